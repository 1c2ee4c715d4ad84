"""The relay's ``EventRepeat`` to a join client (the mirror of ``InputRepeat``):
which sent events are repeated as datagrams, when, how often, and how a client
takes them (in order only, once)."""

from __future__ import annotations

import pytest

from tether.core.codec import unpack_body
from tether.core.errors import RemoteProtocolError
from tether.core.join_endpoint import (
    EVENT_REPEAT_BYTES,
    EVENT_REPEAT_MAX,
    EVENT_REPEATS,
    LOSS_MEMORY,
    REPEAT_APART,
    REPEATED_EVENT_BYTES,
    RelayJoinEndpoint,
    SnapshotCache,
    check_event_repeat,
    repeat_after,
)
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bindings,
    Event,
    EventRepeat,
    Join,
    Output,
    Snapshot,
    Status,
    Structure,
    decode,
)
from tether.core.replog import LogReceiver
from tether.core.session import ACK_EVERY, Channel, Outgoing
from tether.core.testing import FakeClock

SNAP = Snapshot(Structure((), 0), Status(()), Bindings("C-b", ()))
RTT = 0.1
AGAIN = repeat_after(RTT)


def out(seq: int, size: int = 10) -> Event:
    return Event(seq, Output(1, b"x" * size))


class World:
    """A relay endpoint over QUIC (or not) with its cache, on a fake clock."""

    def __init__(self, datagrams: bool = True, readonly: bool = False,
                 lossy: bool = True) -> None:
        self.clock = FakeClock(0.0)
        self.cache = SnapshotCache()
        self.cache.add(Event(1, SNAP))
        self.ep = RelayJoinEndpoint("s1", 7, readonly, b"r" * 32, self.cache)
        self.ep.rtt = RTT
        self.ep.lost_at = 0.0 if lossy else None  # QUIC found a packet lost lately
        self.ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0, datagrams=datagrams)
        while self.ep.next_event() is not None:
            pass
        self.sent = self.send()  # Joined and the snapshot
        self.next_seq = 2

    def send(self) -> list[Outgoing]:
        got: list[Outgoing] = []
        while out_ := self.ep.messages_to_send(self.clock.now):
            got += out_
        return got

    def host(self, *sizes: int) -> list[Outgoing]:
        """The host's log grows by one Output per size; what goes out now."""
        for size in sizes:
            self.cache.add(out(self.next_seq, size))
            self.next_seq += 1
        self.ep.log_advanced()
        return self.send()

    def run(self, until: float) -> list[EventRepeat]:
        """Fire the endpoint's timers up to ``until``; the repeats they sent."""
        got: list[EventRepeat] = []
        while (due := self.ep.next_timer()) is not None and due <= until:
            self.clock.set(max(due, self.clock.now))
            self.ep.handle_timer(self.clock.now)
            for o in self.send():
                if isinstance(o.message, EventRepeat):
                    assert o.channel is Channel.DATAGRAM
                    got.append(o.message)
        self.clock.set(max(until, self.clock.now))
        return got


def seqs(rep: EventRepeat) -> list[int]:
    return [e.seq for e in rep.events]


def test_a_small_event_is_repeated_just_after_it_went_and_again_a_round_trip_later() -> None:
    w = World()
    sent = w.host(10)
    assert [o.message for o in sent] == [out(2)], "the stream copy first, alone"
    assert w.ep.next_timer() == pytest.approx(REPEAT_APART)
    assert w.run(REPEAT_APART - 0.001) == [], "not in the turn it went on the stream"
    [first] = w.run(REPEAT_APART)
    assert seqs(first) == [2] and first.events[0] == out(2)
    assert w.run(REPEAT_APART + AGAIN - 0.001) == []
    [second] = w.run(REPEAT_APART + AGAIN)
    assert seqs(second) == [2]
    assert w.run(60.0) == [], f"at most {EVENT_REPEATS} repeats an event"


def test_an_acked_event_is_not_repeated_again() -> None:
    w = World()
    w.host(10)
    assert len(w.run(REPEAT_APART)) == 1
    w.ep.receive(Ack(2), w.clock.advance(0.05))
    assert w.ep.next_timer() is None
    assert w.run(10.0) == []
    w2 = World()
    w2.host(10)
    w2.ep.receive(Ack(2), 0.001)  # acked before its first repeat: none at all
    assert w2.run(10.0) == []


def test_unacked_older_events_ride_with_a_newer_ones_repeat_oldest_first() -> None:
    """A client missing the older event could take none after it: it goes along."""
    w = World()
    w.host(10)
    w.run(REPEAT_APART)  # 2's first repeat
    w.clock.advance(0.02)
    w.host(20, 30)
    [rep] = w.run(w.clock.now + REPEAT_APART)
    assert seqs(rep) == [2, 3, 4]
    # 2 has had both its repeats; 3 and 4 one more after the timer
    [again] = w.run(60.0)
    assert seqs(again) == [3, 4]
    assert w.run(120.0) == []


def test_bounds_big_events_snapshots_count_and_bytes() -> None:
    w = World()
    w.host(REPEATED_EVENT_BYTES)  # too big: the stream's alone
    assert w.run(1.0) == []
    w.ep.receive(Ack(2), 1.0)
    w.host(*[5] * (EVENT_REPEAT_MAX + 10))
    [rep] = w.run(w.clock.now + REPEAT_APART)
    assert len(rep.events) == EVENT_REPEAT_MAX
    assert seqs(rep) == list(range(3, 3 + EVENT_REPEAT_MAX))
    w.ep.receive(Ack(2 + EVENT_REPEAT_MAX + 10), w.clock.now)
    w.run(60.0)
    w.ep.lost_at = w.clock.now  # still a lossy link
    start = w.next_seq
    w.host(*[300] * 10)  # a datagram's worth: three of them
    reps = w.run(w.clock.now + REPEAT_APART)
    assert len(reps) == 1 and seqs(reps[0]) == [start, start + 1, start + 2]
    encoded = reps[0].encode()
    assert len(encoded) - 4 <= EVENT_REPEAT_BYTES  # what the datagram carries
    assert decode(unpack_body(encoded[4:])) == reps[0]
    # a snapshot is never repeated, and it supersedes what went before it
    w.ep.receive(Ack(w.next_seq - 1), w.clock.now)
    w.cache.add(Event(w.next_seq, SNAP))
    w.next_seq += 1
    w.ep.log_advanced()
    w.send()
    assert w.run(60.0) == []


def test_nothing_is_repeated_over_a_link_without_datagrams() -> None:
    w = World(datagrams=False)
    w.host(10, 10)
    assert w.ep.next_timer() is None
    assert w.run(10.0) == []


def test_a_read_only_client_gets_the_same_repeats() -> None:
    w = World(readonly=True)
    w.host(10)
    assert [seqs(r) for r in w.run(10.0)] == [[2], [2]]


def test_a_lost_link_or_a_new_one_forgets_the_repeats() -> None:
    w = World()
    w.host(10)
    w.ep.connection_lost()
    assert w.ep.next_timer() is None
    w.ep.attach(Join(PROTOCOL_VERSION, "t", b"r" * 32, next_seq=2), 1.0, datagrams=True)
    w.clock.set(1.0)
    w.send()  # Joined, then 2 again on the stream
    reps = w.run(10.0)
    assert [seqs(r) for r in reps] == [[2], [2]]


def test_on_a_link_that_lost_nothing_lately_the_first_repeat_waits_for_the_ack() -> None:
    """Repeated at once, a key's echo cost three packets more (the repeat, and
    the acks it drew) though nothing was lost; only a lossy link needs it."""
    w = World(lossy=False)
    w.host(10)
    assert w.ep.next_timer() == pytest.approx(repeat_after(RTT))
    assert w.run(repeat_after(RTT) - 0.001) == []
    [late] = w.run(repeat_after(RTT))  # unacked that long: lost after all
    assert seqs(late) == [2]
    w2 = World(lossy=False)
    w2.host(10)
    w2.ep.receive(Ack(2), ACK_EVERY + RTT)  # the usual: the ack first
    assert w2.run(10.0) == []
    w3 = World(lossy=False)
    w3.ep.lost_at = 0.0 - LOSS_MEMORY  # a loss, a minute ago: forgotten
    w3.host(10)
    assert w3.ep.next_timer() == pytest.approx(repeat_after(RTT))
    w3.ep.lost_at = 0.0
    w3.host(10)  # a loss now: the next event is repeated at once
    assert w3.ep.next_timer() == pytest.approx(REPEAT_APART)


def test_on_a_short_path_the_second_repeat_waits_for_the_clients_coalesced_ack() -> None:
    """Timed by the round trip alone (1.25 x 1 ms + slack), the second repeat
    went before the client's ack (coalesced for ACK_EVERY) could be back: every
    echo went three times on a LAN though nothing was lost."""
    w = World()
    w.ep.rtt = 0.001
    w.host(10)
    assert len(w.run(REPEAT_APART)) == 1
    # the client acks ACK_EVERY after the event; a round trip later it is here
    assert w.run(ACK_EVERY + 0.001) == [], "no second copy before the ack can be back"
    w.ep.receive(Ack(2), ACK_EVERY + 0.001)
    assert w.run(10.0) == []


def test_the_srtt_times_the_second_repeat() -> None:
    w = World()
    w.ep.rtt = 0.4
    w.host(10)
    w.run(REPEAT_APART)
    assert w.ep.next_timer() == pytest.approx(
        REPEAT_APART + repeat_after(0.4))


# --- the client's side: in order only, once ---------------------------------------


def test_a_client_takes_only_the_next_event_from_a_repeat() -> None:
    r = LogReceiver()
    assert not r.is_next(out(1)), "nothing before the first snapshot"
    assert r.receive(Event(1, SNAP))
    assert not r.is_next(out(3)), "never ahead of the stream"
    assert not r.is_next(Event(5, SNAP)), "a repeat never jumps"
    assert r.is_next(out(2))
    assert r.receive(out(2))
    assert not r.is_next(out(2)), "a duplicate"
    assert not r.receive(out(2)), "the stream's later copy is dropped"
    assert r.receive(out(3))


def test_an_endpoint_and_a_client_over_a_lossy_stream() -> None:
    """The stream copies of 3 and 4 are lost (held up behind QUIC's recovery):
    the repeats deliver them in order, and the stream's copies are duplicates."""
    w = World()
    client = LogReceiver()
    applied: list[int] = []

    def take(ev: Event) -> None:
        if client.receive(ev):
            applied.append(ev.seq)

    for o in w.sent:
        if isinstance(o.message, Event):
            take(o.message)
    sent = [o.message for o in w.host(10)]
    for m in sent:
        take(m)  # type: ignore[arg-type]
    lost = [o.message for o in w.host(10, 10)]
    for rep in w.run(w.clock.now + REPEAT_APART):
        for ev in reversed(rep.events):  # out of order in a datagram: only the next
            if client.is_next(ev):
                take(ev)
        for ev in rep.events:
            if client.is_next(ev):
                take(ev)
    assert applied == [1, 2, 3, 4]
    for m in lost:
        take(m)  # type: ignore[arg-type]
    assert applied == [1, 2, 3, 4]


def test_a_client_refuses_an_oversized_repeat() -> None:
    """The join client's check (a malformed message: the link is dropped)."""
    check_event_repeat(EventRepeat(tuple(out(i) for i in range(EVENT_REPEAT_MAX))))
    with pytest.raises(RemoteProtocolError):
        check_event_repeat(EventRepeat(tuple(out(i) for i in range(EVENT_REPEAT_MAX + 1))))
