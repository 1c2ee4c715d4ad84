"""One shared session's state, and the fan-out of its host's stream.

A session knows nothing of fronts, sockets or the registry: it holds what one
host and its mates share (mates, window size, subscribers) and hands every new
event of the host's log to its subscribers. The protocol with the host (log
position, input stream, acks, presence) is ``core.relay_endpoint``'s
``RelayHostEndpoint``: the session feeds it, sends what it queues on the
current host link and acts on its events. Kept apart from the fronts so the
relay can later move sessions onto other cores without taking a front along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Protocol

from tether.core.join_endpoint import SnapshotCache
from tether.core.limits import MAX_ITEMS
from tether.core.messages import (
    Ack,
    Binding,
    Error,
    Event,
    Hello,
    Input,
    MateInfo,
    Message,
    Snapshot,
    Status,
)
from tether.core.ratelimit import TokenBucket
from tether.core.relay_endpoint import RelayHostEndpoint
from tether.core.session import EventReceived, KickRequested, Presence, SessionEvent
from tether.transport.alarm import Alarm
from tether.transport.link import Link, LinkClosed, send_out

log = logging.getLogger("tether.relay")

class Subscriber(Protocol):
    """Anything fed a session's replication stream: the replica worker today,
    join clients and recorders next.

    Each new event of the host's log reaches every subscriber once and in order
    (repeats after a host reconnect are dropped before). ``send`` must not
    block: back-pressure goes through ``drain``, which the host's receive loop
    awaits, so a slow subscriber slows its host, never the relay. Only the
    replica, the session's authority, may raise from ``send`` (it ends the
    host's connection); others should drop themselves instead.
    """

    def send(self, msg: Message) -> None:
        """Queue one event of the host's log."""

    async def drain(self) -> None:
        """Wait until what was sent is taken."""

    def presence(self, present: bool, text: str) -> None:
        """The host came back, or went away (``text`` says which, for people)."""

    async def close(self) -> None:
        """The session ended."""


class Replica(Subscriber, Protocol):
    """The subscriber that is the session's authority: it renders the stream in
    a tmux server that mates attach to, and outlives the host's disconnects.
    ``replica.ReplicaHandle`` (a worker process per session) is one; a per-core
    worker holding many sessions' replicas can be another."""

    closed: asyncio.Future[None]
    """Done once the replica is gone (the session is then reaped)."""

    async def start(self) -> None: ...

    async def attach(self, mate: int, readonly: bool, cols: int, rows: int, term: str) -> int:
        """A pty master connected to a new tmux client of the replica."""
        ...

    def resized(self, mate: int) -> None:
        """The mate's pty master was just given a new size."""

    def detached(self, mate: int) -> None:
        """The mate left; its pty master is closed."""


MORE = "more"
"""The kind of the last entry of a mate list cut at ``MAX_ITEMS``: not a mate
(its id is 0, which no mate has), its address says how many were left out."""

MatesShown = Callable[[tuple[MateInfo, ...]], None]


@dataclass
class Mate:
    id: int
    readonly: bool
    cols: int
    rows: int
    fd: int = -1
    kind: str = "ssh"
    """``ssh``, ``join`` or ``web``: how the mate is connected."""
    address: str = ""
    """Where it connects from (``203.0.113.5:40122``), for the host's list."""
    fingerprint: str = ""
    """``SHA256:...`` of the SSH key it authenticated with (sessions with ``-a``)."""
    away: bool = False
    """A join client whose link is down while its place is held: still listed."""
    kick: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    """Disconnects this mate (set by its role); None: it cannot be (yet)."""
    show: MatesShown | None = field(default=None, repr=False, compare=False)
    """Shows the session's mate list to this mate (a browser's page), on every change."""

    def info(self) -> MateInfo:
        address = f"{self.address} (link down)" if self.away else self.address
        return MateInfo(self.id, self.kind, self.readonly, address, self.fingerprint)


def mate_list(mates: dict[int, Mate]) -> tuple[MateInfo, ...]:
    """Every mate by id, cut to fit one message: past ``MAX_ITEMS`` the first
    ones, then an entry of kind ``MORE`` saying how many more there are."""
    infos = [mates[k].info() for k in sorted(mates)]
    if len(infos) > MAX_ITEMS:
        left = len(infos) - (MAX_ITEMS - 1)
        infos = [*infos[: MAX_ITEMS - 1], MateInfo(0, MORE, True, f"{left} more not listed")]
    return tuple(infos)


def status_rows(status: Status) -> int:
    """Rows the host's status line takes: tmux allows off, on, or 2 to 5."""
    value = dict(status.options).get("status", "on")
    if value == "off":
        return 0
    return int(value) if value in ("2", "3", "4", "5") else 1


@dataclass
class Session:
    id: str
    rw_token: str
    ro_token: str
    secret: bytes
    host_key: str
    replica: Replica
    mate_keys: set[bytes] = field(default_factory=set)
    host: Link | None = None
    """The current host link: what the endpoint queues goes there."""
    conn: int = 0
    """The endpoint's number for ``host``; a superseded link's news is ignored."""
    mates: dict[int, Mate] = field(default_factory=dict)
    status_rows: int = 1
    ended: bool = False
    worker_log: TokenBucket = field(
        default_factory=lambda: TokenBucket(1.0, 20.0, time.monotonic())
    )
    """Lines the session's worker may put in the relay's log: 20, then 1 a second."""
    joining: int = 0
    """Mates past the token check and not yet attached: counted against max_mates."""
    screen: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the host's first snapshot went to the replica: a mate who
    attached before would see a placeholder and type into nothing."""
    wake: Alarm = field(default_factory=Alarm)
    """Set when the endpoint's next timer moved earlier: the host link's timer
    loop then sleeps again until the new ``next_timer()``."""
    endpoint: InitVar[RelayHostEndpoint | None] = None
    ep: RelayHostEndpoint = field(init=False)
    """The protocol with the host; it decides, the session moves bytes."""
    subscribers: list[Subscriber] = field(init=False)
    """Who gets the host's stream; the replica first, always."""
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    """The host's log from its last snapshot on: where join clients start."""
    joins: int = 0
    """Join clients of this session (they hold the cache past its bound)."""
    _undrained: bool = field(default=False, init=False)

    def __post_init__(self, endpoint: RelayHostEndpoint | None) -> None:
        self.subscribers = [self.replica]
        self.ep = endpoint or RelayHostEndpoint(self.id, self.secret, self.rw_token, self.ro_token)

    @property
    def size(self) -> tuple[int, int]:
        return self.ep.size

    @property
    def away_since(self) -> float | None:
        return self.ep.away_since

    # --- host links: bytes in and out of the endpoint -----------------------------

    def attach(self, link: Link, hello: Hello, now: float) -> int:
        """Make ``link`` the host link (closing one it supersedes): Welcome and the rest."""
        if self.host is not None and self.host is not link:
            self.host.close()  # the old connection is dead or superseded
        self.host = link
        self.conn = self.ep.attach(hello, now)
        self.flush(now)
        self.events()
        self.wake.set()
        return self.conn

    def detach(self, link: Link, now: float) -> bool:
        """``link`` ended; if it was the host's, the host is away (mates are told)."""
        if self.host is not link:
            return False
        self.host = None
        self.ep.connection_lost(now, self.conn)
        self.events()
        return True

    def receive(self, msg: Message, now: float, conn: int) -> list[SessionEvent]:
        """One message from host link ``conn``: through the endpoint, answers out,
        events fanned out. Returns what the caller must act on (ended, failed)."""
        self.ep.receive(msg, now, conn)
        self.flush(now)
        return self.events()

    def tick(self, now: float, activity: float | None = None) -> list[SessionEvent]:
        """Fire the endpoint's due timers; ``activity``: when the transport last
        heard the host outside ``receive`` (QUIC datagram pings)."""
        if activity:
            self.ep.note_activity(activity)
        when = self.ep.next_timer()
        if when is not None and now >= when:
            self.ep.handle_timer(now)
        self.flush(now)
        return self.events()

    def flush(self, now: float) -> None:
        """Send what the endpoint queued on the host link, each on its channel."""
        out = self.ep.messages_to_send(now)
        link = self.host
        if link is None:
            return
        with contextlib.suppress(LinkClosed):
            for o in out:
                send_out(link, o)

    def events(self) -> list[SessionEvent]:
        """Act on the endpoint's events that need no waiting; return the others."""
        left: list[SessionEvent] = []
        while (ev := self.ep.next_event()) is not None:
            if isinstance(ev, EventReceived):
                self._fan_out(ev.event)
            elif isinstance(ev, Presence):
                self.presence(ev.present, ev.text)
            elif isinstance(ev, KickRequested):
                self.kick(ev.mate)
            else:
                left.append(ev)
        return left

    # --- the host's stream, out to subscribers ----------------------------------

    def subscribe(self, sub: Subscriber) -> None:
        """Feed ``sub`` every event from now on (a newcomer starts from a snapshot)."""
        self.subscribers.append(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub is not self.replica:
            with contextlib.suppress(ValueError):
                self.subscribers.remove(sub)

    def _fan_out(self, msg: Event) -> None:
        """One new event of the host's log (the endpoint dropped repeats): to every
        subscriber, in order; ``drain`` then waits for them."""
        if isinstance(msg.body, Status):
            self.status_rows = status_rows(msg.body)
        self.cache.hold = self.joins > 0
        if self.cache.add(msg):
            self.ep.request_snapshot()  # join clients read a long cache: start it over
            self.flush(time.monotonic())
        self._undrained = True
        for sub in self.subscribers:
            sub.send(msg)
        if isinstance(msg.body, Snapshot):
            # the worker handles its stream in order: a mate's attach
            # sent after this finds the host's windows, not a placeholder
            self.screen.set()

    async def drain(self) -> None:
        """Back-pressure: the host's next message waits until subscribers took this one."""
        if self._undrained:
            self._undrained = False
            for sub in list(self.subscribers):
                await sub.drain()

    def presence(self, present: bool, text: str) -> None:
        for sub in self.subscribers:
            sub.presence(present, text)

    async def close(self) -> None:
        """Let go of the host and every subscriber (the registry has forgotten us)."""
        self.ep.end(time.monotonic())
        self.wake.set()
        if self.host is not None:
            self.host.close()
        for sub in list(self.subscribers):
            await sub.close()

    # --- back to the host -------------------------------------------------------

    def send_input(self, pane: int, keys: bytes, binding: Binding | None, now: float) -> None:
        """A mate's keys to the host; the timer loop rearms when the host's
        silence now counts sooner (keys wait for it)."""
        before = self.ep.next_timer()
        self.ep.send_input(pane, keys, binding, now)
        self.flush(now)
        after = self.ep.next_timer()
        if after is not None and (before is None or after < before):
            self.wake.set()

    def from_replica(self, msg: Message) -> None:
        """What the replica worker says: acks, mates' keys, complaints."""
        now = time.monotonic()
        if isinstance(msg, Ack):
            # the endpoint coalesces acks (ACK_EVERY); the timer loop sends them
            before = self.ep.next_timer()
            self.ep.applied(msg.seq, now)
            if self.ep.next_timer() != before:
                self.wake.set()
        elif isinstance(msg, Input):
            self.send_input(msg.pane, msg.keys, msg.binding, now)
        elif isinstance(msg, Error):
            # the worker is jailed because it may be hostile: its words are data,
            # and it may not flood the relay's log
            if self.worker_log.allow(1, now):
                log.warning("session %s: %s", self.id, ascii(msg.message[:300]))

    # --- presence: who is connected, for the host and the mates' pages ----------------

    def add_mate(self, mate: Mate) -> None:
        """``mate`` is connected: listed for the host and every watching mate."""
        self.mates[mate.id] = mate
        self.mates_changed()

    def remove_mate(self, mate_id: int) -> Mate | None:
        """The mate is gone (None: it was not listed)."""
        mate = self.mates.pop(mate_id, None)
        if mate is not None:
            self.mates_changed()
        return mate

    def mates_changed(self) -> None:
        """Tell the host (now, and again on its next reconnect) and the mates who
        watch the list who is connected; a mate's details changed or the set did."""
        infos = mate_list(self.mates)
        self.ep.set_mates(infos)
        self.flush(time.monotonic())
        for mate in list(self.mates.values()):
            if mate.show is not None:
                mate.show(infos)

    def kick(self, mate_id: int) -> bool:
        """The host asked to disconnect a mate: its connection ends, its token stays
        valid. An id no listed mate has (gone already, or never was) is ignored."""
        mate = self.mates.get(mate_id)
        if mate is None or mate.kick is None:
            log.info("session %s: the host asked to disconnect mate %d, which is not "
                     "connected; ignored", self.id, mate_id)
            return False
        log.info("session %s: the host disconnected mate %d (%s)", self.id, mate_id, mate.kind)
        mate.kick()
        return True

    def resize(self) -> None:
        """Window size follows the smallest read-write mate; read-only mates never count."""
        rw = [m for m in self.mates.values() if not m.readonly]
        if rw:
            size = (min(m.cols for m in rw), max(1, min(m.rows for m in rw) - self.status_rows))
        else:
            size = (0, 0)
        self.ep.set_size(*size)
        self.flush(time.monotonic())
