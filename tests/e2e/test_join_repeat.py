"""The relay's ``EventRepeat`` over a real QUIC connection: the packet carrying an
event on the stream is lost, and the datagram that repeats it just after
delivers it to the join client, which applies it once (the stream's copy,
resent by QUIC later, is dropped as a duplicate). The relay's half is the join
role's own send loop (``Joins._send_loop`` over ``RelayJoinEndpoint``); the
client's is ``JoinClient``'s message handling."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tether.client.join import JoinClient
from tether.core.join_endpoint import RelayJoinEndpoint, SnapshotCache
from tether.core.messages import (
    PROTOCOL_VERSION,
    Bindings,
    Event,
    EventBody,
    EventRepeat,
    Join,
    Joined,
    Message,
    Output,
    Snapshot,
    Status,
    Structure,
)
from tether.core.ratelimit import FailureBackoff
from tether.relay.joins import Joins, Place
from tether.transport.quic import (
    QuicLink,
    connect_quic,
    load_or_create_certificate,
    start_quic_server,
)

SNAP = Snapshot(Structure((), 0), Status(()), Bindings("C-b", ()))


class Replica:
    """The join client's replica: what it applied, in order."""

    def __init__(self) -> None:
        self.applied: list[EventBody] = []

    async def apply(self, body: EventBody) -> None:
        self.applied.append(body)

    async def presence(self, present: bool, text: str) -> None:
        pass


class Dropper:
    """Wraps the relay's UDP transport: drops the next ``n`` packets it sends."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.n = 0
        self.dropped = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.n > 0:
            self.n -= 1
            self.dropped += 1
            return
        self.transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_a_lost_stream_packet_is_delivered_by_the_event_repeat(tmp_path: Path) -> None:
    cert, key, fp = load_or_create_certificate(tmp_path / "keys")
    links: asyncio.Queue[QuicLink] = asyncio.Queue()

    async def on_link(link: QuicLink) -> None:
        await links.put(link)

    server = await start_quic_server("127.0.0.1", 0, cert, key, on_link)
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
    client_link = await connect_quic("127.0.0.1", port, fp, timeout=5)
    tasks: list[asyncio.Task[None]] = []
    try:
        client_link.send_nowait(Join(PROTOCOL_VERSION, "test"))
        relay_link = await asyncio.wait_for(links.get(), 5)
        assert isinstance(await asyncio.wait_for(relay_link.recv(), 5), Join)

        # the relay's end: the join role's send loop over the endpoint
        cache = SnapshotCache()
        cache.add(Event(1, SNAP))
        ep = RelayJoinEndpoint("s1", 7, False, b"r" * 32, cache)
        ep.attach(Join(PROTOCOL_VERSION, "test"), time.monotonic(), datagrams=True)
        place = Place(None, ep, None)  # type: ignore[arg-type]
        joins = Joins(None, None, backoff=FailureBackoff())  # type: ignore[arg-type]
        tasks.append(asyncio.create_task(joins._send_loop(place, relay_link)))

        # the client's end: JoinClient applies what comes (from the stream or a repeat)
        replica = Replica()
        jc = JoinClient(None, replica)  # type: ignore[arg-type]
        jc.link = client_link
        seen: list[Message] = []
        assert isinstance(await asyncio.wait_for(client_link.recv(), 5), Joined)

        async def recv_loop() -> None:
            while True:
                msg = await client_link.recv()
                seen.append(msg)
                await jc._receive(msg)  # no acks: JoinClient's timers do not run

        tasks.append(asyncio.create_task(recv_loop()))

        async def until(pred: Any, what: str, timeout: float = 5.0) -> None:
            deadline = time.monotonic() + timeout
            while not pred():
                assert time.monotonic() < deadline, f"timed out: {what}; seen {seen[-6:]}"
                await asyncio.sleep(0.002)

        await until(lambda: replica.applied == [SNAP], "the snapshot")
        await asyncio.sleep(0.2)  # the connection quiet: no ack or repeat in flight

        # a link that lost a packet lately: events are repeated at once
        relay_link._quic._loss._cc.last_loss = before = time.monotonic()  # type: ignore[attr-defined]
        dropper = Dropper(relay_link._transport)
        relay_link._transport = dropper  # type: ignore[assignment]
        echo = Output(1, b"k")
        dropper.n = 1  # the packet that carries the event on the stream
        cache.add(Event(2, echo))
        place.feed.send(echo)  # the session's fan-out wakes the sender
        await until(lambda: len(replica.applied) == 2, "the echo")
        assert dropper.dropped == 1
        assert replica.applied == [SNAP, echo]
        assert jc.repeats_taken == 1, "taken from the repeat, not the stream"
        first = next(m for m in seen if isinstance(m, Event | EventRepeat) and m != Event(1, SNAP))
        assert isinstance(first, EventRepeat) and first.events == (Event(2, echo),)
        # QUIC resends the stream's copy: dropped as a duplicate, applied once
        await until(lambda: Event(2, echo) in seen, "the stream's copy")
        await asyncio.sleep(0.05)
        assert replica.applied == [SNAP, echo]
        assert jc.receiver.next_seq == 3
        # and QUIC's loss detection, which keeps the link in that mode, saw it
        await until(lambda: (relay_link.lost_at or 0.0) > before, "QUIC to find the loss")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client_link.close()
        server.close()  # type: ignore[attr-defined]
