"""A host endpoint and a relay endpoint over memory links: the harness of the
session tests, playing the adapters' part (host agent, relay, replica).

The host's session is a counter of pane outputs: output ``i`` carries
``str(i)``, and a snapshot carries the count so far (in ``active_window``).
The replica checks every event it applies: outputs arrive exactly once and in
order, or a snapshot supersedes them. The host checks mate input the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    Bindings,
    Hello,
    Message,
    Output,
    Snapshot,
    Status,
    Structure,
)
from tether.core.relay_endpoint import HelloGate, RelayHostEndpoint, resumes
from tether.core.session import (
    EventReceived,
    InputReceived,
    LinkBack,
    LinkDead,
    LinkQuiet,
    Outgoing,
    PeerClosed,
    ProtocolFailed,
    SessionEvent,
    SnapshotNeeded,
    State,
)
from tether.core.testing import FakeClock, Impairment, MemoryLink, next_time

SECRET = bytes(range(32))
RECONNECT_DELAY = 0.3
RACE_EVERY = 1.0
"""While the link is quiet, a new connection is tried this often (the adapters'
race, ``transport/reconnect.py``); it wins only where the network carries it."""


class RelaySide:
    """The relay's end of one link: a HelloGate, then the session's endpoint."""

    def __init__(self, world: World, now: float) -> None:
        self.world = world
        self.gate = HelloGate(now)
        self.conn: int | None = None
        self.ep: RelayHostEndpoint | None = None

    @property
    def current(self) -> bool:
        ep = self.ep
        return ep is not None and ep is self.world.relay and self.conn == ep.conn

    def receive(self, msg: Message, now: float) -> None:
        if self.conn is None:
            hello = self.gate.receive(msg, now)
            if hello is not None:
                self.conn = self.world.attach(self.gate, hello, now)
                self.ep = self.world.relay
        elif self.current:
            assert self.world.relay is not None
            self.world.relay.receive(msg, now, self.conn)

    def messages_to_send(self, now: float) -> list[Outgoing]:
        out = self.gate.messages_to_send(now)
        if self.current:
            assert self.world.relay is not None
            out += self.world.relay.messages_to_send(now)
        return out


@dataclass
class World:
    seed: int = 0
    up: Impairment = field(default_factory=Impairment)
    down: Impairment = field(default_factory=Impairment)
    clock: FakeClock = field(default_factory=FakeClock)
    host: HostEndpoint = field(default_factory=HostEndpoint)
    relay: RelayHostEndpoint | None = None
    link: MemoryLink | None = None
    side: RelaySide | None = None
    network_up: bool = True
    reconnect_at: float | None = None
    race_at: float | None = None
    outputs: int = 0
    replica: int = 0
    typed: int = 0
    received_keys: int = 0
    host_events: list[SessionEvent] = field(default_factory=list)
    relay_events: list[SessionEvent] = field(default_factory=list)
    links: list[MemoryLink] = field(default_factory=list)
    sessions: int = 0

    # --- the adapters' part ---------------------------------------------------------

    def connect(self) -> None:
        self.reconnect_at = self.race_at = None
        self.side = RelaySide(self, self.clock.now)
        self.link = MemoryLink(self.host, self.side, self.seed + len(self.links), self.up,
                               self.down)
        self.links.append(self.link)
        if not self.network_up:
            self.link.cut()
        self.host.connect(self.clock.now)

    def attach(self, gate: HelloGate, hello: Hello, now: float) -> int | None:
        if hello.session is None:
            # a new session (the first, or the host never heard of the last one:
            # its Welcome was lost); the mates of a lost one are gone with it
            self.sessions += 1
            self.relay = RelayHostEndpoint(f"s{self.sessions}", SECRET, "rw", "ro", "a", "b")
            self.replica = self.typed = self.received_keys = 0
        elif self.relay is None or not resumes(hello, self.relay.welcome.session, SECRET):
            gate.refuse("unknown session or wrong secret: start over the SSH bootstrap")
            return None
        return self.relay.attach(hello, now)

    def drop(self) -> None:
        """The host closes its link; the relay hears of it unless the path is cut."""
        link, side = self.link, self.side
        if link is None or side is None:
            return
        now = self.clock.now
        told = not link.is_cut
        link.close()
        self.link = self.side = None
        if self.host.state not in (State.IDLE, State.ENDED):
            self.host.connection_lost(now)
        if told and self.relay is not None and side.conn is not None:
            self.relay.connection_lost(now, side.conn)
        if self.host.state is State.IDLE:
            self.reconnect_at = now + RECONNECT_DELAY

    def on_host(self, ev: SessionEvent) -> None:
        self.host_events.append(ev)
        now = self.clock.now
        if isinstance(ev, SnapshotNeeded):
            snap = Snapshot(Structure((), self.outputs), Status(()), Bindings("C-b", ()))
            self.host.push_snapshot(snap, now)
        elif isinstance(ev, InputReceived):
            assert ev.input.keys == str(self.received_keys).encode(), (ev, self.received_keys)
            self.received_keys += 1
        elif isinstance(ev, LinkQuiet):
            self.race_at = now + RECONNECT_DELAY
        elif isinstance(ev, LinkBack):
            self.race_at = None
        elif isinstance(ev, LinkDead | PeerClosed | ProtocolFailed):
            self.drop()

    def on_relay(self, ev: SessionEvent) -> None:
        self.relay_events.append(ev)
        assert self.relay is not None
        if isinstance(ev, EventReceived):
            body = ev.event.body
            if isinstance(body, Snapshot):
                assert body.structure.active_window >= self.replica
                self.replica = body.structure.active_window
            else:
                assert isinstance(body, Output)
                assert body.data == str(self.replica).encode(), (body, self.replica)
                self.replica += 1
            self.relay.applied(ev.event.seq, self.clock.now)

    # --- what the host's tmux and the mates do ----------------------------------------

    def output(self, count: int = 1) -> None:
        for _ in range(count):
            self.host.append(Output(1, str(self.outputs).encode()), self.clock.now)
            self.outputs += 1

    def type(self, count: int = 1) -> None:
        assert self.relay is not None
        for _ in range(count):
            self.relay.send_input(1, str(self.typed).encode(), now=self.clock.now)
            self.typed += 1

    def cut(self) -> None:
        self.network_up = False
        if self.link is not None:
            self.link.cut()

    def kill(self) -> None:
        """The link dies for good (the relay lost its connection state); the
        network itself is fine, so a new connection gets through."""
        if self.link is not None:
            self.link.cut()

    def restore(self) -> None:
        self.network_up = True
        if self.link is not None:
            self.link.restore(self.clock.now)

    # --- the event loop -------------------------------------------------------------------

    def settle(self) -> None:
        while True:
            busy = False
            for ep, handle in ((self.host, self.on_host), (self.relay, self.on_relay)):
                while ep is not None and (ev := ep.next_event()) is not None:
                    handle(ev)
                    busy = True
            if self.side is not None:
                while (ev := self.side.gate.next_event()) is not None:
                    self.relay_events.append(ev)
                    busy = True
            if self.link is not None:
                self.link.pump(self.clock.now)
            if not busy:
                return

    def run(self, seconds: float) -> None:
        end = self.clock.now + seconds
        while True:
            self.settle()
            gate = self.side.gate if self.side is not None else None
            links = [self.link] if self.link is not None else []
            t = next_time([self.host, self.relay, gate], links)
            for at in (self.reconnect_at, self.race_at):
                if at is not None:
                    t = at if t is None else min(t, at)
            if t is None or t > end:
                self.clock.set(end)
                self.settle()
                return
            self.clock.set(t)
            now = self.clock.now
            if self.reconnect_at is not None and now >= self.reconnect_at:
                self.connect()
                continue
            if self.race_at is not None and now >= self.race_at:
                if self.network_up and self.host.quiet:  # the new connection wins
                    self.drop()
                    self.connect()
                else:
                    self.race_at = now + RACE_EVERY
                continue
            if self.link is not None and self.link.deliver(now):
                continue
            for ep in (self.host, self.relay, gate):
                if ep is not None and (when := ep.next_timer()) is not None and when <= now:
                    ep.handle_timer(now)

    def sent(self, direction: str, kind: type) -> list[Message]:
        """Messages of a kind delivered in one direction, over every link."""
        return [m for link in self.links for d, m in link.delivered
                if d == direction and isinstance(m, kind)]
