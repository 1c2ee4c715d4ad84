"""Mate input: exactly once under resends and reconnects, with bounded state."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.errors import RemoteProtocolError
from tether.core.inputs import InputReceiver, InputSender
from tether.core.messages import Binding, Input

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)

actions = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 1), st.binary(min_size=1, max_size=4)),
        st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(1, 5)),
        st.tuples(st.just("ack"), st.integers(0, 1), st.integers(1, 3)),
        st.tuples(st.just("drop"), st.just(0), st.just(0)),
        st.tuples(st.just("reconnect"), st.just(0), st.just(0)),
        st.tuples(st.just("resend"), st.integers(0, 1), st.just(0)),
    ),
    max_size=60,
)


@dataclass
class Link:
    """Relay -> host inputs and host -> relay acks; both lost when the link drops."""

    up: bool = True
    inputs: list[Input] = field(default_factory=list)
    acks: list[tuple[int, int]] = field(default_factory=list)


def run(steps: list[tuple[str, int, object]], max_backlog: int) -> None:
    senders = [InputSender(stream, max_backlog=max_backlog) for stream in (7, 9)]
    by_stream = {s.stream: s for s in senders}
    receiver = InputReceiver()
    link = Link()
    pushed: dict[int, list[Input]] = {7: [], 9: []}
    evicted: dict[int, set[int]] = {7: set(), 9: set()}
    applied: dict[int, list[Input]] = {7: [], 9: []}

    def push(sender: InputSender, keys: bytes) -> None:
        before = {m.seq for m in sender.unacked()}
        msg = sender.push(pane=3, keys=keys)
        assert msg.seq == (pushed[sender.stream][-1].seq + 1 if pushed[sender.stream] else 1)
        pushed[sender.stream].append(msg)
        evicted[sender.stream] |= before - {m.seq for m in sender.unacked()}
        assert len(sender.unacked()) <= max_backlog
        if link.up:
            link.inputs.append(msg)

    def deliver(n: int) -> None:
        for msg in link.inputs[:n]:
            if receiver.accept(msg):
                got = applied[msg.stream]
                assert not got or msg.seq > got[-1].seq, "applied twice or out of order"
                got.append(msg)
            else:
                assert msg.seq <= receiver.last(msg.stream)
            link.acks.append((msg.stream, msg.seq))  # the host acks whatever it saw
        del link.inputs[:n]

    def ack(n: int) -> None:
        for stream, seq in link.acks[:n]:
            by_stream[stream].on_ack(seq)
            assert all(m.seq > seq for m in by_stream[stream].unacked())
        del link.acks[:n]

    def reconnect() -> None:
        link.up = True
        link.inputs = [m for s in senders for m in s.unacked()]

    for op, which, arg in steps:
        sender = senders[which]
        if op == "push":
            assert isinstance(arg, bytes)
            push(sender, arg)
        elif op == "deliver" and link.up:
            assert isinstance(arg, int)
            deliver(arg)
        elif op == "ack" and link.up:
            assert isinstance(arg, int)
            ack(arg)
        elif op == "drop":
            link.up = False
            link.inputs.clear()
            link.acks.clear()
        elif op == "reconnect" and not link.up:
            reconnect()
        elif op == "resend" and link.up:
            # the relay resends unacked input while the link still carries it
            link.inputs += sender.unacked()

    # quiescence: a fresh link, everything delivered and acked
    link.up = False
    reconnect()
    deliver(len(link.inputs))
    ack(len(link.acks))
    for s in senders:
        assert s.unacked() == []
        assert s.dropped == len(evicted[s.stream])
        got = {m.seq for m in applied[s.stream]}
        want = {m.seq for m in pushed[s.stream]}
        assert got <= want
        # nothing lost except what the bounded backlog evicted before delivery
        assert want - got <= evicted[s.stream]
        assert applied[s.stream] == [m for m in pushed[s.stream] if m.seq in got]
        assert receiver.last(s.stream) == (pushed[s.stream][-1].seq if pushed[s.stream] else 0)


@SETTINGS
@given(steps=actions)
def test_exactly_once_under_resend_and_reconnect(steps: list[tuple[str, int, object]]) -> None:
    run(steps, max_backlog=10_000)


@SETTINGS
@given(steps=actions)
def test_exactly_once_with_a_small_backlog(steps: list[tuple[str, int, object]]) -> None:
    run(steps, max_backlog=3)


def test_no_loss_without_eviction() -> None:
    s = InputSender(1)
    r = InputReceiver()
    sent = [s.push(0, b"%d" % i) for i in range(5)]
    assert [r.accept(m) for m in sent[:3]] == [True, True, True]
    # link lost before any ack: everything is resent, the first three are duplicates
    assert [r.accept(m) for m in s.unacked()] == [False, False, False, True, True]
    s.on_ack(r.last(1))
    assert s.unacked() == []


def test_sender_backlog_drops_oldest() -> None:
    s = InputSender(4, max_backlog=3)
    msgs = [s.push(1, bytes([65 + i])) for i in range(5)]
    assert s.unacked() == msgs[2:]
    assert s.dropped == 2
    assert [m.seq for m in msgs] == [1, 2, 3, 4, 5]
    s.on_ack(3)
    assert s.unacked() == msgs[3:]
    assert s.acked == 3


def test_sender_ack_of_input_never_sent() -> None:
    s = InputSender(1)
    s.push(0, b"a")
    with pytest.raises(RemoteProtocolError):
        s.on_ack(2)
    s.on_ack(1)
    s.on_ack(0)  # stale acks are harmless
    assert s.acked == 1


def test_sender_carries_bindings() -> None:
    s = InputSender(2)
    msg = s.push(5, binding=Binding("prefix", "c"))
    assert msg == Input(2, 1, 5, b"", Binding("prefix", "c"))


def test_receiver_rejects_non_positive_seq() -> None:
    r = InputReceiver()
    for seq in (0, -1):
        with pytest.raises(RemoteProtocolError):
            r.accept(Input(1, seq, 0, b"x"))
    assert r.accept(Input(1, 1, 0, b"x"))
    with pytest.raises(RemoteProtocolError):
        r.accept(Input(1, 0, 0, b"x"))


def test_receiver_tolerates_gaps_from_sender_eviction() -> None:
    r = InputReceiver()
    assert r.accept(Input(1, 1, 0, b"a"))
    assert r.accept(Input(1, 4, 0, b"d"))  # 2 and 3 were evicted by the relay
    assert not r.accept(Input(1, 3, 0, b"c"))
    assert r.last(1) == 4


def test_receiver_streams_are_bounded_oldest_forgotten() -> None:
    r = InputReceiver(max_streams=3)
    for stream in (1, 2, 3):
        assert r.accept(Input(stream, 1, 0, b"x"))
    assert r.accept(Input(1, 2, 0, b"x"))  # stream 1 is now the most recent
    assert r.accept(Input(4, 1, 0, b"x"))  # stream 2, the oldest, is forgotten
    assert r.last(2) == 0
    assert (r.last(1), r.last(3), r.last(4)) == (2, 1, 1)
    assert len(r._last) == 3
    for stream in range(100, 200):
        r.accept(Input(stream, 1, 0, b"x"))
    assert len(r._last) == 3
    assert r.last(199) == 1


def test_streams_are_independent() -> None:
    r = InputReceiver()
    assert r.accept(Input(1, 5, 0, b"x"))
    assert r.accept(Input(2, 1, 0, b"x"))
    assert not r.accept(Input(1, 5, 0, b"x"))
    assert r.accept(Input(2, 2, 0, b"x"))


def test_a_re_created_session_numbers_its_mates_input_afresh() -> None:
    """A session re-created with its id (its relay restarted, or the relay
    process holding it died) starts its input over at 1: the host, which
    remembers what it applied per stream, must not drop it as a resend."""
    from tether.core.relay_endpoint import RelayHostEndpoint

    host = InputReceiver()
    before = RelayHostEndpoint("s", b"x" * 32, "rw", "ro")
    for _ in range(3):
        assert host.accept(before.inputs.push(0, b"k"))
    after = RelayHostEndpoint("s", b"x" * 32, "rw", "ro")
    assert host.accept(after.inputs.push(0, b"typed after"))
