"""A host that sends garbage gets a clear error and a closed connection; other sessions
carry on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import asyncssh

from tether.core.messages import (
    PROTOCOL_VERSION,
    Bindings,
    Error,
    Event,
    Hello,
    MessageDecoder,
    Output,
    Ping,
    Pong,
    Snapshot,
    Status,
    Structure,
    Welcome,
    Window,
)
from tether.core.tokens import new_token

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_share import join


async def _raw_host(port: int, payloads: list[bytes]) -> list[object]:
    """Speak to the relay as a host would, but send ``payloads`` verbatim; what the
    relay said until it closed the channel."""
    return await _host_until(port, payloads, None)


def test_garbage_frame_gets_an_error_and_other_sessions_carry_on(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    mate = join(mates, tmp_path, host.ssh_rw)
    # a length prefix with bytes that are not msgpack
    got = asyncio.run(_raw_host(relay.port, [b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1"]))
    assert any(isinstance(m, Error) and "undecodable" in m.message for m in got), got
    # a frame claiming 1 GB: refused before anything is buffered
    got = asyncio.run(_raw_host(relay.port, [b"\x40\x00\x00\x00garbage"]))
    assert any(isinstance(m, Error) and "exceeds" in m.message for m in got), got
    # a valid hello, then an event out of order (the first must be a snapshot)
    hello = Hello(PROTOCOL_VERSION, "hostile").encode()
    got = asyncio.run(_raw_host(relay.port, [hello, Event(7, Output(0, b"boo")).encode()]))
    assert isinstance(got[0], Welcome)
    assert any(isinstance(m, Error) and "snapshot" in m.message for m in got), got
    # a wrong protocol version
    got = asyncio.run(_raw_host(relay.port, [Hello(PROTOCOL_VERSION + 1, "future").encode()]))
    assert any(isinstance(m, Error) and "not supported" in m.message for m in got), got
    # the honest session is untouched
    host.type("echo still-here-$((3*3))")
    mate.wait_text("still-here-9")
    mate.type("echo mate-still-types")
    wait_for(lambda: "mate-still-types" in host.screen().split("echo mate-still-types")[-1], 10,
             "mate input after the hostile hosts")



async def _host_until(port: int, payloads: list[bytes], want: type | None,
                      key: asyncssh.SSHKey | None = None) -> list[object]:
    """Send ``payloads`` as a host; what the relay said until a message of type
    ``want`` arrived (None: until it closed the channel)."""
    key = key or asyncssh.generate_private_key("ssh-ed25519")
    async with asyncssh.connect("127.0.0.1", port, username="tether-host", client_keys=[key],
                                known_hosts=None, agent_path=None) as conn:
        writer, reader, _ = await conn.open_session(subsystem="tether", encoding=None)
        for p in payloads:
            writer.write(p)
        decoder = MessageDecoder()
        got: list[object] = []
        async with asyncio.timeout(15):
            while want is None or not any(isinstance(m, want) for m in got):
                data = await reader.read(65536)
                if not data:
                    break
                got.extend(decoder.feed(data))
        return got


SNAPSHOT = Snapshot(Structure((Window(0, 0, "w", "b25d,80x24,0,0,0", 0),), 0), Status(()),
                    Bindings("C-b", ()))


def test_a_malformed_status_is_data_not_a_crash(relay: RelayProcess) -> None:
    """A status row count of 5,000 digits raised an uncaught ValueError in the relay's
    host handler (Python refuses to convert such a string to an int)."""
    hello = Hello(PROTOCOL_VERSION, "odd-status").encode()
    status = Status((("status", "9" * 5000),))
    got = asyncio.run(_host_until(relay.port, [
        hello, Event(1, SNAPSHOT).encode(), Event(2, status).encode(), Ping(7).encode(),
    ], Pong))  # fmt: skip
    assert Pong(7) in got, got
    assert "Traceback" not in relay.log.read_text()


def test_a_hosts_window_name_runs_nothing_on_the_relay(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    """An ordinary rename (tmux's own '##' is one '#') made the replica run the name."""
    host.tmux("rename-window", "##(cd; id > pwned-name)")
    mate = join(mates, tmp_path, host.ssh_ro)
    mate.wait_text("#(cd; id > pwned-name)")  # shown, as the host's own tmux shows it
    assert relay.replica_dirs(), "no replica directories to look in"
    assert not [p for d in relay.replica_dirs() for p in d.glob("pwned*")]


def test_knowing_a_token_does_not_squat_it_after_a_relay_restart(
    tmp_path: Path, mates: list[Mate]
) -> None:
    """A host re-creating its session chose its old tokens if they were free, so
    whoever knew only the read-only token could register it first after a restart
    and show its viewers another screen."""
    relay = RelayProcess(tmp_path / "relay")
    port = relay.port
    h = Host(tmp_path / "host", relay.conf())
    agent = h.agent_pid()
    try:
        rw, ro = h.ssh_rw, h.ssh_ro
        ro_token = ro.split()[-1].split("@")[0]
        os.kill(agent, signal.SIGSTOP)  # the real host stays away during the attack
        relay.close()
        seen = len(relay.log.read_text())
        relay = RelayProcess(tmp_path / "relay", port)
        squat = Hello(PROTOCOL_VERSION, "squatter", session="0123456789abcdef",
                      secret=os.urandom(32), rw_token=new_token(), ro_token=ro_token)
        got = asyncio.run(_host_until(port, [squat.encode(), Event(1, SNAPSHOT).encode()],
                                      Welcome))
        welcome = next(m for m in got if isinstance(m, Welcome))
        assert ro_token not in (welcome.ro_token, welcome.rw_token)
        os.kill(agent, signal.SIGCONT)
        # the log names a session's tokens by their first four characters
        wait_for(lambda: f", {ro_token[:4]}...)" in relay.log.read_text()[seen:], 30,
                 "the host to re-create its session on the restarted relay")
        wait_for(lambda: (h.ssh_rw, h.ssh_ro) == (rw, ro), 10, "the host's own tokens")
        h.type("echo the-real-host")
        viewer = join(mates, tmp_path, ro, name="viewer")
        viewer.wait_text("the-real-host", 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent, signal.SIGCONT)
        h.close()
        relay.close()
