"""What a hostile peer can make the relay's fronts hold, before or without a token.

Real transport servers in-process (the SSH front on asyncssh, the QUIC front on
aioquic) with their bounds made small or short, against real asyncssh and aioquic
clients that misbehave. Every wait has a deadline; none is a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from tether.core.messages import Hello, Notice, Output
from tether.transport import quic as quic_mod
from tether.transport.link import MAX_UNSENT, LinkClosed
from tether.transport.quic import QuicLink, connect_quic, load_or_create_certificate
from tether.transport.ssh import (
    MAX_CHANNELS,
    MAX_ENV_REQUESTS,
    REQUEST_BURST,
    MateTerminal,
    SSHLink,
    start_ssh_server,
    wait_closed,
)

IDLE = 2.0
PER_ADDRESS = 3


class Front:
    """The SSH front with a short idle timeout and a small per-address cap."""

    def __init__(self) -> None:
        self.mates: list[MateTerminal] = []
        self.mate_reads = True
        self.host_result: asyncio.Future[tuple[int, str]] | None = None

    async def start(self) -> None:
        async def on_host(link: SSHLink, key_fp: str, peer: str) -> None:
            # answer like the relay does, without end, and report how it ended
            assert self.host_result is not None
            await link.recv()
            sent = 0
            try:
                for i in range(10**6):
                    link.send_nowait(Notice("x" * 1000 + str(i)))
                    sent += 1
                    if i % 100 == 0:
                        await asyncio.sleep(0)  # let the socket take what it can
                self.host_result.set_result((sent, "never closed"))
            except LinkClosed as exc:
                self.host_result.set_result((sent, str(exc)))

        async def on_mate(mate: MateTerminal) -> None:
            self.mates.append(mate)
            mate.write(b"hello mate\r\n")
            while self.mate_reads and await mate.read():
                pass
            if not self.mate_reads:
                await asyncio.Event().wait()  # a relay busy elsewhere: reads nothing

        self.acceptor = await start_ssh_server(
            "127.0.0.1", 0, [asyncssh.generate_private_key("ssh-ed25519")], on_host,
            on_mate, idle_timeout=IDLE, max_per_address=PER_ADDRESS,
        )
        self.port = self.acceptor.get_port()

    async def connect(self, user: str = "some-token") -> asyncssh.SSHClientConnection:
        return await asyncssh.connect("127.0.0.1", self.port, username=user, known_hosts=None,
                                      client_keys=None, agent_path=None)


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    f = Front()
    await f.start()
    yield f
    await wait_closed(f.acceptor)


async def closed_within(conn: asyncssh.SSHClientConnection, seconds: float) -> float:
    """How long ``conn`` took to be closed by the server (fails past ``seconds``)."""
    start = time.monotonic()
    await asyncio.wait_for(conn.wait_closed(), seconds)
    return time.monotonic() - start


async def test_logged_in_connection_without_a_session_is_closed(front: Front) -> None:
    idle = await front.connect()
    logged_in = time.monotonic()  # the server's idle timer started a little before
    busy = await front.connect()
    proc = await busy.create_process(term_type="xterm", encoding=None)
    assert await asyncio.wait_for(proc.stdout.readuntil(b"\n"), 5) == b"hello mate\r\n"
    await closed_within(idle, IDLE + 4)
    assert time.monotonic() - logged_in >= IDLE - 0.5
    # the one with a session has been logged in as long, and carries on
    proc.stdin.write(b"still here")
    await asyncio.wait_for(proc.stdin.drain(), 5)
    assert not busy.is_closed()
    # once its session ends, its idle time starts
    proc.stdin.write_eof()
    await closed_within(busy, IDLE + 4)


async def test_connections_per_address_are_capped(front: Front) -> None:
    held = [await front.connect() for _ in range(PER_ADDRESS)]
    with pytest.raises(asyncssh.DisconnectError) as refused:
        await front.connect()
    assert "too many connections from your address" in refused.value.reason
    held.pop().close()
    # the freed place is taken again (the server counts it once the close reached it)
    deadline = time.monotonic() + 5
    while True:
        try:
            held.append(await front.connect())
            break
        except asyncssh.DisconnectError:
            assert time.monotonic() < deadline, "a closed connection kept its place"
            await asyncio.sleep(0.05)
    for conn in held:
        conn.close()


async def test_env_flood_is_refused_and_disconnected(front: Front) -> None:
    conn = await front.connect()
    env = {f"FLOOD_{i}": "v" * 1000 for i in range(30000)}
    with contextlib.suppress(asyncssh.Error, OSError):
        await conn.create_process(term_type="xterm", env=env, encoding=None)
    await closed_within(conn, 10)
    assert not front.mates, "the flooder got a session"
    # a few are refused, not fatal, and a normal mate still gets in
    calm = await front.connect()
    proc = await calm.create_process(term_type="xterm", env={"LANG": "C.UTF-8"}, encoding=None)
    assert await asyncio.wait_for(proc.stdout.readuntil(b"\n"), 5) == b"hello mate\r\n"
    assert MAX_ENV_REQUESTS >= 16
    calm.close()


async def test_resize_flood_at_a_session_that_does_not_read(front: Front) -> None:
    front.mate_reads = False
    conn = await front.connect()
    proc = await conn.create_process(term_type="xterm", encoding=None)
    await asyncio.wait_for(proc.stdout.readuntil(b"\n"), 5)
    with contextlib.suppress(asyncssh.Error, OSError):
        for i in range(REQUEST_BURST * 40):
            proc.change_terminal_size(80 + i % 50, 24)
            if i % 64 == 0:
                await asyncio.sleep(0)
                if conn.is_closed():
                    break
    await closed_within(conn, 10)


async def test_channels_per_connection_are_capped(front: Front) -> None:
    front.mate_reads = False
    conn = await front.connect()
    procs = [await conn.create_process(term_type="xterm", encoding=None)
             for _ in range(MAX_CHANNELS)]
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.create_process(term_type="xterm", encoding=None)
    assert len(procs) == MAX_CHANNELS and not conn.is_closed()
    conn.close()


async def test_ssh_link_to_a_peer_that_does_not_read_is_closed(front: Front) -> None:
    front.host_result = asyncio.get_running_loop().create_future()
    key = asyncssh.generate_private_key("ssh-ed25519")
    conn = await asyncssh.connect("127.0.0.1", front.port, username="tether-host",
                                  client_keys=[key], known_hosts=None, agent_path=None)
    writer, _reader, _ = await conn.open_session(subsystem="tether", encoding=None)
    writer.write(Hello(1, "never reads").encode())
    sent, why = await asyncio.wait_for(front.host_result, 60)
    assert "did not read" in why, why
    # what it held: the bound, and the client's window (asyncssh's 2 MiB)
    assert sent * 1000 < MAX_UNSENT + 4 * 1024 * 1024
    await closed_within(conn, 10)


# --- QUIC ---------------------------------------------------------------------------


async def _quic_server(
    keys: Path, first: float = 1.0
) -> tuple[object, int, str, asyncio.Queue[QuicLink]]:
    cert, key, fp = load_or_create_certificate(keys)
    links: asyncio.Queue[QuicLink] = asyncio.Queue()

    async def on_host(link: QuicLink) -> None:
        await links.put(link)

    server = await quic_mod.start_quic_server("127.0.0.1", 0, cert, key, on_host,
                                              first_message_timeout=first)
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
    return server, port, fp, links


async def test_quic_connection_without_a_message_is_closed(tmp_path: Path) -> None:
    server, port, fp, links = await _quic_server(tmp_path / "keys", first=1.0)
    try:
        start = time.monotonic()  # before the server's timer for it starts
        silent = await connect_quic("127.0.0.1", port, fp, timeout=5)
        talker = await connect_quic("127.0.0.1", port, fp, timeout=5)
        talker.send_nowait(Hello(1, "prompt"))
        with pytest.raises(LinkClosed) as closed:
            await asyncio.wait_for(silent.recv(), 5)
        assert 0.9 <= time.monotonic() - start < 6
        assert "no message" in str(closed.value)
        # the one that spoke in time is served, and stays
        relay_side = await asyncio.wait_for(links.get(), 5)
        assert await asyncio.wait_for(relay_side.recv(), 5) == Hello(1, "prompt")
        relay_side.send_nowait(Notice("welcome"))
        assert await asyncio.wait_for(talker.recv(), 5) == Notice("welcome")
        assert not talker.closed
        talker.close()
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_quic_server_answers_a_new_connection_with_retry(tmp_path: Path) -> None:
    server, port, fp, _ = await _quic_server(tmp_path / "keys")
    try:
        assert await first_reply_type(port) == QuicPacketType.RETRY
        # and a real client still gets through (it echoes the token)
        link = await connect_quic("127.0.0.1", port, fp, timeout=5)
        link.close()
    finally:
        server.close()  # type: ignore[attr-defined]


async def first_reply_type(port: int) -> QuicPacketType:
    """Send one client Initial from a plain UDP socket; the type of the reply's packet."""
    client = QuicConnection(configuration=quic_mod._config(is_client=True))
    client.connect(("127.0.0.1", port), now=time.monotonic())
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for data, _addr in client.datagrams_to_send(now=time.monotonic()):
            await loop.sock_sendto(sock, data, ("127.0.0.1", port))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
    header = pull_quic_header(Buffer(data=reply), host_cid_length=8)
    return header.packet_type


async def test_quic_link_to_a_peer_that_acks_nothing_is_closed(tmp_path: Path) -> None:
    server, port, fp, links = await _quic_server(tmp_path / "keys")
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        client.send_nowait(Hello(1, "deaf"))
        relay_side = await asyncio.wait_for(links.get(), 5)
        await asyncio.wait_for(relay_side.recv(), 5)
        client.datagram_received = lambda data, addr: None  # type: ignore[method-assign]
        with pytest.raises(LinkClosed) as closed:
            for i in range(MAX_UNSENT // 30000 + 100):
                relay_side.send_nowait(Notice("x" * 30000 + str(i)))
                assert relay_side._unacked() <= MAX_UNSENT
                if i % 10 == 0:
                    await asyncio.sleep(0)
        assert "did not read" in str(closed.value)
        assert relay_side.closed
        client.close()
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_quic_peer_cannot_push_more_than_the_inbox_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quic_mod, "MAX_INBOX", 2 * 1024 * 1024)
    server, port, fp, links = await _quic_server(tmp_path / "keys")
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        client.send_nowait(Hello(1, "pusher"))
        relay_side = await asyncio.wait_for(links.get(), 5)  # ... which reads no more
        with pytest.raises(LinkClosed):
            for i in range(100):  # 6 MB at most, three times the bound
                await asyncio.wait_for(client.send(Output(1, bytes(60000) + bytes([i]))), 10)
            await asyncio.wait_for(client.recv(), 10)
        assert relay_side.closed and "ahead" in relay_side.reason
    finally:
        server.close()  # type: ignore[attr-defined]
