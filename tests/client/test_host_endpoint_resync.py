"""What the host agent's adapter adds to ``HostEndpoint``: ``resync`` (tmux gave
the agent a new control client) and control-only sends (``events=False``)."""

from __future__ import annotations

from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bindings,
    Event,
    Output,
    Ping,
    Pong,
    Snapshot,
    Status,
    Structure,
    Welcome,
)
from tether.core.session import SnapshotNeeded, State, Welcomed

WELCOME = Welcome(PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "ssh a", "ssh b", None)
SNAP = Snapshot(Structure((), -1), Status(()), Bindings("C-b", ()))


def connected(now: float = 100.0) -> HostEndpoint:
    ep = HostEndpoint()
    ep.connect(now)
    ep.messages_to_send(now)  # Hello
    ep.receive(WELCOME, now)
    assert isinstance(ep.next_event(), Welcomed)
    assert isinstance(ep.next_event(), SnapshotNeeded)
    ep.push_snapshot(SNAP, now)
    ep.append(Output(0, b"a"), now)
    sent = ep.messages_to_send(now)
    assert [o.message.seq for o in sent] == [1, 2]  # type: ignore[attr-defined]
    ep.receive(Ack(2), now)
    return ep


def test_resync_asks_a_snapshot_and_drops_events_until_it_comes() -> None:
    ep = connected()
    ep.resync(101.0)
    assert ep.state is State.CONNECTED and ep.need_snapshot
    assert isinstance(ep.next_event(), SnapshotNeeded)
    assert ep.append(Output(0, b"lost continuity"), 101.0) is None
    assert ep.next_event() is None  # asked once, not on every append
    seq = ep.push_snapshot(SNAP, 101.5)
    ep.append(Output(0, b"b"), 101.5)
    events = [o.message for o in ep.messages_to_send(101.5)]
    assert all(isinstance(e, Event) for e in events)
    assert [e.seq for e in events] == [seq, seq + 1]  # type: ignore[attr-defined]
    assert isinstance(events[0].body, Snapshot)  # type: ignore[attr-defined]


def test_resync_while_disconnected_snapshots_on_the_next_welcome() -> None:
    ep = connected()
    ep.connection_lost(101.0)
    ep.resync(101.0)
    assert ep.next_event() is None
    ep.connect(102.0)
    ep.receive(Welcome(PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "ssh a", "ssh b", 3), 102.0)
    assert isinstance(ep.next_event(), Welcomed)
    assert isinstance(ep.next_event(), SnapshotNeeded)


def test_control_messages_go_without_the_log() -> None:
    ep = connected()
    ep.append(Output(0, b"c"), 100.0)
    ep.receive(Ping(5), 100.0)
    control = [o.message for o in ep.messages_to_send(100.0, events=False)]
    assert control == [Pong(5)]
    rest = [o.message for o in ep.messages_to_send(100.0)]
    assert len(rest) == 1 and isinstance(rest[0], Event)
