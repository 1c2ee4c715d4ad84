"""The relay's end of a host link, sans-I/O.

Two objects, because the relay must read a ``Hello`` before it knows which
session a link belongs to (that lookup, and creating a session with its
replica, is the registry's I/O):

- ``HelloGate``: one per new host link, until it named its session
  (Hello first, version check, ``hello_timeout``, and the registry's refusals).
- ``RelayHostEndpoint``: one per session, outliving the host's links (the
  Welcome, the host's messages, acks to it, mate input and size, silence and
  presence, expiry while the host is away).

``relay/hosts.py`` and ``relay/session.py`` are the asyncio adapter: they move
messages by ``Channel``, sleep until ``next_timer()`` and act on the events.
"""

from __future__ import annotations

import secrets

from . import tokens
from .errors import RemoteProtocolError
from .inputs import InputSender
from .messages import (
    PROTOCOL_VERSION,
    Ack,
    Binding,
    End,
    Error,
    Event,
    Hello,
    Input,
    InputAck,
    Kick,
    MateInfo,
    Mates,
    Message,
    Ping,
    Pong,
    Resize,
    Resync,
    Welcome,
)
from .ratelimit import TokenBucket
from .replog import LogReceiver
from .session import (
    ACK_BURST,
    ACK_EVERY,
    ACK_IDLE,
    AWAY_CHECK,
    AWAY_GRACE,
    AWAY_TEXT,
    BACK_TEXT,
    HELLO_TIMEOUT,
    HOST_AWAY_TIMEOUT,
    HOST_SILENCE,
    HOST_SILENCE_IDLE,
    KICK_BURST,
    KICK_RATE,
    MIN_WAIT,
    PING_BURST,
    PING_RATE,
    Channel,
    EventReceived,
    HostEnded,
    KickRequested,
    Machine,
    Outgoing,
    Presence,
    ProtocolFailed,
    SessionExpired,
    State,
    Table,
    earliest,
)

_I, C, S, X, E = State.IDLE, State.CONNECTED, State.SILENT, State.CLOSING, State.ENDED


def check_hello(msg: Message) -> Hello:
    """The first message of a host link, checked as ``handle_host`` does (same texts)."""
    if not isinstance(msg, Hello):
        raise RemoteProtocolError("expected Hello first")
    if msg.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {msg.version} is not supported (relay speaks "
            f"{PROTOCOL_VERSION}); upgrade tether"
        )
    return msg


def resumes(hello: Hello, session: str, secret: bytes) -> bool:
    """Whether ``hello`` resumes this session: its id, and its secret (constant time)."""
    return (
        hello.session == session
        and hello.secret is not None
        and tokens.secrets_equal(secret, hello.secret)
    )


GATE_TABLE: Table = {
    (_I, "hello"): C,
    (_I, "fail"): X,
    (C, "fail"): X,
}
"""IDLE: waiting for Hello; CONNECTED: handed to a session; CLOSING: refused."""


class HelloGate(Machine):
    """A new host link until its ``Hello``: the adapter then looks the session up."""

    TABLE = GATE_TABLE

    def __init__(self, now: float, timeout: float = HELLO_TIMEOUT) -> None:
        super().__init__()
        self._deadline: float | None = now + timeout
        self.hello: Hello | None = None

    def receive(self, msg: Message, now: float) -> Hello | None:
        """The Hello if ``msg`` is a good one; else the gate queues an ``Error``."""
        if self.state is not State.IDLE:
            return None
        try:
            self.hello = check_hello(msg)
        except RemoteProtocolError as exc:
            self.refuse(str(exc))
            return None
        self._go("hello")
        self._deadline = None
        return self.hello

    def refuse(self, text: str) -> None:
        """The registry says no (relay full, unknown session...): Error, then close."""
        self._go("fail")
        self._deadline = None
        self._send(Error(text))
        self._emit(ProtocolFailed(text))

    def messages_to_send(self, now: float) -> list[Outgoing]:
        return self._take_outbox()

    def next_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """No Hello in time: the adapter closes the link without a word."""
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._go("fail")
            self._emit(ProtocolFailed("no Hello in time"))


RELAY_TABLE: Table = {
    (_I, "attach"): C,
    (C, "attach"): C,  # a new link supersedes the old one
    (S, "attach"): C,
    (X, "attach"): C,
    (C, "quiet"): S,
    (S, "heard"): C,
    (C, "fail"): X,
    (S, "fail"): X,
    (C, "lost"): _I,
    (S, "lost"): _I,
    (X, "lost"): _I,
    (E, "lost"): E,
    (_I, "end"): E,
    (C, "end"): E,
    (S, "end"): E,
    (X, "end"): E,
}
"""IDLE: no host link (the host is away); SILENT: a link, but a quiet host."""


class RelayHostEndpoint(Machine):
    """A session's side of its host: receiver, mate input stream, acks, presence."""

    TABLE = RELAY_TABLE

    def __init__(
        self,
        session: str,
        secret: bytes,
        rw_token: str,
        ro_token: str,
        ssh_rw: str = "",
        ssh_ro: str = "",
        quic: tuple[str, ...] = (),
        quic_fingerprint: str = "",
        host_away_timeout: float = HOST_AWAY_TIMEOUT,
    ) -> None:
        super().__init__()
        self.welcome = Welcome(
            PROTOCOL_VERSION, session, secret, rw_token, ro_token, ssh_rw, ssh_ro, None,
            quic, quic_fingerprint,
        )
        """The Welcome this session sends, less ``next_seq`` (filled in per link)."""
        self.host_away_timeout = host_away_timeout
        self.receiver = LogReceiver()
        # a stream number of its own: a session re-created with the same id (its
        # relay restarted, or its relay process died) numbers its mates' input
        # from 1 again, which the host must not take for what it applied before
        self.inputs = InputSender(1 + secrets.randbelow(2**30))
        self.size = (0, 0)
        self.acked = 0
        self._ack_sent = 0
        """The last ``acked`` sent: ``ACK_BURST`` counts from it."""
        self.conn = 0
        """The current host link's number; a superseded link's news is ignored."""
        self.away_since: float | None = None
        self.heard = 0.0
        self._activity: float | None = None
        self._pings = TokenBucket(PING_RATE, PING_BURST, 0.0)
        self._kicks = TokenBucket(KICK_RATE, KICK_BURST, 0.0)
        self._silence_at: float | None = None
        self._waiting: float | None = None
        """Since when mates' keys wait for the host's ack (None: all acked)."""
        self._ack_at: float | None = None
        self._resync_owed = False
        self.mates: tuple[MateInfo, ...] = ()
        self._away_at: float | None = None
        """When to tell mates a host whose link ended is away (``AWAY_GRACE``)."""
        self._away_told = False
        """Mates were told the host is away: tell them when it is back."""

    @property
    def connected(self) -> bool:
        return self.state in (State.CONNECTED, State.SILENT)

    def set_addresses(
        self, ssh_rw: str, ssh_ro: str, quic: tuple[str, ...], quic_fingerprint: str,
        join_rw: str = "", join_ro: str = "", web_rw: str = "", web_ro: str = "",
    ) -> None:
        """Where the relay is reached, for the next Welcome: a front (QUIC) may
        start listening after the first host came in."""
        w = self.welcome
        self.welcome = Welcome(
            w.version, w.session, w.secret, w.rw_token, w.ro_token, ssh_rw, ssh_ro, None,
            quic, quic_fingerprint, join_rw, join_ro, web_rw, web_ro,
        )

    # --- host links -------------------------------------------------------------------

    def attach(self, hello: Hello, now: float) -> int:
        """A host link said Hello for this session: Welcome, resend, size, presence.

        Returns the link's number. A link still attached is superseded: the
        adapter closes it (``relay/session.py``: ``Session.attach``)."""
        self._go("attach")
        self.conn += 1
        self._outbox.clear()  # whatever was queued belonged to the old link
        self.away_since = None
        self.heard = now
        self._activity = None
        self._pings = TokenBucket(PING_RATE, PING_BURST, now)
        self._kicks = TokenBucket(KICK_RATE, KICK_BURST, now)
        self._waiting = now if self.inputs.unacked() else None
        self._silence_at = self._silence_due(now)
        w = self.welcome
        self._send(
            Welcome(
                w.version, w.session, w.secret, w.rw_token, w.ro_token, w.ssh_rw, w.ssh_ro,
                self.receiver.next_seq, w.quic, w.quic_fingerprint, w.join_rw, w.join_ro,
                w.web_rw, w.web_ro,
            )
        )
        for msg in self.inputs.unacked():
            self._send(msg)
        self._send(Resize(*self.size))
        self._send(Mates(self.mates))  # even empty: a re-created session forgot them
        if self._resync_owed:
            self._resync_owed = False
            self._send(Resync())
        self._away_at = None
        if self._away_told:
            self._back()
        return self.conn

    def connection_lost(self, now: float, conn: int | None = None) -> None:
        """A host link ended; only the current one makes the host away."""
        if conn is not None and conn != self.conn:
            return
        if self.state in (State.IDLE, State.ENDED):
            return
        self._go("lost")
        self._outbox.clear()
        self._silence_at = None
        self.away_since = now
        if not self._away_told:
            # a host moving to another link (SSH to QUIC, a raced link after an
            # outage) closes the old one first: no notice for that
            self._away_at = now + AWAY_GRACE

    def end(self, now: float) -> None:
        """The relay ends the session (reaper, shutdown): nothing more is sent."""
        if self.state is not State.ENDED:
            self._go("end")
        self._silence_at = self._ack_at = None
        self._outbox.clear()

    def note_activity(self, now: float) -> None:
        """The transport heard the host outside ``receive`` (QUIC datagram pings)."""
        self._activity = now

    # --- the other side of the session: replica acks, mate input, size ----------------

    def applied(self, seq: int, now: float) -> None:
        """The replica applied events up to ``seq``: ack the host, one per
        ACK_EVERY while events flow, else within ACK_IDLE or with the next input."""
        self.acked = seq
        due = now + (ACK_EVERY if seq - self._ack_sent >= ACK_BURST else ACK_IDLE)
        if self._ack_at is None or due < self._ack_at:
            self._ack_at = due

    def _send_ack(self) -> None:
        self._ack_at = None
        if self.connected:
            self._send(Ack(self.acked), Channel.ACK)
            self._ack_sent = self.acked

    def send_input(
        self, pane: int, keys: bytes = b"", binding: Binding | None = None, now: float = 0.0
    ) -> Input:
        """A mate typed: number it; the host gets it now or after it reconnects."""
        msg = self.inputs.push(pane, keys, binding)
        if self._waiting is None:
            self._waiting = now
            if self.state is State.CONNECTED and self._silence_at is not None:
                self._silence_at = min(self._silence_at, self._silence_due(self.heard))
        if self.connected:
            self._send(msg)
            if self._ack_at is not None:
                self._send_ack()  # in the same packet
        return msg

    def request_snapshot(self) -> None:
        """A join client needs a starting point: ask the host for a snapshot, now
        or as soon as it is back."""
        if self.connected:
            self._send(Resync())
        else:
            self._resync_owed = True

    def set_mates(self, mates: tuple[MateInfo, ...]) -> None:
        """Who is connected now; the host hears it now and on every reconnect."""
        if mates != self.mates:
            self.mates = mates
            if self.connected:
                self._send(Mates(mates))

    def set_size(self, cols: int, rows: int) -> None:
        """The smallest read-write mate terminal; the host hears of changes only."""
        if (cols, rows) != self.size:
            self.size = (cols, rows)
            if self.connected:
                self._send(Resize(cols, rows))

    # --- receiving ---------------------------------------------------------------------

    def receive(self, msg: Message, now: float, conn: int | None = None) -> None:
        """One message on the current host link (``relay/hosts.py``'s loop).

        ``conn``: the link it came on; a superseded link's stragglers are dropped."""
        if not self.connected or (conn is not None and conn != self.conn):
            return  # a straggler from a link being closed
        self.heard = now
        self._silence_at = self._silence_due(now)
        if self.state is State.SILENT:
            self._go("heard")
            self._back()
        try:
            self._dispatch(msg, now)
        except RemoteProtocolError as exc:
            self._go("fail")
            self._silence_at = None
            self._send(Error(str(exc)))
            self._emit(ProtocolFailed(str(exc)))

    def _dispatch(self, msg: Message, now: float) -> None:
        if isinstance(msg, Event):
            if self.receiver.receive(msg):
                self._emit(EventReceived(msg))
        elif isinstance(msg, InputAck):
            if msg.stream == self.inputs.stream:
                self.inputs.on_ack(msg.seq)
                self._waiting = None if self.inputs.acked + 1 >= self.inputs.next_seq else now
        elif isinstance(msg, Ping):
            if not self._pings.allow(1, now):
                raise RemoteProtocolError(
                    f"more than {PING_RATE:.0f} pings a second; a host pings once a second"
                )
            self._send(Pong(msg.token))
        elif isinstance(msg, End):
            self._go("end")
            self._silence_at = self._ack_at = None
            self._emit(Presence(False, f"tether: the host ended the session ({msg.reason})"))
            self._emit(HostEnded(msg.reason))
        elif isinstance(msg, Kick):
            if not self._kicks.allow(1, now):
                raise RemoteProtocolError(
                    f"more than {KICK_RATE:.0f} kicks a second; a host kicks when asked"
                )
            self._emit(KickRequested(msg.mate))
        elif not isinstance(msg, Pong):
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a host")

    def messages_to_send(self, now: float) -> list[Outgoing]:
        return self._take_outbox()

    # --- timers --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        expire = None
        if self.away_since is not None and self.state is State.IDLE:
            expire = self.away_since + self.host_away_timeout
        away = self._away_at if self.state is State.IDLE else None
        return earliest(self._silence_at, self._ack_at, expire, away)

    def _away(self) -> None:
        self._away_told = True
        self._emit(Presence(False, AWAY_TEXT))

    def _back(self) -> None:
        self._away_told = False
        self._emit(Presence(True, BACK_TEXT))

    def handle_timer(self, now: float) -> None:
        """Fire what is due: the coalesced ack, the silence check, expiry."""
        if self._ack_at is not None and now >= self._ack_at:
            self._send_ack()
        if self._silence_at is not None and now >= self._silence_at:
            self._check_silence(now)
        if self._away_at is not None and now >= self._away_at:
            self._away_at = None
            if self.state is State.IDLE:
                self._away()
        if (
            self.state is State.IDLE
            and self.away_since is not None
            and now - self.away_since >= self.host_away_timeout
        ):
            self._go("end")
            self._emit(SessionExpired())

    def _silence_due(self, heard: float) -> float:
        """When a host last heard at ``heard`` counts as away: ``HOST_SILENCE``
        after mates' keys began to wait for it, else ``HOST_SILENCE_IDLE`` (an
        idle host pings every ``PING_IDLE``)."""
        due = heard + HOST_SILENCE_IDLE
        if self._waiting is not None:
            due = min(due, max(heard, self._waiting) + HOST_SILENCE)
        return due

    def _check_silence(self, now: float) -> None:
        """The host's silence: away once ``_silence_due``, checked every
        ``AWAY_CHECK`` while away."""
        self.heard = max(self.heard, self._activity or 0.0)
        due = self._silence_due(self.heard)
        quiet = now >= due
        if quiet and self.state is State.CONNECTED:
            self._go("quiet")
            self._away()
        elif not quiet and self.state is State.SILENT:
            self._go("heard")
            self._back()
        if self.state is State.SILENT and now - self.heard >= self.host_away_timeout:
            # a link kept open (QUIC outlives silences) but a host gone for good
            self._go("end")
            self._silence_at = self._ack_at = None
            self._emit(SessionExpired())
            return
        if self.state is State.SILENT:
            self._silence_at = now + AWAY_CHECK
        else:
            self._silence_at = max(due, now + MIN_WAIT)
