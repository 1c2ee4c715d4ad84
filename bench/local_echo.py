#!/usr/bin/env python3
"""Local echo benchmark (issue 16): `tether join --predict adaptive|never` beside OpenSSH `ssh`.

    python3 bench/local_echo.py [--quick] [--losses PCT,PCT..] [--keys N] [--seed N]
                                [--programs P..] [--no-password] [--json FILE] [--logs DIR]

Needs root and /dev/net/tun (tether netsim). One ``tether.netsim`` network:
``host`` and ``relay`` on clean links, ``mate`` on one link with 50 ms of delay
each way (100 ms RTT; set before the mates start, so the joins' pings know the
RTT from the first) and L% loss each way (``--losses``, default 0,10,29; the
link's loss is seeded, the seeds printed). One relay (QUIC on), one host whose
only pane runs bash (prompt ``$ ``, the host's status line off) with the host's
own terminal attached, and three mates in the same session, all in the ``mate``
namespace, so the impairment hits them alike:

* ``adaptive``: ``tether join --predict adaptive`` (the default: local echo),
* ``never``:    ``tether join --predict never`` (the same client, no local echo),
* ``ssh``:      OpenSSH ``ssh TOKEN@relay`` (the host's printed ``#{tether_ssh}``).

Each mate's program runs on a pty the benchmark reads at once (``PtyProc``: the
benchmark is the mate's terminal), every read timestamped and fed to a pyte
screen of that terminal. The mates type in turn (never at once) into the host's
pane, each a turn of lines; the order of the three is rotated turn by turn. A
key follows the one before by a gap drawn uniformly from 100-300 ms (the first
of a turn too, and the first after an Enter); after a turn, every mate's screen
must come to show the host's pane exactly (text and cursor as ``capture-pane``
has them, no underlined cell left) before the next turn starts. A mate's first
line in a program is a warm-up, not timed: a join engages its model of the pane
on the first key typed into it (that key is never predicted), and the window's
name changes with the program.

* ``shell``:   bash at its prompt, a turn is one line: ``echo`` and one to three
  words, then Enter (30% of lines with a typo: one or two wrong letters erased
  with backspace, then the right ones).
* ``cat``:     ``cat``; a turn is one line of one to four words, then Enter.
* ``cat-run``: ``cat > /dev/null``; a turn is three such lines typed in a row
  (typing on after Enter without waiting; the copy cat would print could race
  the next line's first keys, so it goes to /dev/null).

Per printable key (not spaces, not the typos, which later keys erase): where it
lands is known (the host's cursor at the turn's start, plus its column and row),
and the mate's screen is watched at that cell:

* visible:   from writing the key to the mate's pty until the cell shows it (a
  prediction, underlined, or the host's echo);
* confirmed: until the cell shows it without underline: the host's echo. tether
  underlines predictions while its SRTT is above 80 ms or during a glitch, so on
  this 100 ms link every prediction is underlined and the echo that replaces it is
  not. A plain cell seen before the host's own terminal showed the key would be a
  prediction drawn plain: counted (``anomalies``), and reported if ever seen;
* host:      until the host's own terminal shows it (the input path alone).

``early`` counts the keys visible at least 20 ms before they were confirmed
(shown by prediction); ``fail`` those never visible or confirmed within 30 s.

Also, per loss rate, a password prompt: the host runs ``read -s -p 'Password: '
pw; echo "got ${#pw}"``, and each mate in turn types a secret (capitals) with the
same gaps and Enter; every read of every mate's terminal is checked for any
capital letter new in the pane (``shown``: must be never), and the host must show
``got N``. At the end of each cell every mate's screen must equal the host's pane
(``final screens equal``). A mate whose screen does not come to equal the host's
within 30 s is stuck (OpenSSH's TCP at 29% loss, now and then): it is started
again, the line cleared, and its lost keys count as failed. Per cell the joins'
quiet-link races and moves to a new QUIC connection are counted from their logs.

Every random choice (netsim, the link's loss, the typed text and the gaps)
derives from ``--seed``, printed. ``--quick`` (< 2 min): 29% loss, shell and cat,
8 keys per mate and program. A full run (0,10,29%, shell, cat and cat-run, 40
keys per mate and program) takes about 12-15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import select
import shutil
import string
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python3 bench/local_echo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyte

from bench.common import BenchError, percentile, summary
from bench.roaming_rig import copy_logs, interrupt_on_sigterm, tear_down
from tether.netsim import nsutil
from tether.netsim.network import Network
from tether.testing.env import SSH_OPTS, tether_cmd, tether_env
from tether.testing.host import TMUX_CONF, Host
from tether.testing.mate import PtyProc
from tether.testing.relay import RelayProcess

TOPOLOGY = {"host": ["eth0"], "relay": ["eth0"], "mate": ["eth0"]}
PORT = 2222
PANE = (80, 24)
"""the host's window (its status line off): the pane every mate shows at its top left"""
TERM = (80, 25)
"""the mates' terminals: the pane and the replica's status line"""
TERM_NAME = "tmux-256color"
"""what the benchmark's terminals claim to be (no ``rep``: pyte has no REP)"""
DELAY_MS = 50.0
MATES = ("adaptive", "never", "ssh")
PROGRAMS = ("shell", "cat", "cat-run")
LINES_PER_TURN = {"shell": 1, "cat": 1, "cat-run": 3}
"""lines a mate types in a row, Enter and the next line's keys only the usual gaps apart"""
COMMAND = {"cat": "cat", "cat-run": "cat > /dev/null"}
"""what the host runs for a program: lines typed in a row go to /dev/null, or cat's
copy of a line would race the echo of the next line's first keys (typeahead)"""
ROWS = {"shell": 2, "cat": 2, "cat-run": 1}
"""rows a line takes: shell and cat the line and its output (echo's, cat's copy)"""
PROMPT = "$ "
PASSWORD = "Password: "
GAP = (0.100, 0.300)
EARLY_MS = 20.0
KEY_TIMEOUT = 30.0
"""a key not visible / confirmed this long after it was typed counts as failed"""
SETTLE_TIMEOUT = 30.0
CURSOR_GRACE = 3.0
"""a mate's screen right but for its cursor this long: the cursor is left behind"""
CELL_BUDGET = 150.0
"""seconds one (loss, program) cell may take; then it stops early"""
WORDS = string.ascii_lowercase
SECRET = string.ascii_uppercase
"""what a secret is made of: no capital letter shows on the screens meanwhile"""
QUICK: dict[str, Any] = {"losses": [29.0], "keys": 8, "programs": ["shell", "cat"]}
FULL: dict[str, Any] = {"losses": [0.0, 10.0, 29.0], "keys": 40, "programs": list(PROGRAMS)}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()



# --- terminals -------------------------------------------------------------------------


@dataclass
class Key:
    """One timed key: where it lands, when it was typed and when it showed."""

    mate: str
    ch: str
    col: int
    row: int
    t0: float
    visible: float | None = None
    confirmed: float | None = None
    host: float | None = None
    anomaly: bool = False
    line: int = 0
    """which of the lines typed in a row (``cat-run``) it is in, from 0"""

    def ms(self, t: float | None) -> float | None:
        return None if t is None else (t - self.t0) * 1000


class Screen(pyte.Screen):  # type: ignore[misc]
    """pyte's screen with SU and SD, which pyte lacks: tmux draws a cleared pane
    scrolled into its history (``scroll-on-clear``) with them."""

    def scroll_up(self, count: int | None = None, *_: int, private: bool = False) -> None:
        if private:
            return
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        for _n in range(min(max(count or 1, 1), bottom - top + 1)):
            for y in range(top, bottom):
                self.buffer[y] = self.buffer[y + 1]
            self.buffer.pop(bottom, None)
        self.dirty.update(range(self.lines))

    def scroll_down(self, count: int | None = None, *_: int, private: bool = False) -> None:
        if private:
            return
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        for _n in range(min(max(count or 1, 1), bottom - top + 1)):
            for y in range(bottom, top, -1):
                self.buffer[y] = self.buffer[y - 1]
            self.buffer.pop(top, None)
        self.dirty.update(range(self.lines))


class Stream(pyte.ByteStream):  # type: ignore[misc]
    csi = {**pyte.ByteStream.csi, "S": "scroll_up", "T": "scroll_down"}


class Term:
    """A terminal the benchmark is: a pty read at once, fed to a pyte screen; checks
    run after every read (``checks``)."""

    def __init__(self, name: str, proc: PtyProc, size: tuple[int, int]) -> None:
        self.name = name
        self.proc = proc
        self.screen = Screen(*size)
        self.stream = Stream(self.screen)
        self.checks: list[Callable[[float], bool]] = []
        """called with the read's time after each read; True: done, dropped"""
        self.dead = False
        self.tail = b""

    @property
    def fd(self) -> int:
        return self.proc.fd

    def feed(self, data: bytes, now: float) -> None:
        self.tail = (self.tail + data)[-2000:]
        self.stream.feed(data)
        if self.checks:
            self.checks = [c for c in self.checks if not c(now)]

    def cell(self, col: int, row: int) -> Any:
        return self.screen.buffer[row][col]

    def rows(self, n: int = PANE[1]) -> list[str]:
        """The pane's rows as shown (trailing blanks stripped)."""
        return [self.screen.display[r].rstrip() for r in range(n)]

    def cursor(self) -> tuple[int, int]:
        return self.screen.cursor.x, self.screen.cursor.y

    def underlined(self, n: int = PANE[1]) -> list[tuple[int, int]]:
        """Cells of the pane drawn underlined (text, not blanks): a prediction left over."""
        out = []
        for r in range(n):
            line = self.screen.buffer[r]
            out += [(c, r) for c in range(PANE[0]) if line[c].underscore and line[c].data != " "]
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.close()


class Terminals:
    """Every terminal, read together; nothing may block on output the benchmark never reads."""

    def __init__(self) -> None:
        self.terms: list[Term] = []

    def add(self, t: Term) -> Term:
        self.terms.append(t)
        return t

    def pump(self, until: float, cond: Callable[[], bool] | None = None,
             poll: float = 0.05) -> bool:
        """Read every terminal until ``perf_counter() >= until`` or ``cond()`` (checked
        after reads and every ``poll`` s); whether ``cond`` came true."""
        last = 0.0
        while True:
            now = time.perf_counter()
            if cond is not None and now - last >= poll:
                last = now
                if cond():
                    return True
            if now >= until:
                return False
            live = [t for t in self.terms if not t.dead]
            wait = min(until - now, poll if cond is not None else until - now)
            r, _, _ = select.select([t.fd for t in live], [], [], max(wait, 0.0))
            now = time.perf_counter()
            for t in live:
                if t.fd not in r:
                    continue
                try:
                    data = t.proc.read()
                except EOFError:
                    t.dead = True
                    log(f"{t.name}: its program ended: {t.tail[-300:]!r}")
                    continue
                if data:
                    t.feed(data, now)

    def sleep(self, secs: float) -> None:
        self.pump(time.perf_counter() + secs)


# --- the rig ---------------------------------------------------------------------------


class Rig:
    """The network, the relay, the host (bash, its own terminal attached) and three mates."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.net = Network(TOPOLOGY, seed=seed)
        self.relay: RelayProcess | None = None
        self.host: Host | None = None
        self.terms = Terminals()
        self.host_term: Term | None = None
        self.mates: dict[str, Term] = {}
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.starts = dict.fromkeys(MATES, 0)
        self.fresh: set[str] = set()
        """mates started again since the last line they typed (its model to engage again)"""
        self.program = "shell"
        """what runs in the host's pane now: ``shell`` or ``cat``"""
        self.join_quic: dict[str, bool] = {}

    def start(self) -> None:
        net = self.net
        net.start()
        log(f"netsim: run {net.run_id} seed={net.seed}")
        self.relay = RelayProcess(self.root / "relay", PORT, prefix=net.exec_argv("relay"),
                                  bind="0.0.0.0", public=net.addr("relay"))
        home = self.root / "host"
        home.mkdir()
        # tmux starts login shells: ~/.bash_profile, not ~/.bashrc
        (home / ".bash_profile").write_text(f"PS1='{PROMPT}'\nunset PROMPT_COMMAND\nHISTFILE=\n")
        env = tether_env(home, tmp=self._tmp("host"), term=TERM_NAME, shell="/bin/bash")
        host = Host(home, self.relay.conf(), PANE, prefix=net.exec_argv("host"), env=env,
                    tmux_conf=TMUX_CONF + "set -g status off\n")
        self.host = host
        self.wait(lambda: self.host_rows()[0] == PROMPT.rstrip(), 20, "bash's prompt on the host")
        self.host_term = self.terms.add(Term(
            "host", PtyProc(["tmux", "-u", "-S", host.sock, "attach"], env, PANE), PANE))
        self.wait(lambda: self.host_status().startswith("[tether quic"), 60,
                  "the host on QUIC")
        # the delay before the mates start: the joins' pings (their SRTT, which local
        # echo's display and underline follow) see the link's RTT from the first one
        self.impair(0.0, self.seed * 100)
        join_line = host.join_rw.split()
        ssh_line = host.ssh_rw.split()
        for m in MATES:
            mhome = self.root / m
            mhome.mkdir()
            (mhome / ".tmux.conf").write_text(f"set -g default-terminal {TERM_NAME}\n")
            menv = tether_env(mhome, tmp=self._tmp(m), term=TERM_NAME)
            if m == "ssh":
                argv = ["ssh", *SSH_OPTS, *ssh_line[1:]]
            else:
                argv = tether_cmd("join", "--log", str(mhome / "join.log"), "--predict", m,
                                  *join_line[2:])
            self.argv[m] = ([*net.exec_argv("mate"), *argv], menv)
            self.start_mate(m)
        host.type("echo ready-$((6*7))")
        for m, t in self.mates.items():
            self.wait(lambda t=t: any("ready-42" in r for r in t.rows()), 60,
                      f"the {m} mate to show the host's pane")
        for m in MATES:
            if m != "ssh":
                self.wait(lambda m=m: self.on_quic(m), 30, f"the {m} join on QUIC")
        host.tmux("send-keys", "C-l")
        self.settle("the first screen")
        self.fresh.clear()

    def start_mate(self, m: str) -> None:
        self.starts[m] += 1
        argv, env = self.argv[m]
        self.mates[m] = self.terms.add(Term(m, PtyProc(argv, env, TERM), TERM))
        self.fresh.add(m)

    def restart(self, m: str) -> None:
        """End mate ``m`` (its program stuck: whatever it still had to send goes with it)
        and start it again; until it shows the host's pane."""
        old = self.mates.pop(m)
        old.close()
        self.terms.terms.remove(old)
        self.start_mate(m)

    def _tmp(self, name: str) -> Path:
        p = self.root / f"{name}.tmp"  # short: tmux sockets live here
        p.mkdir()
        return p

    def on_quic(self, m: str) -> bool:
        with contextlib.suppress(OSError):
            text = (self.root / m / "join.log").read_text(errors="replace")
            return "ALPN negotiated protocol tether/1" in text
        return False

    def host_status(self) -> str:
        assert self.host is not None
        return self.host.tmux("show", "-gv", "@tether_status", check=False).strip()

    def host_rows(self) -> list[str]:
        assert self.host is not None
        text = self.host.tmux("capture-pane", "-p")
        rows = [r.rstrip() for r in text.split("\n")][:PANE[1]]
        return rows + [""] * (PANE[1] - len(rows))

    def host_cursor(self) -> tuple[int, int]:
        assert self.host is not None
        x, y = self.host.tmux("display", "-p", "#{cursor_x} #{cursor_y}").split()
        return int(x), int(y)

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.terms.pump(time.perf_counter() + timeout, cond, poll=0.05):
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")

    def mismatch(self, m: str, rows: list[str], cur: tuple[int, int]) -> str | None:
        """How mate ``m``'s screen differs from the host's pane (None: it does not)."""
        t = self.mates[m]
        if t.dead:
            return "its program ended"
        mine = t.rows()
        if mine != rows:
            diff = [i for i in range(PANE[1]) if mine[i] != rows[i]]
            i = diff[0]
            return f"row {i}: {mine[i]!r}, the host's {rows[i]!r}"
        if under := t.underlined():
            return f"underlined cells {under[:4]}"
        if t.cursor() != cur:
            return f"cursor {t.cursor()}, the host's {cur}"
        return None

    def settled(self, timeout: float, expect: Callable[[list[str], tuple[int, int]], bool]
                | None = None, mates: Sequence[str] = MATES) -> dict[str, str]:
        """Until the host's pane is as ``expect``ed and every mate's screen equals it;
        {mate: how it differs} for those that did not within ``timeout``. A mate whose
        screen differs only by its cursor for ``CURSOR_GRACE`` s is given up on at once
        (``cursor_only``: a predicted cursor left behind by local echo)."""
        state: dict[str, Any] = {"since": None}

        def done() -> bool:
            rows, cur = self.host_rows(), self.host_cursor()
            state["bad"] = bad = {m: d for m in mates if (d := self.mismatch(m, rows, cur))}
            if not (expect is None or expect(rows, cur)):
                bad["host"] = f"not as expected: cursor {cur}, rows {rows}"
            if bad and cursor_only(bad):
                now = time.perf_counter()
                state["since"] = state["since"] or now
                return bool(now - state["since"] >= CURSOR_GRACE)
            state["since"] = None
            return not bad

        self.terms.pump(time.perf_counter() + timeout, done, poll=0.05)
        return state.get("bad", {})

    def settle(self, what: str, expect: Callable[[list[str], tuple[int, int]], bool] | None
               = None, cell: Cell | None = None, timeout: float = SETTLE_TIMEOUT) -> None:
        """``settled``. A cursor left behind is counted in ``cell``; a mate whose screen
        does not come to equal the host's is stuck: it is started again and the pane's
        line cleared (``reset``). BenchError if that does not help, or the host's pane
        is not as expected while every mate shows it (a key lost)."""
        bad = self.settled(timeout, expect)
        if not bad:
            return
        if cursor_only(bad):
            log(f"  cursor left behind ({what}): {bad}")
            if cell is not None:
                for who in bad:
                    cell.cursor_left[who] = cell.cursor_left.get(who, 0) + 1
            return
        stuck = [m for m in bad if m != "host" and not cursor_only({m: bad[m]})]
        if cell is not None:
            cell.unsettled.append(f"{what}: {bad}")
        if not stuck:
            raise BenchError(f"the host's pane is not as expected ({what}): {bad}")
        for m in stuck:
            log(f"  {m} stuck ({what}): {bad[m]}; starting it again")
            if cell is not None:
                cell.restarts.append(m)
            self.restart(m)
        self.reset()

    def reset(self) -> None:
        """The host's line killed (^U: readline's and the tty's) and the pane cleared;
        until every mate shows it (a mate started again too)."""
        assert self.host is not None
        self.host.tmux("send-keys", "C-u")
        clear(self, force=True, timeout=2 * SETTLE_TIMEOUT)

    def links(self) -> dict[str, tuple[int, int]]:
        """Per join: (times it found its link quiet for 2 s and raced new ones, times
        it moved to a new QUIC connection), from its log so far."""
        out = {}
        for m in MATES:
            if m == "ssh":
                continue
            text = ""
            with contextlib.suppress(OSError):
                text = (self.root / m / "join.log").read_text(errors="replace")
            out[m] = (text.count("reconnecting"), text.count("the relay is back after")
                      - text.count("on the same connection"))
        return out

    def impair(self, loss: float, seed: int) -> None:
        self.net.link("mate", "eth0").set(delay=f"{DELAY_MS:g}ms", loss=f"{loss:g}%",
                                          seed=seed)

    def close(self) -> None:
        for t in self.terms.terms:
            t.close()
        tear_down(self.root, self.host, self.relay, self.net)

    def collect_logs(self, dest: Path) -> None:
        copy_logs(self.root, self.relay, dest)
        for m in MATES:
            with contextlib.suppress(OSError):
                shutil.copy(self.root / m / "join.log", dest / f"join-{m}.log")


def cursor_only(bad: dict[str, str]) -> bool:
    """Whether ``settled``'s mismatches are all of the cursor alone of a mate that draws
    predictions (another's is only late)."""
    return all(m == "adaptive" and v.startswith("cursor ") for m, v in bad.items())


# --- typing ----------------------------------------------------------------------------


def line_text(rng: random.Random, program: str) -> list[tuple[str, bool]]:
    """A line's keys: (key, timed); ``\\x7f`` is backspace. Typos are typed and erased."""
    words = [
        "".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        for _ in range(rng.randint(1, 3) if program == "shell" else rng.randint(1, 4))
    ]
    text = ("echo " if program == "shell" else "") + " ".join(words)
    keys: list[tuple[str, bool]] = []
    typo_at = rng.randrange(len(text)) if rng.random() < 0.3 else -1
    for i, ch in enumerate(text):
        if i == typo_at and ch != " ":
            n = rng.randint(1, 2)
            for _ in range(n):
                keys.append((rng.choice([c for c in WORDS if c != ch]), False))
            keys += [("\x7f", False)] * n
        keys.append((ch, ch != " "))
    return keys


@dataclass
class Cell:
    """The keys of one (loss, program) cell and what went wrong."""

    loss: float
    program: str
    keys: list[Key] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    cursor_left: dict[str, int] = field(default_factory=dict)
    """lines after which a mate's cursor stayed away from the host's (all else equal)"""
    screens_equal: dict[str, str | None] = field(default_factory=dict)
    stopped: bool = False
    restarts: list[str] = field(default_factory=list)
    """mates started again in the cell (stuck: the screen never came to equal the host's)"""
    error: str | None = None
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    """per join, during the cell: (quiet-link races, moves to a new QUIC connection)"""

    def of(self, m: str) -> list[Key]:
        return [k for k in self.keys if k.mate == m]


def type_line(rig: Rig, m: str, keys: list[tuple[str, bool]], rng: random.Random,
              cell: Cell | None, start: tuple[int, int], line: int = 0) -> list[Key]:
    """Mate ``m`` types ``keys`` then Enter, with gaps; the timed keys start watched at
    ``start`` (the host's cursor) plus their column. Returns the timed keys."""
    term = rig.mates[m]
    host = rig.host_term
    assert host is not None
    col, row = start
    timed: list[Key] = []
    for ch, is_timed in [*keys, ("\r", False)]:
        rig.terms.sleep(rng.uniform(*GAP))
        if ch == "\x7f":
            col -= 1
        t0 = time.perf_counter()
        if is_timed and col < PANE[0]:
            k = Key(m, ch, col, row, t0, line=line)
            timed.append(k)
            term.checks.append(_mate_check(term, k))
            host.checks.append(_host_check(host, k))
        term.proc.write(ch.encode())
        if ch not in ("\x7f", "\r"):
            col += 1
    if cell is not None:
        cell.keys += timed
    return timed


def _mate_check(term: Term, k: Key) -> Callable[[float], bool]:
    def check(now: float) -> bool:
        if now - k.t0 > KEY_TIMEOUT:
            return True
        c = term.cell(k.col, k.row)
        if c.data == k.ch:
            if k.visible is None:
                k.visible = now
            if not c.underscore:
                k.confirmed = now
                if k.host is None:
                    k.anomaly = True
                return True
        return False
    return check


def _host_check(term: Term, k: Key) -> Callable[[float], bool]:
    def check(now: float) -> bool:
        if now - k.t0 > KEY_TIMEOUT:
            return True
        if term.cell(k.col, k.row).data == k.ch:
            k.host = now
            return True
        return False
    return check


def expect_after(program: str, start: tuple[int, int], texts: list[str]
                 ) -> Callable[[list[str], tuple[int, int]], bool]:
    """The host's pane once lines typed from ``start`` and their Enters are done: each
    line shown, its output (echo's, cat's) under it, the cursor at the next prompt."""
    row = start[1]

    def ok(rows: list[str], cur: tuple[int, int]) -> bool:
        if row + ROWS[program] * len(texts) >= PANE[1]:
            return False
        if program == "shell":
            (text,) = texts
            words = text[len("echo "):]
            return (rows[row] == PROMPT + text and rows[row + 1] == words
                    and rows[row + 2] == PROMPT.rstrip() and cur == (len(PROMPT), row + 2))
        n = ROWS[program]
        return all(rows[row + n * j + i] == t for j, t in enumerate(texts) for i in range(n)
                   ) and cur == (0, row + n * len(texts))
    return ok


def final_text(keys: list[tuple[str, bool]]) -> str:
    out: list[str] = []
    for ch, _ in keys:
        if ch == "\x7f":
            out.pop()
        else:
            out.append(ch)
    return "".join(out)


def clear(rig: Rig, need: int = 4, force: bool = False,
          timeout: float = SETTLE_TIMEOUT) -> None:
    """Clear the pane when fewer than ``need`` rows are left under the cursor (no line
    may scroll the screen while its keys are watched), then until every mate shows it."""
    assert rig.host is not None
    if not force and rig.host_cursor()[1] < PANE[1] - need:
        return
    if rig.program == "shell":
        rig.host.tmux("send-keys", "C-l")
        home = (len(PROMPT), 0)
    else:  # what `clear` prints, from the program's side of the pane's tty
        tty = rig.host.tmux("display", "-p", "#{pane_tty}").strip()
        fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, b"\033[H\033[2J")
        finally:
            os.close(fd)
        home = (0, 0)

    def expect(rows: list[str], cur: tuple[int, int]) -> bool:
        return rows[0] == (PROMPT.rstrip() if rig.program == "shell" else "") and cur == home

    bad = rig.settled(timeout, expect)
    if bad and not cursor_only(bad):
        raise BenchError(f"the screens did not clear: {bad}")


def run_cell(rig: Rig, loss: float, program: str, n_keys: int, rng: random.Random,
             budget: float) -> Cell:
    """Lines typed in turn by the three mates until each has ``n_keys`` timed keys; the
    first line of each mate is a warm-up (the join engages its model on the first key)."""
    assert rig.host is not None
    cell = Cell(loss, program)
    links0 = rig.links()
    if program != "shell":
        clear(rig, force=True)
        cmd = COMMAND[program]
        rig.host.type(cmd)
        rig.settle("cat started", lambda rows, cur: cur == (0, 1) and rows[0] == PROMPT + cmd)
        rig.program = "cat"
    try:
        type_lines(rig, cell, n_keys, rng, budget)
        rows, cur = rig.host_rows(), rig.host_cursor()
        cell.screens_equal = {m: rig.mismatch(m, rows, cur) for m in MATES}
    except BenchError as exc:
        cell.error = str(exc)
        log(f"  {program} failed: {exc}")
    finally:
        links1 = rig.links()
        cell.links = {m: (links1[m][0] - links0[m][0], links1[m][1] - links0[m][1])
                      for m in links1}
        if program != "shell":
            rig.host.tmux("send-keys", "C-u", "C-d")
            rig.program = "shell"
            rig.settle("cat ended", lambda rows, cur: rows[cur[1]] == PROMPT.rstrip()
                       and cur[0] == len(PROMPT))
    return cell


def type_lines(rig: Rig, cell: Cell, n_keys: int, rng: random.Random, budget: float) -> None:
    start_t = time.monotonic()
    orders = list(itertools.permutations(MATES))
    warm = set(MATES)
    """whose next line is a warm-up: the first in a cell (a join engages its model on its
    first key, and the window's name changed with the program), or after a start"""
    rnd = 0
    while any(len(cell.of(m)) < n_keys for m in MATES):
        if time.monotonic() - start_t > budget:
            cell.stopped = True
            log(f"  cell budget {budget:.0f}s used up")
            break
        for m in orders[rnd % len(orders)]:
            if len(cell.of(m)) >= n_keys and m not in warm:
                continue
            warm |= rig.fresh
            rig.fresh.discard(m)
            n_lines = 1 if m in warm else LINES_PER_TURN[cell.program]
            clear(rig, ROWS[cell.program] * n_lines + 2)
            start = rig.host_cursor()
            texts = []
            for j in range(n_lines):
                keys = line_text(rng, cell.program)
                texts.append(final_text(keys))
                at = (start[0], start[1] + ROWS[cell.program] * j)
                type_line(rig, m, keys, rng, None if m in warm else cell, at, j)
            warm.discard(m)
            try:
                rig.settle(f"a turn of {m}", expect_after(cell.program, start, texts), cell)
            finally:
                for t in rig.terms.terms:
                    t.checks.clear()
        rnd += 1


def password(rig: Rig, rng: random.Random) -> dict[str, Any]:
    """Each mate types a secret into ``read -s``: never shown on any mate's screen."""
    assert rig.host is not None
    out: dict[str, Any] = {}
    for m in MATES:
        clear(rig, 5)
        row = rig.host_cursor()[1]
        rig.host.type(f"read -s -p '{PASSWORD}' pw; echo \"got ${{#pw}}\"")
        rig.settle("a password prompt", lambda rows, cur, row=row: cur == (len(PASSWORD),
                                                                           row + 1))
        secret = "".join(rng.choice(SECRET) for _ in range(rng.randint(6, 10)))
        shown: list[str] = []
        for t in rig.mates.values():
            base = [list(t.rows()[r].ljust(PANE[0])) for r in range(PANE[1])]

            def check(now: float, t: Term = t, base: list[list[str]] = base,
                      shown: list[str] = shown) -> bool:
                for r in range(PANE[1]):
                    line = t.screen.buffer[r]
                    for c in range(PANE[0]):
                        ch = line[c].data
                        if ch in SECRET and ch != base[r][c]:
                            shown.append(f"{t.name}: {ch!r} at ({c},{r})")
                            return True
                return False
            t.checks.append(check)
        type_line(rig, m, [(c, False) for c in secret], rng, None, (0, 0))
        got = f"got {len(secret)}"  # read -s does not echo the Enter either
        rec = Cell(-1, "password")
        rig.settle(f"the password of {m}", lambda rows, cur, row=row, got=got:
                   rows[row + 1] == PASSWORD + got and cur == (len(PROMPT), row + 2), rec)
        bad = "; ".join(rec.unsettled) or None
        for t in rig.mates.values():
            t.checks.clear()
        out[m] = {"secret_len": len(secret), "shown": shown, "settled": not bad,
                  "unsettled": bad, "restarted": rec.restarts}
        log(f"  password typed by {m}: " + ("shown: " + ", ".join(shown) if shown else
                                             "never shown") + (f"; NOT SETTLED {bad}" if bad
                                                               else f"; host: {got!r}"))
    return out


# --- the report ------------------------------------------------------------------------


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def fmt_ms(v: float) -> str:
    text = fmt(v)
    return text if text.endswith("s") or text == "-" else text + " ms"


def _vals(keys: list[Key], what: str) -> list[float]:
    return [x for k in keys if (x := k.ms(getattr(k, what))) is not None]


def _stats(v: list[float]) -> str:
    st = summary(v)
    return f"{fmt(st['median']):>6} {fmt(st['p90']):>6} {fmt(st['p99']):>6}"


def _ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "  -    -    - "
    return " ".join(f"{percentile(a, q) / percentile(b, q):4.2f}" if percentile(b, q) > 0
                    else "   -" for q in (50, 90, 99))


def report(seed: int, quick: bool, cells: list[Cell], passwords: dict[str, Any],
           info: dict[str, Any]) -> str:
    lines = [
        f"tether local-echo benchmark ({'quick' if quick else 'full'}), seed {seed}; "
        "times in ms from writing a key to the mate's pty",
        f"  the mate's link: {DELAY_MS:g} ms delay each way ({2 * DELAY_MS:g} ms RTT), "
        f"L% loss each way (link seed {seed}00 + i for the i-th loss rate, from 1);",
        "  host and relay on clean links. Three mates in one session typing in turn, gaps "
        "100-300 ms; a turn is one line",
        "  (shell: `echo words` at bash's prompt; cat) or three lines in a row (cat-run: "
        "cat > /dev/null).",
        "  adaptive = tether join --predict adaptive,",
        "  never = tether join --predict never, ssh = OpenSSH ssh TOKEN@relay. joins on QUIC: "
        + ", ".join(f"{m} {'yes' if q else 'NO'}" for m, q in info["quic"].items()) + ".",
        "  visible: the key's cell shows it (prediction or echo); confirmed: shows it not "
        "underlined (the host's echo);",
        f"  host: the host's own terminal shows it; early: visible >= {EARLY_MS:g} ms before "
        "confirmed; fail: not visible/confirmed in 30 s.",
        "  /ssh: the mate's figure over ssh's in the same cell, at the median, p90, p99.",
        f"  load average (1/5/15 min) at start -> end: {info['loadavg']}",
        "",
        f"{'loss':>4} {'prog':<7} {'mate':<8} {'n':>3} | {'visible':>6} {'p90':>6} {'p99':>6} |"
        f" {'confirmed':>9} {'p90':>6} {'p99':>6} | {'host':>6} | {'early':>5} {'fail':>4} |"
        f" {'visible/ssh':>14} | {'confirmed/ssh':>14}",
    ]
    for c in cells:
        ssh = c.of("ssh")
        for m in MATES:
            ks = c.of(m)
            vis, conf, host = _vals(ks, "visible"), _vals(ks, "confirmed"), _vals(ks, "host")
            early = sum(1 for k in ks if k.visible is not None and (
                k.confirmed is None or k.confirmed - k.visible >= EARLY_MS / 1000))
            fail = sum(1 for k in ks if k.visible is None or k.confirmed is None)
            rv = _ratio(vis, _vals(ssh, "visible")) if m != "ssh" else ""
            rc = _ratio(conf, _vals(ssh, "confirmed")) if m != "ssh" else ""
            lines.append(
                f"{c.loss:>3g}% {c.program:<7} {m:<8} {len(ks):>3} | {_stats(vis)} | "
                f"   {_stats(conf)} | {fmt(summary(host)['median']):>6} | "
                f"{early:>5} {fail:>4} | {rv:>14} | {rc:>14}")
        notes = []
        if c.stopped:
            notes.append("stopped early (time budget)")
        if c.error:
            notes.append(f"FAILED: {c.error[:200]}")
        if c.restarts:
            notes.append("stuck and started again: " + ", ".join(c.restarts))
        if any(r or n for r, n in c.links.values()):
            notes.append("joins' quiet-link races / new QUIC connections: " + ", ".join(
                f"{m} {r}/{n}" for m, (r, n) in c.links.items()))
        if c.cursor_left:
            notes.append("a mate's cursor left away from the host's after lines: "
                         + ", ".join(f"{m} {n}" for m, n in c.cursor_left.items()))
        anomalies = sum(k.anomaly for k in c.keys)
        if anomalies:
            notes.append(f"{anomalies} keys drawn plain before the host echoed them")
        neq = {m: d for m, d in c.screens_equal.items() if d}
        notes.append("final screens equal the host's: " + ("all" if not neq else
                                                            f"NOT {neq}"))
        lines.extend(textwrap.wrap(f"({'; '.join(notes)})", 110, initial_indent=" " * 13,
                                   subsequent_indent=" " * 14))
    runs = [c for c in cells if LINES_PER_TURN[c.program] > 1]
    if runs:
        lines.append("")
        lines.append("lines typed in a row (cat-run), by line of the turn: median visible (n, "
                     "early = shown before the echo)")
        for c in runs:
            parts = []
            for m in ("adaptive", "never"):
                for first in (True, False):
                    ks = [k for k in c.of(m) if (k.line == 0) == first]
                    early = sum(1 for k in ks if k.visible is not None and (
                        k.confirmed is None or k.confirmed - k.visible >= EARLY_MS / 1000))
                    parts.append(f"{m} {'1st line' if first else 'later lines'} "
                                 f"{fmt(percentile(_vals(ks, 'visible'), 50))} "
                                 f"(n {len(ks)}, early {early})")
            lines.append(f"  {c.loss:>3g}%: " + "; ".join(parts))
    if passwords:
        lines.append("")
        lines.append("password prompt (read -s), a secret typed by each mate with the same "
                     "gaps: any letter of it on any mate's screen?")
        for loss, per in passwords.items():
            lines.append(f"  {loss:>3}% loss: " + ", ".join(
                f"{m} typed {r['secret_len']}: "
                + ("SHOWN " + "; ".join(r["shown"]) if r["shown"] else "never shown")
                + ("" if r["settled"] else " (then " + (
                    f"stuck and started again: {', '.join(r['restarted'])}" if r["restarted"]
                    else "the screens did not settle") + ")")
                for m, r in per.items()))
    lines.append("")
    lines.append("target (issue 16): at 29% loss, adaptive's median visible < 5 ms and median "
                 "confirmed < 150 ms:")
    for c in cells:
        if c.loss != 29:
            continue
        ks = c.of("adaptive")
        v, cf = percentile(_vals(ks, "visible"), 50), percentile(_vals(ks, "confirmed"), 50)
        ok = v < 5 and cf < 150
        lines.append(f"  {c.program:<7}: visible {fmt_ms(v)}, confirmed {fmt_ms(cf)}: "
                     + ("met" if ok else "MISSED"))
    return "\n".join(lines)


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run it; 1 if a part failed (or a secret showed), 2 if netsim cannot run."""
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short smoke run (< 2 min): 29%% loss, shell and cat, 8 keys per "
                         "mate")
    ap.add_argument("--losses", type=_numbers, metavar="PCT,PCT..",
                    help="loss each way on the mate's link (default 0,10,29; quick 29)")
    ap.add_argument("--keys", type=int, metavar="N",
                    help="timed keys per mate, program and loss (default 40, quick 8)")
    ap.add_argument("--seed", type=int, help="seed of every random choice (default: random, "
                    "printed)")
    ap.add_argument("--json", metavar="FILE", help="write the figures and every key as JSON")
    ap.add_argument("--logs", metavar="DIR",
                    help="copy the relay's, agent's and joins' logs here")
    ap.add_argument("--programs", nargs="+", choices=PROGRAMS,
                    help="what the mates type into (default shell cat cat-run; quick shell "
                         "cat)")
    ap.add_argument("--no-password", action="store_true", help="skip the password prompt")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    losses = args.losses if args.losses is not None else preset["losses"]
    n_keys = args.keys if args.keys is not None else preset["keys"]
    programs = args.programs or preset["programs"]
    reason = nsutil.unavailable_reason()
    if reason:
        print(f"local-echo benchmark cannot run: {reason}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"local-echo benchmark: seed={seed} ({'quick' if args.quick else 'full'})",
          flush=True)
    loadavg = [os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="tb-lecho-"))
    rig = Rig(root, seed)
    cells: list[Cell] = []
    passwords: dict[str, Any] = {}
    errors: list[str] = []
    started = time.monotonic()

    interrupt_on_sigterm()
    try:
        rig.start()
        log(f"rig ready in {time.monotonic() - started:.1f}s")
        for i, loss in enumerate(losses):
            link_seed = seed * 100 + i + 1
            rig.impair(loss, link_seed)
            log(f"loss {loss:g}% each way, {2 * DELAY_MS:g} ms RTT (link seed {link_seed})")
            for program in programs:
                rng = random.Random(f"{seed}:{loss:g}:{program}")
                t = time.monotonic()
                try:
                    cell = run_cell(rig, loss, program, n_keys, rng, CELL_BUDGET)
                except BenchError as exc:
                    errors.append(f"{loss:g}% {program}: {exc}")
                    log(f"  {program} failed: {exc}")
                    continue
                cells.append(cell)
                if cell.error:
                    errors.append(f"{loss:g}% {program}: {cell.error}")
                log(f"  {program}: {time.monotonic() - t:.0f}s; " + ", ".join(
                    f"{m} visible {fmt(percentile(_vals(cell.of(m), 'visible'), 50))} "
                    f"confirmed {fmt(percentile(_vals(cell.of(m), 'confirmed'), 50))}"
                    for m in MATES))
            if not args.no_password:
                try:
                    passwords[f"{loss:g}"] = password(
                        rig, random.Random(f"{seed}:{loss:g}:password"))
                except BenchError as exc:
                    errors.append(f"{loss:g}% password: {exc}")
                    log(f"  password failed: {exc}")
        rig.join_quic = {m: rig.on_quic(m) for m in MATES if m != "ssh"}
    except BenchError as exc:
        errors.append(f"rig: {exc}")
        log(f"rig failed: {exc}")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        if args.logs:
            with contextlib.suppress(Exception):
                rig.collect_logs(Path(args.logs))
        rig.close()
        shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - started
    loadavg.append(os.getloadavg())
    info = {"quic": rig.join_quic or {m: False for m in MATES if m != "ssh"},
            "loadavg": " -> ".join(" ".join(f"{x:.1f}" for x in v) for v in loadavg)}
    print()
    print(report(seed, args.quick, cells, passwords, info))
    print(f"\ntotal {total:.0f}s on {platform.node()} ({os.cpu_count()} cores), seed {seed}")
    for e in errors:
        print(f"error: {e}")
    leaked = any(r["shown"] for per in passwords.values() for r in per.values())
    if args.json:
        data = {
            "seed": seed, "quick": args.quick, "seconds": total, "errors": errors,
            "delay_ms_each_way": DELAY_MS, "losses": losses, "keys": n_keys,
            "joins_on_quic": rig.join_quic, "loadavg": loadavg, "passwords": passwords,
            "cells": [{
                "loss_pct": c.loss, "program": c.program, "stopped": c.stopped,
                "screens_equal": c.screens_equal, "unsettled": c.unsettled,
                "cursor_left": c.cursor_left, "restarts": c.restarts, "error": c.error,
                "join_links": c.links,
                "mates": {m: {
                    "visible": summary(_vals(c.of(m), "visible")),
                    "confirmed": summary(_vals(c.of(m), "confirmed")),
                    "host": summary(_vals(c.of(m), "host")),
                    "keys": [{**asdict(k), "visible_ms": k.ms(k.visible),
                              "confirmed_ms": k.ms(k.confirmed), "host_ms": k.ms(k.host)}
                             for k in c.of(m)],
                } for m in MATES},
            } for c in cells],
        }
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 1 if errors or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
