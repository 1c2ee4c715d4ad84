"""The session protocol, socket-free: a host endpoint and a relay endpoint run
whole sessions against each other over memory links with a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from session_world import World

from tether.core.errors import LocalProtocolError
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bindings,
    End,
    Error,
    Event,
    Hello,
    Input,
    InputAck,
    Output,
    Ping,
    Pong,
    Resize,
    Snapshot,
    Status,
    Structure,
    Welcome,
)
from tether.core.relay_endpoint import HelloGate, RelayHostEndpoint
from tether.core.session import (
    ACK_BURST,
    ACK_EVERY,
    ACK_IDLE,
    AWAY_GRACE,
    AWAY_TEXT,
    BACK_TEXT,
    HOST_SILENCE,
    HOST_SILENCE_IDLE,
    PING_EVERY,
    PING_IDLE,
    PROVEN_PONGS,
    Channel,
    HostEnded,
    LinkBack,
    LinkDead,
    LinkQuiet,
    PeerClosed,
    Presence,
    ProtocolFailed,
    SessionExpired,
    SnapshotNeeded,
    State,
    Welcomed,
)
from tether.core.testing import Impairment


def started(**kw: object) -> World:
    w = World(**kw)  # type: ignore[arg-type]
    w.connect()
    w.run(0.5)
    return w


def presence(w: World) -> list[bool]:
    return [e.present for e in w.relay_events if isinstance(e, Presence)]


def test_handshake_snapshot_then_stream_and_acks_trim_backlog() -> None:
    w = started()
    assert w.host.state is State.CONNECTED and w.relay is not None
    assert w.relay.state is State.CONNECTED
    welcomed = [e for e in w.host_events if isinstance(e, Welcomed)]
    assert len(welcomed) == 1 and welcomed[0].announce and not welcomed[0].new_session
    # the wire as today: Hello; Welcome, then the pending input (none), then Resize
    first = w.links[0].delivered
    assert isinstance(first[0][1], Hello) and first[0][0] == "a>b"
    down = [m for d, m in first if d == "b>a"]
    assert isinstance(down[0], Welcome) and down[0].next_seq is None
    assert down[1] == Resize(0, 0)
    w.output(50)
    w.run(1.0)
    assert w.replica == 50
    events = w.sent("a>b", Event)
    assert [e.seq for e in events] == list(range(1, 52))
    assert events[0].body.__class__.__name__ == "Snapshot"
    assert w.host.log.backlog_events == 0 and w.host.log.acked == 51
    assert w.relay.acked == 51


def test_acks_are_coalesced_every_ack_every() -> None:
    w = started()
    for _ in range(20):  # 20 events within 20 ms: one or two acks, not 20
        w.output()
        w.run(0.001)
    w.run(0.5)
    acks = w.sent("b>a", Ack)
    assert 1 <= len(acks) <= 3 and acks[-1].seq == 21


def test_a_keystroke_and_its_echo_carry_the_acks_a_typing_mate_needs() -> None:
    """Each ack sent alone cost a packet each way (the ack, then the peer's QUIC
    ACK of it). The host's input ack rides with the key's echo; the relay holds
    its ack of a few events until the next key (or ACK_IDLE), and acks a burst
    within ACK_EVERY."""
    w = started()
    w.run(ACK_IDLE + 0.1)
    assert w.relay is not None
    acks, input_acks = len(w.sent("b>a", Ack)), len(w.sent("a>b", InputAck))
    for _ in range(10):  # a mate typing 10 keys a second, each echoed at once
        keys = w.received_keys
        w.type()
        while w.received_keys == keys:
            w.run(0.001)
        w.output()
        w.run(0.1)
    # the echo's batch held the key's ack: no input ack waited for its own timer
    up = [m for link in w.links for d, m in link.delivered if d == "a>b"]
    for i, m in enumerate(up):
        if isinstance(m, InputAck):
            assert isinstance(up[i + 1], Event), up[i - 1 : i + 2]
    assert len(w.sent("a>b", InputAck)) - input_acks == 10
    # the relay's ack of each echo went with the next key, the last one alone
    down = [m for link in w.links for d, m in link.delivered if d == "b>a"]
    new_acks = len(w.sent("b>a", Ack)) - acks
    assert new_acks == 9, new_acks
    for i, m in enumerate(down):
        if isinstance(m, Ack) and m.seq > 1 and i + 1 < len(down):
            assert isinstance(down[i - 1], Input), down[i - 1 : i + 1]
    w.run(ACK_IDLE)
    assert len(w.sent("b>a", Ack)) - acks == 10 and w.host.log.backlog_events == 0
    # a burst is acked within ACK_EVERY of its arrival (10 ms away), as before
    before = len(w.sent("b>a", Ack))
    w.output(ACK_BURST)
    w.run(0.01 + ACK_EVERY + 0.01)
    assert ACK_EVERY + 0.02 < ACK_IDLE and len(w.sent("b>a", Ack)) > before


def test_mate_input_reaches_host_once_in_order_and_is_acked() -> None:
    w = started()
    w.type(30)
    w.run(0.5)
    assert w.received_keys == 30
    assert w.relay is not None and w.relay.inputs.unacked() == []
    assert len(w.sent("a>b", InputAck)) < 5  # coalesced


def test_pings_measure_rtt_and_idle_slows_them() -> None:
    w = started(up=Impairment(delay=0.02), down=Impairment(delay=0.03))
    w.run(60)
    assert w.host.rtt == pytest.approx(0.05, abs=1e-6)
    idle_pings = len(w.sent("a>b", Ping))
    # PING_START until PROVEN_PONGS pongs, then PING_IDLE: 3 + 5 or 6 in a minute
    assert 7 <= idle_pings <= 10
    w.output()
    w.run(PING_EVERY + 0.1)  # output pulls the slow ping in
    assert len(w.sent("a>b", Ping)) == idle_pings + 1
    for _ in range(8):
        w.output()
        w.run(0.5)
    assert len(w.sent("a>b", Ping)) - idle_pings >= 8  # busy: PING_EVERY
    assert all(isinstance(m, Pong) for m in w.sent("b>a", Pong))


def _idle_host_on_a_lossy_path(seed: int, seconds: float, loss: float) -> tuple[int, int]:
    """A welcomed idle host whose pings and pongs are each lost with ``loss``
    (50 ms each way): (pings sent, LinkQuiet events)."""
    rng = random.Random(seed)
    ep = HostEndpoint()
    ep.connect(0.0)
    ep.messages_to_send(0.0)
    ep.receive(Welcome(PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "a", "b", None), 0.0)
    pings = quiet = 0
    arrivals: list[tuple[float, int]] = []  # (when, token) of pongs on their way
    now = 0.0
    while now < seconds:
        arrivals.sort()
        due = ep.next_timer()
        assert due is not None
        if arrivals and arrivals[0][0] <= due:
            now, token = arrivals.pop(0)
            ep.receive(Pong(token), now)
        else:
            now = due
            ep.handle_timer(now)
        for out in ep.messages_to_send(now):
            if isinstance(out.message, Ping):
                pings += 1
                if rng.random() >= loss and rng.random() >= loss:
                    arrivals.append((now + 0.1, out.message.token))
        while (ev := ep.next_event()) is not None:
            quiet += isinstance(ev, LinkQuiet)
            if isinstance(ev, SnapshotNeeded):
                ep.push_snapshot(Snapshot(Structure((), 0), Status(()), Bindings("C-b", ())), now)
    return pings, quiet


@pytest.mark.parametrize("seed", range(3))
def test_an_idle_host_costs_a_ping_in_ping_idle_on_a_lossy_link(seed: int) -> None:
    """At 30% loss each way half the pongs are lost: each miss is retried
    within PING_RETRY or two RTT, and the link does not go quiet for that."""
    pings, quiet = _idle_host_on_a_lossy_path(seed, 3600.0, 0.3)
    assert 3600 / PING_IDLE <= pings <= 3600 / PING_IDLE * 2.5, "retries only for the lost"
    # quiet takes 9 misses in a row (QUIET_AFTER at PING_RETRY): 0.51^9 a cycle,
    # about once an hour (elapsed time alone made it every half minute)
    assert quiet <= 3
    clean, quiet = _idle_host_on_a_lossy_path(seed, 3600.0, 0.0)
    assert clean <= 3600 / PING_IDLE + PROVEN_PONGS + 1 and quiet == 0


def test_unanswered_pings_make_the_link_quiet_after_quiet_misses() -> None:
    w = started()
    w.run(30)  # idle: pings every PING_IDLE now
    cut_at = w.clock.now
    assert w.host.unanswered_since is None
    w.cut()
    w.run(PING_IDLE + 1)  # the next ping goes unanswered, then the retries
    since = w.host.unanswered_since
    assert since is not None and cut_at < since <= cut_at + PING_IDLE
    [quiet] = [e for e in w.host_events if isinstance(e, LinkQuiet)]
    tokens = w.host._token
    w.run(5)
    assert w.host._token - tokens == 10, "while quiet, a probe every PING_QUIET"
    w.restore()
    w.run(1)
    assert any(isinstance(e, LinkBack) for e in w.host_events)
    assert cut_at - PING_IDLE <= quiet.since <= cut_at, "since the last word heard"


def test_a_network_change_pings_at_once() -> None:
    w = started()
    w.run(30)
    tokens = w.host._token
    w.host.network_changed(w.clock.now)
    w.run(0.02)
    assert w.host._token == tokens + 1


def test_silence_away_then_back_on_same_link() -> None:
    w = started()
    w.run(2)
    w.cut()
    w.run(HOST_SILENCE_IDLE - 3)  # an idle host pings every PING_IDLE: not yet away
    assert w.relay is not None and w.relay.state is State.CONNECTED
    w.run(3)
    assert w.relay.state is State.SILENT
    assert w.relay_events[-1] == Presence(False, AWAY_TEXT)
    w.restore()
    w.run(1.5)
    assert w.relay.state is State.CONNECTED and w.relay_events[-1] == Presence(True, BACK_TEXT)
    assert w.host.state is State.CONNECTED and len(w.links) == 1


def test_keys_waiting_for_a_silent_host_make_it_away_within_host_silence() -> None:
    w = started()
    w.run(30)  # idle, last heard up to PING_IDLE ago
    w.cut()
    w.run(1)
    w.type(3)
    w.run(HOST_SILENCE - 0.2)
    assert w.relay is not None and w.relay.state is State.CONNECTED
    w.run(0.5)
    assert w.relay.state is State.SILENT and presence(w)[-1] is False
    w.restore()
    w.run(2)
    assert presence(w)[-1] is True and w.received_keys == 3


def test_a_quiet_link_carries_on_when_the_network_returns() -> None:
    w = started()
    w.output(10)
    w.type(5)
    w.run(0.5)
    w.cut()
    w.output(10)  # the host's tmux goes on; the relay sees none of it
    w.type(5)  # the mates go on typing; the host sees none of it
    w.run(30)  # long past QUIET_AFTER: the link is kept, never given up
    assert any(isinstance(e, LinkQuiet) for e in w.host_events)
    assert not any(isinstance(e, LinkDead) for e in w.host_events)
    assert w.host.state is State.CONNECTED and w.host.quiet
    assert w.replica == 10, "the log waits while the link is quiet"
    w.restore()
    w.run(3)
    [back] = [e for e in w.host_events if isinstance(e, LinkBack)]
    assert 30 <= back.quiet <= 31.5
    assert len(w.links) == 1, "the same link carried on"
    assert w.replica == w.outputs == 20
    assert w.received_keys == w.typed == 10
    assert presence(w)[-1] is True and False in presence(w)


def test_pings_probe_faster_while_quiet() -> None:
    w = started()
    w.run(1)
    w.cut()
    w.run(10.5)
    quiet = [e for e in w.host_events if isinstance(e, LinkQuiet)]
    assert len(quiet) == 1, "one LinkQuiet per outage"
    # every PING_QUIET (0.5 s) a probe; the outbox holds them while the path is cut
    tokens = w.host._token
    w.run(5)
    assert w.host._token - tokens == 10


def test_a_dead_link_is_replaced_by_a_raced_one_exactly_once() -> None:
    w = started()
    w.output(10)
    w.type(5)
    w.run(0.5)
    w.kill()  # the link is gone for good, the network is not
    w.output(10)
    w.type(5)
    w.run(6)
    assert w.host.state is State.CONNECTED and len(w.links) == 2
    hellos = w.sent("a>b", Hello)
    assert hellos[-1].session == "s1" and hellos[-1].secret is not None
    assert w.replica == w.outputs == 20
    assert w.received_keys == w.typed == 10
    assert [e.announce for e in w.host_events if isinstance(e, Welcomed)] == [True, False]
    # a short backlog replays from where the relay stood: no second snapshot
    assert w.host.log.snapshots == 1


def test_a_long_backlog_jumps_to_a_snapshot_when_the_link_is_back() -> None:
    w = started()
    w.run(0.5)
    w.cut()
    w.run(3)  # quiet: the log waits
    for _ in range(3000):  # ~ 30 KiB of output while away
        w.output()
    w.restore()
    w.run(3)
    assert w.host.log.snapshots == 2, "the present, not the history"
    assert w.replica == w.outputs == 3000
    assert len(w.links) == 1


def test_a_long_backlog_jumps_on_a_new_link_too() -> None:
    w = started()
    w.run(0.5)
    w.kill()
    for _ in range(3000):
        w.output()
    w.run(6)
    assert len(w.links) == 2 and w.host.log.snapshots == 2
    assert w.replica == w.outputs == 3000


def test_host_end_ends_the_relay_side() -> None:
    w = started()
    w.output(3)
    w.host.end("the host's tmux session ended", w.clock.now)
    w.run(0.5)
    assert w.replica == 3
    assert w.relay is not None and w.relay.state is State.ENDED
    assert HostEnded("the host's tmux session ended") in w.relay_events
    assert w.relay_events[-2] == Presence(
        False, "tether: the host ended the session (the host's tmux session ended)"
    )


def test_relay_refuses_other_version() -> None:
    gate = HelloGate(0.0)
    assert gate.receive(Hello(PROTOCOL_VERSION + 1, "tether-host"), 0.0) is None
    text = f"protocol version {PROTOCOL_VERSION + 1} is not supported (relay speaks " \
        f"{PROTOCOL_VERSION}); upgrade tether"
    assert [o.message for o in gate.messages_to_send(0.0)] == [Error(text)]
    assert gate.state is State.CLOSING and gate.next_event() == ProtocolFailed(text)
    gate = HelloGate(0.0)
    assert gate.receive(Ping(1), 0.0) is None
    assert gate.next_event() == ProtocolFailed("expected Hello first")


def test_hello_timeout_closes_silently() -> None:
    gate = HelloGate(0.0)
    assert gate.next_timer() == 15.0
    gate.handle_timer(15.0)
    assert gate.state is State.CLOSING and gate.messages_to_send(15.0) == []


def _handshaking() -> HostEndpoint:
    host = HostEndpoint()
    host.connect(0.0)
    [hello] = host.messages_to_send(0.0)
    assert hello.message == Hello(PROTOCOL_VERSION, "tether-host")
    assert hello.channel is Channel.STREAM
    return host


def _welcome(version: int = PROTOCOL_VERSION) -> Welcome:
    return Welcome(version, "s", b"x" * 32, "rw", "ro", "a", "b", None)


def test_host_refuses_other_version_and_unexpected_messages() -> None:
    host = _handshaking()
    host.receive(_welcome(1), 0.1)
    assert host.next_event() == ProtocolFailed(
        f"relay speaks protocol 1, we speak {PROTOCOL_VERSION}"
    )
    assert host.state is State.CLOSING
    host.connection_lost(0.2)
    host.connect(1.0)
    host.receive(Error("this relay is full; try again later"), 1.1)
    assert host.next_event() == ProtocolFailed("relay: this relay is full; try again later")
    host.connection_lost(1.2)
    host.connect(2.0)
    host.receive(Ping(1), 2.0)
    assert host.next_event() == ProtocolFailed("expected Welcome, got Ping")


def test_host_handshake_times_out() -> None:
    host = _handshaking()
    assert host.next_timer() == 20.0
    host.handle_timer(20.0)
    assert isinstance(host.next_event(), LinkDead) and host.state is State.CLOSING


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (Hello(PROTOCOL_VERSION, "x"), "unexpected Hello from the relay"),
        (Ack(5), "ack 5 for an event never sent"),
        (Input(1, 0, 1, b"k"), "input seq must be positive"),
    ],
)
def test_host_connected_protocol_errors(msg: object, text: str) -> None:
    host = _handshaking()
    host.receive(_welcome(), 0.1)
    assert isinstance(host.next_event(), Welcomed)
    assert isinstance(host.next_event(), SnapshotNeeded)
    host.receive(msg, 0.2)  # type: ignore[arg-type]
    assert host.next_event() == ProtocolFailed(text) and host.state is State.CLOSING
    host.receive(Ping(1), 0.3)  # stragglers are ignored
    assert host.next_event() is None


def test_host_error_after_handshake_is_a_peer_close() -> None:
    host = _handshaking()
    host.receive(_welcome(), 0.1)
    host.next_event(), host.next_event()
    host.receive(Error("session replica failed: x"), 0.2)
    assert host.next_event() == PeerClosed("relay: session replica failed: x")


def _relay_attached() -> RelayHostEndpoint:
    ep = RelayHostEndpoint("s", b"x" * 32, "rw", "ro")
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 0.0)
    ep.messages_to_send(0.0)
    assert ep.next_event() is None  # nobody was told the host is away
    return ep


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (Welcome(2, "s", b"", "", "", "", "", None), "unexpected Welcome from a host"),
        (Event(1, Output(1, b"x")), "the first event must be a snapshot"),
        (InputAck(1, 3), "input ack 3 for input never sent"),
    ],
)
def test_relay_protocol_errors_send_error(msg: object, text: str) -> None:
    ep = _relay_attached()
    if isinstance(msg, InputAck):  # for the session's own input stream
        msg = InputAck(ep.inputs.stream, msg.seq)
    ep.receive(msg, 0.1)  # type: ignore[arg-type]
    assert ep.next_event() == ProtocolFailed(text) and ep.state is State.CLOSING
    assert [o.message for o in ep.messages_to_send(0.1)] == [Error(text)]
    ep.connection_lost(0.2, ep.conn)
    assert ep.next_event() is None and ep.away_since == 0.2
    assert ep.next_timer() == 0.2 + AWAY_GRACE
    ep.handle_timer(0.2 + AWAY_GRACE)
    assert ep.next_event() == Presence(False, AWAY_TEXT)


def test_a_host_moving_to_another_link_is_never_announced_away() -> None:
    """SSH to QUIC: the old link ends just before the new one's Hello. Within
    AWAY_GRACE mates hear nothing; past it, away and then back."""
    ep = _relay_attached()
    ep.connection_lost(1.0, ep.conn)
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 1.0 + AWAY_GRACE / 2)
    ep.handle_timer(1.0 + AWAY_GRACE)
    assert ep.next_event() is None
    ep.connection_lost(5.0, ep.conn)
    ep.handle_timer(5.0 + AWAY_GRACE)
    assert ep.next_event() == Presence(False, AWAY_TEXT)
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 9.0)
    assert ep.next_event() == Presence(True, BACK_TEXT)


def test_relay_limits_pings() -> None:
    ep = _relay_attached()
    for i in range(50):
        ep.receive(Ping(i), 0.0)
    assert ep.state is State.CONNECTED
    ep.receive(Ping(51), 0.0)
    assert ep.next_event() == ProtocolFailed(
        "more than 10 pings a second; a host pings once a second"
    )


def test_relay_expires_an_away_session_and_ignores_superseded_links() -> None:
    ep = _relay_attached()
    old = ep.conn
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 1.0)
    ep.connection_lost(1.5, old)  # the superseded link's end changes nothing
    assert ep.state is State.CONNECTED
    ep.connection_lost(2.0, ep.conn)
    ep.handle_timer(2.0 + AWAY_GRACE)  # mates are told
    assert ep.next_timer() == 2.0 + 3600.0
    ep.handle_timer(3602.0)
    assert ep.state is State.ENDED


def test_relay_drops_a_superseded_links_stragglers() -> None:
    ep = _relay_attached()
    old = ep.conn
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 1.0)
    ep.messages_to_send(1.0)
    ep.receive(Ping(1), 1.1, old)  # still in flight on the old link: not answered
    assert ep.messages_to_send(1.1) == [] and ep.heard == 1.0
    ep.receive(Ping(2), 1.2, ep.conn)
    assert [o.message for o in ep.messages_to_send(1.2)] == [Pong(2)]


def test_relay_counts_activity_outside_receive_against_silence() -> None:
    """Over QUIC the link answers datagram pings itself: what it heard keeps the
    host present, and once it stops the host is away HOST_SILENCE_IDLE later."""
    ep = _relay_attached()
    for t in range(1, 40, 10):
        ep.note_activity(float(t))
        while (when := ep.next_timer()) is not None and when <= t:
            ep.handle_timer(when)
    assert ep.state is State.CONNECTED and ep.next_event() is None
    last = 31.0
    ep.handle_timer(last + HOST_SILENCE_IDLE - 1)  # not yet
    assert ep.state is State.CONNECTED and ep.next_timer() == last + HOST_SILENCE_IDLE
    ep.handle_timer(last + HOST_SILENCE_IDLE)
    assert ep.state is State.SILENT and ep.next_event() == Presence(False, AWAY_TEXT)
    ep.note_activity(last + HOST_SILENCE_IDLE + 0.5)
    ep.handle_timer(ep.next_timer() or 0.0)
    assert ep.state is State.CONNECTED and ep.next_event() == Presence(True, BACK_TEXT)


def test_relay_acks_only_a_connected_host_and_end_stops_everything() -> None:
    ep = _relay_attached()
    ep.applied(3, 0.0)
    ep.connection_lost(0.01, ep.conn)
    ep.handle_timer(0.05)
    assert ep.messages_to_send(0.05) == []  # the ack was for a link that is gone
    ep.end(0.1)
    assert ep.state is State.ENDED and ep.next_timer() is None


def test_relay_welcome_gives_the_addresses_of_the_moment() -> None:
    ep = RelayHostEndpoint("s", b"x" * 32, "rw", "ro", "ssh rw@a", "ssh ro@a")
    ep.set_addresses("ssh rw@b", "ssh ro@b", ("b:1",), "fp")  # QUIC started listening
    ep.attach(Hello(PROTOCOL_VERSION, "h"), 0.0)
    welcome = ep.messages_to_send(0.0)[0].message
    assert isinstance(welcome, Welcome)
    assert (welcome.ssh_rw, welcome.quic, welcome.quic_fingerprint) == ("ssh rw@b", ("b:1",), "fp")
    assert (welcome.session, welcome.rw_token) == ("s", "rw")


def test_local_misuse_is_refused() -> None:
    host = _handshaking()
    with pytest.raises(LocalProtocolError):
        host.connect(0.0)


def test_end_while_connected_sends_pending_events_then_end() -> None:
    host = _handshaking()
    host.receive(_welcome(), 0.1)
    assert host.need_snapshot
    from tether.core.messages import Bindings, Snapshot, Status, Structure

    host.push_snapshot(Snapshot(Structure((), 0), Status(()), Bindings("C-b", ())), 0.1)
    host.append(Output(1, b"x"), 0.1)
    host.end("bye", 0.2)
    sent = [o.message for o in host.messages_to_send(0.2)]
    assert [type(m) for m in sent] == [Event, Event, End]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("out"), st.integers(1, 40)),
        st.tuples(st.just("type"), st.integers(1, 10)),
        st.tuples(st.just("wait"), st.floats(0.0, 12.0)),
        st.tuples(st.just("cut"), st.just(0)),
        st.tuples(st.just("restore"), st.just(0)),
        st.tuples(st.just("drop"), st.just(0)),
    ),
    max_size=14,
)
faults = st.builds(
    Impairment,
    delay=st.floats(0.001, 0.2),
    jitter=st.floats(0.0, 0.1),
    loss=st.sampled_from([0.0, 0.0, 0.01, 0.05]),
    duplicate=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.3),
)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(ops=ops, up=faults, down=faults, seed=st.integers(0, 2**16))
def test_interleavings_exactly_once_in_order(
    ops: list[tuple[str, float]], up: Impairment, down: Impairment, seed: int
) -> None:
    """Whatever the faults, every output reaches the replica once and in order (or
    a snapshot supersedes it) and every keystroke the host once and in order;
    once the network is good again, both converge."""
    w = World(seed=seed, up=up, down=down)
    w.connect()
    w.run(1.0)
    for op, arg in ops:
        if op == "out":
            w.output(int(arg))
        elif op == "type" and w.relay is not None:
            w.type(int(arg))
        elif op == "wait":
            w.run(arg)
        elif op == "cut":
            w.cut()
        elif op == "restore":
            w.restore()
        elif op == "drop":
            w.drop()
        w.run(0.05)
    w.restore()
    w.up, w.down = Impairment(), Impairment()
    if w.link is not None and w.link.broken:
        w.drop()
    w.run(45)
    assert w.host.state is State.CONNECTED
    assert w.replica == w.outputs
    assert w.received_keys == w.typed


def test_a_link_silent_past_the_away_timeout_ends_the_session() -> None:
    """QUIC keeps a silent connection open as long as the relay waits for its
    host, so the relay's own clock must end a session whose host never spoke
    again on it (not wait for the link to close first, then an hour more)."""
    ep = RelayHostEndpoint("s", b"x" * 32, "rw", "ro", host_away_timeout=30.0)
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 0.0)
    ep.receive(Ping(1), 1.0)
    now, expired = 1.0, False
    for _ in range(200):  # bounded: the timer fires about once a second
        when = ep.next_timer()
        assert when is not None, "a silent link must keep a timer armed"
        now = when
        ep.handle_timer(now)
        events = []
        while (ev := ep.next_event()) is not None:
            events.append(ev)
        if any(isinstance(ev, SessionExpired) for ev in events):
            expired = True
            break
    assert expired and ep.state is State.ENDED
    assert 31.0 <= now <= 32.5, now
