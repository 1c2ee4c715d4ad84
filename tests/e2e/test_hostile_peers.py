"""Peers who try to make a real relay hold memory before or without a token: the relay
closes them, its memory stays bounded, and honest sessions carry on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import asyncssh
import pytest

from tether.core.messages import PROTOCOL_VERSION, Hello, Ping
from tether.transport.link import LinkClosed
from tether.transport.quic import FIRST_MESSAGE_TIMEOUT, connect_quic, load_or_create_certificate
from tether.transport.ssh import MAX_CONNECTIONS_PER_ADDRESS

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_share import join

MiB = 1024 * 1024


def rss(relay: RelayProcess) -> int:
    """The relay process's resident memory, in bytes."""
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _connect(port: int, user: str, **kwargs: object) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", port, username=user, known_hosts=None,
                                  agent_path=None, **kwargs)  # type: ignore[arg-type]


async def _closed_within(conn: asyncssh.SSHClientConnection, seconds: float) -> bool:
    try:
        await asyncio.wait_for(conn.wait_closed(), seconds)
    except TimeoutError:
        return False
    return True


async def _env_flood(port: int, count: int) -> bool:
    """A would-be mate that sends ``count`` 1 kB env requests; whether the relay hung up."""
    conn = await _connect(port, "no-such-token", client_keys=None)
    env = {f"FLOOD_{i}": "v" * 1000 for i in range(count)}
    with contextlib.suppress(asyncssh.Error, OSError):
        await conn.create_process(term_type="xterm", env=env, encoding=None)
    closed = await _closed_within(conn, 20)
    conn.close()
    return closed


def test_env_flood_is_cut_off_and_a_mate_still_joins(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    before = rss(relay)
    closed = asyncio.run(_env_flood(relay.port, 30000))  # 30 MB of env requests
    grown = rss(relay) - before
    print(f"env flood: relay grew {grown / MiB:.1f} MiB, closed: {closed}")
    assert grown < 8 * MiB, f"the relay grew by {grown / MiB:.1f} MiB"
    assert closed, "the relay kept the flooding connection"
    mate = join(mates, tmp_path, host.ssh_rw)
    host.type("echo after-env-flood-$((2*21))")
    mate.wait_text("after-env-flood-42")


async def _ping_flood(port: int, pings: int) -> tuple[int, bool]:
    """A host that says Hello, then sends ``pings`` Pings and never reads a byte.

    Returns how many it got out, and whether the relay closed its channel."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    conn = await _connect(port, "tether-host", client_keys=[key])
    # a small window: what piles up is the relay's, not in flight to this client
    writer, _reader, _ = await conn.open_session(subsystem="tether", encoding=None,
                                                 window=65536)
    writer.write(Hello(PROTOCOL_VERSION, "never reads").encode())
    batch = b"".join(Ping(2**40 + i).encode() for i in range(10000))
    sent = 0
    with contextlib.suppress(asyncssh.Error, OSError):
        while sent < pings and not conn.is_closed():
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), 30)
            sent += 10000
    try:
        await asyncio.wait_for(writer.channel.wait_closed(), 30)
        closed = True
    except TimeoutError:
        closed = False
    conn.close()
    return sent, closed


def test_host_that_pings_and_never_reads_is_cut_off(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    mate = join(mates, tmp_path, host.ssh_rw)
    before = rss(relay)
    # each Pong is 15 bytes: a million of them is well past the 8 MiB bound on
    # unsent bytes, but the ping rate limit ends the link first (the unsent bound
    # itself is tested on a bare link in tests/transport/test_bounds.py)
    sent, closed = asyncio.run(_ping_flood(relay.port, 1_000_000))
    grown = rss(relay) - before
    print(f"ping flood: {sent} pings sent, relay grew {grown / MiB:.1f} MiB, closed: {closed}")
    assert closed, f"the relay kept a host that did not read ({sent} pings sent)"
    assert grown < 24 * MiB, f"the relay grew by {grown / MiB:.1f} MiB"
    assert "pings a second" in relay.log.read_text()
    host.type("echo after-ping-flood-$((3*3))")
    mate.wait_text("after-ping-flood-9")
    mate.type("echo mate-types-after-flood")
    wait_for(lambda: "mate-types-after-flood" in host.screen().split("echo mate-types")[-1],
             10, "mate input after the flood")


async def _fill_address(port: int, limit: int) -> tuple[int, str]:
    """Open connections until the relay refuses one; how many it took, and why it refused."""
    held: list[asyncssh.SSHClientConnection] = []
    why = ""
    try:
        for _ in range(limit):
            try:
                held.append(await _connect(port, "no-such-token", client_keys=None))
            except asyncssh.DisconnectError as exc:
                why = exc.reason
                break
        return len(held), why
    finally:
        for conn in held:
            conn.close()
        for conn in held:
            await _closed_within(conn, 5)


async def _admitted(port: int) -> bool:
    try:
        conn = await _connect(port, "no-such-token", client_keys=None)
    except asyncssh.DisconnectError:
        return False
    conn.close()
    return True


def test_connections_from_one_address_are_capped(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    held, why = asyncio.run(_fill_address(relay.port, MAX_CONNECTIONS_PER_ADDRESS + 8))
    assert "too many connections from your address" in why, (held, why)
    # the host's own connection(s) come from this address too
    assert MAX_CONNECTIONS_PER_ADDRESS - 3 <= held <= MAX_CONNECTIONS_PER_ADDRESS
    assert "refused: too many connections" in relay.log.read_text()
    wait_for(lambda: asyncio.run(_admitted(relay.port)), 10, "the address to be let in again")
    mate = join(mates, tmp_path, host.ssh_rw)
    host.type("echo after-the-crowd")
    mate.wait_text("after-the-crowd")


def test_silent_quic_connections_are_closed(relay: RelayProcess) -> None:
    """(Retry on new connections is tested on the QUIC front in test_bounds.py.)"""
    _, _, fp = load_or_create_certificate(relay.workdir / "keys")

    async def probe() -> float:
        silent = await connect_quic("127.0.0.1", relay.port, fp, timeout=5)
        start = time.monotonic()
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(silent.recv(), FIRST_MESSAGE_TIMEOUT + 5)
        return time.monotonic() - start

    took = asyncio.run(probe())
    assert took < FIRST_MESSAGE_TIMEOUT + 2, took
    assert "no complete message" in relay.log.read_text()
