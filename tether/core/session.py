"""The session protocol as sans-I/O endpoints, one per role (aioquic's shape).

An endpoint never touches a socket, a task or a clock. Its adapter feeds it
what arrived (``receive(message, now)``), tells it when a connection came or
went, sends what ``messages_to_send(now)`` returns, calls ``handle_timer(now)``
at ``next_timer()``, and acts on ``next_event()`` (apply an event to tmux, type
mate input, tell the mates the host is away...). Time only comes in as ``now``,
so a test drives a whole session with a fake clock (``tether.core.testing``).

This module holds what the roles share: the timer values (today's, from
``tether/client/host.py`` and ``tether/relay/server.py``, so the wire behaviour
does not change when the adapters switch over), the outgoing-message record,
the events, and the state machinery. The roles live in ``host_endpoint``
(the host agent's end) and ``relay_endpoint`` (the relay's end of a host);
a mate role (``tether join``) will be a third, on the same base.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from .errors import LocalProtocolError
from .messages import Event, Input, MateInfo, Message, Welcome
from .records import Record

# --- timer values: today's, so the wire does not change ------------------------

PING_EVERY = 0.5
"""Host ping interval while busy (typing or output in the last ``IDLE_AFTER``)."""
PING_START = 1.0
"""Host ping interval while idle, until ``PROVEN_PONGS`` pongs proved the path."""
PING_IDLE = 10.0
"""Host ping interval once idle on a proven path. It keeps NAT mappings open
(30 s is about the shortest UDP timeout of home routers) and costs an idle
session about 10 bytes a second each way and the relay one ping in ten
seconds. Output or mate input makes the host busy, and its next ping comes
within ``PING_EVERY``; a change of the host's addresses pings at once."""
PROVEN_PONGS = 3
"""Pongs on a link before its idle pings slow to ``PING_IDLE``."""
IDLE_AFTER = 5.0
"""Seconds without typing or output before the host pings at ``PING_IDLE``."""
PING_RETRY = 0.25
"""Least time before a ping whose predecessor went unanswered (a lost ping
or pong is retried within about two round trips, not a whole interval on)."""
QUIET_AFTER = 2.0
"""Seconds of unanswered pings before the host looks for another way to the
relay, beside the link, which it keeps: the next packet that gets through on it
carries on (a QUIC connection survives address changes and long silences)."""
QUIET_MISSES = 6
"""Unanswered pings in a row, with ``QUIET_AFTER`` at least, that make a link
quiet: at 30% loss each way half of all pongs are lost, and elapsed time alone
raced a new link every half minute."""
PING_QUIET = 0.5
"""Host ping interval while the link is quiet: each ping is a probe that finds
the path again (a QUIC connection moves to the host's new address on it)."""
JUMP_BYTES = 16 * 1024
"""Log bytes not yet sent past which the host sends the current screen instead,
when a link comes back or a new one resumes: after an outage, mates see the
present within a round trip or two, not the history replayed (at 30% loss a
QUIC congestion window carries a few kilobytes a round trip)."""
PINGS_KEPT = 20
"""Outstanding ping tokens the host remembers for RTT (host.py ``_liveness``)."""
HANDSHAKE_TIMEOUT = 20.0
"""How long the host waits for ``Welcome`` (host.py ``_handshake``)."""
ACK_EVERY = 0.03
"""Acks are coalesced on both ends (host.py and server.py ``ACK_EVERY``)."""
ACK_IDLE = 0.25
"""How long the relay may hold its ack of a few events (fewer than
``ACK_BURST``): a mate typing sends the next key sooner, and the ack rides in
its packet. Each ack sent alone cost a packet each way (the ack, then the
peer's QUIC ACK of it), two of the seven a keystroke took."""
ACK_BURST = 8
"""Events unacked at which the relay acks within ``ACK_EVERY`` again: a
host's backlog (``MAX_BACKLOG_BYTES``) follows a flood closely."""
RTT_WEIGHT = 0.2
"""Weight of a new RTT sample in the smoothed RTT (host.py ``_handle``)."""
SEND_CHUNK = 256 * 1024
"""Event bytes the host hands out per batch before draining (host.py ``_send_loop``)."""
HOST_SILENCE = 5.0
"""Seconds a host may leave mates' keys unacknowledged (it is busy then, and
pings every ``PING_EVERY``) before they are told it is away."""
HOST_SILENCE_IDLE = 15.0
"""Seconds without a word from an idle host before its mates are told it is
away: past ``PING_IDLE`` and the retries of a lost ping."""
AWAY_GRACE = 1.0
"""How long after a host's link ends mates are told it is away: a host moving to
another link (SSH to QUIC) closes the old one just before the new one says Hello."""
AWAY_CHECK = 1.0
"""While a host is away, the relay re-checks its link this often (server.py)."""
MIN_WAIT = 0.05
"""Shortest silence wait the relay arms (server.py ``_host_loop``)."""
PING_RATE = 10.0
PING_BURST = 50.0
KICK_RATE = 2.0
KICK_BURST = 20.0
"""Kicks a host may send a second, and in a burst (each may log a line)."""
"""Pings a host may send a second, and in a burst (server.py)."""
HELLO_TIMEOUT = 15.0
"""How long the relay waits for a new link's ``Hello`` (``RelayConfig.hello_timeout``)."""
HOST_AWAY_TIMEOUT = 3600.0
"""How long a session waits for its host (``RelayConfig.host_away_timeout``)."""

AWAY_TEXT = "tether: the host is away; waiting for it"
BACK_TEXT = "tether: the host is back"


# --- what goes out --------------------------------------------------------------


class Channel(Enum):
    """How the adapter sends a message; the endpoint does not know the transport."""

    STREAM = "stream"
    """In order and reliable: ``link.send_nowait``."""
    ACK = "ack"
    """A cumulative ack a later one supersedes: ``link.send_ack`` (a QUIC datagram)."""
    DATAGRAM = "datagram"
    """May be lost: ``link.send_datagram`` over QUIC, ``send_nowait`` otherwise."""


class Outgoing(Record):
    message: Message
    channel: Channel = Channel.STREAM


# --- events for the adapter -----------------------------------------------------


class Welcomed(Record):
    """Host: the relay accepted us. ``announce``: first session or a new one (the
    connection strings changed: publish them, as host.py ``_publish(True)``)."""

    welcome: Welcome
    announce: bool
    new_session: bool


class SnapshotNeeded(Record):
    """Host: capture the session and call ``push_snapshot`` (the relay is behind)."""


class InputReceived(Record):
    """Host: mate input to type into the host's tmux, exactly once and in order."""

    input: Input


class ResizeRequested(Record):
    """Host: the smallest read-write mate terminal (0, 0: none)."""

    cols: int
    rows: int


class LinkDead(Record):
    """Host: no ``Welcome`` within ``HANDSHAKE_TIMEOUT``; close the link, reconnect."""

    quiet: float


class LinkQuiet(Record):
    """Host: no word from the relay for ``QUIET_AFTER`` (since ``since``). Keep the
    link; race new connections beside it until it, or one of them, gets through."""

    since: float


class LinkBack(Record):
    """Host: the quiet link was heard again after ``quiet`` seconds: stop racing."""

    quiet: float


class PeerClosed(Record):
    """The peer said why it closes (an ``Error`` after the handshake); reconnect."""

    reason: str


class ProtocolFailed(Record):
    """The peer broke the protocol (or refused ours): ``text`` says how. Send what
    is queued (the relay queues an ``Error``), close the link, then report."""

    text: str


class EventReceived(Record):
    """Relay: a new replication event for the replica; ack it with ``applied``."""

    event: Event


class Presence(Record):
    """Relay: tell the mates whether the host is there (``replica.presence``)."""

    present: bool
    text: str


class HostEnded(Record):
    """Relay: the host ended the session (``End``); end it and let the mates go."""

    reason: str


class MatesChanged(Record):
    """Host: the mates connected now (``Mates``), to say who came and went."""

    mates: tuple[MateInfo, ...]


class KickRequested(Record):
    """Relay: the host asked to disconnect this mate (``Kick``)."""

    mate: int


class SessionExpired(Record):
    """Relay: the host stayed away past ``host_away_timeout``; end the session."""


SessionEvent = (
    Welcomed
    | SnapshotNeeded
    | InputReceived
    | ResizeRequested
    | LinkDead
    | LinkQuiet
    | LinkBack
    | PeerClosed
    | ProtocolFailed
    | EventReceived
    | Presence
    | HostEnded
    | SessionExpired
    | MatesChanged
    | KickRequested
)


# --- state ----------------------------------------------------------------------


class State(Enum):
    IDLE = "idle"
    """No connection (before the first, or between two)."""
    HANDSHAKE = "handshake"
    """Host: ``Hello`` sent, waiting for ``Welcome``."""
    CONNECTED = "connected"
    """Replicating; the relay hears the host."""
    SILENT = "silent"
    """Relay: connected, but the host said nothing for ``HOST_SILENCE``: away."""
    CLOSING = "closing"
    """This connection failed (dead, error, refused): the adapter closes it."""
    ENDED = "ended"
    """The session is over; nothing more happens."""


Table = dict[tuple[State, str], State]


class Machine:
    """Shared plumbing: a transition table, an outbox, an event queue."""

    TABLE: Table = {}

    def __init__(self) -> None:
        self.state = State.IDLE
        self._outbox: list[Outgoing] = []
        self._events: deque[SessionEvent] = deque()

    def _go(self, trigger: str) -> None:
        """Take the transition ``trigger`` from the current state, or refuse it:
        a move the table does not list is a bug in the adapter, not the peer."""
        new = self.TABLE.get((self.state, trigger))
        if new is None:
            raise LocalProtocolError(f"{trigger!r} in state {self.state.value}")
        self.state = new

    def _can(self, trigger: str) -> bool:
        return (self.state, trigger) in self.TABLE

    def _send(self, msg: Message, channel: Channel = Channel.STREAM) -> None:
        self._outbox.append(Outgoing(msg, channel))

    def _emit(self, event: SessionEvent) -> None:
        self._events.append(event)

    def next_event(self) -> SessionEvent | None:
        """The next thing the adapter must act on, oldest first; None when done."""
        return self._events.popleft() if self._events else None

    def _take_outbox(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out


def earliest(*times: float | None) -> float | None:
    """The first of some deadlines, ignoring the unarmed ones."""
    armed = [t for t in times if t is not None]
    return min(armed) if armed else None


def describe_table(table: Table) -> str:
    """The table as text lines, ``state --trigger--> state``: for docs and reviews."""
    return "\n".join(
        f"{a.value:>9} --{trigger}--> {b.value}" for (a, trigger), b in table.items()
    )
