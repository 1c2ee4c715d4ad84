"""The host's end of the session protocol, sans-I/O.

It owns what happens on the link to the relay: the handshake and version
check, the replication log and where it resumes, the exactly-once input
streams and their coalesced acks, pings, RTT and the quiet-link check, and the
batches of events. Its adapter, ``tether/client/relay_side.py``, moves
messages and runs the timer; ``tether/client/tmux_side.py`` turns tmux into
``append`` and ``push_snapshot`` calls and this endpoint's events into tmux
commands.
"""

from __future__ import annotations

from .errors import RemoteProtocolError
from .inputs import InputReceiver
from .liveness import Pinger
from .messages import (
    PROTOCOL_VERSION,
    Ack,
    End,
    Error,
    EventBody,
    Hello,
    Input,
    InputAck,
    Kick,
    MateInfo,
    Mates,
    Message,
    Notice,
    Output,
    Ping,
    Pong,
    Resize,
    Resync,
    Snapshot,
    Welcome,
)
from .replog import LogSender
from .session import (
    ACK_EVERY,
    HANDSHAKE_TIMEOUT,
    JUMP_BYTES,
    PING_QUIET,
    PINGS_KEPT,
    RTT_WEIGHT,
    SEND_CHUNK,
    Channel,
    InputReceived,
    LinkBack,
    LinkDead,
    LinkQuiet,
    Machine,
    MatesChanged,
    Outgoing,
    PeerClosed,
    ProtocolFailed,
    ResizeRequested,
    SnapshotNeeded,
    State,
    Table,
    Welcomed,
    earliest,
)

RESYNC_EVERY = 1.0
"""Least time between two snapshots the relay asks for (``Resync``)."""

_I, H, C, X, E = State.IDLE, State.HANDSHAKE, State.CONNECTED, State.CLOSING, State.ENDED

HOST_TABLE: Table = {
    (_I, "connect"): H,
    (H, "welcome"): C,
    (H, "fail"): X,
    (C, "fail"): X,
    (H, "lost"): _I,
    (C, "lost"): _I,
    (X, "lost"): _I,
    (E, "lost"): E,
    (_I, "end"): E,
    (H, "end"): E,
    (C, "end"): E,
    (X, "end"): E,
}
"""The host's connection states: one connection at a time, any number in turn."""


class HostEndpoint(Machine):
    """The host agent's end of the link to the relay; outlives its connections."""

    TABLE = HOST_TABLE

    def __init__(
        self,
        client: str = "tether-host",
        mate_keys: tuple[str, ...] = (),
        log: LogSender | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.mate_keys = mate_keys
        self.log = log if log is not None else LogSender()
        self.inputs = InputReceiver()
        self.shared: Welcome | None = None
        """The relay's last ``Welcome``: session, secret, tokens (host.py ``Shared``)."""
        self.rtt: float | None = None
        self.last_contact = 0.0
        self.last_busy: float | None = None
        self._activity: float | None = None
        self._handshake_deadline: float | None = None
        self._pinger: Pinger | None = None
        """The ping schedule while connected (``core.liveness``)."""
        self._token = 0
        self._pings: dict[int, float] = {}
        self._input_ack: InputAck | None = None
        self._ack_at: float | None = None
        self._snapshot_asked = False
        self._resynced: float | None = None
        self.mates: tuple[MateInfo, ...] = ()
        """Who the relay last said is connected (``Mates``)."""
        self.quiet_since: float | None = None
        """When the relay was last heard, while the link is quiet (``LinkQuiet``)."""

    # --- connections ---------------------------------------------------------------

    def connect(self, now: float) -> None:
        """A new link is up: say ``Hello``, resuming our session if we have one."""
        self._go("connect")
        s = self.shared
        self._send(
            Hello(
                PROTOCOL_VERSION,
                self.client,
                s.session if s else None,
                s.secret if s else None,
                s.rw_token if s else None,
                s.ro_token if s else None,
                self.mate_keys,
            )
        )
        self._handshake_deadline = now + HANDSHAKE_TIMEOUT
        self._activity = None

    def connection_lost(self, now: float) -> None:
        """The link is gone (closed by us or the peer): replay unacked events next time."""
        self._go("lost")
        self.log.on_disconnect()
        self._handshake_deadline = self._ack_at = None
        self._pinger = None
        self._input_ack = None
        self._pings.clear()
        self._snapshot_asked = False
        self._outbox.clear()
        self.quiet_since = None

    def end(self, reason: str, now: float) -> None:
        """The host's tmux session ended: tell the relay (if connected), then stop."""
        if self.state is State.CONNECTED:
            for ev in self.log.to_send():
                self._send(ev)
            self._send(End(reason))
        self._go("end")
        self._handshake_deadline = self._ack_at = None
        self._pinger = None

    def kick(self, mate: int) -> bool:
        """Ask the relay to disconnect a mate; False while no link is up."""
        if self.state is not State.CONNECTED:
            return False
        self._send(Kick(mate))
        return True

    # --- the replication log ----------------------------------------------------------

    def append(self, body: EventBody, now: float) -> int | None:
        """Log one event (None: dropped, a snapshot is owed and will carry it)."""
        if isinstance(body, Output):
            self._busy(now)
        seq = self.log.append(body)
        self._ask_snapshot()
        return seq

    def push_snapshot(self, snapshot: Snapshot, now: float) -> int:
        """Log a snapshot; pane images follow it as ``PaneReset`` appends."""
        self._snapshot_asked = False
        return self.log.push_snapshot(snapshot)

    def snapshot_failed(self) -> None:
        """The capture failed: ask again (host.py retries on the next append)."""
        self._snapshot_asked = False
        self._ask_snapshot()

    def resync(self, now: float) -> None:
        """The capture lost continuity (tmux gave the agent a new control client, and
        what panes printed in between is gone): the log starts over from a snapshot.
        Events already handed out stay valid; those logged meanwhile are dropped."""
        self.log.need_snapshot = True
        self._snapshot_asked = False
        self._ask_snapshot()

    def note_busy(self, now: float) -> None:
        """Output or typing the log did not see (e.g. a muted pane): pings stay fast."""
        self._busy(now)

    def _busy(self, now: float) -> None:
        """Pings come fast while busy (``Pinger.busy``)."""
        self.last_busy = now
        if self._pinger is not None:
            self._pinger.busy(now)

    def network_changed(self, now: float) -> None:
        """The host's addresses or routes changed: ping now, so the relay learns
        the new path (QUIC migrates on it) before a mate's key needs it."""
        self.last_busy = now
        if self._pinger is not None:
            self._pinger.ping_now(now)

    def note_activity(self, now: float) -> None:
        """The transport heard the relay outside ``receive`` (QUIC ``last_activity``)."""
        if self._activity is None or now > self._activity:
            self._activity = now
            if self.state is State.CONNECTED:
                self._heard(now)

    def _heard(self, now: float) -> None:
        """The relay spoke: a quiet link is back. The log sent meanwhile is on
        its way; what waited behind it jumps to a snapshot when long."""
        since, self.quiet_since = self.quiet_since, None
        if since is None:
            return
        self._emit(LinkBack(now - since))
        if self.log.jump(JUMP_BYTES):
            self._ask_snapshot()
        if self._pinger is not None:
            self._pinger.back(now)

    @property
    def unanswered_since(self) -> float | None:
        """When the oldest ping the relay has not answered went out (None: it
        answered the last one, or none is out): an idle host pings every
        ``PING_IDLE``, so the last contact alone says little."""
        if self._pinger is None:
            return None
        return self._pinger.unanswered_since(max(self.last_contact, self._activity or 0.0))

    @property
    def quiet(self) -> bool:
        """The link is quiet (``LinkQuiet``): the adapter holds the log back."""
        return self.quiet_since is not None

    @property
    def need_snapshot(self) -> bool:
        return self.log.need_snapshot

    def _ask_snapshot(self) -> None:
        if self.log.need_snapshot and self.state is State.CONNECTED and not self._snapshot_asked:
            self._snapshot_asked = True
            self._emit(SnapshotNeeded())

    # --- sending ------------------------------------------------------------------------

    def messages_to_send(
        self, now: float, limit_bytes: int | None = SEND_CHUNK, events: bool = True
    ) -> list[Outgoing]:
        """What to send now, in order; call again (after draining) until empty.
        ``events=False``: only the control messages (pongs, acks, pings), which an
        adapter sends at once while its sender waits for the link to drain."""
        out = self._take_outbox()
        if events and self.state is State.CONNECTED and self.quiet_since is None:
            # while quiet the log waits here, where it can still jump to a snapshot
            sending = self.log.to_send(limit_bytes=limit_bytes)
            if sending and self._input_ack is not None:
                # a key's echo: its ack goes in the same packet, not in one of its own
                out.append(Outgoing(self._input_ack, Channel.ACK))
                self._input_ack = self._ack_at = None
            out += [Outgoing(ev) for ev in sending]
        return out

    # --- receiving ----------------------------------------------------------------------

    def receive(self, msg: Message, now: float) -> None:
        """One message from the relay. A protocol violation never raises: the
        endpoint moves to CLOSING and emits ``ProtocolFailed``."""
        if self.state is State.HANDSHAKE:
            self._on_handshake(msg, now)
        elif self.state is State.CONNECTED:
            self.last_contact = now
            self._heard(now)
            try:
                self._dispatch(msg, now)
            except RemoteProtocolError as exc:
                self._fail(str(exc))
        # IDLE, CLOSING, ENDED: a straggler from a link being closed; ignore it

    def _on_handshake(self, msg: Message, now: float) -> None:
        """host.py ``_handshake``: Error, anything but Welcome, or another version fail."""
        if isinstance(msg, Error):
            return self._fail(f"relay: {msg.message}")
        if not isinstance(msg, Welcome):
            return self._fail(f"expected Welcome, got {type(msg).__name__}")
        if msg.version != PROTOCOL_VERSION:
            return self._fail(
                f"relay speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}"
            )
        self._welcome(msg, now)

    def _welcome(self, welcome: Welcome, now: float) -> None:
        """host.py ``_session``: where the log resumes, then liveness starts."""
        announce = self.shared is None
        new_session = self.shared is not None and self.shared.session != welcome.session
        self.shared = welcome
        self.log.on_connect(None if new_session else welcome.next_seq)
        self.log.jump(JUMP_BYTES)  # a long replay: the current screen instead
        if new_session:
            self.inputs = InputReceiver()  # its input streams start over at 1
        self._go("welcome")
        self._handshake_deadline = None
        self.quiet_since = None
        self.last_contact = now
        self.rtt = None
        self._token = 0
        self._pings.clear()
        self._pinger = Pinger(now, self.last_busy)
        self._emit(Welcomed(welcome, announce or new_session, new_session))
        self._ask_snapshot()

    def _dispatch(self, msg: Message, now: float) -> None:
        """host.py ``_handle``, message by message."""
        if isinstance(msg, Ack):
            self.log.on_ack(msg.seq)
        elif isinstance(msg, Input):
            self._busy(now)
            if self.inputs.accept(msg):
                self._emit(InputReceived(msg))
            self._input_ack = InputAck(msg.stream, msg.seq)  # a resend is acked again
            if self._ack_at is None:
                self._ack_at = now + ACK_EVERY
        elif isinstance(msg, Resize):
            self._emit(ResizeRequested(msg.cols, msg.rows))
        elif isinstance(msg, Ping):
            self._send(Pong(msg.token))
        elif isinstance(msg, Pong):
            sent = self._pings.pop(msg.token, None)
            if sent is not None:
                if self._pinger is not None:
                    self._pinger.pong()
                sample = now - sent
                old = self.rtt
                self.rtt = sample if old is None else (1 - RTT_WEIGHT) * old + RTT_WEIGHT * sample
        elif isinstance(msg, Notice):
            pass
        elif isinstance(msg, Mates):
            self.mates = msg.mates
            self._emit(MatesChanged(msg.mates))
        elif isinstance(msg, Resync):
            # a join client needs a starting point; one snapshot a second at most,
            # whatever the relay asks
            if self._resynced is None or now - self._resynced >= RESYNC_EVERY:
                self._resynced = now
                self.resync(now)
        elif isinstance(msg, Error):
            self._go("fail")
            self._emit(PeerClosed(f"relay: {msg.message}"))
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the relay")

    def _fail(self, text: str) -> None:
        self._go("fail")
        self._handshake_deadline = self._ack_at = None
        self._pinger = None
        self._emit(ProtocolFailed(text))

    # --- timers ---------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next run (None: nothing armed)."""
        ping = self._pinger.next_at if self._pinger is not None else None
        return earliest(self._handshake_deadline, self._ack_at, ping)

    def handle_timer(self, now: float) -> None:
        """Fire whatever is due: handshake timeout, coalesced input ack, ping."""
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._handshake_deadline = None
            self._go("fail")
            self._emit(LinkDead(HANDSHAKE_TIMEOUT))
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_at = None
            ack, self._input_ack = self._input_ack, None
            if ack is not None and self.state is State.CONNECTED:
                self._send(ack, Channel.ACK)
        if self._pinger is not None and now >= self._pinger.next_at:
            self._ping(now)

    def _ping(self, now: float) -> None:
        """The ping timer (``core.liveness``): past ``QUIET_MISSES`` unanswered
        the link is quiet (``LinkQuiet``), and pinging goes on: the link is
        never given up for silence alone."""
        pinger = self._pinger
        assert pinger is not None
        heard = max(self.last_contact, self._activity or 0.0)
        if not pinger.timer(now, heard, self.rtt):
            return
        self._token += 1
        self._pings[self._token] = now
        self._pings.pop(self._token - PINGS_KEPT, None)
        self._send(Ping(self._token), Channel.DATAGRAM)
        if self.quiet_since is None and pinger.went_quiet(now):
            self.quiet_since = heard
            pinger.quiet = True
            pinger.next_at = now + PING_QUIET
            self._emit(LinkQuiet(heard))
