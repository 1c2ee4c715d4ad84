"""Mate input with per-stream sequence numbers, applied exactly once.

The relay numbers each input stream (one per mate, or per replica input
source) with ``InputSender`` and resends what the host has not acked after a
reconnect. The host's ``InputReceiver`` remembers the last applied number per
stream, so a resent chunk is recognised and dropped: never typed twice.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .errors import RemoteProtocolError
from .limits import MAX_INPUT_BACKLOG, MAX_INPUT_STREAMS
from .messages import Binding, Input


class InputSender:
    """One stream's unacked input, bounded."""

    def __init__(self, stream: int, max_backlog: int = MAX_INPUT_BACKLOG) -> None:
        self.stream = stream
        self.next_seq = 1
        self.acked = 0
        self.max_backlog = max_backlog
        self.dropped = 0
        self._pending: deque[Input] = deque()

    def push(self, pane: int, keys: bytes = b"", binding: Binding | None = None) -> Input:
        msg = Input(self.stream, self.next_seq, pane, keys, binding)
        self.next_seq += 1
        self._pending.append(msg)
        while len(self._pending) > self.max_backlog:
            # The host is unreachable and the mate keeps typing: keep the newest.
            self._pending.popleft()
            self.dropped += 1
        return msg

    def on_ack(self, seq: int) -> None:
        if seq >= self.next_seq:
            raise RemoteProtocolError(f"input ack {seq} for input never sent")
        while self._pending and self._pending[0].seq <= seq:
            self._pending.popleft()
        self.acked = max(self.acked, seq)

    def unacked(self) -> list[Input]:
        """Everything to resend on a new connection, in order."""
        return list(self._pending)


class InputReceiver:
    """Remembers the last applied seq per stream (bounded number of streams)."""

    def __init__(self, max_streams: int = MAX_INPUT_STREAMS) -> None:
        self._last: OrderedDict[int, int] = OrderedDict()
        self.max_streams = max_streams

    def accept(self, msg: Input) -> bool:
        """True if ``msg`` is new and must be applied; False if already applied."""
        if msg.seq < 1:
            raise RemoteProtocolError("input seq must be positive")
        last = self._last.get(msg.stream, 0)
        if msg.seq <= last:
            return False
        self._last[msg.stream] = msg.seq
        self._last.move_to_end(msg.stream)
        while len(self._last) > self.max_streams:
            self._last.popitem(last=False)
        return True

    def last(self, stream: int) -> int:
        return self._last.get(stream, 0)
