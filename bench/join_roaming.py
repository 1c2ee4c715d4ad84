#!/usr/bin/env python3
"""Join-roaming benchmark: `tether join` beside OpenSSH `ssh`, with the MATE's link impaired.

    python3 bench/join_roaming.py [--quick] [--json FILE] [--seed N] [--logs DIR]
                                  [--only PART...] [--losses PCT,PCT..] [--samples N]
                                  [--outages S,S..] [--outage-losses PCT,PCT..] [--runs N]
                                  [--moves N] [--predict MODE]

Needs root and /dev/net/tun (tether netsim). One ``tether.netsim`` network:
``host`` and ``relay`` on clean links, ``mate`` with two links, ``wifi`` and
``lte`` (it starts on wifi). One relay (port 2222, QUIC on), one host whose
pane runs ``tee -a FILE`` (echoes like ``cat``, and appends every line it
receives to a file in the host's home), and two mates in the same session and
run, both in the ``mate`` namespace, so any impairment hits both alike:

* ``join``: the host's printed ``#{tether_join}`` line (``tether join --pin ...``),
  the roaming client (QUIC; SSH fallback);
* ``ssh``:  the host's printed ``#{tether_ssh}`` line, OpenSSH ``ssh TOKEN@relay``.

Each mate runs in a local tmux of its own (its "terminal"), watched through a
control-mode client (``tether.testing.tap.Tap``, as bench/roaming.py does): keys
are typed with ``send-keys -l`` on that client, every ``%output`` of the mate's
pane is timestamped on arrival, and ``capture-pane`` confirms the screen shows
what is expected; a sample's time is the arrival of the output that made it true.
The two mates type disjoint alphabets (join lower case, ssh upper case), so their
keys can share the host's one line and file and still be told apart; each has a
probe key of its own (join ``+``, ssh ``=``) that shows nowhere else. The mate's
links carry 50 ms of delay each way (100 ms RTT) in every part. Where the join
has local echo prediction (``tether join --predict``), it runs with ``--predict
never`` unless ``--predict`` says otherwise: a key then shows only once the host
echoed it, as with ssh, and the figures compare the two links.

Parts (figures are measured, never asserted):

1. ``echo``: for each loss rate (``--losses``, default 0,10,30 % each way on both
   mate links, seeded), one printable key at a time, join and ssh alternating
   (A B B A), >= 50 ms apart, each timed from ``send-keys`` until that mate's
   screen shows it (the host pane's tty echoes it). ``--samples`` keys per mate
   and cell (default 60), a cell stops early when its time budget is spent; a key
   not shown within 30 s counts as failed (that mate sits out the rest of the cell).
2. ``move``: both mates type a word and Enter every 0.3-0.5 s; after 3 s the mate
   moves to its other link (``net.move``: the old address is gone, a new one on the
   other link), and right after it each mate types its probe key. Per run and mate:
   did it survive (its probe echoes: within 60 s for join; ssh, expected to die, is
   "dropped" after 20 s without it), and the gap: from the end of the move until
   the output showing the probe reaches that mate's terminal (``%output``: the
   bytes, even if more lines scroll them off at once). ``--moves`` runs (default 4), alternating
   wifi -> lte and back; a dropped ssh mate is started again for the next run.
3. ``blackout``: both mates type as in 2; after 3 s the mate's active link drops
   every packet, both ways, for N s (``--outages``, default 10,60) at L% loss
   (``--outage-losses``, default 0; 30 is an option), ``--runs`` runs per cell
   (default 2). At the link's return both stop typing and each types its probe key.
   Per run and mate: (a) from the return until the output showing the probe reaches
   that mate's terminal (as in 2); (b) from the return
   until everything it typed in the dark (its last word and the Enter after it) is
   in the host's file (inotify on it, ``LineWatch``); survived or dropped (no probe
   echo within 60 s, or the mate's program exited).

Every word typed in parts 2 and 3 must reach the host's file exactly once and in
order (each mate's characters, filtered by its alphabet): for join anything else
is a CORRECTNESS FAILURE (exit status 1); for an ssh mate that dropped, what it
lost is counted and printed. Every random choice (netsim, the links' loss, the
typed keys and their pace) derives from ``--seed``, printed at the start and in
the report. ``--quick`` (< 2 min): loss 0 and 30 %, 10 keys, one move, one 10 s
blackout. A full run takes about 12 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python3 bench/join_roaming.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchError, percentile, summary
from bench.roaming_rig import (
    STATUS_OK,
    LineWatch,
    copy_logs,
    fmt,
    fmt_ms,
    interrupt_on_sigterm,
    log,
    tear_down,
    wait_until,
)
from tether.netsim import nsutil
from tether.netsim.network import Network
from tether.testing.env import tether_cmd, tether_env, tmux
from tether.testing.host import Host
from tether.testing.join_mate import join_argv
from tether.testing.mate import Mate, visible
from tether.testing.relay import RelayProcess
from tether.testing.tap import Hit, Tap, expand_rep

TOPOLOGY = {"host": ["eth0"], "relay": ["eth0"], "mate": ["wifi", "lte"]}
MATES = ("join", "ssh")
PORT = 2222
SIZE = (100, 30)
DELAY_MS = 50.0
"""each way on both of the mate's links, in every part: 100 ms RTT"""
ALPHABETS = {"join": ("abcdefghijkmnopqrstuvwxyz",),
             "ssh": ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")}
"""what each mate types; an ssh mate started again takes the next of its alphabets,
so keys of an earlier ssh that reach the host late (its dead connection's kernel
socket delivering them when its address comes back) are told apart: ``ghost``"""
PROBE = {"join": "+", "ssh": "="}
TYPED = frozenset("".join(a for v in ALPHABETS.values() for a in v) + "".join(PROBE.values()))
EXITED = {"join": "[join exited", "ssh": "[ssh exited"}
TYPED_FILE = "typed.txt"

ECHO_LINE = 40
"""keys on one line of the host's cat (both mates together), then Enter (untimed)"""
ECHO_PACE = 0.050
ECHO_WARMUP = 2
KEY_TIMEOUT = 30.0
WORD = (4, 8)
"""letters per typed word (parts 2 and 3); then Enter"""
WORD_PACE = (0.3, 0.5)
BEFORE_S = 3.0
AFTER_S = 3.0
"""typing goes on this long after a run's figures are in"""
MOVE_WAIT = {"join": 60.0, "ssh": 20.0}
"""after a move: how long a mate's probe may take before the mate counts as dropped"""
RECOVERY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 60.0

QUICK: dict[str, Any] = {"losses": [0.0, 30.0], "samples": 10, "budget": 20.0,
                         "outages": [10.0], "outage_losses": [0.0], "runs": 1, "moves": 1}
FULL: dict[str, Any] = {"losses": [0.0, 10.0, 30.0], "samples": 60, "budget": 150.0,
                        "outages": [10.0, 60.0], "outage_losses": [0.0], "runs": 2, "moves": 4}
PARTS = ("echo", "move", "blackout")


def only(text: str, alphabet: str) -> str:
    """The characters of ``text`` in ``alphabet`` (what one mate types)."""
    return "".join(c for c in text if c in alphabet)


def typed_rows(screen: str) -> list[str]:
    """The screen's rows made only of typed characters (the host cat's lines)."""
    return [r for r in (row.rstrip() for row in screen.split("\n")) if r and set(r) <= TYPED]


# --- the mates ---------------------------------------------------------------------------


class JoinTerm:
    """`tether join` (the host's printed line) in a local tmux of its own, as a person
    runs it in a terminal: the same shape as ``Mate`` (OpenSSH in a local tmux)."""

    def __init__(self, root: Path, join_line: str, prefix: Sequence[str],
                 size: tuple[int, int], name: str, extra: Sequence[str] = ()) -> None:
        home = root / name
        home.mkdir(parents=True)
        (home / ".tmux.conf").write_text("set -g default-terminal tmux-256color\n")
        tmp = root / f"{name}.tmp"  # short: the join's own tmux socket lives here
        tmp.mkdir()
        self.log = home / "join.log"
        env = tether_env(home, tmp=tmp)
        self.sock = str(root / f"{name}.sock")
        conf = root / f"{name}.tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g default-terminal tmux-256color\n")
        argv = join_argv(join_line, str(self.log))
        at = argv.index("join") + 1
        cmd = shlex.join([*prefix, *argv[:at], *extra, *argv[at:]])
        cmd += '; echo "[join exited: $?]"; sleep 3600'
        subprocess.run(["tmux", "-S", self.sock, "-f", str(conf), "new-session", "-d", "-x",
                        str(size[0]), "-y", str(size[1]), cmd], check=True, env=env)

    def on_quic(self) -> bool:
        """The join's log shows a QUIC handshake (aioquic logs it)."""
        with contextlib.suppress(OSError):
            return "ALPN negotiated protocol tether/1" in self.log.read_text(errors="replace")
        return False

    def close(self) -> None:
        tmux(self.sock, "kill-server", check=False)


@dataclass
class MateSide:
    """One mate: its terminal (a local tmux running ssh or the join) and the tap on it."""

    name: str
    term: Mate | JoinTerm
    tap: Tap
    label: str
    alphabet: str

    def screen(self) -> str:
        return self.tap.screen()

    def exited(self) -> bool:
        """Whether the mate's program (ssh or the join) has exited: its terminal then
        runs the ``sleep`` after it (the exit line may have scrolled away, typing goes on)."""
        try:
            ok, out = self.tap.command("display -p '#{pane_current_command}'")
        except BenchError:
            return True
        return ok and out[:1] == ["sleep"]

    def wait_output(self, since: int, text: str, timeout: float) -> float | None:
        """When output showing ``text`` (its visible part, escapes removed) first reached
        the mate's terminal after ``since`` (a ``Tap.mark``), with the program still
        running (after an exit the terminal's own echo would show a typed key). The
        bytes' arrival, whether or not the screen still shows them when captured: lines
        that arrive with them may scroll them away at once. None: not within ``timeout``."""
        tap = self.tap
        needle = text.encode()
        deadline = time.perf_counter() + timeout
        idx = since
        tail = b""  # a chunk's end: an escape sequence may straddle two
        while True:
            with tap.cond:
                if len(tap.chunks) <= idx and not tap.dead:
                    tap.cond.wait(max(0.0, min(0.25, deadline - time.perf_counter())))
                new = tap.chunks[idx:]
                idx = len(tap.chunks)
                dead = tap.dead
            for t, data in new:
                buf = tail + data
                if needle in visible(expand_rep(buf)):
                    return None if self.exited() else t
                tail = buf[-64:]
            if dead or time.perf_counter() >= deadline:
                return None

    def tail(self) -> str:
        """What a dropped mate shows: the program's last words and exit line if it
        exited (from the history), else the last rows of its screen with text."""
        try:
            _, lines = self.tap.command("capture-pane -p -S -5000")
        except BenchError as exc:
            return f"(no screen: {exc})"
        rows = [r.rstrip() for r in lines if r.strip()]
        ends = [i for i, r in enumerate(rows) if EXITED[self.name] in r]
        if ends:
            i = ends[-1]
            return " | ".join(rows[max(0, i - 2):i + 1])
        return " | ".join(rows[-3:])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tap.close()
        with contextlib.suppress(Exception):
            self.term.close()


class Rig:
    """The network, the relay, the host running ``tee -a FILE``, and both mates."""

    def __init__(self, root: Path, seed: int, predict: str) -> None:
        self.root = root
        self.seed = seed
        self.predict = predict
        self.join_extra: list[str] = []
        self.net = Network(TOPOLOGY, seed=seed)
        self.relay: RelayProcess | None = None
        self.host: Host | None = None
        self.typed = root / "host" / TYPED_FILE
        self.tty_fd = -1
        self.mates: dict[str, MateSide] = {}
        self.starts = dict.fromkeys(MATES, 0)
        self.join_line = ""
        self.ssh_line = ""
        self.join_quic = True

    # -- bring-up --------------------------------------------------------------------------

    def start(self) -> None:
        help_text = subprocess.run(tether_cmd("join", "--help"), capture_output=True,
                                   text=True, timeout=60).stdout
        if "--predict" in help_text:
            self.join_extra = ["--predict", self.predict]
        else:
            self.predict = "n/a (this tether's join does not predict)"
        net = self.net
        net.start()
        log(f"netsim: run {net.run_id} seed={net.seed}")
        self.relay = RelayProcess(self.root / "relay", PORT, prefix=net.exec_argv("relay"),
                                  bind="0.0.0.0", public=net.addr("relay"))
        host = Host(self.root / "host", self.relay.conf(), SIZE, prefix=net.exec_argv("host"))
        self.host = host
        host.type(f"exec tee -a {shlex.quote(str(self.typed))}")
        wait_until(lambda: host.display("#{pane_current_command}") == "tee", 15,
                   "tee in the host pane")
        self.tty_fd = os.open(host.display("#{pane_tty}"), os.O_WRONLY | os.O_NOCTTY)
        wait_until(lambda: (m := STATUS_OK.match(self.host_status())) and m.group(1) == "quic",
                   60, "the host to be connected over QUIC", interval=0.1)
        self.join_line = host.join_rw
        self.ssh_line = host.ssh_rw
        for m in MATES:
            self.start_mate(m)

    def host_status(self) -> str:
        assert self.host is not None
        return self.host.tmux("show", "-gv", "@tether_status", check=False).strip()

    def start_mate(self, m: str) -> MateSide:
        """Start mate ``m`` (again); until a key it types reaches the host."""
        self.starts[m] += 1
        label = f"mate-{m}{self.starts[m]}"
        prefix = self.net.exec_argv("mate")
        t0 = time.monotonic()
        term: Mate | JoinTerm
        if m == "ssh":
            term = Mate(self.root, self.ssh_line, SIZE, name=label, prefix=prefix)
        else:
            term = JoinTerm(self.root, self.join_line, prefix, SIZE, label, self.join_extra)
        alphabets = ALPHABETS[m]
        side = MateSide(m, term, Tap(term.sock), label,
                        alphabets[(self.starts[m] - 1) % len(alphabets)])
        self.mates[m] = side
        wait_until(lambda: side.exited() or any("0:" in r for r in side.screen().split("\n")),
                   60, f"the {m} mate to show the session")
        if side.exited():
            raise BenchError(f"the {m} mate exited at start:\n{side.screen()}")
        if isinstance(term, JoinTerm):
            try:
                wait_until(term.on_quic, 30, "the join on QUIC")
            except BenchError:
                self.join_quic = False
                log("join: not on QUIC after 30 s (SSH channel); going on")
        self._typing_works(side)
        log(f"{label} ready in {time.monotonic() - t0:.1f}s on {self.net.active_link('mate')}")
        return side

    def _typing_works(self, side: MateSide, timeout: float = 60) -> None:
        """The mate's probe key and Enter reach the host's file."""
        watch = LineWatch(self.typed)
        try:
            deadline = time.monotonic() + timeout
            while True:
                side.tap.send_literal(PROBE[side.name])
                side.tap.send_key("Enter")
                if watch.wait(lambda lines: any(PROBE[side.name] in x for _, x in lines), 10):
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"keys of the {side.name} mate do not reach the host")
        finally:
            watch.close()

    def restart(self, m: str) -> None:
        """End mate ``m`` and start a new one."""
        old = self.mates.pop(m)
        old.close()
        self.start_mate(m)

    # -- the network -----------------------------------------------------------------------

    def impair(self, loss: float, seed: int) -> None:
        """100 ms RTT and ``loss`` % each way on both of the mate's links."""
        for i, name in enumerate(TOPOLOGY["mate"]):
            self.net.link("mate", name).set(delay=f"{DELAY_MS:g}ms", loss=f"{loss:g}%",
                                            seed=seed + i)

    def clear_screen(self, timeout: float = 30) -> None:
        """Clear the host pane (as ``clear`` would): no probe key left on any screen."""
        os.write(self.tty_fd, b"\033[H\033[2J")
        for side in self.mates.values():
            with contextlib.suppress(BenchError):
                wait_until(lambda s=side: not typed_rows(s.screen()), timeout,
                           f"the {side.name} mate's screen to clear")

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        for side in self.mates.values():
            side.close()
        with contextlib.suppress(OSError):
            os.close(self.tty_fd)
        tear_down(self.root, self.host, self.relay, self.net)

    def collect_logs(self, dest: Path) -> None:
        """The relay's, the agent's and the joins' logs, and the netsim events, to ``dest``."""
        copy_logs(self.root, self.relay, dest)
        for p in self.root.glob("mate-join*/join.log"):
            with contextlib.suppress(OSError):
                shutil.copy(p, dest / f"{p.parent.name}.log")
        (dest / "netsim-events.log").write_text("\n".join(str(e) for e in self.net.events) + "\n")


# --- statistics ------------------------------------------------------------------------------


@dataclass
class Cell:
    """Samples of one figure (ms); ``failed``: samples that never came."""

    values: list[float] = field(default_factory=list)
    failed: int = 0
    sent: list[float] = field(default_factory=list)
    """each sample's send time (wall clock, as the logs have it)"""

    def add(self, hit: Hit | None, t0: float) -> float | None:
        wall = time.time() - (time.perf_counter() - t0)
        if hit is None:
            self.failed += 1
            return None
        ms = (hit.t - t0) * 1000
        self.values.append(ms)
        self.sent.append(wall)
        return ms

    def to_json(self) -> dict[str, Any]:
        return {"stats": summary(self.values), "failed": self.failed, "values": self.values,
                "sent_wall": self.sent}


def stats_cols(values: Sequence[float]) -> str:
    """median, p90, p99 and n, as table columns."""
    st = summary(values)
    return (f"{fmt(st['median']):>7} {fmt(st['p90']):>7} {fmt(st['p99']):>7} "
            f"{st['runs']:>3}")


def ratios(a: Sequence[float], b: Sequence[float]) -> str:
    """a / b at the median, p90 and p99 (``-`` without samples on both sides)."""
    if not a or not b:
        return f"{'-':>5} {'-':>5} {'-':>5}"
    return " ".join(f"{percentile(a, q) / percentile(b, q):>5.2f}" for q in (50, 90, 99))


# --- 1. echo ----------------------------------------------------------------------------------


class EchoLine:
    """The host cat's current line as both mates type into it, one key at a time.

    ``expect[m]``: the characters of mate ``m`` the line should show (a key that
    came late on the line before is carried over). A key is shown when the lowest
    row made only of typed characters, filtered to ``m``'s alphabet, is exactly that.
    """

    def __init__(self, rig: Rig, rng: random.Random) -> None:
        self.rig = rig
        self.rng = rng
        self.expect = dict.fromkeys(MATES, "")
        self.first = dict.fromkeys(MATES, "")
        """the first of ``m``'s characters on the previous line's copy (tee's): never
        the first of a new line, so that copy never passes for the new line"""
        self.keys = 0
        self.stuck: set[str] = set()
        self.garbled: list[str] = []

    def key(self, m: str, timeout: float) -> tuple[Hit | None, float]:
        """Type one key into mate ``m``; (the hit, when it was sent)."""
        exp = self.expect[m]
        avoid = exp[-1] if exp else self.first[m]
        side = self.rig.mates[m]
        c = self.rng.choice([x for x in side.alphabet if x != avoid])
        want = exp + c
        self.expect[m] = want
        self.keys += 1
        tap = side.tap

        def shows(scr: str) -> bool:
            rows = typed_rows(scr)
            return bool(rows) and only(rows[-1], side.alphabet) == want

        mark = tap.mark()
        t0 = tap.send_literal(c)
        hit = tap.wait(mark, shows, timeout, c.encode())
        if hit is None:
            self.stuck.add(m)
        return hit, t0

    def newline(self, watch: LineWatch, timeout: float) -> None:
        """Enter (untimed) from a mate that is not stuck; the line in the host's file says
        what of each mate's keys made it, the rest is carried to the next line."""
        by = next((m for m in MATES if m not in self.stuck), MATES[0])
        n0 = len(watch.lines)
        self.rig.mates[by].tap.send_key("Enter")
        got = watch.wait(lambda lines: lines[n0:], timeout)
        line = got[0][1] if got else None
        for m in MATES:
            exp = self.expect[m]
            came = only(line, self.rig.mates[m].alphabet) if line is not None else ""
            if exp.startswith(came):
                carry = exp[len(came):]
            else:
                self.garbled.append(f"{m}: expected {exp!r}, the host got {came!r}")
                carry = ""
            self.first[m] = came[:1]
            self.expect[m] = carry
        self.keys = sum(len(v) for v in self.expect.values())


def bench_echo(rig: Rig, losses: Sequence[float], samples: int, budget: float,
               out: dict[str, Any]) -> None:
    """Part 1: keystroke echo for each loss rate on the mate's links (100 ms RTT)."""
    line = EchoLine(rig, random.Random(f"{rig.seed}:echo"))
    for i, loss in enumerate(losses):
        seed = rig.seed * 100 + i + 1
        rig.impair(loss, seed)
        log(f"echo: RTT {2 * DELAY_MS:g} ms, loss {loss:g}% each way on the mate's links "
            f"(seed {seed})")
        cells = {m: Cell() for m in MATES}
        out[f"{loss:g}"] = {"loss_pct": loss, "link_seed": seed, "cells": cells}
        watch = LineWatch(rig.typed)
        try:
            line.stuck.clear()
            start = time.monotonic()
            for _ in range(ECHO_WARMUP):  # untimed, under the new conditions
                for m in MATES:
                    if m not in line.stuck:
                        hit, _ = line.key(m, KEY_TIMEOUT)
                        cells[m].failed += hit is None
                        time.sleep(ECHO_PACE)
            for k in range(samples):
                if time.monotonic() - start > budget:
                    log(f"echo: cell budget {budget:.0f}s used up after {k} rounds")
                    break
                for m in MATES if k % 2 == 0 else MATES[::-1]:  # A B B A
                    if m in line.stuck:
                        continue
                    hit, t0 = line.key(m, KEY_TIMEOUT)
                    cells[m].add(hit, t0)
                    time.sleep(ECHO_PACE)  # a typist's pace
                if line.keys >= ECHO_LINE:
                    line.newline(watch, KEY_TIMEOUT)
            line.newline(watch, KEY_TIMEOUT)
        finally:
            watch.close()
        for m in MATES:
            st = summary(cells[m].values)
            log(f"  {m}: median {fmt(st['median'])} p90 {fmt(st['p90'])} p99 {fmt(st['p99'])} "
                f"n={st['runs']} failed={cells[m].failed}"
                + (" (sat out the rest of the cell)" if m in line.stuck else ""))
    out["garbled"] = line.garbled


# --- 2 and 3: typing words while the link misbehaves ----------------------------------------


class WordTypist:
    """Types a word of its mate's alphabet and Enter every 0.3-0.5 s, in a thread."""

    def __init__(self, side: MateSide, rng: random.Random) -> None:
        self.side = side
        self.rng = rng
        self.words: list[tuple[str, float]] = []
        """(word, time just before it was sent), in order"""
        self.error: str | None = None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tap = self.side.tap
        alphabet = self.side.alphabet
        nxt = time.perf_counter()
        while not self._stop.is_set():
            word = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(*WORD)))
            try:
                t0 = tap.send_literal(word)
                tap.send_key("Enter")
            except BenchError as exc:
                self.error = str(exc)
                break
            with self.lock:
                self.words.append((word, t0))
            nxt += self.rng.uniform(*WORD_PACE)
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def snapshot(self) -> list[tuple[str, float]]:
        with self.lock:
            return list(self.words)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def arrivals(lines: Sequence[tuple[float, str]], alphabet: str) -> tuple[str, list[float]]:
    """A mate's characters (``alphabet``) in the host's file, and when each got there."""
    chars: list[str] = []
    times: list[float] = []
    for t, text in lines:
        s = only(text, alphabet)
        chars.append(s)
        times.extend([t] * len(s))
    return "".join(chars), times


def check_stream(words: Sequence[tuple[str, float]], lines: Sequence[tuple[float, str]],
                 m: str, alphabet: str) -> dict[str, Any]:
    """What of the mate's words reached the host: all, a prefix (``lost`` the rest),
    or something else (``garbled``: doubled, reordered or changed); and ``ghost``:
    how many keys of an earlier instance of the same mate (another of its alphabets)
    reached the host during the run."""
    typed = "".join(w for w, _ in words)
    got, _ = arrivals(lines, alphabet)
    others = "".join(a for a in ALPHABETS[m] if a != alphabet)
    res: dict[str, Any] = {"typed_chars": len(typed), "arrived_chars": len(got),
                           "lost_chars": 0, "garbled": None,
                           "ghost_chars": sum(len(only(x, others)) for _, x in lines)}
    if got != typed:
        if typed.startswith(got):
            res["lost_chars"] = len(typed) - len(got)
        else:
            at = next((i for i, (a, b) in enumerate(zip(got, typed, strict=False)) if a != b),
                      min(len(got), len(typed)))
            res["garbled"] = (f"at character {at}: typed {typed[at:at + 12]!r}, the host got "
                              f"{got[at:at + 12]!r} ({len(got)} of {len(typed)} characters)")
    return res


class Later:
    """``fn()`` on a daemon thread (one still waiting never holds up the exit)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class Run:
    """One run of part 2 or 3: both mates typing words, the host's file watched."""

    def __init__(self, rig: Rig, seed_text: str) -> None:
        self.rig = rig
        self.watch = LineWatch(rig.typed)
        self.alpha = {m: rig.mates[m].alphabet for m in MATES}
        self.typists = {m: WordTypist(rig.mates[m], random.Random(f"{seed_text}:{m}"))
                        for m in MATES}

    def probe(self, m: str, t_from: float, timeout: float) -> Later:
        """Type mate ``m``'s probe key now; a future: seconds from ``t_from`` until its
        echo reaches the mate's terminal (None if never)."""
        side = self.rig.mates[m]
        mark = side.tap.mark()
        side.tap.send_literal(PROBE[m])

        def wait() -> float | None:
            t = side.wait_output(mark, PROBE[m], timeout)
            return None if t is None else t - t_from

        return Later(wait)

    def arrived(self, m: str, n: int, timeout: float) -> Later:
        """A future: until the host's file holds ``n`` of ``m``'s characters (or time's up)."""
        return Later(lambda: self.watch.wait(
            lambda lines: len(arrivals(lines, self.alpha[m])[0]) >= n, timeout))

    def finish(self, live: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Typing on for ``AFTER_S``, then stopped; until every word of the ``live``
        mates is in the host's file; each mate's stream checked."""
        time.sleep(AFTER_S)
        for ty in self.typists.values():
            ty.stop()
        for m in live:
            need = sum(len(w) for w, _ in self.typists[m].snapshot())
            self.watch.wait(lambda lines, a=self.alpha[m], need=need:
                            len(arrivals(lines, a)[0]) >= need, DRAIN_TIMEOUT)
        out = {}
        for m in MATES:
            res = check_stream(self.typists[m].snapshot(), self.watch.lines, m, self.alpha[m])
            res["typing_error"] = self.typists[m].error
            out[m] = res
        return out

    def close(self) -> None:
        for ty in self.typists.values():
            ty.stop()
        self.watch.close()


def _extras(r: dict[str, Any]) -> str:
    """A run's losses, ghosts, garbling and a dropped mate's last screen rows, for the log."""
    return ((f", lost {r['lost_chars']} chars" if r["lost_chars"] else "")
            + (f", {r['ghost_chars']} ghost chars" if r["ghost_chars"] else "")
            + (f", GARBLED {r['garbled']}" if r["garbled"] else "")
            + (f"; its terminal ends: {_short(r['screen_tail'])!r}" if r["screen_tail"]
               else ""))


def _short(tail: str | None) -> str:
    """A dropped mate's last rows, short: up to its exit line, blanks squeezed."""
    text = tail or ""
    if m := re.search(r"\[(ssh|join) exited: \d+\]", text):
        text = text[:m.end()]
    return re.sub(r"\s{2,}", " ", text)[-90:]


def _alive(rig: Rig, m: str) -> bool:
    return not rig.mates[m].exited()


def _revive(rig: Rig, results: dict[str, dict[str, Any]]) -> None:
    """Start again every mate that did not survive the run."""
    for m, r in results.items():
        if not r["survived"]:
            log(f"  {m}: starting the mate again")
            rig.restart(m)


# --- 2. address change -------------------------------------------------------------------------


def move_run(rig: Rig, k: int, runs: int) -> dict[str, dict[str, Any]]:
    """One run of part 2; a result per mate."""
    seed_text = f"{rig.seed}:move:{k}"
    link_seed = random.Random(seed_text).randrange(1, 2**31)
    rig.impair(0.0, link_seed)
    rig.clear_screen()
    net = rig.net
    frm = net.active_link("mate")
    to = next(n for n in TOPOLOGY["mate"] if n != frm)
    run = Run(rig, seed_text)
    try:
        time.sleep(BEFORE_S)
        addr0 = net.addr("mate")
        tm = time.perf_counter()
        addr1 = net.move("mate", to)
        t_move = time.perf_counter()
        gaps = {m: run.probe(m, t_move, MOVE_WAIT[m]) for m in MATES}
        got = {m: f.result() for m, f in gaps.items()}
        exited = {m: not _alive(rig, m) for m in MATES}
        survived = {m: got[m] is not None and not exited[m] for m in MATES}
        streams = run.finish([m for m in MATES if survived[m]])
        for m in MATES:
            streams[m]["screen_tail"] = None if survived[m] else rig.mates[m].tail()
    finally:
        run.close()
    out = {}
    for m in MATES:
        r = {"run": k + 1, "from": frm, "to": to, "addr": f"{addr0} -> {addr1}",
             "move_ms": (t_move - tm) * 1000, "link_seed": link_seed,
             "gap_ms": None if got[m] is None else got[m] * 1000,
             "survived": survived[m], "exited": exited[m], **streams[m]}
        out[m] = r
    log(f"move {k + 1}/{runs} {frm} -> {to} ({addr0} -> {addr1}): "
        + ", ".join(f"{m} " + (fmt_ms(r['gap_ms']) if r["survived"] else
                               "DROPPED" + (" (exited)" if r["exited"] else ""))
                    + _extras(r) for m, r in out.items()))
    _revive(rig, out)
    return out


def bench_move(rig: Rig, runs: int, results: list[dict[str, Any]]) -> None:
    """Part 2: ``runs`` address changes, alternating wifi -> lte and back."""
    for k in range(runs):
        for m, r in move_run(rig, k, runs).items():
            results.append({"mate": m, **r})


# --- 3. blackout -------------------------------------------------------------------------------


def blackout_run(rig: Rig, secs: float, loss: float, k: int,
                 runs: int) -> dict[str, dict[str, Any]]:
    """One run of part 3: ``secs`` of darkness on the mate's link at ``loss``."""
    seed_text = f"{rig.seed}:blackout:{secs:g}:{loss:g}:{k}"
    link_seed = random.Random(seed_text).randrange(1, 2**31)
    rig.impair(loss, link_seed)
    rig.clear_screen()
    link = rig.net.link("mate")  # the active one
    run = Run(rig, seed_text)
    try:
        time.sleep(BEFORE_S)
        tb = time.perf_counter()
        link.blackout(secs)
        te = tb + secs  # the forwarder's blackout ends at most a request's time later
        log(f"blackout {secs:g}s loss {loss:g}% run {k + 1}/{runs}: {link.key} dark")
        time.sleep(max(0.0, te - time.perf_counter()))
        for ty in run.typists.values():  # no more lines after the probes: nothing to scroll
            ty.stop()                    # them away before a mate's terminal shows them
        probes = {m: run.probe(m, te, RECOVERY_TIMEOUT) for m in MATES}
        dark_words = {m: [(w, t) for w, t in run.typists[m].snapshot() if tb <= t < te]
                      for m in MATES}
        need = {}
        for m in MATES:
            words = run.typists[m].snapshot()
            upto = max((i for i, (_, t) in enumerate(words) if tb <= t < te), default=-1)
            need[m] = sum(len(w) for w, _ in words[:upto + 1]) if upto >= 0 else 0
        darks = {m: run.arrived(m, need[m], RECOVERY_TIMEOUT) for m in MATES if need[m]}
        got = {m: f.result() for m, f in probes.items()}
        for f in darks.values():
            f.result()
        exited = {m: not _alive(rig, m) for m in MATES}
        survived = {m: got[m] is not None and not exited[m] for m in MATES}
        streams = run.finish([m for m in MATES if survived[m]])
        for m in MATES:
            streams[m]["screen_tail"] = None if survived[m] else rig.mates[m].tail()
        lines = list(run.watch.lines)
    finally:
        run.close()
    out = {}
    for m in MATES:
        _, times = arrivals(lines, run.alpha[m])
        dark_ms = None
        if need[m] and len(times) >= need[m]:
            dark_ms = (times[need[m] - 1] - te) * 1000
        r = {"run": k + 1, "outage_s": secs, "loss_pct": loss, "link": link.key,
             "link_seed": link_seed, "probe_ms": None if got[m] is None else got[m] * 1000,
             "dark_ms": dark_ms, "dark_words": len(dark_words[m]),
             "survived": survived[m], "exited": exited[m], **streams[m]}
        out[m] = r
    log("  " + ", ".join(
        f"{m}: key {fmt_ms(r['probe_ms'])}, dark words ({r['dark_words']}) -> host "
        f"{fmt_ms(r['dark_ms'])}" + ("" if r["survived"] else " DROPPED")
        + (" (exited)" if r["exited"] else "") + _extras(r)
        for m, r in out.items()))
    _revive(rig, out)
    return out


def bench_blackout(rig: Rig, outages: Sequence[float], losses: Sequence[float], runs: int,
                   results: list[dict[str, Any]]) -> None:
    """Part 3: ``runs`` runs of every (blackout, loss) cell."""
    for secs in outages:
        for loss in losses:
            for k in range(runs):
                for m, r in blackout_run(rig, secs, loss, k, runs).items():
                    results.append({"mate": m, **r})


# --- the report -------------------------------------------------------------------------------


def _vals(rs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rs if r[key] is not None]


def violations(moves: Sequence[dict[str, Any]], blackouts: Sequence[dict[str, Any]],
               echo: dict[str, Any]) -> list[str]:
    """What broke exactly-once-in-order: any garbling; a join mate's lost keys."""
    out = [f"echo: {g}" for g in echo.get("garbled", [])]
    for part, rs in (("move", moves), ("blackout", blackouts)):
        for r in rs:
            what = (f"{part} {r['mate']} run {r['run']}"
                    + (f" ({r['outage_s']:g}s {r['loss_pct']:g}%)" if part == "blackout" else ""))
            if r["garbled"]:
                out.append(f"{what}: garbled {r['garbled']}")
            if r["mate"] == "join" and r["lost_chars"]:
                out.append(f"{what}: {r['lost_chars']} typed characters never reached the host")
            if r["typing_error"]:
                out.append(f"{what}: typing stopped: {r['typing_error']}")
    return out


def report(args: argparse.Namespace, seed: int, echo: dict[str, Any],
           moves: Sequence[dict[str, Any]], blackouts: Sequence[dict[str, Any]],
           rig_info: dict[str, Any]) -> str:
    lines: list[str] = []
    mode = "quick" if args.quick else "full"
    lines.append(f"tether join-roaming benchmark ({mode}), seed {seed} (netsim, loss, typed "
                 "keys); times in ms (s where marked)")
    lines.append(f"  the MATE's link impaired: host and relay on clean links; the mate on wifi "
                 f"and lte, {DELAY_MS:g} ms delay each way")
    lines.append(f"  on both ({2 * DELAY_MS:g} ms RTT) in every part. Two mates in the same "
                 "session and run, both in the 'mate' netns,")
    lines.append("  each in a local tmux read through a control client: join = `tether join` "
                 "(the host's printed line;")
    lines.append(f"  on QUIC: {'yes' if rig_info['join_quic'] else 'NO'}; local echo prediction: "
                 f"{rig_info['predict']}), ssh = OpenSSH `ssh TOKEN@relay`.")
    lines.append("  join/ssh = ratio of join's figure to ssh's at the median, p90, p99.")
    la = " -> ".join(" ".join(f"{x:.1f}" for x in v) for v in args.loadavg)
    lines.append(f"  load average (1/5/15 min) at start -> end: {la}")

    cells = {k: v for k, v in echo.items() if k != "garbled"}
    if cells:
        lines.append("")
        lines.append("1. keystroke echo: one key at a time, join and ssh alternating, from "
                     "send-keys until on that mate's screen")
        lines.append(f"   RTT {2 * DELAY_MS:g} ms; loss each way on the mate's link; "
                     f"'fail' = not shown within {KEY_TIMEOUT:g} s")
        lines.append(f"  {'loss':>5} | {'join median':>11} {'p90':>7} {'p99':>7} {'n':>3} "
                     f"{'fail':>4} | {'ssh median':>11} {'p90':>7} {'p99':>7} {'n':>3} "
                     f"{'fail':>4} | {'join/ssh':>8} {'p90':>5} {'p99':>5}")
        for c in cells.values():
            j, s = c["cells"]["join"], c["cells"]["ssh"]
            lines.append(f"  {c['loss_pct']:>4g}% | {'':>4}{stats_cols(j.values)} {j.failed:>4} | "
                         f"{'':>4}{stats_cols(s.values)} {s.failed:>4} | "
                         f"{'':>3}{ratios(j.values, s.values)}")
    if moves:
        lines.append("")
        lines.append("2. address change: the mate moves to its other link (old address gone) "
                     "while both type a word + Enter")
        lines.append("   every 0.3-0.5 s; right after the move each mate types a key; gap = "
                     "from the move until that key's echo")
        lines.append(f"   reaches its terminal. Dropped = no echo within {MOVE_WAIT['ssh']:g} s "
                     f"(ssh) / {MOVE_WAIT['join']:g} s (join), or the program exited.")
        lines.append(f"  {'mate':<5} {'survived':>8} | {'gap median':>10} {'p90':>7} {'p99':>7} "
                     f"{'n':>3} | runs (direction: gap)")
        for m in MATES:
            rs = [r for r in moves if r["mate"] == m]
            surv = sum(r["survived"] for r in rs)
            ex = sum(r["exited"] for r in rs)
            per = ", ".join(f"{r['from'][0]}>{r['to'][0]} "
                            + (fmt_ms(r["gap_ms"]) if r["survived"] else
                               "dropped" + ("/exited" if r["exited"] else "/hung"))
                            for r in rs)
            lines.append(f"  {m:<5} {f'{surv}/{len(rs)}':>8} | {'':>3}"
                         f"{stats_cols(_vals([r for r in rs if r['survived']], 'gap_ms'))} | "
                         f"{per}")
            if ex and m == "ssh":
                lines.append(f"  {'':<5} {'':>8}   (ssh exited by itself within the run "
                             f"{ex}/{len(rs)}; 'hung' = still running, no echo)")
        lost = [r for r in moves if r["mate"] == "ssh" and r["lost_chars"]]
        if lost:
            lines.append("  ssh: what it typed after the move never reached the host: "
                         + ", ".join(f"run {r['run']} {r['lost_chars']} chars" for r in lost))
        ghosts = [r for r in moves if r["ghost_chars"]]
        if ghosts:
            lines.extend(textwrap.wrap(
                "  ghost keys: " + ", ".join(f"run {r['run']} {r['ghost_chars']} chars"
                                            for r in ghosts)
                + " typed into an earlier ssh mate (dropped, then killed) reached the host in "
                "this run, when its old address came back: its kernel socket outlived it and "
                "the relay still held its connection", 108,
                subsequent_indent="    "))
        mv = [r["move_ms"] for r in moves if r["mate"] == "join"]
        lines.append(f"  net.move itself: median {fmt(percentile(mv, 50))} ms (not in the gap)")
    if blackouts:
        lines.append("")
        lines.append("3. blackout: the mate's active link drops everything, both ways, for N s "
                     "while both type a word + Enter")
        lines.append("   every 0.3-0.5 s (L% loss each way before, during and after);")
        lines.append("   (a) key: at the link's return both stop typing and type a key -> its "
                     "echo reaches that mate's terminal")
        lines.append("   (b) dark->host: from the link's return until everything the mate typed "
                     "in the dark is in the host's file")
        lines.append(f"   dropped = no echo of (a) within {RECOVERY_TIMEOUT:g} s, or the program "
                     "exited; its figures are left out")
        lines.append(f"  {'outage':>6} {'loss':>4} {'mate':<4} {'ok':>5} | "
                     f"{'(a) median':>10} {'p90':>7} {'p99':>7} {'n':>3} | "
                     f"{'(b) median':>10} {'p90':>7} {'p99':>7} {'n':>3} | "
                     f"{'join/ssh (a)':>12} {'(b)':>5}")
        keys = sorted({(r["outage_s"], r["loss_pct"]) for r in blackouts})
        for secs, loss in keys:
            rs = [r for r in blackouts if r["outage_s"] == secs and r["loss_pct"] == loss]
            by = {m: [r for r in rs if r["mate"] == m and r["survived"]] for m in MATES}
            for m in MATES:
                all_m = [r for r in rs if r["mate"] == m]
                ok = f"{len(by[m])}/{len(all_m)}"
                rat = ""
                if m == "join":
                    a = [percentile(_vals(by[x], "probe_ms"), 50) for x in MATES]
                    b = [percentile(_vals(by[x], "dark_ms"), 50) for x in MATES]
                    rat = f" | {_ratio(a[0], a[1]):>12} {_ratio(b[0], b[1]):>5}"
                lines.append(f"  {f'{secs:g}s':>6} {loss:>3g}% {m:<4} {ok:>5} | {'':>3}"
                             f"{stats_cols(_vals(by[m], 'probe_ms'))} | {'':>3}"
                             f"{stats_cols(_vals(by[m], 'dark_ms'))}{rat}")
        lines.append("  (join/ssh here: at the median)")
        for r in blackouts:
            if not r["survived"]:
                lines.append(f"  dropped: {r['outage_s']:g}s/{r['loss_pct']:g}% #{r['run']} "
                             f"{r['mate']}: its terminal ends {_short(r['screen_tail'])!r}")
        lines.extend(textwrap.wrap("runs (a)/(b): " + "; ".join(
            f"{r['outage_s']:g}s/{r['loss_pct']:g}% #{r['run']} {r['mate']} "
            + (f"{fmt_ms(r['probe_ms'])}/{fmt_ms(r['dark_ms'])}" if r["survived"] else
               "dropped" + ("/exited" if r["exited"] else ""))
            for r in blackouts), 108, initial_indent="  ", subsequent_indent="    "))
    moved_words = sum(r["typed_chars"] > 0 for r in [*moves, *blackouts])
    broken = violations(moves, blackouts, echo)
    if moves or blackouts:
        lines.append("")
        if not broken:
            lines.append(f"correctness: in all {moved_words} mate-runs of parts 2 and 3 every "
                         "character typed reached the host exactly once and in order")
            lines.append("  (except what a dropped ssh mate typed after it lost its link)")
        else:
            lines.append("CORRECTNESS FAILURE:")
            lines.extend(f"  !! {v}" for v in broken)
    if rig_info["restarts"]:
        lines.append(f"mates started again after a drop: {rig_info['restarts']}")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "-"
    return f"{a / b:.2f}"


# --- the command line -------------------------------------------------------------------------


def _numbers(text: str) -> list[float]:
    """``0,10,30`` as numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts asked for on a fresh rig; 1 if a part failed or a join lost keys,
    2 if netsim cannot run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run for smoke testing (< 2 min): echo at 0%% and 30%% loss, "
                         "10 keys; one move; one 10 s blackout")
    ap.add_argument("--json", metavar="FILE", help="write the figures and samples as JSON")
    ap.add_argument("--seed", type=int,
                    help="seed of every random choice: netsim, the links' loss, the typed "
                         "keys and their pace (default: random, printed)")
    ap.add_argument("--logs", metavar="DIR",
                    help="copy the relay's, agent's and joins' logs and the netsim events here")
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    ap.add_argument("--losses", type=_numbers, metavar="PCT,PCT..",
                    help="echo: loss rates each way on the mate's links (default 0,10,30; "
                         "quick 0,30)")
    ap.add_argument("--samples", type=int, metavar="N",
                    help="echo: timed keys per loss rate and mate (default 60, quick 10)")
    ap.add_argument("--outages", type=_numbers, metavar="S,S..",
                    help="blackout: lengths in seconds (default 10,60; quick 10)")
    ap.add_argument("--outage-losses", type=_numbers, metavar="PCT,PCT..",
                    help="blackout: loss rates each way around the blackout (default 0; "
                         "e.g. 0,30)")
    ap.add_argument("--runs", type=int, metavar="N",
                    help="blackout: runs per (length, loss) cell (default 2, quick 1)")
    ap.add_argument("--predict", choices=("never", "adaptive", "always"), default="never",
                    help="the join's local echo prediction (`tether join --predict`), where "
                         "it has one; default never: the figures are then the link's, a key "
                         "is shown only once the host echoed it. With adaptive or always, "
                         "'shown' includes a predicted (underlined) character")
    ap.add_argument("--moves", type=int, metavar="N",
                    help="address changes, alternating wifi -> lte and back (default 4, "
                         "quick 1)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("losses", "samples", "outages", "outage_losses", "runs", "moves"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    budget = preset["budget"] * max(1.0, args.samples / preset["samples"])
    reason = nsutil.unavailable_reason()
    if reason:
        print(f"join-roaming benchmark cannot run: {reason}", file=sys.stderr)
        return 2
    parts = args.only or PARTS
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"join-roaming benchmark: seed={seed} ({'quick' if args.quick else 'full'})",
          flush=True)
    args.loadavg = [os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="tb-jroam-"))
    rig = Rig(root, seed, args.predict)
    echo: dict[str, Any] = {}
    moves: list[dict[str, Any]] = []
    blackouts: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.monotonic()

    interrupt_on_sigterm()
    try:
        rig.start()
        log(f"rig ready in {time.monotonic() - started:.1f}s")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("echo", lambda: bench_echo(rig, args.losses, args.samples, budget, echo)),
            ("blackout", lambda: bench_blackout(rig, args.outages, args.outage_losses,
                                                args.runs, blackouts)),
            ("move", lambda: bench_move(rig, args.moves, moves)),  # last: it kills ssh mates
        ]
        for name, fn in steps:
            if name not in parts:
                continue
            t = time.monotonic()
            try:
                fn()
            except BenchError as exc:
                errors.append(f"{name}: {exc}")
                log(f"{name} failed: {exc}")
            log(f"{name} took {time.monotonic() - t:.0f}s")
    except BenchError as exc:
        errors.append(f"rig: {exc}")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        if args.logs:
            with contextlib.suppress(Exception):
                rig.collect_logs(Path(args.logs))
        rig.close()
        shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - started
    args.loadavg.append(os.getloadavg())
    rig_info = {"join_quic": rig.join_quic, "predict": rig.predict,
                "restarts": ", ".join(f"{m} {n - 1}x" for m, n in rig.starts.items() if n > 1)}
    print()
    print(report(args, seed, echo, moves, blackouts, rig_info))
    print(f"\ntotal {total:.0f}s on {platform.node()} ({os.cpu_count()} cores), seed {seed}")
    broken = violations(moves, blackouts, echo)
    for e in errors:
        print(f"error: {e}")
    if args.json:
        data = {
            "seed": seed, "quick": args.quick, "seconds": total, "errors": errors,
            "loadavg": args.loadavg, "delay_ms_each_way": DELAY_MS, "join_on_quic": rig.join_quic,
            "join_predict": rig.predict,
            "settings": {k: getattr(args, k) for k in
                         ("losses", "samples", "outages", "outage_losses", "runs", "moves")},
            "echo": {k: ({**v, "cells": {m: c.to_json() for m, c in v["cells"].items()}}
                         if k != "garbled" else v) for k, v in echo.items()},
            "move": moves, "blackout": blackouts, "violations": broken,
            "mate_starts": rig.starts,
        }
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 1 if errors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
