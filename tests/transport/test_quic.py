"""QUIC links on loopback: certificate pinning, framing both ways, liveness datagrams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tether.core.errors import AuthError
from tether.core.messages import Ack, Hello, InputAck, Notice, Output, Ping, Pong
from tether.transport import quic as quic_mod
from tether.transport.link import LinkClosed
from tether.transport.quic import (
    QuicLink,
    connect_quic,
    load_or_create_certificate,
    start_quic_server,
)


async def _server(keys: Path) -> tuple[object, int, str, asyncio.Queue[QuicLink]]:
    cert, key, fp = load_or_create_certificate(keys)
    links: asyncio.Queue[QuicLink] = asyncio.Queue()

    async def on_host(link: QuicLink) -> None:
        await links.put(link)

    server = await start_quic_server("127.0.0.1", 0, cert, key, on_host)
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
    return server, port, fp, links


async def test_certificate_fingerprint_is_pinned(tmp_path: Path) -> None:
    server, port, fp, _ = await _server(tmp_path / "keys")
    try:
        wrong = "SHA256:" + "00" * 32
        with pytest.raises(AuthError) as err:
            await connect_quic("127.0.0.1", port, wrong, timeout=5)
        assert "mismatch" in str(err.value)
        assert wrong in str(err.value) and fp in str(err.value)
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_messages_flow_both_ways_and_pings_are_answered(tmp_path: Path) -> None:
    server, port, fp, links = await _server(tmp_path / "keys")
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        client.send_nowait(Hello(1, "test"))
        big = Output(3, bytes(range(256)) * 2000)
        await client.send(big)
        relay_side = await asyncio.wait_for(links.get(), 5)
        assert await asyncio.wait_for(relay_side.recv(), 5) == Hello(1, "test")
        assert await asyncio.wait_for(relay_side.recv(), 5) == big
        relay_side.send_nowait(Notice("hi"))
        assert await asyncio.wait_for(client.recv(), 5) == Notice("hi")
        client.send_datagram(Ping(7))
        assert await asyncio.wait_for(client.recv(), 5) == Pong(7)
        client.close()
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(relay_side.recv(), 30)
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_certificate_survives_restarts(tmp_path: Path) -> None:
    _, _, fp1 = load_or_create_certificate(tmp_path)
    _, _, fp2 = load_or_create_certificate(tmp_path)
    assert fp1 == fp2 and fp1.startswith("SHA256:") and len(fp1) == 7 + 64


async def test_probe_backoff_is_capped(tmp_path: Path) -> None:
    """Consecutive probe timeouts double the timer at most MAX_PTO_BACKOFF times."""
    from tether.transport.quic import MAX_PTO_BACKOFF

    server, port, fp, _ = await _server(tmp_path / "keys")
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        loss = client._quic._loss  # aioquic's loss recovery, which the link adjusts
        now = asyncio.get_running_loop().time()
        for _ in range(6):  # six probe timeouts in a row, no ack in between
            loss.on_loss_detection_timeout(now=now)
        assert loss._pto_count == MAX_PTO_BACKOFF  # unbounded, it would be 6
        client.close()
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_acks_go_as_datagrams_and_the_last_is_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost ack must not hold up the ordered stream, and the last one is sent again."""
    monkeypatch.setattr(quic_mod, "ACK_REPEAT", 0.2)
    server, port, fp, links = await _server(tmp_path / "keys")
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        client.send_nowait(Hello(1, "test"))
        relay_side = await asyncio.wait_for(links.get(), 5)
        assert await asyncio.wait_for(relay_side.recv(), 5) == Hello(1, "test")
        sent_before = relay_side.bytes_sent
        relay_side.send_ack(Ack(3))
        relay_side.send_ack(Ack(5))  # supersedes 3: only 5 is repeated
        relay_side.send_ack(InputAck(1, 2))
        assert relay_side.bytes_sent == sent_before  # nothing went on the stream
        got = [await asyncio.wait_for(client.recv(), 5) for _ in range(5)]
        assert got[:3] == [Ack(3), Ack(5), InputAck(1, 2)]
        assert sorted(got[3:], key=repr) == [Ack(5), InputAck(1, 2)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.recv(), 0.5)  # repeated once, not forever
        client.close()
    finally:
        server.close()  # type: ignore[attr-defined]
