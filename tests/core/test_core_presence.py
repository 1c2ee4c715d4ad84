"""Presence over the session protocol: the relay tells its host who is
connected (``Mates``, again after every reconnect) and the host disconnects one
(``Kick``)."""

from __future__ import annotations

import pytest

from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import PROTOCOL_VERSION, Hello, Kick, MateInfo, Mates, Welcome
from tether.core.relay_endpoint import RelayHostEndpoint
from tether.core.session import (
    KICK_BURST,
    KickRequested,
    MatesChanged,
    ProtocolFailed,
    State,
    Welcomed,
)

ALICE = MateInfo(1, "ssh", False, "192.0.2.7", "SHA256:abc")
BOB = MateInfo(2, "web", True, "198.51.100.2")


def relay() -> RelayHostEndpoint:
    return RelayHostEndpoint("s1", b"k" * 32, "rw", "ro")


def sent(ep: RelayHostEndpoint | HostEndpoint, now: float = 0.0) -> list[object]:
    return [o.message for o in ep.messages_to_send(now)]


def test_mates_go_to_a_connected_host_on_change_only() -> None:
    ep = relay()
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 1.0)
    sent(ep)
    ep.set_mates((ALICE,))
    assert sent(ep) == [Mates((ALICE,))]
    ep.set_mates((ALICE,))
    assert sent(ep) == []
    ep.set_mates(())
    assert sent(ep) == [Mates(())]


def test_every_attach_says_who_is_there_even_nobody() -> None:
    ep = relay()
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 1.0)
    assert Mates(()) in sent(ep)


def test_a_reconnecting_host_hears_who_came_while_it_was_away() -> None:
    ep = relay()
    ep.set_mates((ALICE, BOB))  # no host yet: nothing sent, remembered
    assert sent(ep) == []
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 1.0)
    assert Mates((ALICE, BOB)) in sent(ep)


def test_kick_from_the_host_is_an_event_at_the_relay() -> None:
    ep = relay()
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 1.0)
    while ep.next_event() is not None:
        pass
    ep.receive(Kick(2), 2.0)
    assert ep.next_event() == KickRequested(2)


def test_a_host_flooding_kicks_is_refused() -> None:
    ep = relay()
    ep.attach(Hello(PROTOCOL_VERSION, "tether-host"), 1.0)
    while ep.next_event() is not None:
        pass
    events = []
    for _ in range(100):
        ep.receive(Kick(999), 2.0)
        while (ev := ep.next_event()) is not None:
            events.append(ev)
    assert events.count(KickRequested(999)) == KICK_BURST
    assert isinstance(events[-1], ProtocolFailed) and "kicks a second" in events[-1].text
    assert ep.state is not State.CONNECTED


@pytest.mark.parametrize("connected", [True, False])
def test_host_reports_mates_and_kicks_only_when_connected(connected: bool) -> None:
    ep = HostEndpoint()
    assert ep.kick(1) is False
    ep.connect(0.0)
    sent(ep)
    if connected:
        ep.receive(Welcome(PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "a", "b", None), 0.0)
        assert isinstance(ep.next_event(), Welcomed)
        while ep.next_event() is not None:
            pass
        ep.receive(Mates((BOB,)), 0.5)
        assert ep.next_event() == MatesChanged((BOB,)) and ep.mates == (BOB,)
        assert ep.kick(2) is True
        assert Kick(2) in sent(ep, 1.0)
    else:
        assert ep.kick(1) is False
