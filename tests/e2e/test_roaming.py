"""The roaming transport on a real (namespaced) network: roams, loss, outages, UDP blocks.

The relay, the host and the mate each live in a network namespace built by
tether netsim; the host's link is impaired, moved and cut while a mate types.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether.netsim.network import Network

from .helpers import Host, Mate, RelayProcess, strip_lines, wait_for

pytestmark = pytest.mark.netsim

OUTAGE = float(os.environ.get("TETHER_TEST_OUTAGE", "60"))
"""Seconds of the blackout and SIGSTOP tests (the issue asks for 60)."""


@dataclass
class Rig:
    net: Network
    relay: RelayProcess
    host: Host
    mate: Mate
    keys_file: Path



@pytest.fixture
def rig(netsim: Network, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    block_from_start = request.node.get_closest_marker("udp_blocked_from_start") is not None
    if request.node.get_closest_marker("nat") is not None:
        netsim.nat("host", True)
    relay = RelayProcess(tmp_path / "relay", 2222, prefix=netsim.exec_argv("relay"), bind="0.0.0.0",
                         public=netsim.addr("relay"))
    if block_from_start:
        netsim.block_udp("host", True)
    host = Host(tmp_path / "host", relay.conf(), prefix=netsim.exec_argv("host"))
    keys = tmp_path / "keys.txt"
    host.tmux("split-window", "-h")
    host.type("i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.05; done", target=":0.1")
    host.tmux("select-pane", "-t", ":0.0")
    host.type(f"stty -echo; cat > {keys}")
    mate = Mate(tmp_path, host.ssh_rw, (100, 30), prefix=netsim.exec_argv("mate"))
    wait_for(lambda: "0:" in mate.status_line(), 30, "the mate to attach")
    wait_for(lambda: "tick-" in mate.screen(), 30, "the ticker on the mate's screen")
    try:
        yield Rig(netsim, relay, host, mate, keys)
    finally:
        mate.close()
        host.close()
        relay.close()


def type_tokens(rig: Rig, n: int, during: dict[int, object] | None = None) -> str:
    """The mate types ``n`` tokens 40 ms apart; ``during[i]()`` runs before token i."""
    typed = []
    for i in range(n):
        action = (during or {}).get(i)
        if callable(action):
            action()
        token = f"k{i:04d} "
        rig.mate.type(token, enter=False)
        typed.append(token)
        time.sleep(0.04)  # a person's typing pace, not a wait for a condition
    rig.mate.keys("Enter")
    return "".join(typed) + "\n"


def assert_keys_exactly_once(rig: Rig, expected: str, timeout: float = 60) -> None:
    wait_for(lambda: (rig.keys_file.exists() and rig.keys_file.read_text() == expected) or (
        rig.keys_file.exists() and len(rig.keys_file.read_text()) > len(expected)),
        timeout, "the mate's keystrokes in the host's file")
    assert rig.keys_file.read_text() == expected, "keystrokes lost, doubled or reordered"


def assert_converges(rig: Rig, timeout: float = 60) -> None:
    """Stop the ticker, then the mate's view of it must equal the host's pane."""
    rig.host.tmux("send-keys", "-t", ":0.1", "C-c")
    left = int(rig.host.tmux("display", "-p", "-t", ":0.0", "#{pane_width}").strip())

    def same() -> bool:
        ours = strip_lines(rig.host.tmux("capture-pane", "-p", "-t", ":0.1"))[:29]
        theirs = [ln[left + 1:].rstrip() for ln in rig.mate.lines()[:29]]
        return ours == theirs

    wait_for(same, timeout, "the mate's screen to equal the host's pane")


def transport(rig: Rig) -> str:
    return rig.host.tmux("show", "-gv", "@tether_status").strip()


def test_roaming_wifi_lte_wifi_keeps_every_keystroke_once(rig: Rig) -> None:
    wait_for(lambda: "quic" in transport(rig), 20, "the host to be on QUIC")
    before = rig.net.addr("host")
    expected = type_tokens(rig, 60, {
        15: lambda: rig.net.move("host", "lte"),
        40: lambda: rig.net.move("host", "wifi"),
    })
    assert rig.net.addr("host") != "" and before
    assert_keys_exactly_once(rig, expected)
    assert_converges(rig)
    log = rig.relay.log.read_text()
    # the same QUIC connection carried on: the host never had to attach again
    assert log.count("attached to session") == 2, "one SSH bootstrap, one QUIC attach"


def test_lossy_link_100ms_rtt_30_percent_loss(rig: Rig) -> None:
    wait_for(lambda: "quic" in transport(rig), 20, "the host to be on QUIC")
    rig.net.link("host", "wifi").set(delay="50ms", loss="30%")
    expected = type_tokens(rig, 30)
    assert_keys_exactly_once(rig, expected, 90)
    assert_converges(rig, 90)


def _recovers(rig: Rig, before: tuple[str, str]) -> None:
    rig.host.type("", enter=False)
    rig.host.tmux("send-keys", "-t", ":0.1", "C-c")
    rig.host.tmux("send-keys", "-t", ":0.1", "echo back-after-outage", "Enter")
    rig.mate.wait_text("back-after-outage", 60)
    assert (rig.host.ssh_rw, rig.host.ssh_ro) == before
    expected = type_tokens(rig, 10)
    assert_keys_exactly_once(rig, expected)


def test_blackout_recovers_by_itself_with_the_same_tokens(rig: Rig) -> None:
    before = (rig.host.ssh_rw, rig.host.ssh_ro)
    rig.net.link("host", "wifi").blackout(OUTAGE)
    rig.mate.wait_text("host is away", OUTAGE)
    wait_for(lambda: "reconnecting" in transport(rig) or "last contact" in transport(rig),
             OUTAGE, "the host's status line to say it lost contact")
    _recovers(rig, before)


def test_sigstop_of_the_agent_recovers(rig: Rig) -> None:
    before = (rig.host.ssh_rw, rig.host.ssh_ro)
    pid = rig.host.agent_pid()
    rig.net.suspend(pid)
    try:
        rig.mate.wait_text("host is away", OUTAGE)
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:  # the laptop sleeps: nothing to wait on
            time.sleep(0.5)
    finally:
        rig.net.resume(pid)
    _recovers(rig, before)


@pytest.mark.udp_blocked_from_start
def test_udp_blocked_from_the_start_falls_back_to_ssh_then_moves_to_quic(rig: Rig) -> None:
    wait_for(lambda: "ssh" in transport(rig), 10, "the host to say it is on SSH")
    expected = type_tokens(rig, 10)
    assert_keys_exactly_once(rig, expected)
    rig.net.block_udp("host", False)
    wait_for(lambda: "quic" in transport(rig), 40, "the host to move to QUIC once UDP works")
    rig.host.tmux("send-keys", "-t", ":0.1", "C-c")
    rig.host.tmux("send-keys", "-t", ":0.1", "echo over-quic-now", "Enter")
    rig.mate.wait_text("over-quic-now", 30)


def test_udp_blocked_mid_session_falls_back_and_returns(rig: Rig) -> None:
    wait_for(lambda: "quic" in transport(rig), 20, "the host to be on QUIC")
    rig.net.block_udp("host", True)
    wait_for(lambda: "ssh" in transport(rig), 40, "the fallback to the SSH channel")
    rig.host.tmux("send-keys", "-t", ":0.1", "C-c")
    rig.host.tmux("send-keys", "-t", ":0.1", "echo over-ssh-now", "Enter")
    rig.mate.wait_text("over-ssh-now", 30)
    rig.net.block_udp("host", False)
    wait_for(lambda: "quic" in transport(rig), 40, "the host to return to QUIC")


@pytest.mark.nat
def test_nat_rebinding_keeps_the_connection(rig: Rig) -> None:
    wait_for(lambda: "quic" in transport(rig), 20, "the host to be on QUIC")
    attaches = rig.relay.log.read_text().count("attached to session")
    expected = type_tokens(rig, 40, {15: lambda: rig.net.nat_rebind("host")})
    assert_keys_exactly_once(rig, expected)
    assert_converges(rig)
    assert rig.relay.log.read_text().count("attached to session") == attaches, (
        "the rebinding cost a reconnect"
    )


BLACKOUT = float(os.environ.get("TETHER_TEST_BLACKOUT", "6"))
"""Seconds of the lossy-blackout tests (TETHER_TEST_BLACKOUT lengthens them)."""


class Typist:
    """The mate types numbered lines, one every ``every`` seconds, in a thread;
    a second thread notes when each reaches the host's file."""

    def __init__(self, rig: Rig, every: float = 0.3) -> None:
        self.rig = rig
        self.every = every
        self.typed: list[tuple[str, float]] = []
        self.arrived: dict[str, float] = {}
        self._stop = threading.Event()
        self._typed_all = threading.Event()
        self._threads = [threading.Thread(target=self._type, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]

    def __enter__(self) -> Typist:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[1].join(30)  # the watcher has seen every line that arrived

    def stop_typing(self) -> None:
        self._stop.set()
        self._threads[0].join(10)

    def _type(self) -> None:
        i = 0
        due = time.monotonic()
        while not self._stop.is_set() and i < 2000:
            line = f"line-{i:04d}"
            self.rig.mate.type(line)
            self.typed.append((line, time.monotonic()))
            i += 1
            # on a schedule: a slow tmux call on a loaded machine does not thin it
            due += self.every
            self._stop.wait(max(0.0, due - time.monotonic()))
        self._typed_all.set()

    def _watch(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.rig.keys_file.exists():
                now = time.monotonic()
                for line in self.rig.keys_file.read_text().split("\n")[:-1]:
                    self.arrived.setdefault(line, now)
            if self._typed_all.is_set() and len(self.arrived) >= len(self.typed):
                return
            time.sleep(0.02)

    def expected(self) -> str:
        return "".join(f"{line}\n" for line, _ in self.typed)


@pytest.mark.parametrize(("loss", "new_address"), [(0, False), (30, True)],
                         ids=["clean", "30pct-loss-new-address"])
def test_lines_typed_through_a_blackout_arrive_once_and_soon(
    rig: Rig, loss: int, new_address: bool
) -> None:
    """A mate types a line every 0.3 s before, during and after a blackout of the
    host's link (with loss each way on it throughout, and the host back on a new
    address in one case): every line reaches the host exactly once, in order;
    the time from the link's return until the last line typed in the dark
    reaches the host is printed (target: within 2 s)."""
    wait_for(lambda: "quic" in transport(rig), 20, "the host to be on QUIC")
    seed = 14
    for name in ("wifi", "lte"):
        rig.net.link("host", name).set(delay="25ms", loss=f"{loss}%", seed=seed)
    with Typist(rig) as typist:
        time.sleep(2)  # a person types with the link up first
        dark = time.monotonic()
        rig.net.link("host", "wifi").blackout(BLACKOUT)
        if new_address:
            time.sleep(BLACKOUT - 0.5)  # the network returns as another one
            rig.net.move("host", "lte")
        else:
            time.sleep(BLACKOUT)
        back = time.monotonic()
        in_dark = [line for line, t in typist.typed if dark <= t < back]
        time.sleep(3)
        typist.stop_typing()
        expected = typist.expected()
        assert_keys_exactly_once(rig, expected, 60)
    arrived = typist.arrived
    last_dark = max(arrived[line] for line in in_dark) - back
    # typed while up: with 2 s to arrive before the blackout, or 2 s after it
    up = [arrived[line] - t for line, t in typist.typed if t + 2 < dark or t >= back + 2]
    print(f"\nblackout {BLACKOUT:g}s, {loss}% loss each way"
          f"{', back on a new address' if new_address else ''}: "
          f"{len(in_dark)} lines typed in the dark; the last reached the host "
          f"{last_dark:.2f}s after the link's return; lines typed while up waited "
          f"at most {max(up):.2f}s (median {sorted(up)[len(up) // 2]:.2f}s)")
    messages = rig.host.messages()
    print("\n".join(ln for ln in messages.splitlines() if "relay" in ln)[-600:])
    assert in_dark, "no line was typed during the blackout"
    assert "back after" in messages, messages
