"""The replication log: sequence numbers, acks, replay, and snapshots when behind.

``LogSender`` lives with the producer (the host agent). It numbers events,
keeps unacked ones in a bounded buffer for replay on a new connection, and
asks for a snapshot when the receiver's position is no longer buffered or the
backlog passes its bound: the snapshot then replaces the whole backlog.

``LogReceiver`` lives with the consumer (the relay). It applies each sequence
number exactly once and in order; only a snapshot may jump ahead.

Both are pure state machines: no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .limits import MAX_BACKLOG_BYTES, MAX_BACKLOG_EVENTS
from .messages import Event, EventBody, Snapshot, event_size


@dataclass(slots=True)
class _Entry:
    event: Event
    size: int


class LogSender:
    """Numbers events and keeps the unacked ones until the receiver confirms them."""

    def __init__(
        self, max_bytes: int = MAX_BACKLOG_BYTES, max_events: int = MAX_BACKLOG_EVENTS
    ) -> None:
        self.max_bytes = max_bytes
        self.max_events = max_events
        self.next_seq = 1
        self.acked = 0
        self._buf: deque[_Entry] = deque()
        self._bytes = 0
        self._sent = 0  # entries of _buf already handed out on this connection
        self.need_snapshot = True  # the first thing a receiver gets is a snapshot
        self.snapshots = 0

    @property
    def backlog_bytes(self) -> int:
        return self._bytes

    @property
    def backlog_events(self) -> int:
        return len(self._buf)

    def append(self, body: EventBody) -> int | None:
        """Log one event; returns its seq, or None while a snapshot is owed.

        While a snapshot is owed, events are dropped: the snapshot will carry
        their effect.
        """
        if self.need_snapshot:
            return None
        seq = self.next_seq
        self.next_seq += 1
        size = event_size(body)
        self._buf.append(_Entry(Event(seq, body), size))
        self._bytes += size
        unsent = len(self._buf) - self._sent
        if unsent > 0 and (self._bytes > self.max_bytes or len(self._buf) > self.max_events):
            # The receiver is too far behind: drop what it has not even been sent,
            # and let a snapshot supersede it.
            self._drop_unsent()
            self.need_snapshot = True
        return seq

    def push_snapshot(self, snapshot: Snapshot) -> int:
        """Log a snapshot that supersedes everything not yet sent."""
        self._drop_unsent()
        seq = self.next_seq
        self.next_seq += 1
        size = event_size(snapshot)
        self._buf.append(_Entry(Event(seq, snapshot), size))
        self._bytes += size
        self.need_snapshot = False
        self.snapshots += 1
        return seq

    @property
    def unsent_bytes(self) -> int:
        return sum(e.size for e in list(self._buf)[self._sent:])

    def jump(self, max_unsent: int) -> bool:
        """Past ``max_unsent`` bytes not yet sent, drop them and owe a snapshot:
        after an outage the receiver gets the present, not the history. What
        was sent stays (it is on its way); True if it jumped."""
        if self.need_snapshot or len(self._buf) == self._sent:
            return False
        if self.unsent_bytes <= max_unsent:
            return False
        self._drop_unsent()
        self.need_snapshot = True
        return True

    def _drop_unsent(self) -> None:
        while len(self._buf) > self._sent:
            self._bytes -= self._buf.pop().size

    def to_send(self, limit_bytes: int | None = None) -> list[Event]:
        """Events not yet handed out on the current connection, in order."""
        out: list[Event] = []
        total = 0
        while self._sent < len(self._buf):
            entry = self._buf[self._sent]
            if limit_bytes is not None and out and total + entry.size > limit_bytes:
                break
            out.append(entry.event)
            total += entry.size
            self._sent += 1
        return out

    def on_ack(self, seq: int) -> None:
        """The receiver applied everything up to ``seq``."""
        if seq >= self.next_seq:
            raise RemoteProtocolError(f"ack {seq} for an event never sent")
        if seq <= self.acked:
            return  # old or duplicate ack
        sent_seq = self._buf[self._sent - 1].event.seq if self._sent else self.acked
        if seq > sent_seq:
            raise RemoteProtocolError(f"ack {seq} for an event not yet sent")
        while self._buf and self._buf[0].event.seq <= seq:
            entry = self._buf.popleft()
            self._bytes -= entry.size
            self._sent -= 1
        self.acked = seq

    def on_connect(self, receiver_next: int | None) -> bool:
        """A new connection: the receiver wants ``receiver_next`` onward.

        Returns True if the log can replay from there; False if a snapshot is
        needed (then ``need_snapshot`` is set and the backlog dropped).
        """
        self._sent = 0
        if receiver_next is not None and receiver_next - 1 > self.acked:
            if receiver_next > self.next_seq:
                receiver_next = None  # the receiver claims the future: start over
            else:
                # the receiver applied more than it acked: those are done
                self.on_ack_unsent(receiver_next - 1)
        first = self._buf[0].event.seq if self._buf else self.next_seq
        if receiver_next is not None and first <= receiver_next <= self.next_seq:
            if not self.need_snapshot:
                return True
        self._buf.clear()
        self._bytes = 0
        self.need_snapshot = True
        return False

    def on_ack_unsent(self, seq: int) -> None:
        """Trim entries up to ``seq`` regardless of what was sent (reconnect path)."""
        while self._buf and self._buf[0].event.seq <= seq:
            self._bytes -= self._buf.popleft().size
        self.acked = max(self.acked, seq)

    def on_disconnect(self) -> None:
        """Everything unacked must be sent again on the next connection."""
        self._sent = 0


class LogReceiver:
    """Applies each event exactly once, in order; only a snapshot may skip ahead."""

    def __init__(self) -> None:
        self.next_seq: int | None = None  # None: nothing applied yet, need a snapshot

    @property
    def applied(self) -> int:
        return 0 if self.next_seq is None else self.next_seq - 1

    def receive(self, event: Event) -> bool:
        """True if ``event`` is new and must be applied now; False for a duplicate."""
        if isinstance(event.body, Snapshot):
            if self.next_seq is not None and event.seq < self.next_seq:
                return False
            self.next_seq = event.seq + 1
            return True
        if self.next_seq is None:
            raise RemoteProtocolError("the first event must be a snapshot")
        if event.seq < self.next_seq:
            return False
        if event.seq > self.next_seq:
            raise RemoteProtocolError(f"gap: expected event {self.next_seq}, got {event.seq}")
        self.next_seq += 1
        return True

    def is_next(self, event: Event) -> bool:
        """Whether ``event``, repeated out of band (``EventRepeat``), may be taken
        now: only the very next one. A repeat never jumps (no snapshot ahead, no
        gap) and a duplicate is not new; the ordered copy covers the rest."""
        return self.next_seq is not None and event.seq == self.next_seq

    def forget(self) -> None:
        """Drop the position (e.g. the replica was lost): the next event must be a snapshot."""
        self.next_seq = None
