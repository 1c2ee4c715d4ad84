"""The replication log: exactly once and in order, or superseded by a snapshot.

A stateful model drives a ``LogSender`` (host) and a ``LogReceiver`` (relay)
over a lossy link that drops and reconnects, with a small backlog bound so the
snapshot path is taken often. The receiver applies events to a model replica;
after every delivery that replica must equal the host's state at the sequence
number the receiver has reached, and after a quiescent delivery it must equal
the host's current state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tether.core.errors import RemoteProtocolError
from tether.core.messages import (
    Binding,
    Bindings,
    Event,
    EventBody,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
    event_size,
)
from tether.core.replog import LogReceiver, LogSender

PANES = st.integers(0, 2)


@dataclass
class Replica:
    """What a replica of the host shows: pane contents, active window, status, prefix."""

    panes: dict[int, bytes] = field(default_factory=dict)
    active: int = 0
    status: tuple[tuple[str, str], ...] = ()
    prefix: str = "C-b"

    def copy(self) -> Replica:
        return dataclasses.replace(self, panes=dict(self.panes))

    def apply(self, body: EventBody) -> None:
        if isinstance(body, Output):
            self.panes[body.pane] = self.panes.get(body.pane, b"") + body.data
        elif isinstance(body, PaneReset):
            self.panes[body.image.pane] = body.image.data
        elif isinstance(body, Structure):
            self.active = body.active_window
        elif isinstance(body, Status):
            self.status = body.options
        elif isinstance(body, Bindings):
            self.prefix = body.prefix
        else:
            raise AssertionError(f"unexpected body {body!r}")


def snapshot_of(state: Replica) -> Snapshot:
    """A Snapshot message for ``state``; pane contents travel via a side table."""
    return Snapshot(
        Structure((), state.active),
        Status(state.status),
        Bindings(state.prefix, (Binding("prefix", "c"),)),
    )


class Replication(RuleBasedStateMachine):
    MAX_BYTES = 400
    MAX_EVENTS = 10

    def __init__(self) -> None:
        super().__init__()
        self.sender = LogSender(max_bytes=self.MAX_BYTES, max_events=self.MAX_EVENTS)
        self.receiver = LogReceiver()
        self.host = Replica()
        # the host's state right after each logged seq (for a snapshot: its full state)
        self.states: dict[int, Replica] = {}
        self.replica = Replica()
        self.applied: list[int] = []  # every seq the receiver applied, in order
        self.snapshot_seqs: set[int] = set()
        self.wire: list[Event] = []  # host -> relay, in flight on the current link
        self.acks: list[int] = []  # relay -> host, in flight
        self.connected = False

    # --- the host -------------------------------------------------------------

    def log(self, body: EventBody) -> None:
        self.host.apply(body)
        s = self.sender
        sent_before = [e.event for e in list(s._buf)[: s._sent]]
        seq = s.append(body)
        if seq is not None:
            assert seq not in self.states
            self.states[seq] = self.host.copy()
        else:
            assert s.need_snapshot
        # the bound only ever drops what was not handed out (on this connection) yet
        assert [e.event for e in list(s._buf)[: s._sent]] == sent_before
        over = s.backlog_bytes > s.max_bytes or s.backlog_events > s.max_events
        if seq is not None and over:
            assert s.need_snapshot
            assert s.backlog_events == s._sent, "unsent events kept past the bound"

    @initialize()
    def first_connect(self) -> None:
        self.connect()

    @rule(pane=PANES, data=st.binary(min_size=1, max_size=40))
    def output(self, pane: int, data: bytes) -> None:
        self.log(Output(pane, data))

    @rule(pane=PANES, size=st.integers(100, 500))
    def burst(self, pane: int, size: int) -> None:
        """``cat hugefile``: enough output to pass the backlog bound quickly."""
        self.log(Output(pane, bytes([65 + pane]) * size))

    @rule(pane=PANES, data=st.binary(max_size=20))
    def pane_reset(self, pane: int, data: bytes) -> None:
        self.log(PaneReset(PaneImage(pane, data)))

    @rule(active=st.integers(0, 3))
    def structure(self, active: int) -> None:
        self.log(Structure((), active))

    @rule(value=st.text(max_size=8))
    def status(self, value: str) -> None:
        self.log(Status((("status-left", value),)))

    @rule(prefix=st.sampled_from(["C-a", "C-b", "C-q"]))
    def bindings(self, prefix: str) -> None:
        self.log(Bindings(prefix, ()))

    @precondition(lambda self: self.sender.need_snapshot)
    @rule()
    def snapshot(self) -> None:
        seq = self.sender.push_snapshot(snapshot_of(self.host))
        assert not self.sender.need_snapshot
        self.states[seq] = self.host.copy()
        self.snapshot_seqs.add(seq)

    # --- the link -------------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule(limit=st.none() | st.integers(1, 300))
    def send(self, limit: int | None) -> None:
        events = self.sender.to_send(limit_bytes=limit)
        if self.wire and events:
            assert events[0].seq > self.wire[-1].seq
        self.wire += events

    @precondition(lambda self: self.connected and self.wire)
    @rule(n=st.integers(1, 8))
    def deliver(self, n: int) -> None:
        for ev in self.wire[:n]:
            self.receive(ev)
        del self.wire[:n]

    @precondition(lambda self: self.connected and self.receiver.applied > 0)
    @rule()
    def relay_acks(self) -> None:
        self.acks.append(self.receiver.applied)

    @precondition(lambda self: self.connected and self.acks)
    @rule(n=st.integers(1, 3))
    def deliver_acks(self, n: int) -> None:
        for seq in self.acks[:n]:
            self.sender.on_ack(seq)
            assert self.sender.acked >= seq
        del self.acks[:n]

    @precondition(lambda self: self.connected)
    @rule()
    def link_lost(self) -> None:
        """In-flight events and acks are lost with the connection."""
        self.wire.clear()
        self.acks.clear()
        self.sender.on_disconnect()
        self.connected = False

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connect()

    @precondition(lambda self: not self.connected)
    @rule()
    def relay_loses_replica(self) -> None:
        """The relay restarts its replica: it has nothing and needs a snapshot."""
        self.receiver.forget()
        self.replica = Replica()
        self.applied.append(0)  # a new life: the next applied seq must be a snapshot

    def connect(self) -> None:
        position = self.receiver.next_seq
        acked_before = self.sender.acked
        ok = self.sender.on_connect(position)
        if not ok:
            assert self.sender.need_snapshot
            assert self.sender.backlog_events == 0
            assert self.sender.backlog_bytes == 0
        else:
            assert position is not None
            assert not self.sender.need_snapshot
        if (
            position is not None
            and position - 1 > acked_before
            and position <= self.sender.next_seq
        ):
            assert self.sender.acked == position - 1  # applied counts as acked
        self.connected = True

    # --- the relay --------------------------------------------------------------

    def receive(self, ev: Event) -> None:
        last = self.applied[-1] if self.applied else 0
        if not self.receiver.receive(ev):
            assert last != 0 and ev.seq <= last, f"refused {ev.seq} at {last}"
            return
        is_snapshot = isinstance(ev.body, Snapshot)
        assert ev.seq not in self.applied, f"seq {ev.seq} applied twice"
        if is_snapshot:
            assert ev.seq in self.snapshot_seqs
            assert ev.seq > last
            self.replica = self.states[ev.seq].copy()
            assert self.replica.active == ev.body.structure.active_window
            assert self.replica.status == ev.body.status.options
        else:
            assert last != 0, "a non-snapshot applied without a snapshot first"
            assert ev.seq == last + 1, f"skipped from {last} to {ev.seq}"
            self.replica.apply(ev.body)
        self.applied.append(ev.seq)
        assert self.replica == self.states[ev.seq], f"replica differs from host at {ev.seq}"

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def backlog_accounting(self) -> None:
        s = self.sender
        assert s.acked < s.next_seq
        assert 0 <= s._sent <= s.backlog_events
        buffered = list(s._buf)
        seqs = [e.event.seq for e in buffered]
        assert seqs == sorted(set(seqs))
        assert all(seq > s.acked for seq in seqs)
        assert s.backlog_bytes == sum(event_size(e.event.body) for e in buffered)

    @invariant()
    def receiver_position(self) -> None:
        if self.receiver.next_seq is not None:
            assert self.receiver.applied == self.applied[-1]
            assert self.replica == self.states[self.receiver.applied]

    # --- quiescence ---------------------------------------------------------------

    @rule()
    def settle(self) -> None:
        """Let the link heal and drain: the replica must then equal the host."""
        if not self.connected:
            self.connect()
        for _ in range(100):
            if self.sender.need_snapshot:
                self.snapshot()
            self.wire += self.sender.to_send()
            for ev in self.wire:
                self.receive(ev)
            self.wire.clear()
            self.sender.on_ack(self.receiver.applied)
            if not self.sender.need_snapshot and self.sender.backlog_events == 0:
                break
        else:
            raise AssertionError("the link never drained")
        assert not self.sender.need_snapshot
        assert self.replica == self.host, "an event was lost without a snapshot"
        assert self.sender.backlog_events == 0
        assert self.sender.acked == self.sender.next_seq - 1

    def teardown(self) -> None:
        self.settle()


TestReplication = Replication.TestCase
TestReplication.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    # no "explain" phase: line tracing makes reporting a failure take minutes
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


# --- unit tests -----------------------------------------------------------------------


def connected_sender(**kw: int) -> LogSender:
    s = LogSender(**kw)
    assert s.on_connect(None) is False
    s.push_snapshot(snapshot_of(Replica()))
    return s


def test_first_event_is_a_snapshot() -> None:
    s = LogSender()
    assert s.need_snapshot
    assert s.append(Output(0, b"x")) is None  # nothing logged before the first snapshot
    assert s.backlog_events == 0
    seq = s.push_snapshot(snapshot_of(Replica()))
    assert s.append(Output(0, b"y")) == seq + 1
    r = LogReceiver()
    with pytest.raises(RemoteProtocolError):
        r.receive(Event(seq + 1, Output(0, b"y")))
    evs = s.to_send()
    assert [r.receive(e) for e in evs] == [True, True]


def test_ack_of_unsent_seq_is_a_remote_error() -> None:
    s = connected_sender()
    s.append(Output(0, b"a"))
    s.append(Output(0, b"b"))
    (snap,) = s.to_send(limit_bytes=1)
    s.on_ack(snap.seq)
    with pytest.raises(RemoteProtocolError):
        s.on_ack(snap.seq + 1)  # logged but not yet sent
    with pytest.raises(RemoteProtocolError):
        s.on_ack(s.next_seq)  # never logged
    s.to_send()
    s.on_ack(snap.seq + 2)
    s.on_ack(snap.seq + 1)  # old acks are harmless
    assert s.acked == snap.seq + 2
    assert s.backlog_events == 0


def test_ack_after_reconnect_must_be_for_events_sent_on_this_connection() -> None:
    s = connected_sender()
    s.append(Output(0, b"a"))
    sent = s.to_send()
    s.on_disconnect()
    assert s.on_connect(sent[0].seq) is True  # receiver has nothing of this batch
    with pytest.raises(RemoteProtocolError):
        s.on_ack(sent[-1].seq)
    assert s.to_send() == sent  # replayed, same numbers
    s.on_ack(sent[-1].seq)


def test_on_connect_position_no_longer_buffered() -> None:
    s = connected_sender()
    for i in range(5):
        s.append(Output(0, b"%d" % i))
    sent = s.to_send()
    s.on_ack(sent[-1].seq)
    assert s.backlog_events == 0
    s.on_disconnect()
    # the receiver lost its state and claims an old position: gone from the buffer
    assert s.on_connect(sent[1].seq) is False
    assert s.need_snapshot
    assert s.backlog_events == 0 and s.backlog_bytes == 0
    assert s.append(Output(0, b"dropped")) is None


def test_on_connect_from_the_future_or_nowhere_needs_a_snapshot() -> None:
    s = connected_sender()
    s.to_send()
    s.on_disconnect()
    assert s.on_connect(s.next_seq + 5) is False
    assert s.need_snapshot
    s = connected_sender()
    s.to_send()
    s.on_disconnect()
    assert s.on_connect(None) is False
    assert s.need_snapshot


def test_on_connect_replays_exactly_what_the_receiver_misses() -> None:
    s = connected_sender()
    r = LogReceiver()
    for i in range(6):
        s.append(Output(0, b"%d" % i))
    sent = s.to_send()
    for ev in sent[:3]:
        assert r.receive(ev)
    s.on_disconnect()
    assert s.on_connect(r.next_seq) is True
    assert s.acked == r.applied  # what the receiver applied needs no ack
    replay = s.to_send()
    assert replay == sent[3:]
    assert all(r.receive(ev) for ev in replay)
    assert s.on_connect(r.next_seq) is True  # a second reconnect before any ack
    assert s.to_send() == []


def test_backlog_bound_drops_unsent_events_only() -> None:
    s = connected_sender(max_bytes=1200)  # snapshot 256 + 216 per event
    sent = s.to_send()
    for _ in range(3):
        s.append(Output(1, b"x" * 200))
    sent += s.to_send()  # 4 events handed out, not acked
    kept = s.backlog_events
    assert kept == 4
    assert s.append(Output(1, b"y" * 200)) is not None  # still fits
    assert s.backlog_events == 5
    assert not s.need_snapshot
    s.append(Output(1, b"z" * 200))  # over the bound: unsent ones go
    assert s.need_snapshot
    assert s.backlog_events == kept
    assert s.backlog_bytes == sum(event_size(e.body) for e in sent)
    assert s.append(Output(1, b"more")) is None
    # what was sent can still be replayed after a reconnect
    s.on_disconnect()
    seq = s.push_snapshot(snapshot_of(Replica()))
    # push_snapshot after a disconnect: nothing counts as sent, so all of it goes
    assert [e.event.seq for e in s._buf] == [seq]


def test_backlog_event_bound() -> None:
    s = connected_sender(max_events=4)
    s.to_send()
    for i in range(3):
        s.append(Output(0, b"%d" % i))
    assert not s.need_snapshot
    s.append(Output(0, b"3"))
    s.append(Output(0, b"4"))
    assert s.need_snapshot
    assert s.backlog_events == 1  # the snapshot, sent but not acked


def test_snapshot_supersedes_unsent_events_and_receiver_jumps() -> None:
    s = connected_sender()
    r = LogReceiver()
    for ev in s.to_send():
        r.receive(ev)
    s.append(Output(0, b"a"))
    s.append(Output(0, b"b"))
    seq = s.push_snapshot(snapshot_of(Replica()))
    evs = s.to_send()
    assert [e.seq for e in evs] == [seq]
    assert seq > r.next_seq  # a jump over the superseded events
    assert r.receive(evs[0])
    assert r.next_seq == seq + 1
    assert not r.receive(evs[0])  # a duplicate snapshot is not applied again


def test_receiver_rejects_gaps_and_ignores_duplicates() -> None:
    r = LogReceiver()
    assert r.applied == 0
    assert r.receive(Event(5, snapshot_of(Replica())))
    assert r.receive(Event(6, Output(0, b"a")))
    assert not r.receive(Event(6, Output(0, b"a")))
    assert not r.receive(Event(2, Output(0, b"a")))
    with pytest.raises(RemoteProtocolError):
        r.receive(Event(8, Output(0, b"a")))
    assert r.applied == 6
    r.forget()
    assert r.next_seq is None
    with pytest.raises(RemoteProtocolError):
        r.receive(Event(7, Output(0, b"a")))


def test_to_send_limit() -> None:
    s = connected_sender()
    for _ in range(4):
        s.append(Output(0, b"x" * 100))
    first = s.to_send(limit_bytes=1)
    assert len(first) == 1  # always progress, even past the limit
    batch = s.to_send(limit_bytes=250)
    assert len(batch) == 2
    assert len(s.to_send(limit_bytes=10_000)) == 2
    assert s.to_send() == []
