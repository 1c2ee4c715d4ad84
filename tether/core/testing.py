"""Test doubles shipped with the package (as httpcore ships its mock backends).

``FakeClock`` is the only time there is; ``MemoryLink`` is one connection
between two endpoints, each direction with its own seeded impairment. It
behaves as the real transports do, so the protocol is tested against what it
will meet:

- stream messages (``Channel.STREAM``) arrive in order or not at all: a
  "lost" stream message breaks the connection (it goes black, as a TCP
  connection whose path died), it never leaves a gap;
- acks and datagrams may be lost, duplicated and reordered (QUIC datagrams);
- ``cut()`` blackholes the connection (nothing arrives, nobody is told);
  ``restore()`` lets held stream messages through late (a QUIC connection
  that migrated), or ``close()`` ends it (both sides learn it from the harness).

Pure, like the rest of ``tether.core``: the test decides when time moves.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .messages import Message
from .session import Channel, Outgoing, earliest


class FakeClock:
    """Seconds, moved only by the test."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def set(self, when: float) -> None:
        self.now = max(self.now, when)


class Peer(Protocol):
    """What a link needs of an endpoint (or of an adapter-like wrapper around one)."""

    def receive(self, msg: Message, now: float) -> object: ...

    def messages_to_send(self, now: float) -> list[Outgoing]: ...


class Timed(Protocol):
    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


@dataclass
class Impairment:
    """One direction's faults; probabilities per message, times in seconds."""

    delay: float = 0.01
    jitter: float = 0.0
    loss: float = 0.0
    """Datagrams lost; for stream messages: chance the connection breaks there."""
    duplicate: float = 0.0
    """Datagrams delivered twice."""
    reorder: float = 0.0
    """Datagrams held back behind later ones."""


class _Direction:
    def __init__(self, rng: random.Random, imp: Impairment, to: Peer) -> None:
        self.rng = rng
        self.imp = imp
        self.to = to
        self.queue: list[tuple[float, int, Message]] = []
        self.held: list[Message] = []  # stream messages sent while cut
        self.last_stream = 0.0
        self.counter = itertools.count()

    def _lag(self) -> float:
        return self.imp.delay + self.rng.random() * self.imp.jitter

    def put(self, out: Outgoing, now: float, cut: bool) -> bool:
        """Queue one message; False if it broke the connection."""
        if out.channel is Channel.STREAM:
            if self.rng.random() < self.imp.loss:
                return False
            if cut:
                self.held.append(out.message)
                return True
            self.last_stream = max(self.last_stream, now + self._lag())
            self._push(self.last_stream, out.message)
            return True
        if cut or self.rng.random() < self.imp.loss:
            return True
        at = now + self._lag()
        if self.rng.random() < self.imp.reorder:
            at += self.imp.delay * (1 + 3 * self.rng.random()) + 0.001
        self._push(at, out.message)
        if self.rng.random() < self.imp.duplicate:
            self._push(at + self._lag(), out.message)
        return True

    def _push(self, at: float, msg: Message) -> None:
        heapq.heappush(self.queue, (at, next(self.counter), msg))

    def release(self, now: float) -> None:
        held, self.held = self.held, []
        for msg in held:
            self.last_stream = max(self.last_stream, now + self._lag())
            self._push(self.last_stream, msg)


class MemoryLink:
    """One connection between peer ``a`` and peer ``b``, driven by ``pump``/``deliver``."""

    def __init__(
        self,
        a: Peer,
        b: Peer,
        seed: int = 0,
        a_to_b: Impairment | None = None,
        b_to_a: Impairment | None = None,
    ) -> None:
        rng = random.Random(seed)
        self.a, self.b = a, b
        self._ab = _Direction(rng, a_to_b or Impairment(), b)
        self._ba = _Direction(rng, b_to_a or Impairment(), a)
        self.is_cut = False
        self.closed = False
        self.broken = False
        """A stream message was "lost": the connection went black for good."""
        self.delivered: list[tuple[str, Message]] = []
        """Every delivery, ("a>b" or "b>a", message): for assertions on wire order."""

    def cut(self) -> None:
        """Blackhole: datagrams in flight are lost, stream messages wait."""
        self.is_cut = True
        for d in (self._ab, self._ba):
            d.held = [m for _, _, m in sorted(d.queue)] + d.held
            d.queue.clear()

    def restore(self, now: float) -> None:
        """The path is back: the held stream messages arrive, in order."""
        if self.broken or self.closed:
            return
        self.is_cut = False
        self._ab.release(now)
        self._ba.release(now)

    def close(self) -> None:
        """The connection is over; whatever was in flight is gone."""
        self.closed = True
        for d in (self._ab, self._ba):
            d.queue.clear()
            d.held.clear()

    def pump(self, now: float) -> None:
        """Take what both peers want to send."""
        for peer, d in ((self.a, self._ab), (self.b, self._ba)):
            for out in peer.messages_to_send(now):
                if self.closed:
                    continue
                if not d.put(out, now, self.is_cut or self.broken):
                    self.broken = True
                    self.cut()

    def next_delivery(self) -> float | None:
        return earliest(*(d.queue[0][0] if d.queue else None for d in (self._ab, self._ba)))

    def deliver(self, now: float) -> bool:
        """Deliver the one message due first; False if none is due."""
        due = [d for d in (self._ab, self._ba) if d.queue and d.queue[0][0] <= now]
        if not due or self.closed:
            return False
        d = min(due, key=lambda x: x.queue[0][:2])
        _, _, msg = heapq.heappop(d.queue)
        self.delivered.append(("a>b" if d is self._ab else "b>a", msg))
        d.to.receive(msg, now)
        return True


def next_time(timed: Iterable[Timed | None], links: Iterable[MemoryLink]) -> float | None:
    """The next moment anything happens: a timer or a delivery."""
    return earliest(
        *(t.next_timer() for t in timed if t is not None),
        *(link.next_delivery() for link in links if not link.closed),
    )
