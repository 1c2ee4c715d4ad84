"""A host link's lazy acks (``transport.quic.LAZY_ACK_DELAY``), on real aioquic
links over loopback: scheduled late on a quiet path and carried by data, and
back to 20 ms at both ends once a packet is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tether.core.messages import Notice
from tether.transport import quic as quic_mod
from tether.transport.quic import (
    ACK_DELAY,
    LAZY_ACK_ALLOWANCE,
    LAZY_ACK_DELAY,
    QuicLink,
    connect_quic,
    load_or_create_certificate,
    start_quic_server,
)


class Pair:
    def __init__(self, server: Any, client: QuicLink, relay: QuicLink) -> None:
        self.server = server
        self.client = client
        self.relay = relay


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    cert, key, fp = load_or_create_certificate(tmp_path / "keys")
    links: asyncio.Queue[QuicLink] = asyncio.Queue()

    async def on_host(link: QuicLink) -> None:
        await links.put(link)

    server = await start_quic_server("127.0.0.1", 0, cert, key, on_host)
    port = server._transport.get_extra_info("sockname")[1]
    client = await connect_quic("127.0.0.1", port, fp, timeout=5)
    client.send_nowait(Notice("hello"))
    relay = await asyncio.wait_for(links.get(), 5)
    assert await asyncio.wait_for(relay.recv(), 5) == Notice("hello")
    await settled(client, relay)
    try:
        yield Pair(server, client, relay)
    finally:
        client.close()
        server.close()


async def exchange(a: QuicLink, b: QuicLink, text: str) -> None:
    a.send_nowait(Notice(text))
    assert await asyncio.wait_for(b.recv(), 5) == Notice(text)


async def settled(*links: QuicLink) -> None:
    """Until no ack is pending on ``links`` (the one after the handshake, or
    for the last message): the next packet is then acked on its own clock."""
    deadline = time.monotonic() + 5
    while any(ack_due(link) is not None for link in links):
        assert time.monotonic() < deadline, "acks still pending after 5 s"
        await asyncio.sleep(0.005)


def ack_due(link: QuicLink) -> float | None:
    """Seconds from now until ``link`` sends its pending ack (None: none pending)."""
    at = link._ack_space().ack_at  # type: ignore[union-attr]
    return None if at is None else at - link._loop.time()


def count_datagrams(link: QuicLink) -> list[int]:
    """Every datagram ``link`` sends from now on, by size."""
    sizes: list[int] = []
    original = link._quic.datagrams_to_send

    def counted(now: float) -> list[tuple[bytes, Any]]:
        out = original(now=now)
        sizes.extend(len(d) for d, _ in out)
        return out

    link._quic.datagrams_to_send = counted  # type: ignore[method-assign]
    return sizes


async def test_without_lazy_acks_a_lone_ack_goes_after_20_ms(pair: Pair) -> None:
    await exchange(pair.client, pair.relay, "key")
    due = ack_due(pair.relay)
    assert due is not None and due <= ACK_DELAY


async def test_on_a_quiet_path_the_ack_waits_and_rides_on_data(pair: Pair) -> None:
    pair.client.enable_lazy_acks()
    pair.relay.enable_lazy_acks()
    await settled(pair.client, pair.relay)
    # each end allows the other the lazy delay, and a margin, before its probe timeout
    assert LAZY_ACK_ALLOWANCE > LAZY_ACK_DELAY
    assert pair.client._quic._loss.max_ack_delay == LAZY_ACK_ALLOWANCE
    assert pair.relay._quic._loss.max_ack_delay == LAZY_ACK_ALLOWANCE
    sent = count_datagrams(pair.relay)
    await exchange(pair.client, pair.relay, "echo")  # the host's echo reaches the relay
    due = ack_due(pair.relay)
    assert due is not None and ACK_DELAY < due <= LAZY_ACK_DELAY
    assert sent == []  # no lone ack yet
    await exchange(pair.relay, pair.client, "next key")  # the mate's next key
    assert ack_due(pair.relay) is None, "the ack went with the key"
    assert len(sent) == 1


async def test_a_lost_packet_brings_20_ms_acks_back_at_both_ends(pair: Pair) -> None:
    pair.client.enable_lazy_acks()
    pair.relay.enable_lazy_acks()
    received = pair.relay.datagram_received
    dropped: list[bytes] = []

    def lossy(data: bytes | str, addr: object) -> None:
        if not dropped:
            dropped.append(bytes(data))  # the network loses the next packet
            return
        received(data, addr)

    pair.relay.datagram_received = lossy  # type: ignore[method-assign]
    pair.client.send_nowait(Notice("lost"))
    await asyncio.sleep(0)
    pair.client.send_nowait(Notice("after"))
    # the relay sees the gap in the packet numbers: acks in 20 ms from now on
    assert await asyncio.wait_for(pair.relay.recv(), 5) == Notice("lost")  # resent
    assert await asyncio.wait_for(pair.relay.recv(), 5) == Notice("after")
    assert dropped
    assert pair.relay._quic._ack_delay == ACK_DELAY
    assert pair.relay._quic._loss.max_ack_delay == pair.relay._peer_ack_delay
    # the host found its packet lost (QUIC's loss detection): the same there
    deadline = time.monotonic() + 5
    while pair.client._quic._ack_delay != ACK_DELAY and time.monotonic() < deadline:
        await exchange(pair.relay, pair.client, "key")
    assert pair.client._quic._ack_delay == ACK_DELAY
    assert pair.client._quic._loss.max_ack_delay == pair.client._peer_ack_delay


async def test_an_end_that_sees_a_gap_turns_the_other_strict_too(pair: Pair) -> None:
    # a gap only the relay sees (a late packet, or a loss the host has not
    # found yet): the relay skips a packet number, which the host sees
    pair.client.enable_lazy_acks()
    pair.relay.enable_lazy_acks()
    pair.client._quic._packet_number += 1  # the relay will miss one
    await exchange(pair.client, pair.relay, "after a gap")
    assert pair.relay._quic._ack_delay == ACK_DELAY
    assert pair.client._quic._ack_delay == LAZY_ACK_DELAY  # nothing seen here yet
    await exchange(pair.relay, pair.client, "key")
    assert pair.client._quic._ack_delay == ACK_DELAY
    assert pair.client._quic._loss.max_ack_delay == pair.client._peer_ack_delay
    # both strict now: neither skips again, and messages flow
    await exchange(pair.client, pair.relay, "echo")
    await exchange(pair.relay, pair.client, "next")


async def test_a_minute_without_loss_makes_acks_lazy_again(pair: Pair) -> None:
    pair.relay.enable_lazy_acks()
    now = pair.relay._loop.time()
    pair.relay._gap_at = now - 1.0
    pair.relay._ack_policy(now)
    assert pair.relay._quic._ack_delay == ACK_DELAY
    pair.relay._gap_at = now - quic_mod.LOSS_MEMORY - 1.0
    pair.relay._ack_policy(now)
    assert pair.relay._quic._ack_delay == LAZY_ACK_DELAY
