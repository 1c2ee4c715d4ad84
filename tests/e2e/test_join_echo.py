"""`tether join --predict always` (local echo) on a slow, lossy (namespaced) network.

The mate's link has 50 ms of delay each way (100 ms RTT) and 10% loss each way
(seeded); the host and the relay are on clean links. The host's pane runs bash
(prompt ``$ ``). The mate is a person at a terminal: `tether join` runs in a
local tmux of its own that the test types into with send-keys and reads with
capture-pane (``JoinMate``); the host's pane is read the same way.

A key shown on the mate's screen while the host's pane (captured right after the
mate's screen) does not show it yet was drawn before the host could have echoed
it: a prediction. By design the first key of an epoch (the first typed after a
new prompt) is not shown until its echo confirms the epoch.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether.netsim.network import Network
from tether.testing.env import tether_cmd, tether_env, tmux

from .helpers import Host, RelayProcess, strip_lines, wait_for
from .test_join import JoinMate

pytestmark = pytest.mark.netsim

TOPOLOGY = {"host": ["eth0"], "relay": ["eth0"], "mate": ["eth0"]}
LINK_SEED = 16
"""the mate's link's loss decisions (the network's own seed is the test id's)"""
PANE = (80, 23)
"""the host's pane: an 80x24 window less the host's status line; the mate's
terminal (100x30, its own status line) shows it whole at its top left"""
PROMPT = "$ "
GAP = (0.10, 0.30)
"""a person's typing gaps, seconds"""



@dataclass
class Rig:
    net: Network
    relay: RelayProcess
    host: Host
    mate: JoinMate
    rng: random.Random

    def host_rows(self) -> list[str]:
        return _rows(self.host.screen())

    def mate_rows(self) -> list[str]:
        """The host's pane as the mate's terminal shows it."""
        return _rows(self.mate.screen())

    def replica_rows(self) -> list[str]:
        """The host's pane in the mate's local replica (tmux's view of it)."""
        return _rows(self.mate.replica("capture-pane", "-p", "-t", "tether:", check=False))

    def host_cursor(self) -> tuple[int, int]:
        x, y = self.host.tmux("display", "-p", "#{cursor_x} #{cursor_y}").split()
        return int(x), int(y)

    def gap(self) -> None:
        time.sleep(self.rng.uniform(*GAP))  # a person's pace, not a wait for a condition


def _rows(text: str) -> list[str]:
    rows = [r[: PANE[0]].rstrip() for r in text.split("\n")][: PANE[1]]
    return rows + [""] * (PANE[1] - len(rows))


def _at(rows: list[str], col: int, row: int) -> str:
    return rows[row][col : col + 1] if row < len(rows) else ""


@pytest.fixture
def rig(netsim_factory, tmp_path: Path) -> Iterator[Rig]:  # type: ignore[no-untyped-def]
    net: Network = netsim_factory(TOPOLOGY)
    relay = RelayProcess(tmp_path / "relay", 2222, prefix=net.exec_argv("relay"), bind="0.0.0.0",
                         public=net.addr("relay"))
    home = tmp_path / "host"
    home.mkdir()
    # tmux starts login shells: a plain prompt from ~/.bash_profile
    (home / ".bash_profile").write_text(f"PS1='{PROMPT}'\nunset PROMPT_COMMAND\nHISTFILE=\n")
    host = Host(home, relay.conf(), (PANE[0], PANE[1] + 1), prefix=net.exec_argv("host"),
                env=tether_env(home, shell="/bin/bash"))
    # impaired before the join starts: its pings find the link's RTT from the first one
    net.link("mate", "eth0").set(delay="50ms", loss="10%", seed=LINK_SEED)
    log = tmp_path / "join.log"
    words = host.join_rw.split()
    argv = [*net.exec_argv("mate"),
            *tether_cmd("join", "--log", str(log), "--predict", "always", *words[2:])]
    mate = JoinMate(tmp_path / "mate", argv)
    r = Rig(net, relay, host, mate, random.Random(LINK_SEED))
    try:
        host.type("echo ready-$((6*7))")
        mate.wait_text("ready-42", 60)
        wait_for(lambda: "ALPN negotiated protocol tether/1" in log.read_text(errors="replace"),
                 30, "the join on QUIC")
        host.tmux("send-keys", "C-l")
        wait_for(lambda: r.mate_rows() == r.host_rows() == [PROMPT.rstrip()] + [""] * 22, 30,
                 "a cleared screen on the host and the mate")
        yield r
    finally:
        print(f"join log tail:\n{log.read_text()[-1500:] if log.exists() else '(none)'}")
        mate.close()
        host.close()
        relay.close()


def _type_line(rig: Rig, text: str) -> list[bool]:
    """The mate types ``text`` at the host's prompt with a person's gaps; for each key
    but spaces (a blank shows nothing), whether the mate's terminal showed it while
    the host's pane did not yet."""
    col, row = rig.host_cursor()
    early = []
    for i, ch in enumerate(text):
        rig.gap()
        rig.mate.type(ch, enter=False)
        if ch == " ":
            continue
        at = col + i
        state: dict[str, bool] = {}

        def shown(at: int = at, ch: str = ch, state: dict[str, bool] = state) -> bool:
            mine = _at(rig.mate_rows(), at, row)
            if mine != ch:
                return False
            state["early"] = _at(rig.host_rows(), at, row) != ch  # captured after the mate's
            return True

        wait_for(shown, 20, f"key {i} ({ch!r}) on the mate's screen", interval=0.002)
        early.append(state["early"])
    return early


def _assert_converges(rig: Rig, timeout: float = 30) -> None:
    """The mate's terminal and its local replica come to show the host's pane exactly."""
    last: dict[str, list[str]] = {}

    def same() -> bool:
        last.update(host=rig.host_rows(), mate=rig.mate_rows(), replica=rig.replica_rows())
        return last["host"] == last["mate"] == last["replica"]

    try:
        wait_for(same, timeout, "the mate's view of the pane to equal the host's")
    except AssertionError as exc:
        rows = "\n".join(f"{k}: {strip_lines(chr(10).join(v))}" for k, v in last.items())
        raise AssertionError(f"{exc}\n{rows}") from None


def test_join_echo_shows_keys_before_the_host_echoes_them(rig: Rig) -> None:
    """Two command lines typed at a person's pace: most keys show on the mate's screen
    before the host could have echoed them (not the first of each line: a new prompt
    starts a tentative epoch); the mate ends up showing exactly the host's pane."""
    lines = ["echo local-echo-works", "echo typed-twice"]
    verdicts = []
    for n, text in enumerate(lines):
        early = _type_line(rig, text)
        verdicts.append(early)
        rig.gap()
        tmux(rig.mate.sock, "send-keys", "Enter")
        words = text.split(" ", 1)[1]  # echo's output
        wait_for(lambda w=words: rig.host_rows().count(w) == 1 and rig.mate_rows().count(w)
                 == 1, 30, f"line {n}'s output on the host's pane and the mate's screen")
    print("\nkeys shown before the host had them: "
          + "; ".join(f"{sum(e)}/{len(e)} " + "".join("P" if x else "." for x in e)
                      for e in verdicts))
    for early in verdicts:
        assert not early[0], "the first key of a line (a new epoch) showed before its echo"
        later = early[1:]
        assert sum(later) >= max(3, len(later) // 3), (
            f"too few keys shown before the host echoed them: {sum(later)}/{len(later)}")
    _assert_converges(rig)


def test_join_echo_never_shows_a_password(rig: Rig) -> None:
    """``read -s``: the mate types a secret with a person's gaps; its screen, read after
    every key and between keys, never shows any character of it; the host gets it whole."""
    prompt = "Password: "
    rig.host.type(f"read -s -p '{prompt}' pw; echo \"got ${{#pw}}\"")
    wait_for(lambda: any(r == prompt.rstrip() for r in rig.mate_rows())
             and rig.host_cursor()[0] == len(prompt), 30,
             "the password prompt on the mate's screen")
    before = "".join(rig.mate_rows())
    letters = [c for c in string.ascii_uppercase if c not in before]
    secret = "".join(rig.rng.choice(letters) for _ in range(10))
    looks = 0
    seen: list[str] = []

    def look() -> None:
        nonlocal looks
        looks += 1
        rows = rig.mate_rows()
        seen.extend(f"{c!r} in row {i}: {r!r}" for i, r in enumerate(rows) for c in secret
                    if c in r)

    for ch in secret:
        rig.mate.type(ch, enter=False)
        until = time.monotonic() + rig.rng.uniform(*GAP)
        while time.monotonic() < until:  # the gap, spent reading the screen
            look()
        assert not seen, f"the secret showed on the mate's screen: {seen[:3]}"
    tmux(rig.mate.sock, "send-keys", "Enter")
    got = f"{prompt}got {len(secret)}"
    deadline = time.monotonic() + 30
    while got not in rig.host_rows():
        look()
        assert time.monotonic() < deadline, f"the host never showed {got!r}"
    wait_for(lambda: (look(), got in rig.mate_rows())[1], 30, f"{got!r} on the mate's screen")
    assert not seen, f"the secret showed on the mate's screen: {seen[:3]}"
    print(f"\nthe mate's screen read {looks} times while typing a {len(secret)}-letter secret: "
          "none of it shown")
    _assert_converges(rig)


def test_join_echo_leaves_the_cursor_where_the_host_has_it(rig: Rig) -> None:
    """A command line and Enter at once (a quick typist), on the 100 ms link without
    loss: once the output is on the mate's screen, the mate's cursor (its terminal's,
    and its local replica pane's) comes to where the host's is, with nothing more
    printed."""
    rig.net.link("mate", "eth0").set(loss="0%")  # the Enter's echo comes in one RTT
    _type_line(rig, "echo where-is-the-cursor")
    tmux(rig.mate.sock, "send-keys", "Enter")
    wait_for(lambda: rig.host_rows().count("where-is-the-cursor") == 1
             and rig.mate_rows().count("where-is-the-cursor") == 1, 30,
             "the line's output on the host's pane and the mate's screen")
    _assert_converges(rig)
    fmt = "#{cursor_x} #{cursor_y}"
    want = rig.host_cursor()
    got: dict[str, tuple[int, ...]] = {}

    def same() -> bool:
        got["terminal"] = tuple(int(v) for v in tmux(rig.mate.sock, "display", "-p", fmt).split())
        got["replica"] = tuple(int(v) for v in rig.mate.replica(
            "display", "-p", "-t", "tether:", fmt).split())
        return got["terminal"] == got["replica"] == want

    try:
        wait_for(same, 5, "the mate's cursor where the host's is")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the host's {want}, the mate's {got}") from None
