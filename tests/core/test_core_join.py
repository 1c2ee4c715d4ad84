"""The relay's end of a join client: where it starts in the host's log, how it
resumes, its input, and the snapshot cache it reads from."""

from __future__ import annotations

import pytest

from tether.core.errors import RemoteProtocolError
from tether.core.join_endpoint import (
    MAX_REPEATED,
    JoinFailed,
    MateLeft,
    MateResized,
    MateTyped,
    RelayJoinEndpoint,
    ResyncNeeded,
    SnapshotCache,
    check_join,
)
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bindings,
    End,
    Error,
    Event,
    Input,
    InputAck,
    InputRepeat,
    Join,
    Joined,
    Output,
    Ping,
    Pong,
    Resize,
    Snapshot,
    Status,
    Structure,
)
from tether.core.session import JUMP_BYTES, Channel

SNAP = Snapshot(Structure((), 0), Status(()), Bindings("C-b", ()))


def out(seq: int, size: int = 10) -> Event:
    return Event(seq, Output(1, b"x" * size))


def events(ep: RelayJoinEndpoint, now: float = 0.0) -> list[object]:
    return [o.message for o in ep.messages_to_send(now, limit_bytes=None)]


def drain_events(ep: RelayJoinEndpoint) -> list[object]:
    got = []
    while (ev := ep.next_event()) is not None:
        got.append(ev)
    return got


def endpoint(cache: SnapshotCache, readonly: bool = False) -> RelayJoinEndpoint:
    return RelayJoinEndpoint("s1", 7, readonly, b"r" * 32, cache)


def test_cache_holds_the_log_from_the_last_snapshot() -> None:
    c = SnapshotCache()
    assert not c.valid and c.take(1, None) == []
    c.add(out(1))  # nothing to start from yet
    assert not c.valid
    c.add(Event(2, SNAP))
    for seq in (3, 4, 5):
        c.add(out(seq))
    assert (c.first_seq, c.next_seq) == (2, 6)
    assert [e.seq for e in c.take(4, None)] == [4, 5]
    assert [e.seq for e in c.take(2, 25)] == [2]  # the snapshot weighs 256
    c.add(out(7))  # a gap: no valid start until the next snapshot
    assert not c.valid
    c.add(Event(8, SNAP))
    assert c.first_seq == 8


def test_cache_overflow_drops_it_or_asks_for_a_snapshot_when_clients_read() -> None:
    c = SnapshotCache(max_bytes=1000)
    c.add(Event(1, SNAP))
    asks = [c.add(out(seq, 100)) for seq in range(2, 12)]
    assert not c.valid and not any(asks), "no client: dropped, nobody asked"
    c.hold = True
    c.add(Event(20, SNAP))
    asks = [c.add(out(seq, 100)) for seq in range(21, 40)]
    assert asks.count(True) == 1 and c.valid, "asked once, kept growing"
    assert [c.add(out(seq, 100)) for seq in range(40, 80)].count(True) == 0
    assert not c.valid, "past four times the bound it is dropped all the same"


def test_a_new_client_waits_for_a_snapshot_then_starts_from_it() -> None:
    c = SnapshotCache()
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    assert drain_events(ep) == [ResyncNeeded()]
    [joined] = events(ep)
    assert isinstance(joined, Joined) and joined.mate == 7 and not joined.readonly
    c.add(Event(5, SNAP))
    c.add(out(6))
    ep.log_advanced()
    assert [m.seq for m in events(ep)] == [5, 6]  # type: ignore[attr-defined]
    c.add(out(7))
    ep.log_advanced()
    assert [m.seq for m in events(ep)] == [7]  # type: ignore[attr-defined]
    assert drain_events(ep) == []


def test_a_client_resumes_where_it_stopped_or_jumps_when_that_is_long() -> None:
    c = SnapshotCache(max_bytes=10 * JUMP_BYTES)
    c.add(Event(1, SNAP))
    for seq in range(2, 10):
        c.add(out(seq))
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t", b"r" * 32, next_seq=6), 0.0)
    assert [m.seq for m in events(ep)[1:]] == [6, 7, 8, 9]  # type: ignore[attr-defined]
    ep.connection_lost()
    for seq in range(10, 10 + JUMP_BYTES // 20):  # a long backlog meanwhile
        c.add(out(seq))
    ep.attach(Join(PROTOCOL_VERSION, "t", b"r" * 32, next_seq=10), 1.0)
    sent = events(ep)
    assert sent[1] == Event(1, SNAP), "the present, not the history"
    assert ep.conn == 2


def test_a_client_behind_a_new_snapshot_jumps_to_it() -> None:
    c = SnapshotCache()
    c.add(Event(1, SNAP))
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    events(ep)
    ep.connection_lost()
    c.add(out(2))
    c.add(Event(3, SNAP))
    ep.log_advanced()
    ep.attach(Join(PROTOCOL_VERSION, "t", b"r" * 32, next_seq=2), 1.0)
    assert [m.seq for m in events(ep)[1:]] == [3]  # type: ignore[attr-defined]


def test_input_reaches_the_host_once_and_is_acked() -> None:
    c = SnapshotCache()
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t", cols=100, rows=30), 0.0)
    assert MateResized(100, 30) in drain_events(ep)
    events(ep)
    for seq in (1, 2, 2, 1, 3):  # resends after a reconnect are dropped
        ep.receive(Input(1, seq, 4, f"k{seq}".encode()), 0.0)
    assert [e.keys for e in drain_events(ep) if isinstance(e, MateTyped)] == [b"k1", b"k2", b"k3"]
    assert ep.next_timer() is not None
    ep.handle_timer(1.0)
    assert events(ep, 1.0) == [InputAck(1, 3)]
    ep.receive(Ping(9), 1.0)
    assert events(ep, 1.0) == [Pong(9)]


def test_a_keys_ack_rides_with_its_echo() -> None:
    """The ack of a join client's key goes in the packet of the key's echo, not
    alone a coalescing delay later (the client repeated every key meanwhile)."""
    c = SnapshotCache()
    c.add(Event(1, SNAP))
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ep)
    events(ep)
    ep.receive(Input(1, 1, 4, b"k"), 0.0)
    assert ep.next_timer() is not None  # the ack timer, if no echo comes first
    c.add(out(2))  # the echo
    ep.log_advanced()
    sent = ep.messages_to_send(0.004)
    assert [o.message for o in sent] == [InputAck(1, 1), out(2)]
    assert sent[0].channel is Channel.ACK
    ep.handle_timer(1.0)
    assert events(ep, 1.0) == [], "acked once"


def test_repeated_input_is_taken_in_order_only_and_once() -> None:
    """A datagram of unacked inputs may overtake the stream: an input in it that is
    not the next of its stream waits for the stream (taking it would make the
    stream's earlier one look old); the stream's later copies are dropped."""
    ep = endpoint(SnapshotCache())
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ep)
    events(ep)
    k = [Input(5, seq, 4, f"k{seq}".encode()) for seq in range(1, 6)]

    def typed() -> list[bytes]:
        return [e.keys for e in drain_events(ep) if isinstance(e, MateTyped)]

    ep.receive(InputRepeat((k[1], k[2])), 0.0)  # input 1 was lost: nothing yet
    assert typed() == []
    ep.receive(k[0], 0.0)  # the stream
    ep.receive(InputRepeat((k[0], k[1], k[2], k[3])), 0.0)
    assert typed() == [b"k1", b"k2", b"k3", b"k4"]
    for m in (k[1], k[2], k[3], k[4], InputRepeat((k[3], k[4]))):
        ep.receive(m, 0.1)
    assert typed() == [b"k5"]
    ep.handle_timer(1.0)
    assert events(ep, 1.0) == [InputAck(5, 5)]


def test_repeats_are_bounded_and_refused_from_a_read_only_client() -> None:
    ep = endpoint(SnapshotCache())
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ep)
    ep.receive(InputRepeat(tuple(Input(1, i, 0, b"x") for i in range(1, MAX_REPEATED + 2))), 0)
    assert isinstance(drain_events(ep)[-1], JoinFailed)
    ro = endpoint(SnapshotCache(), readonly=True)
    ro.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ro)
    ro.receive(InputRepeat((Input(1, 1, 0, b"x"),)), 0.0)
    evs = drain_events(ro)
    assert not any(isinstance(e, MateTyped) for e in evs)
    assert isinstance(evs[-1], JoinFailed) and "read-only" in evs[-1].text


def test_a_read_only_client_cannot_type() -> None:
    ep = endpoint(SnapshotCache(), readonly=True)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ep)
    events(ep)
    ep.receive(Input(1, 1, 0, b"rm -rf /\r"), 0.0)
    evs = drain_events(ep)
    assert not any(isinstance(e, MateTyped) for e in evs)
    assert isinstance(evs[-1], JoinFailed) and "read-only" in evs[-1].text
    assert isinstance(events(ep)[0], Error)
    ep.receive(Input(1, 2, 0, b"x"), 0.0)  # the link is being closed: ignored
    assert drain_events(ep) == []


@pytest.mark.parametrize("readonly", [False, True])
def test_a_client_that_says_goodbye_leaves_and_nothing_after_is_taken(readonly: bool) -> None:
    ep = endpoint(SnapshotCache(), readonly=readonly)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    drain_events(ep)
    ep.receive(End("the mate left"), 0.0)
    assert drain_events(ep) == [MateLeft("the mate left")]
    ep.receive(Input(1, 1, 0, b"x"), 0.0)  # after goodbye: ignored
    assert drain_events(ep) == [] and events(ep) == []


def test_bad_acks_and_strangers_are_refused() -> None:
    c = SnapshotCache()
    c.add(Event(1, SNAP))
    ep = endpoint(c)
    ep.attach(Join(PROTOCOL_VERSION, "t"), 0.0)
    events(ep)
    ep.receive(Ack(1), 0.0)
    assert ep.acked == 1
    ep.receive(Ack(5), 0.0)
    assert isinstance(drain_events(ep)[-1], JoinFailed)
    with pytest.raises(RemoteProtocolError, match="expected Join"):
        check_join(Ping(1))
    with pytest.raises(RemoteProtocolError, match="upgrade tether"):
        check_join(Join(PROTOCOL_VERSION + 1, "t"))
    # protocol 6 changed host links only: a join client of 5 is still served
    assert check_join(Join(5, "t")).version == 5
    with pytest.raises(RemoteProtocolError, match="upgrade tether"):
        check_join(Join(4, "t"))


@pytest.mark.parametrize(("make", "what"), [
    (lambda i: Ping(i), "pings"),
    (lambda i: Resize(80 + i % 2, 24), "resizes"),
])
def test_a_flood_of_pings_or_resizes_ends_the_link(make, what) -> None:  # type: ignore[no-untyped-def]
    ep = endpoint(SnapshotCache())
    ep.attach(Join(PROTOCOL_VERSION, "t"), 100.0)
    drain_events(ep)
    for i in range(400):  # all in the same instant: past any burst
        ep.receive(make(i), 100.0)
    failed = [e for e in drain_events(ep) if isinstance(e, JoinFailed)]
    assert len(failed) == 1 and what in failed[0].text
    assert not ep.connected
