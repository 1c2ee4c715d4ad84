"""A host that sends garbage gets a clear error and a closed connection; other sessions
carry on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from tether.core.messages import (
    PROTOCOL_VERSION,
    Error,
    Event,
    Hello,
    MessageDecoder,
    Output,
    Welcome,
)

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_share import join


async def _raw_host(port: int, payloads: list[bytes]) -> list[object]:
    """Speak to the relay as a host would, but send ``payloads`` verbatim."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with asyncssh.connect("127.0.0.1", port, username="tether-host", client_keys=[key],
                                known_hosts=None, agent_path=None) as conn:
        writer, reader, _ = await conn.open_session(subsystem="tether", encoding=None)
        for p in payloads:
            writer.write(p)
        decoder = MessageDecoder()
        got: list[object] = []
        async with asyncio.timeout(15):
            while data := await reader.read(65536):
                got.extend(decoder.feed(data))
        return got  # the relay closed the channel


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

