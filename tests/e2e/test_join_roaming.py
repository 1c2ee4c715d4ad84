"""`tether join` on a faulty (namespaced) network: the mate roams and is blacked
out while typing numbered lines into the host's `cat`; every line must arrive
exactly once and in order, and the join must never exit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.netsim.network import Network
from tether.testing.env import tether_cmd

from .helpers import Host, RelayProcess, wait_for
from .test_join import JoinMate
from .test_roaming import BLACKOUT, Rig, Typist, assert_keys_exactly_once, ns

pytestmark = pytest.mark.netsim

TOPOLOGY = {"host": ["eth0"], "relay": ["eth0"], "mate": ["wifi", "lte"]}


@pytest.fixture
def rig(netsim_factory, tmp_path: Path) -> Iterator[Rig]:  # type: ignore[no-untyped-def]
    net: Network = netsim_factory(TOPOLOGY)
    relay = RelayProcess(tmp_path / "relay", 2222, prefix=ns(net, "relay"), bind="0.0.0.0",
                         public=net.addr("relay"))
    host = Host(tmp_path / "host", relay.conf(), prefix=ns(net, "host"))
    keys = tmp_path / "keys.txt"
    host.type(f"stty -echo; cat > {keys}")
    words = host.join_rw.split()
    log = tmp_path / "join.log"
    argv = [*ns(net, "mate"), *tether_cmd("join", "--log", str(log), *words[2:])]
    mate = JoinMate(tmp_path / "mate", argv)
    try:
        wait_for(lambda: "tether quic" in mate.screen(), 40, "the host's screen on the mate's")
        wait_for(lambda: _on_quic(log), 30, "the join client on QUIC")
        yield Rig(net, relay, host, mate, keys)  # type: ignore[arg-type]
    finally:
        print(f"join log tail:\n{log.read_text()[-1500:] if log.exists() else '(none)'}")
        mate.close()
        host.close()
        relay.close()


def _on_quic(log: Path) -> bool:
    """The join's log shows a QUIC handshake (aioquic logs it)."""
    return log.exists() and "ALPN negotiated protocol tether/1" in log.read_text()


def _alive(rig: Rig) -> None:
    screen = rig.mate.screen()  # type: ignore[attr-defined]
    assert "[join exited" not in screen, screen


def test_join_roams_wifi_lte_wifi_and_keeps_every_line_once(rig: Rig) -> None:
    with Typist(rig) as typist:
        time.sleep(2)
        rig.net.move("mate", "lte")
        time.sleep(3)
        rig.net.move("mate", "wifi")
        time.sleep(3)
        typist.stop_typing()
        assert_keys_exactly_once(rig, typist.expected(), 60)
    _alive(rig)


def test_join_rides_out_a_blackout_with_loss(rig: Rig) -> None:
    seed = 15
    for name in ("wifi", "lte"):
        rig.net.link("mate", name).set(delay="25ms", loss="10%", seed=seed)
    with Typist(rig) as typist:
        time.sleep(2)
        dark = time.monotonic()
        rig.net.link("mate", "wifi").blackout(BLACKOUT)
        time.sleep(BLACKOUT - 0.5)
        rig.net.move("mate", "lte")  # back on another address
        back = time.monotonic()
        in_dark = [line for line, t in typist.typed if dark <= t < back]
        time.sleep(3)
        typist.stop_typing()
        assert_keys_exactly_once(rig, typist.expected(), 60)
    last = max(typist.arrived[line] for line in in_dark) - back
    print(f"\njoin: blackout {BLACKOUT:g}s, 10% loss each way, back on a new address: "
          f"{len(in_dark)} lines typed in the dark; the last reached the host "
          f"{last:.2f}s after the link's return")
    assert in_dark
    _alive(rig)



def test_join_far_behind_after_a_blackout_jumps_to_the_present(rig: Rig) -> None:
    """The host floods while the mate is dark: on its return the mate is shown
    the present (a snapshot), not the backlog replayed; the time is printed."""
    rig.net.link("mate", "wifi").blackout(BLACKOUT)
    time.sleep(1)
    rig.host.tmux("split-window", "-d", "-t", ":0",
                  "seq 1 400000; echo flood-done-$((6*7)); sleep 600")
    time.sleep(BLACKOUT - 1)
    back = time.monotonic()
    rig.mate.wait_text("flood-done-42", 60)  # type: ignore[attr-defined]
    print(f"\njoin: after a {BLACKOUT:g}s blackout with a flood on the host, the mate "
          f"showed the present {time.monotonic() - back:.2f}s after the link's return")
    _alive(rig)


def test_join_with_udp_blocked_uses_ssh_and_moves_to_quic_when_it_can(
    netsim_factory, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    net: Network = netsim_factory(TOPOLOGY)
    relay = RelayProcess(tmp_path / "relay", 2222, prefix=ns(net, "relay"), bind="0.0.0.0",
                         public=net.addr("relay"))
    host = Host(tmp_path / "host", relay.conf(), prefix=ns(net, "host"))
    keys = tmp_path / "keys.txt"
    host.type(f"stty -echo; cat > {keys}")
    net.block_udp("mate", True)
    log = tmp_path / "join.log"
    words = host.join_rw.split()
    mate = JoinMate(tmp_path / "mate",
                    [*ns(net, "mate"), *tether_cmd("join", "--log", str(log), *words[2:])])
    try:
        wait_for(lambda: "tether quic" in mate.screen(), 40, "the host's screen on the mate's")
        rig = Rig(net, relay, host, mate, keys)  # type: ignore[arg-type]
        with Typist(rig) as typist:
            time.sleep(2)
            typist.stop_typing()
            first = typist.expected()
            assert_keys_exactly_once(rig, first, 30)
        assert not _on_quic(log), "QUIC got through a UDP block"
        net.block_udp("mate", False)
        wait_for(lambda: _on_quic(log), 40, "the join client to move to QUIC")
        with Typist(rig) as typist:  # numbered from 0 again: the file holds both
            time.sleep(2)
            typist.stop_typing()
            assert_keys_exactly_once(rig, first + typist.expected(), 30)
        _alive(rig)
    finally:
        mate.close()
        host.close()
        relay.close()
