"""``Connector.race``: every path at once until one gets through.

Against a real relay (``tether.relay.server.Relay``, in this process, unjailed) over
loopback, with the real OpenSSH client: QUIC wins when it works and SSH is then
never started; a QUIC endpoint that does not answer costs ``SSH_AFTER``; a recent
QUIC failure sends SSH at once; a cancelled race leaves no socket or ``ssh``
behind; an SSH ``AuthError`` ends the race. Where an outcome hangs on timing
(two attempts done at once, refusals), fakes stand in for the attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tether.core.errors import AuthError
from tether.core.messages import PROTOCOL_VERSION, Ping, Pong, Welcome
from tether.relay.config import RelayConfig
from tether.relay.server import Relay
from tether.transport import quic as quic_mod
from tether.transport import reconnect
from tether.transport import ssh as ssh_mod
from tether.transport.link import LinkClosed
from tether.transport.openssh import RelayAddress
from tether.transport.reconnect import Connector, QuicInfo

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")

WRONG_PIN = "SHA256:" + "A" * 43

# --- fixtures: a real relay, a host key, a UDP port that never answers -------------


@pytest.fixture(scope="module")
def relay_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of relay keys for the module (RSA generation takes a while)."""
    keys = tmp_path_factory.mktemp("relay-keys")
    ssh_mod.load_or_create_host_keys(keys)
    quic_mod.load_or_create_certificate(keys)
    return keys


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("host") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
async def relay(
    relay_keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Relay]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))  # nothing of this machine's ssh set-up plays a part
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    r = Relay(RelayConfig(keys_dir=relay_keys, bind="127.0.0.1", port=0, jail=False))
    await r.start()
    yield r
    await r.close()


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A UDP port where packets arrive and nothing ever answers (a blackhole)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def closed_udp_port() -> int:
    """A UDP port nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def make_connector(relay: Relay, identity: Path, quic_port: int | None = None,
                   quic_fingerprint: str | None = None, pins: list[str] | None = None) -> Connector:
    """A host's connector for ``relay``, told its QUIC endpoint as a Welcome tells it
    (``quic_port``: another port, e.g. one that never answers)."""
    pins = pins if pins is not None else [fp for _, fp in relay.fingerprints]
    c = Connector(RelayAddress("127.0.0.1", relay.port, pins, [str(identity)]))
    assert relay.quic_port is not None
    c.learn(Welcome(
        PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "ssh rw@x", "ssh ro@x", None,
        quic=(f"127.0.0.1:{quic_port or relay.quic_port}",),
        quic_fingerprint=quic_fingerprint or relay.quic_fingerprint,
    ))
    assert c.quic is not None and c.quic_preferred()
    return c


@dataclass
class Spy:
    """Counts the attempts ``race`` starts (loop times) and keeps what they made."""

    t0: float = 0.0
    ssh: list[float] = field(default_factory=list)
    quic: list[float] = field(default_factory=list)
    links: list[Any] = field(default_factory=list)

    def close_all(self) -> None:
        for link in self.links:
            link.close()


@pytest.fixture
async def spy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Spy]:
    s = Spy(t0=time.monotonic())
    real_ssh, real_quic = reconnect.connect_host, quic_mod.connect_quic

    async def connect_host(addr: RelayAddress, timeout: float = 6.0) -> Any:
        s.ssh.append(time.monotonic() - s.t0)
        link = await real_ssh(addr, timeout)
        s.links.append(link)
        return link

    async def connect_quic(host: str, port: int, fingerprint: str, timeout: float = 5.0) -> Any:
        s.quic.append(time.monotonic() - s.t0)
        link = await real_quic(host, port, fingerprint, timeout)
        s.links.append(link)
        return link

    monkeypatch.setattr(reconnect, "connect_host", connect_host)
    monkeypatch.setattr(quic_mod, "connect_quic", connect_quic)  # imported at each attempt
    yield s
    s.close_all()


# --- what this process holds: UDP sockets, ssh children -----------------------------


def udp_sockets() -> set[str]:
    """Inodes of the UDP sockets this process has open."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            udp.update(line.split()[9] for line in f)
    return mine & udp


def ssh_children() -> set[int]:
    """Our child processes named ssh, zombies included (an unreaped child is a leak too)."""
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == b"ssh":
            kids.add(int(entry))
    return kids


async def until(cond: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def live(link: Any) -> None:
    """The link reaches the relay: its end answers a ping (QUIC: a datagram)."""
    link.send_datagram(Ping(7))
    assert await asyncio.wait_for(link.recv(), 5) == Pong(7)


# --- real paths ------------------------------------------------------------------------


async def test_quic_wins_and_ssh_is_never_started(
    relay: Relay, identity: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconnect, "SSH_AFTER", 5.0)  # room for a loaded machine
    c = make_connector(relay, identity)
    c.quic_failed_at = time.monotonic() - reconnect.UPGRADE_AFTER - 1  # long ago: QUIC again
    before = ssh_children()
    link = await asyncio.wait_for(c.race(), 10)
    assert link.kind == "quic"
    await live(link)
    assert spy.ssh == [], "QUIC got through within SSH_AFTER: no ssh was started"
    assert ssh_children() == before
    assert len(spy.quic) == 1 and spy.links == [link]
    assert c.quic_failed_at is None, "QUIC works: it is preferred again"
    assert not link.closed


@pytest.mark.parametrize("endpoint", ["silent", "closed"])
async def test_quic_that_never_answers_falls_back_to_ssh_after_ssh_after(
    relay: Relay, identity: Path, spy: Spy, silent_udp: int, endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.6)
    monkeypatch.setattr(reconnect, "PROBE_EVERY", 0.2)
    monkeypatch.setattr(reconnect, "QUIC_TIMEOUT", 0.3)
    port = silent_udp if endpoint == "silent" else closed_udp_port()
    c = make_connector(relay, identity, quic_port=port)
    before = udp_sockets()
    start = time.monotonic()
    spy.t0 = start
    link = await asyncio.wait_for(c.race(), 10)
    took = time.monotonic() - start
    assert link.kind == "ssh"
    assert spy.ssh and spy.ssh[0] >= 0.6, f"ssh started at {spy.ssh}, before SSH_AFTER"
    assert 0.6 <= took < 0.6 + 10  # plus an OpenSSH start and handshake
    assert len(spy.ssh) == 1
    assert len(spy.quic) >= 3, "QUIC was tried again every PROBE_EVERY meanwhile"
    assert all(q < took for q in spy.quic)
    assert c.quic_failed_at is not None and start < c.quic_failed_at <= time.monotonic()
    assert not c.quic_preferred()
    assert "QUIC" in c.last_error
    await until(lambda: not (udp_sockets() - before), "the QUIC attempts' sockets to close")
    # the SSH link is a real one to the relay, which now waits for our Hello
    assert not link.closed


async def test_a_recent_quic_failure_sends_ssh_at_once_and_no_quic(
    relay: Relay, identity: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def attempt(self: Connector) -> Any:
        nonlocal calls
        calls += 1
        raise LinkClosed("not expected")

    monkeypatch.setattr(Connector, "_quic_attempt", attempt)
    c = make_connector(relay, identity)  # QUIC works: it would win if tried
    failed = c.quic_failed_at = time.monotonic() - 1.0
    spy.t0 = time.monotonic()
    link = await asyncio.wait_for(c.race(), 10)
    assert link.kind == "ssh"
    assert spy.ssh[0] < 1.0 < reconnect.SSH_AFTER, "SSH went at once, not after SSH_AFTER"
    assert calls == 0 and spy.quic == [], "no QUIC attempt while it recently failed"
    assert c.quic_failed_at is not None and c.quic_failed_at > failed


async def test_quic_is_raced_again_once_upgrade_after_has_passed(
    relay: Relay, identity: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A race that started on SSH alone takes QUIC up when it is preferred again;
    the SSH attempt still running is then cancelled."""
    monkeypatch.setattr(reconnect, "UPGRADE_AFTER", 0.5)
    ssh_cancelled = asyncio.Event()

    async def hanging_ssh(addr: RelayAddress, timeout: float = 6.0) -> Any:
        spy.ssh.append(time.monotonic() - spy.t0)
        try:
            await asyncio.Event().wait()
        finally:
            ssh_cancelled.set()

    monkeypatch.setattr(reconnect, "connect_host", hanging_ssh)
    c = make_connector(relay, identity)
    spy.t0 = time.monotonic()
    c.quic_failed_at = time.monotonic()
    link = await asyncio.wait_for(c.race(), 10)
    assert link.kind == "quic"
    await live(link)
    assert spy.ssh and spy.ssh[0] < 0.3
    assert spy.quic and spy.quic[0] >= 0.5, "QUIC only once UPGRADE_AFTER had passed"
    await asyncio.wait_for(ssh_cancelled.wait(), 5)
    assert c.quic_failed_at is None


async def test_a_dead_endpoint_does_not_hold_up_a_live_one(
    relay: Relay, identity: Path, spy: Spy, silent_udp: int
) -> None:
    c = make_connector(relay, identity)
    assert c.quic is not None
    c.quic.endpoints.insert(0, ("127.0.0.1", silent_udp))
    before = udp_sockets()
    start = time.monotonic()
    link = await asyncio.wait_for(c.race(), 10)
    assert link.kind == "quic" and time.monotonic() - start < reconnect.QUIC_TIMEOUT
    assert len(spy.quic) == 2 and spy.quic[1] - spy.quic[0] < 0.5, "both endpoints at once"
    await live(link)
    # the handshake to the dead endpoint was dropped with its socket: only the winner's
    await until(lambda: len(udp_sockets() - before) == 1, "the loser's socket to close")
    link.close()
    await until(lambda: not (udp_sockets() - before), "the winner's socket to close")


async def test_cancelling_a_race_leaves_no_socket_and_no_ssh(
    spy: Spy, silent_udp: int, tmp_path: Path, identity: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.1)
    monkeypatch.setattr(reconnect, "PROBE_EVERY", 0.1)
    monkeypatch.setattr(reconnect, "QUIC_TIMEOUT", 30.0)  # every attempt still running

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # never says a word: ssh waits for its banner
        writer.close()

    tcp = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        port = tcp.sockets[0].getsockname()[1]
        c = Connector(RelayAddress("127.0.0.1", port, [WRONG_PIN], [str(identity)]),
                      quic=QuicInfo([("127.0.0.1", silent_udp)], "SHA256:" + "00" * 32))
        udp_before, ssh_before = udp_sockets(), ssh_children()
        race = asyncio.create_task(c.race())
        await until(lambda: ssh_children() - ssh_before, "ssh to start")
        await until(lambda: len(udp_sockets() - udp_before) >= 3, "three QUIC attempts")
        assert not race.done()
        race.cancel()
        with pytest.raises(asyncio.CancelledError):
            await race
        await until(lambda: not (udp_sockets() - udp_before), "every QUIC socket to close")
        await until(lambda: not (ssh_children() - ssh_before), "ssh to be ended and reaped")
        assert spy.links == [], "nothing got through"
    finally:
        tcp.close()


async def test_an_ssh_auth_error_ends_the_race(
    relay: Relay, identity: Path, spy: Spy, silent_udp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's key is not the pinned one: no use racing on; QUIC attempts stop."""
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.3)
    monkeypatch.setattr(reconnect, "PROBE_EVERY", 0.1)
    monkeypatch.setattr(reconnect, "QUIC_TIMEOUT", 30.0)
    c = make_connector(relay, identity, quic_port=silent_udp, pins=[WRONG_PIN])
    before = udp_sockets()
    with pytest.raises(AuthError, match="mismatch"):
        await asyncio.wait_for(c.race(), 10)
    assert len(spy.ssh) == 1 and len(spy.quic) >= 3
    await until(lambda: not (udp_sockets() - before), "the QUIC attempts' sockets to close")


async def test_a_refusal_over_ssh_propagates_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def refused(addr: RelayAddress, timeout: float = 6.0) -> Any:
        nonlocal calls
        calls += 1
        raise AuthError("relay 127.0.0.1:1 refused our key (Permission denied)")

    monkeypatch.setattr(reconnect, "connect_host", refused)
    monkeypatch.setattr(reconnect, "SSH_EVERY", 0.05)
    c = Connector(RelayAddress("127.0.0.1", 1))
    with pytest.raises(AuthError, match="refused our key"):
        await asyncio.wait_for(c.race(), 5)
    assert calls == 1, "a refusal is not retried"


async def test_a_quic_certificate_mismatch_does_not_end_the_race(
    relay: Relay, identity: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike SSH's, a QUIC certificate that is not the pinned one is noted and
    the race goes on to SSH (which checks the relay's key itself)."""
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.3)
    c = make_connector(relay, identity, quic_fingerprint="SHA256:" + "00" * 32)
    link = await asyncio.wait_for(c.race(), 10)
    assert link.kind == "ssh"
    assert "mismatch" in c.cert_error and relay.quic_fingerprint in c.cert_error
    assert spy.quic and not any(lk.kind == "quic" for lk in spy.links)
    assert c.quic_failed_at is not None


# --- timing the attempts by hand ----------------------------------------------------------


class FakeLink:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.description = kind
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_ssh_is_tried_again_until_it_gets_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconnect, "SSH_EVERY", 0.05)
    tries: list[float] = []
    made = FakeLink("ssh")

    async def flaky(addr: RelayAddress, timeout: float = 6.0) -> Any:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise LinkClosed("ssh: Connection refused")
        return made

    monkeypatch.setattr(reconnect, "connect_host", flaky)
    c = Connector(RelayAddress("127.0.0.1", 1))  # no QUIC known: SSH alone, at once
    assert await asyncio.wait_for(c.race(), 5) is made
    assert len(tries) == 3 and c.last_error == "ssh: Connection refused"
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(tries))
    assert c.quic_failed_at is None, "no QUIC to have failed"


async def test_a_race_on_ssh_alone_waits_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = 0
    real_wait = asyncio.wait

    class CountingAsyncio:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        async def wait(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal waits
            waits += 1
            return await real_wait(*args, **kwargs)

    async def slow_ssh(addr: RelayAddress, timeout: float = 6.0) -> FakeLink:
        await asyncio.sleep(0.5)  # an SSH handshake over a long path
        return FakeLink("ssh")

    monkeypatch.setattr(reconnect, "asyncio", CountingAsyncio())
    monkeypatch.setattr(reconnect, "connect_host", slow_ssh)
    c = Connector(RelayAddress("127.0.0.1", 1))  # the bootstrap: no QUIC known yet
    assert (await asyncio.wait_for(c.race(), 5)).kind == "ssh"
    assert waits <= 5, f"race() woke {waits} times in 0.5 s with nothing due"


async def test_of_two_attempts_done_at_once_the_loser_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.0)
    monkeypatch.setattr(reconnect, "PROBE_EVERY", 30.0)
    gate = asyncio.Event()
    made: list[FakeLink] = []

    async def attempt(kind: str) -> FakeLink:
        await gate.wait()
        made.append(FakeLink(kind))
        return made[-1]

    async def quic_attempt(self: Connector) -> FakeLink:
        return await attempt("quic")

    async def connect_host(addr: RelayAddress, timeout: float = 6.0) -> FakeLink:
        return await attempt("ssh")

    monkeypatch.setattr(Connector, "_quic_attempt", quic_attempt)
    monkeypatch.setattr(reconnect, "connect_host", connect_host)
    c = Connector(RelayAddress("127.0.0.1", 1), quic=QuicInfo([("127.0.0.1", 1)], "SHA256:x"))
    race = asyncio.create_task(c.race())
    for _ in range(5):
        await asyncio.sleep(0)  # both attempts start and wait at the gate
    gate.set()
    won = await asyncio.wait_for(race, 5)
    assert sorted(lk.kind for lk in made) == ["quic", "ssh"]
    (lost,) = [lk for lk in made if lk is not won]
    assert lost.closed and not won.closed
    assert (c.quic_failed_at is None) == (won.kind == "quic")


async def test_attempts_still_running_when_one_wins_are_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUIC every PROBE_EVERY: several are in flight when the last one started wins."""
    monkeypatch.setattr(reconnect, "PROBE_EVERY", 0.05)
    monkeypatch.setattr(reconnect, "SSH_AFTER", 0.1)
    started: list[asyncio.Future[FakeLink]] = []
    cancelled: list[int] = []
    ssh_cancelled = asyncio.Event()

    async def quic_attempt(self: Connector) -> FakeLink:
        fut: asyncio.Future[FakeLink] = asyncio.get_running_loop().create_future()
        started.append(fut)
        n = len(started)
        try:
            return await fut
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    async def connect_host(addr: RelayAddress, timeout: float = 6.0) -> FakeLink:
        try:
            await asyncio.Event().wait()
        finally:
            ssh_cancelled.set()
        raise AssertionError("unreachable")

    monkeypatch.setattr(Connector, "_quic_attempt", quic_attempt)
    monkeypatch.setattr(reconnect, "connect_host", connect_host)
    c = Connector(RelayAddress("127.0.0.1", 1), quic=QuicInfo([("127.0.0.1", 1)], "SHA256:x"))
    race = asyncio.create_task(c.race())
    await until(lambda: len(started) >= 4, "four QUIC attempts")
    assert not race.done()
    winner = FakeLink("quic")
    started[-1].set_result(winner)
    assert await asyncio.wait_for(race, 5) is winner
    await asyncio.wait_for(ssh_cancelled.wait(), 5)
    await until(lambda: len(cancelled) == len(started) - 1, "the other attempts to be cancelled")
    assert not winner.closed
