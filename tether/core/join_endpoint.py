"""The relay's end of a join client (``tether join``), sans-I/O.

A join client is fed the host's replication log itself, not a rendering of
the relay's replica: its own tmux applies the events. The relay keeps the log
from the host's last snapshot on (``SnapshotCache``, one per session), so a
client that is new, or comes back after an outage, starts from the present:
it resumes where it stopped when that is a short replay, and otherwise jumps
to the snapshot. Where the relay holds no snapshot (the cache overflowed, or
the session is new), the endpoint asks for one (``ResyncNeeded``: the
adapter sends ``Resync`` to the host).

The endpoint outlives its links: a client that reconnects (any address, any
transport) with the ``resume`` secret of its ``Joined`` takes its place
again, and its keystrokes, numbered by the client, reach the host exactly
once (``core.inputs``).

Over QUIC the endpoint also repeats the client's small unacked events as
datagrams (``EventRepeat``), the mirror of the client's ``InputRepeat``: a
lost packet of the host's echo then costs no loss-recovery delay when a copy
just after it, or one a little over a round trip later, gets through.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .inputs import InputReceiver
from .messages import (
    JOIN_PROTOCOL_VERSIONS,
    PROTOCOL_VERSION,
    Ack,
    Binding,
    End,
    Error,
    Event,
    EventRepeat,
    Frame,
    Input,
    InputAck,
    InputRepeat,
    Join,
    Joined,
    Message,
    Output,
    PaneReset,
    Ping,
    Pong,
    Resize,
    Snapshot,
    event_size,
)
from .ratelimit import TokenBucket
from .records import Record
from .session import ACK_EVERY, JUMP_BYTES, PING_BURST, PING_RATE, SEND_CHUNK, Channel, Outgoing

MAX_REPEATED = 32
"""Most inputs one ``InputRepeat`` may carry (the client sends fewer: a datagram's worth)."""
REPEAT_APART = 0.005
"""The first repeat (of a key, of an event) this long after it: in a packet of its
own (sent in the same turn it would share the original's packet, and a loss
would take both)."""
REPEAT_AFTER_RTTS, REPEAT_SLACK = 1.25, 0.02
"""A key still unacked this long after it, an event this long after its first
repeat (in SRTTs, plus slack): repeated once more. Past that, QUIC's own
recovery. Long enough for the ack to come back first when nothing was lost."""
REPEAT_RTT = 0.1
"""The SRTT assumed before the link has measured one."""
LOSS_MEMORY = 60.0
"""Seconds after the link last lost a packet during which a key or event is
repeated at once (``REPEAT_APART``). On a path that loses nothing the first
copy waits ``repeat_after`` like the second: the ack comes back first, and
a key's echo costs no extra packets (three, with the acks they drew)."""


def first_repeat(now: float, lost_at: float | None, rtt: float | None) -> float:
    """When a key or event just sent is first repeated, if still unacked: at once
    (``REPEAT_APART``) on a link that lost a packet lately, else after
    ``repeat_after``."""
    if lost_at is not None and now - lost_at < LOSS_MEMORY:
        return now + REPEAT_APART
    return now + repeat_after(rtt or REPEAT_RTT)


def repeat_after(rtt: float) -> float:
    """How long an unacked key or event waits for its next repeat: a little over
    a round trip, and never less than the peer's coalesced ack (``ACK_EVERY``)
    takes to come back. Timed by the round trip alone, a short path (a LAN,
    loopback) sent every echo and key a second time before its ack could
    arrive, though nothing was lost."""
    return max(REPEAT_AFTER_RTTS * rtt, ACK_EVERY + rtt) + REPEAT_SLACK

EVENT_REPEATS = 2
"""Times an event goes as a repeat at most (besides its copy on the stream)."""
EVENT_REPEAT_MAX = 16
"""Most events one ``EventRepeat`` carries (and a client accepts)."""
EVENT_REPEAT_BYTES = 1000
"""Most encoded bytes of one ``EventRepeat`` (a QUIC datagram holds ~1200)."""
REPEATED_EVENT_BYTES = 512
"""Events larger than this encoded are not repeated: an echo is a few bytes;
bulk output is QUIC's to recover, repeats would only multiply it."""
REPEAT_HEADER = 8
"""Bytes of an ``EventRepeat``'s own framing, beyond its events'."""
RESIZE_RATE = 32.0
RESIZE_BURST = 256.0
"""Resizes a join client may send a second, and in a burst (as ssh window changes)."""
CACHE_MAX_BYTES = 1024 * 1024
"""Log bytes kept after the host's last snapshot. Past this, with join clients
present, the host is asked for a new snapshot (which resets the cache) while
the cache grows on, up to four times this; with none, or past that, the
cache is dropped and the next client that needs a start asks for one."""


class SnapshotCache:
    """The host's log from its last snapshot on: where any join client can start."""

    def __init__(self, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hold = False
        """Join clients read from the cache: past ``max_bytes`` ask for a
        snapshot and keep growing (to 4x) rather than drop their positions."""
        self._events: deque[Event] = deque()
        self._bytes = 0
        self._asked = False

    @property
    def valid(self) -> bool:
        """Holds a snapshot (and everything after it)."""
        return bool(self._events)

    @property
    def first_seq(self) -> int | None:
        """The snapshot's sequence number (None: no snapshot held)."""
        return self._events[0].seq if self._events else None

    @property
    def next_seq(self) -> int | None:
        """The sequence number the next event will have, as far as the cache knows."""
        return self._events[-1].seq + 1 if self._events else None

    def add(self, event: Event) -> bool:
        """One new event of the host's log, in order; True: ask the host for a
        snapshot now (``Resync``), the cache is long."""
        if isinstance(event.body, Snapshot):
            self._events.clear()
            self._bytes = 0
            self._asked = False
        elif not self._events or event.seq != self._events[-1].seq + 1:
            self.clear()  # nothing to start from, or a gap: wait for a snapshot
            return False
        self._events.append(event)
        self._bytes += event_size(event.body)
        if self._bytes <= self.max_bytes:
            return False
        if not self.hold or self._bytes > self.max_bytes * 4:
            self.clear()
            return False
        ask, self._asked = not self._asked, True
        return ask

    def clear(self) -> None:
        self._events.clear()
        self._bytes = 0
        self._asked = False

    def bytes_from(self, seq: int) -> int:
        """What replaying from ``seq`` would cost."""
        return sum(event_size(e.body) for e in self._events if e.seq >= seq)

    def take(self, seq: int, limit_bytes: int | None) -> list[Event]:
        """Events from ``seq`` on (held ones only), at most ``limit_bytes`` (one at least)."""
        first = self.first_seq
        if first is None or seq < first:
            return []
        out: list[Event] = []
        total = 0
        for i in range(seq - first, len(self._events)):
            ev = self._events[i]
            size = event_size(ev.body)
            if limit_bytes is not None and out and total + size > limit_bytes:
                break
            out.append(ev)
            total += size
        return out


# --- events for the adapter ------------------------------------------------------


class ResyncNeeded(Record):
    """The client needs a starting point the cache does not hold: ask the host."""


class MateTyped(Record):
    """Keys (or a host binding) the client typed, once and in order: for the host."""

    pane: int
    keys: bytes
    binding: Binding | None


class MateResized(Record):
    """The client's terminal size changed (read-write clients count for the size)."""

    cols: int
    rows: int


class MateLeft(Record):
    """The client said goodbye (``End``): its place ends now, not when the relay
    would forget it, so the host's list of mates is right at once."""

    reason: str


class JoinFailed(Record):
    """The client broke the protocol: send the queued ``Error`` and close the link."""

    text: str


JoinEvent = ResyncNeeded | MateTyped | MateResized | JoinFailed


@dataclass(slots=True)
class _Repeat:
    """A small sent event, unacked: repeated as a datagram up to ``EVENT_REPEATS`` times."""

    event: Event
    size: int
    count: int
    due: float


class RelayJoinEndpoint:
    """One join client's place in a session: log position, input stream, size."""

    def __init__(
        self,
        session: str,
        mate: int,
        readonly: bool,
        resume: bytes,
        cache: SnapshotCache,
        quic: tuple[str, ...] = (),
        quic_fingerprint: str = "",
    ) -> None:
        self.session = session
        self.mate = mate
        self.readonly = readonly
        self.resume = resume
        self.cache = cache
        self.quic = quic
        self.quic_fingerprint = quic_fingerprint
        self.inputs = InputReceiver()
        self.size = (80, 24)
        self.connected = False
        self.conn = 0
        self.next_send: int | None = None
        """The next event to send; None: waiting for a starting point."""
        self.acked = 0
        self._outbox: list[Outgoing] = []
        self._events: deque[JoinEvent] = deque()
        self._input_ack: InputAck | None = None
        self._ack_at: float | None = None
        self._resync_asked = False
        self._pings = TokenBucket(PING_RATE, PING_BURST, 0.0)
        self._resizes = TokenBucket(RESIZE_RATE, RESIZE_BURST, 0.0)
        self.datagrams = False
        """The link takes datagrams (QUIC): small events are repeated on it."""
        self.rtt: float | None = None
        """The link's smoothed RTT, set by the adapter (QUIC's estimate)."""
        self.lost_at: float | None = None
        """When the link last lost a packet (its QUIC's loss detection)."""
        self._repeats: deque[_Repeat] = deque()
        """Sent, unacked, small events, in order; together they fit one datagram."""

    # --- links -------------------------------------------------------------------------

    def attach(self, join: Join, now: float, datagrams: bool = False) -> int:
        """A link said ``Join`` (checked by the adapter: version, token or resume):
        answer, and place the client in the log. Returns the link's number.
        ``datagrams``: the link can send them (QUIC), so events are repeated."""
        self.conn += 1
        self.connected = True
        self.datagrams = datagrams
        self._repeats.clear()
        self._outbox.clear()
        self._input_ack = None
        self._ack_at = None
        self._send(
            Joined(PROTOCOL_VERSION, self.session, self.mate, self.readonly, self.resume,
                   self.quic, self.quic_fingerprint)
        )
        self._resize(join.cols, join.rows)
        self.next_send = None
        want = join.next_seq
        if want is not None and self.cache.valid:
            first, nxt = self.cache.first_seq, self.cache.next_seq
            assert first is not None and nxt is not None
            if first < want <= nxt and self.cache.bytes_from(want) <= JUMP_BYTES:
                self.next_send = want  # a short replay: where the client stopped
        if self.next_send is None:
            self._start()
        return self.conn

    def connection_lost(self, conn: int | None = None) -> None:
        if conn is not None and conn != self.conn:
            return
        self.connected = False
        self._outbox.clear()
        self._ack_at = None
        self._repeats.clear()

    def _start(self) -> None:
        """From the cache's snapshot, or ask the host for one."""
        self._repeats.clear()  # a jump: what was sent before it is superseded
        if self.cache.valid:
            self.next_send = self.cache.first_seq
            self._resync_asked = False
        else:
            self.next_send = None
            if not self._resync_asked:
                self._resync_asked = True
                self._events.append(ResyncNeeded())

    # --- the host's log ---------------------------------------------------------------

    def log_advanced(self) -> None:
        """The cache took an event (or a snapshot): a client waiting for a start
        may have one now; one whose position the cache dropped jumps."""
        first = self.cache.first_seq
        if self.next_send is None or first is None or self.next_send < first:
            self._start()

    # --- from the client -------------------------------------------------------------

    def receive(self, msg: Message, now: float, conn: int | None = None) -> None:
        if not self.connected or (conn is not None and conn != self.conn):
            return
        try:
            self._dispatch(msg, now)
        except RemoteProtocolError as exc:
            self.connected = False
            self._send(Error(str(exc)))
            self._events.append(JoinFailed(str(exc)))

    def _dispatch(self, msg: Message, now: float) -> None:
        if isinstance(msg, Ack):
            if self.next_send is not None and msg.seq >= self.next_send:
                raise RemoteProtocolError(f"ack {msg.seq} for an event never sent")
            self.acked = max(self.acked, msg.seq)
            while self._repeats and self._repeats[0].event.seq <= msg.seq:
                self._repeats.popleft()
        elif isinstance(msg, Input):
            if self.readonly:
                raise RemoteProtocolError("this is a read-only join: input is not accepted")
            if self.inputs.accept(msg):
                self._events.append(MateTyped(msg.pane, msg.keys, msg.binding))
            self._ack_input(msg.stream, msg.seq, now)
        elif isinstance(msg, InputRepeat):
            if self.readonly:
                raise RemoteProtocolError("this is a read-only join: input is not accepted")
            if len(msg.inputs) > MAX_REPEATED:
                raise RemoteProtocolError(f"more than {MAX_REPEATED} inputs repeated at once")
            for inp in msg.inputs:
                # only the next of its stream: an input that overtook an earlier one
                # still on its way would make the receiver drop that one as old
                if inp.seq == self.inputs.last(inp.stream) + 1 and self.inputs.accept(inp):
                    self._events.append(MateTyped(inp.pane, inp.keys, inp.binding))
                    self._ack_input(inp.stream, inp.seq, now)
        elif isinstance(msg, Resize):
            if not self._resizes.allow(1, now):
                raise RemoteProtocolError(f"more than {RESIZE_RATE:.0f} resizes a second")
            self._resize(msg.cols, msg.rows)
        elif isinstance(msg, Ping):
            if not self._pings.allow(1, now):
                raise RemoteProtocolError(f"more than {PING_RATE:.0f} pings a second")
            self._send(Pong(msg.token), Channel.DATAGRAM)
        elif isinstance(msg, End):
            self.connected = False
            self._outbox.clear()
            self._events.append(MateLeft(msg.reason))
        elif not isinstance(msg, Pong):
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a join client")

    def _ack_input(self, stream: int, seq: int, now: float) -> None:
        """Ack on the ack timer (a resend is acked again: its first ack may be lost)."""
        self._input_ack = InputAck(stream, seq)
        if self._ack_at is None:
            self._ack_at = now + ACK_EVERY

    def _resize(self, cols: int, rows: int) -> None:
        if (cols, rows) != self.size:
            self.size = (cols, rows)
            self._events.append(MateResized(cols, rows))

    # --- to the client ----------------------------------------------------------------

    def _send(self, msg: Message, channel: Channel = Channel.STREAM) -> None:
        self._outbox.append(Outgoing(msg, channel))

    def messages_to_send(self, now: float, limit_bytes: int | None = SEND_CHUNK) -> list[Outgoing]:
        """Control messages, then the log from the client's position (a batch;
        call again after draining until empty)."""
        out, self._outbox = self._outbox, []
        if self.connected and self.next_send is not None:
            events = self.cache.take(self.next_send, limit_bytes)
            if events:
                self.next_send = events[-1].seq + 1
                if self._input_ack is not None:
                    # the echo of the client's key: its ack goes in the same
                    # packet, not in one of its own a coalescing delay later
                    out.append(Outgoing(self._input_ack, Channel.ACK))
                    self._input_ack = self._ack_at = None
                out += [Outgoing(ev) for ev in events]
                if self.datagrams:
                    for ev in events:
                        self._track(ev, now)
        return out

    def _track(self, event: Event, now: float) -> None:
        """Repeat ``event`` if it is small and fits one datagram with the other
        unacked ones: the repeats are for the echo of a key, not a flood's bytes
        (while acks lag, new events are left to the stream)."""
        body = event.body
        if isinstance(body, Snapshot):
            return
        if isinstance(body, Output | Frame | PaneReset) and event_size(body) > REPEATED_EVENT_BYTES:
            return  # big: not encoded only to be measured
        size = len(event.encode())
        if size > REPEATED_EVENT_BYTES or len(self._repeats) >= EVENT_REPEAT_MAX:
            return
        held = sum(r.size for r in self._repeats)
        if REPEAT_HEADER + held + size > EVENT_REPEAT_BYTES:
            return
        self._repeats.append(_Repeat(event, size, 0, first_repeat(now, self.lost_at, self.rtt)))

    def _repeat(self, now: float) -> None:
        """One ``EventRepeat``: every tracked event with a repeat left, oldest first
        (an event the client lacks lets it take none after it), but none in the
        turn it went on the stream."""
        pick: list[Event] = []
        size = REPEAT_HEADER
        again = now + repeat_after(self.rtt or REPEAT_RTT)
        for r in self._repeats:
            if r.count >= EVENT_REPEATS or (r.count == 0 and r.due > now):
                continue
            if len(pick) >= EVENT_REPEAT_MAX or size + r.size > EVENT_REPEAT_BYTES:
                break
            pick.append(r.event)
            size += r.size
            r.count += 1
            r.due = again
        if pick:
            self._send(EventRepeat(tuple(pick)), Channel.DATAGRAM)

    def _repeat_due(self) -> float | None:
        dues = [r.due for r in self._repeats if r.count < EVENT_REPEATS]
        return min(dues) if dues else None

    def next_event(self) -> JoinEvent | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        due = self._repeat_due() if self.connected else None
        if due is None or (self._ack_at is not None and self._ack_at < due):
            return self._ack_at
        return due

    def handle_timer(self, now: float) -> None:
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_at = None
            ack, self._input_ack = self._input_ack, None
            if ack is not None and self.connected:
                self._send(ack, Channel.ACK)
        if self.connected:
            due = self._repeat_due()
            if due is not None and now >= due:
                self._repeat(now)


def check_event_repeat(msg: EventRepeat) -> None:
    """A client's check of an ``EventRepeat`` beyond its schema: bounded as sent."""
    if len(msg.events) > EVENT_REPEAT_MAX:
        raise RemoteProtocolError(f"more than {EVENT_REPEAT_MAX} events repeated at once")


def check_join(msg: Message) -> Join:
    """The first frame of a join link, or why not."""
    if not isinstance(msg, Join):
        raise RemoteProtocolError(f"expected Join first, got {type(msg).__name__}")
    if msg.version not in JOIN_PROTOCOL_VERSIONS:
        raise RemoteProtocolError(
            f"protocol version {msg.version} is not supported (relay speaks "
            f"{PROTOCOL_VERSION}); upgrade tether"
        )
    return msg
