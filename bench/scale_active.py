"""Scale with active mates: idle sessions on QUIC, and mates typing beside them.

Issue 18's target: one relay on this machine holds 2,000 idle sessions with real
QUIC keep-alives plus 200 sessions whose ssh mates each type 5 keys a second,
the active mates' echo p99 under 10 ms; the benchmark prints what binds first.

One ``tether relay`` on loopback (jailed replicas when root, as the other
benchmarks). The sessions come from fake hosts (``bench/scale_fleet.py``: one
asyncio process of host endpoints, real agents cost ~30 MB each): each bootstraps
over SSH, then moves to QUIC with its ``Welcome``'s endpoints and fingerprint
through tether's own ``Connector``, as an agent does, so its keep-alives are real
QUIC datagrams on the schedule ``HostEndpoint`` keeps (every 10 s once idle on a
proven link, every 0.5 s while busy). A host whose QUIC attempt fails stays on
SSH and the notes count it.

* ``--active M`` sessions (default 200; ``--quick`` 4) whose pane echoes what
  mates type, as ``cat`` under a tty echoes printable keys: the fake host logs
  each mate ``Input`` back as ``Output`` of that pane. Each gets one real OpenSSH
  mate (``ssh`` with the session's read-write token) on a pty this process reads.
* ``--idle N`` sessions (default 2,000; ``--quick`` 10) that only keep alive.

The actives start first, so their PSS per session (with the mate) is measured
before the idle ones start. One driver (``selectors`` over every mate's pty)
types into every mate 5 printable keys a second, each mate's start offset drawn
at random (``--seed``), open loop: a slow echo does not slow the typing. Each
key is timed from its write until it shows among its mate's visible output;
after 50 keys an Enter (untimed) starts a new line, so no key repeats on a
line. Keys due within the steady window (``--seconds``, default 30; quick 8),
after a warm-up, are counted; one not echoed within 5 s is lost.

Over the window: echo median/p90/p99 over every counted key, split into its
input path (until the fake host got the key; it logs when, on the same
CLOCK_MONOTONIC) and output path, and the p99 of each mate; CPU per second of
each relay-side part (``Relay.parts()``), of the busiest relay-side process (the
relay is one asyncio thread), of the whole machine (/proc/stat, so other work on
a shared machine shows), and of the load generators (the fake-host processes,
the mates' ssh, this driver); relay-side PSS in total and per session (active
ones with their mate, idle ones); the keep-alives the idle hosts sent and got
back. A reading of a few seconds before typing gives the relay-side CPU of an
idle session on QUIC and, by difference, the relay's CPU per typed key, from
which the typing mates that would fill the relay's thread (and the machine's
cores) beside these idle sessions are extrapolated. Then the bounds, each as a
share of what it may use (the relay's thread of one core, the machine's cores,
memory, each generator's busiest process): the largest binds first. A
saturated generator invalidates the figure, and the note says so. Active fake
hosts run ``ACTIVE_PER_PROCESS`` to a process: a key costs one ~2 ms (aioquic).

Guards: before anything starts, a first guess (``GUESS_SESSION`` per session
and ``GUESS_MATE`` per mate) that the actives fit in 80% of MemAvailable;
before the idle sessions start, the measured PSS per session caps how many may
start within 80% of MemAvailable (the note says so); while they start, the
fleet stops starting sessions once the machine's MemAvailable falls below 20%
of what it was, or after 10 minutes. What came up is measured.

The idle fake hosts run at nice 10 (they would be elsewhere: the relay goes
first); the active ones at nice 0, since their echo is in the measured path.

Run alone: ``python3 -m bench.scale_active [--quick] [--idle N] [--active M]
[--seconds S] [--seed X] [--relay-arg=ARG ...]``; also ``bench/run.py --only
scale-active`` (defaults). ``--relay-arg=--replica --relay-arg=worker`` measures
the relay with a worker process per session instead of its direct replicas.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import os
import random
import select
import selectors
import string
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    SSH_OPTS,
    BenchError,
    Ctx,
    Drainer,
    Figure,
    Log,
    Mem,
    PtyProc,
    Relay,
    Workdir,
    mem_of,
    percentile,
    visible,
)
from bench.memory import settle
from bench.scale import _raise_nofile, meminfo
from bench.scale_fleet import PING_EVERY, START_LIMIT, Fleet, snapshot_payload
from tether.core.session import IDLE_AFTER, PING_START, PROVEN_PONGS
from tether.core.session import PING_EVERY as PING_BUSY
from tether.testing.procs import cpu_seconds

BENCH = "scale-active"
MIB = 1 << 20
GIB = 1 << 30
KEYS_PER_S = 5.0
TARGET_P99_MS = 10.0
KEY_DEADLINE = 5.0
"""seconds a key may take to show before it counts as lost"""
LETTERS = string.ascii_letters.encode()
LINE = 50
"""keys per line, then an Enter: no letter repeats on a line"""
SIZE = (80, 24)
MATE_SIZE = (80, 25)
READY_TEXT = b"ready$"
"""what an active pane shows: a mate that shows it is attached"""
MEM_SHARE = 0.8
GUESS_SESSION = 7.5 * MIB
"""relay-side PSS per session before any was measured (README: 7.1 MiB at 1,000)"""
GUESS_MATE = 3 * MIB
"""a mate: its ssh, the relay's side of it, its replica tmux client"""
SETTLE_AFTER_MARK = 0.3
"""seconds after a CPU reading before counted keys start: keys delayed by the
reading (it reads /proc for every relay-side process) are not counted"""
ACTIVE_PER_PROCESS = 50
"""active sessions per fake-host process: each key costs one ~2 ms of CPU (aioquic),
so one process for 200 typing mates would saturate its thread and time itself"""
SATURATED = 0.9
"""share of a bound past which it is called saturated"""


@dataclass
class Params:
    idle: int
    active: int
    seconds: float
    seed: int = 0
    relay_args: tuple[str, ...] = ()
    """more arguments for ``tether relay`` (e.g. ``--replica worker``)"""

    @staticmethod
    def defaults(quick: bool) -> Params:
        return Params(10, 4, 8.0) if quick else Params(2000, 200, 30.0)


PARAMS: Params | None = None
"""Set by ``main`` from the command line; otherwise ``Params.defaults``."""


# --- one mate and the driver that types into every mate ----------------------------------


def split_escape(buf: bytes) -> tuple[bytes, bytes]:
    """(what can be read now, an escape sequence cut off at the end of ``buf``): a
    CSI split between two reads would otherwise leave its final letter visible."""
    i = buf.rfind(b"\x1b")
    if i < 0 or len(buf) - i > 512:
        return buf, b""
    tail = buf[i:]
    if len(tail) == 1:
        return buf[:i], tail
    kind = tail[1:2]
    if kind == b"[":
        done = any(0x40 <= b <= 0x7E for b in tail[2:])
    elif kind in (b"]", b"P", b"_", b"^", b"X"):
        done = b"\x07" in tail
    elif kind in (b"(", b")", b"*", b"+"):
        done = len(tail) >= 3
    else:
        done = True
    return (buf, b"") if done else (buf[:i], tail)


@dataclass
class Typist:
    """One mate's terminal: what it typed and waits to see, what it saw when."""

    index: int
    pty: PtyProc
    col: int = 0
    carry: bytes = b""
    pending: deque[tuple[bytes, float, float, bool]] = field(default_factory=deque)
    """(key, written at, due at, counted), oldest first"""
    samples: list[tuple[float, float, float, bytes]] = field(default_factory=list)
    """(due at, written at, seen at, key) of each counted key seen; times are
    time.monotonic(), the fake hosts' clock too"""
    typed: int = 0
    lost: int = 0
    dead: str = ""

    def type_key(self, due: float, counted: bool) -> bool:
        """Type the next key (an Enter after ``LINE``); True if a counted key went."""
        if self.col >= LINE:
            self.col = 0
            self.pty.write(b"\r")
            return False
        ch = LETTERS[self.col : self.col + 1]
        self.col += 1
        t0 = time.monotonic()
        self.pty.write(ch)
        self.pending.append((ch, t0, due, counted))
        self.typed += counted
        return counted

    def feed(self, data: bytes, now: float) -> int:
        """Match what arrived against the keys waited for, in order; counted keys seen."""
        buf, self.carry = split_escape(self.carry + data)
        text = visible(buf)
        pos = seen = 0
        while self.pending:
            ch, t0, due, counted = self.pending[0]
            i = text.find(ch, pos)
            if i < 0:
                break
            self.pending.popleft()
            pos = i + 1
            if counted:
                self.samples.append((due, t0, now, ch))
                seen += 1
        return seen

    def expire(self, now: float) -> int:
        """Give up on keys older than ``KEY_DEADLINE``; counted keys given up."""
        n = 0
        while self.pending and now - self.pending[0][1] > KEY_DEADLINE:
            if self.pending.popleft()[3]:
                n += 1
        self.lost += n
        return n

    def end(self, why: str) -> int:
        """Its ssh ended: every key it waits for is lost."""
        self.dead = why
        n = sum(1 for p in self.pending if p[3])
        self.pending.clear()
        self.lost += n
        return n


Mark = Callable[[], dict[str, Any]]


def type_all(typists: list[Typist], warm: float, seconds: float, rng: random.Random,
             mark: Mark, log: Log) -> dict[str, Any]:
    """Type ``KEYS_PER_S`` keys a second into every mate, open loop, for ``warm``
    seconds, then ``seconds`` counted (``mark()`` is called at both ends of the
    counted window, its reading kept), then until every counted key is seen or lost."""
    period = 1.0 / KEYS_PER_S
    sel = selectors.DefaultSelector()
    for t in typists:
        sel.register(t.pty.fd, selectors.EVENT_READ, t)
    start = time.monotonic() + 0.2
    heap = [(start + rng.uniform(0, period), t.index) for t in typists]
    heapq.heapify(heap)
    by_index = {t.index: t for t in typists}
    warm_end = start + warm + period
    t0_count = t1_count = math.inf
    phase = "warm"
    counted_pending = 0
    marks: dict[str, dict[str, Any]] = {}
    next_expiry = 0.0
    drain_until = math.inf
    try:
        while True:
            now = time.monotonic()
            if phase == "warm" and now >= warm_end:
                marks["start"] = mark()
                t0_count = time.monotonic() + SETTLE_AFTER_MARK
                t1_count = t0_count + seconds
                phase = "count"
                log(f"{BENCH}: counting {seconds:.0f}s of keys from {len(typists)} mates")
            elif phase == "count" and now >= t1_count:
                phase = "tail"
            if phase == "tail" and (counted_pending <= 0
                                    or now > t1_count + KEY_DEADLINE + 1):
                marks["end"] = mark()
                phase = "drain"
                drain_until = time.monotonic() + KEY_DEADLINE
            if phase == "drain" and (now > drain_until
                                     or not any(t.pending for t in typists if not t.dead)):
                break
            if phase != "drain":
                while heap and heap[0][0] <= now:
                    due, i = heapq.heappop(heap)
                    t = by_index[i]
                    if not t.dead:
                        counted_pending += t.type_key(due, t0_count <= due < t1_count)
                        heapq.heappush(heap, (due + period, i))
            if now >= next_expiry:
                next_expiry = now + 0.1
                for t in typists:
                    if t.pending:
                        counted_pending -= t.expire(now)
            wake = heap[0][0] if heap and phase != "drain" else now + 0.05
            timeout = max(0.0, min(wake - time.monotonic(), 0.1))
            for key, _ in sel.select(timeout):
                t = key.data
                seen_at = time.monotonic()
                try:
                    data = t.pty.read()
                except EOFError:
                    sel.unregister(t.pty.fd)
                    counted_pending -= t.end("its ssh ended")
                    log(f"{BENCH}: mate {t.index}'s ssh ended")
                    continue
                if data:
                    counted_pending -= t.feed(data, seen_at)
    finally:
        sel.close()
    return {"marks": marks, "window": (t0_count, t1_count)}


def split_paths(typists: list[Typist], heard: dict[int, list[tuple[float, bytes]]]
                ) -> tuple[list[float], list[float]]:
    """(input ms, output ms) of each counted key: from its write to the fake host's
    receipt of it (``heard``: by session, when each mate input came), and from there
    to its mate's screen. Keys reach a host in the order typed, so each is found
    after the one before it."""
    inputs: list[float] = []
    outputs: list[float] = []
    for t in typists:
        got = [(when, bytes([b])) for when, keys in heard.get(t.index, []) for b in keys]
        at = 0
        for _due, t0, seen, ch in sorted(t.samples, key=lambda s: s[1]):
            for j in range(at, min(len(got), at + 4 * LINE)):
                when, key = got[j]
                if key == ch and t0 <= when <= seen:
                    inputs.append((when - t0) * 1000)
                    outputs.append((seen - when) * 1000)
                    at = j + 1
                    break
    return inputs, outputs


def attach_mates(wd: Workdir, ssh_lines: dict[int, str], log: Log,
                 timeout: float) -> tuple[list[Typist], list[str]]:
    """One OpenSSH mate per active session on a pty of ours, each proven attached:
    its pane's ``READY_TEXT`` shows (ssh is in raw mode by then, so a key cannot be
    the local tty's echo), then a key typed into it comes back through the fake
    host. An ssh that ends meanwhile is started again (three tries). The typists,
    and why the others are not."""
    home = wd.path / "mates"
    home.mkdir(exist_ok=True)
    env = wd.env(home)
    argvs: dict[int, list[str]] = {}
    for i, line in sorted(ssh_lines.items()):
        words = line.split()
        if not words or words[0] != "ssh":
            raise BenchError(f"session {i}: no ssh line in its Welcome: {line!r}")
        argvs[i] = ["ssh", *SSH_OPTS, *words[1:]]

    def spawn(i: int) -> PtyProc:
        p = PtyProc(argvs[i], env, MATE_SIZE)
        wd.on_close(p.close)
        return p

    procs = {i: spawn(i) for i in argvs}
    tails = dict.fromkeys(argvs, b"")
    stage = dict.fromkeys(argvs, "screen")  # -> "probe" -> "ok" | "failed"
    tries = dict.fromkeys(argvs, 1)
    probed = dict.fromkeys(argvs, 0.0)
    why: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    reported = time.monotonic()
    while (waiting := [i for i, s in stage.items() if s in ("screen", "probe")]):
        now = time.monotonic()
        if now > deadline:
            for i in waiting:
                why[i] = f"not attached within {timeout:.0f}s (stage {stage[i]})"
                stage[i] = "failed"
            break
        if now - reported > 5:
            reported = now
            done = sum(s == "ok" for s in stage.values())
            log(f"{BENCH}: {done}/{len(argvs)} mates attached")
        for i in waiting:
            if stage[i] == "probe" and now - probed[i] >= 3:
                probed[i] = now
                procs[i].write(b"!")
        fds = {procs[i].fd: i for i in waiting}
        readable, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in readable:
            i = fds[fd]
            try:
                data = procs[i].read()
            except EOFError:
                last = visible(tails[i])[-200:].decode(errors="replace").strip()
                if tries[i] >= 3:
                    stage[i] = "failed"
                    why[i] = f"its ssh ended three times ({last or 'no output'})"
                    continue
                log(f"{BENCH}: mate {i}'s ssh ended ({last or 'no output'}); again")
                procs[i].close()
                tries[i] += 1
                procs[i], tails[i], stage[i] = spawn(i), b"", "screen"
                continue
            tails[i] = (tails[i] + data)[-4096:]
            if stage[i] == "screen" and READY_TEXT in visible(tails[i]):
                stage[i], tails[i], probed[i] = "probe", b"", 0.0
            elif stage[i] == "probe" and b"!" in visible(tails[i]):
                stage[i] = "ok"
    typists = []
    for i, s in stage.items():
        if s == "ok":
            procs[i].write(b"\r")  # a fresh line
            typists.append(Typist(i, procs[i]))
    return typists, [f"mate {i}: {w}" for i, w in why.items()]


# --- CPU and memory readings ------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, (busy + idle + iowait) / tick


def _total(parts: dict[str, Mem]) -> Mem:
    total = Mem()
    for m in parts.values():
        total = total + m
    return total


def _median(xs: list[float]) -> float:
    return percentile(xs, 50) if xs else math.nan


def _fmt(parts: dict[str, float], unit: str, digits: int = 1) -> str:
    shown = [f"{k} {v:.{digits}f}" for k, v in parts.items() if abs(v) >= 0.5 * 10 ** -digits]
    return (", ".join(shown) + f" {unit}") if shown else "none"


# --- the benchmark ------------------------------------------------------------------------------


class _Bench:
    """One run's processes and readings."""

    def __init__(self, wd: Workdir, p: Params, ctx: Ctx) -> None:
        self.wd = wd
        self.p = p
        self.quick = ctx.quick
        self.log = ctx.log
        self.notes: list[str] = []
        self.fleets: dict[str, list[Fleet]] = {}
        """the fake-host processes of each kind (active ones in shards)"""
        cap = str(p.idle + p.active + 16)
        self.relay = Relay(wd, ["--max-sessions", cap, "--max-sessions-per-key", cap,
                                *p.relay_args])
        self.drainer: Drainer | None = None
        self.groups: dict[str, list[int]] = {}
        """pids by part, relay side and load generators, fixed before typing"""
        self.relay_parts: list[str] = []

    def measure(self) -> dict[str, Mem]:
        return mem_of(self.relay.parts())

    def close_drainer(self) -> None:
        drainer, self.drainer = self.drainer, None
        if drainer is not None:
            drainer.close()

    def start_fleet(self, kind: str, count: int, first: int, payload: bytes,
                    tick: Callable[[], None], per_process: int) -> dict[str, Any]:
        """``count`` sessions of ``kind`` from fake-host processes of at most
        ``per_process`` sessions each, started at once; their READY reports merged."""
        path = self.wd.path / f"{kind}.snapshot"
        path.write_bytes(payload)
        echo = kind == "active"
        shards = [(first + k, min(per_process, count - k))
                  for k in range(0, count, per_process)]
        self.log(f"{BENCH}: starting {count} {kind} sessions (SSH, then QUIC) from "
                 f"{len(shards)} fake-host process(es)")
        fleets = self.fleets[kind] = [
            Fleet(self.wd, self.relay.port, n, at, path, quic=True, echo=echo,
                  nice=0 if echo else 10) for at, n in shards]
        readies = [f.wait_ready(START_LIMIT + 120, self.log, tick) for f in fleets]
        ready: dict[str, Any] = {
            "ok": sum(r["ok"] for r in readies), "failed": sum(r["failed"] for r in readies),
            "elapsed_s": max(r["elapsed_s"] for r in readies),
            "stopped_early": any(r["stopped_early"] for r in readies),
            "latencies_ms": [x for r in readies for x in r["latencies_ms"]],
            "errors": [e for r in readies for e in r["errors"]][:5],
            "on_quic": sum(r["on_quic"] for r in readies),
            "quic_errors": [e for r in readies for e in r["quic_errors"]][:5],
            "mates": {k: v for r in readies for k, v in r.get("mates", {}).items()},
        }
        self.log(f"{BENCH}: {ready['ok']} {kind} sessions up ({ready['on_quic']} on QUIC), "
                 f"{ready['failed']} failed, in {ready['elapsed_s']:.1f}s")
        if ready["quic_errors"]:
            self.log(f"{BENCH}: stayed on SSH: {'; '.join(ready['quic_errors'])}")
        return ready

    def all_fleets(self) -> list[Fleet]:
        return [f for fs in self.fleets.values() for f in fs]

    def cpu_between(self, a: dict[str, Any], b: dict[str, Any]
                    ) -> tuple[Callable[[list[int]], float], dict[str, float], float]:
        """Between two marks: CPU ms/s of some pids (a function), of each group, and of
        the whole machine."""
        secs = max(1e-9, b["t"] - a["t"])

        def rate(pids: list[int]) -> float:
            return sum(b["cpu"].get(x, 0.0) - a["cpu"].get(x, 0.0) for x in pids) * 1000 / secs

        rates = {k: rate(v) for k, v in self.groups.items()}
        return rate, rates, (b["machine"][0] - a["machine"][0]) * 1000 / secs

    def mark(self) -> dict[str, Any]:
        """CPU of every process that matters (by pid), the machine's, the fleets'
        counters, and when."""
        cpu = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}
        fleets = {k: {n: f.counters(self.log) for n, f in enumerate(fs)
                      if f.proc.poll() is None} for k, fs in self.fleets.items()}
        return {"t": time.monotonic(), "cpu": cpu, "machine": machine_cpu(), "fleets": fleets}

    def run(self) -> list[Figure]:
        p, log = self.p, self.log
        avail0 = meminfo().get("MemAvailable", 0)
        guess_active = p.active * (GUESS_SESSION + GUESS_MATE)
        if guess_active > MEM_SHARE * avail0:
            raise BenchError(
                f"{p.active} active sessions need about {guess_active / GIB:.1f} GiB (a "
                f"first guess), more than {MEM_SHARE:.0%} of MemAvailable "
                f"{avail0 / GIB:.1f} GiB: not started")
        guess_all = guess_active + p.idle * GUESS_SESSION
        log(f"{BENCH}: {p.idle} idle + {p.active} active sessions need about "
            f"{guess_all / GIB:.1f} GiB (a first guess); MemAvailable {avail0 / GIB:.1f} GiB")
        base = settle(self.measure, 10)

        # the active sessions and their mates
        active_payload = snapshot_payload(self.wd, SIZE, status=False,
                                          screen=READY_TEXT.decode() + " ", name="tpl-active")
        ready_a = self.start_fleet("active", p.active, 0, active_payload, lambda: None,
                                   ACTIVE_PER_PROCESS)
        if not ready_a["ok"]:
            raise BenchError(f"no active session came up: {'; '.join(ready_a['errors'])}")
        lines = {int(k): v for k, v in ready_a["mates"].items()}
        log(f"{BENCH}: starting {len(lines)} ssh mates")
        typists, missing = attach_mates(self.wd, lines, log, 60 + 0.5 * len(lines))
        if missing:
            self.notes.append(f"{len(missing)} mates did not attach ({missing[0]})")
        if not typists:
            raise BenchError("no mate attached")
        attached_at = time.monotonic()
        drainer = self.drainer = Drainer()
        self.wd.on_close(self.close_drainer)
        for t in typists:
            drainer.add(t.pty)
        with_active = settle(self.measure, 30)
        active_up = ready_a["ok"]
        fleet_a_mem = mem_of({"f": [f.proc.pid for f in self.fleets["active"]]})["f"]
        per_active = ((_total(with_active[-1]).pss - _total(base[-1]).pss) / active_up)
        fleet_per = fleet_a_mem.pss / active_up

        # the idle sessions, within the memory guards
        idle_n = p.idle
        if idle_n:
            avail = meminfo().get("MemAvailable", 0)
            per = per_active + fleet_per
            fits = int(MEM_SHARE * avail / per) if per > 0 else idle_n
            if fits < idle_n:
                why = (f"memory guard: {idle_n} idle sessions need about "
                       f"{idle_n * per / GIB:.1f} GiB ({per / MIB:.1f} MiB each as measured "
                       f"with the active ones), more than {MEM_SHARE:.0%} of MemAvailable "
                       f"{avail / GIB:.1f} GiB: {fits} started")
                log(f"{BENCH}: {why}")
                self.notes.append(why)
                idle_n = max(0, fits)
        ready_i: dict[str, Any] | None = None
        if idle_n:
            floor = (1 - MEM_SHARE) * meminfo().get("MemAvailable", 0)
            halted: list[float] = []

            def guard() -> None:
                left = meminfo().get("MemAvailable", 0)
                if not halted and left < floor:
                    halted.append(left)
                    log(f"{BENCH}: MemAvailable down to {left / GIB:.1f} GiB: no more "
                        "sessions started")
                    for f in self.fleets["idle"]:
                        f.halt()

            ready_i = self.start_fleet("idle", idle_n, active_up, snapshot_payload(
                self.wd, SIZE, name="tpl-idle"), guard, idle_n)
            if halted:
                self.notes.append(f"the memory guard stopped the idle start at "
                                  f"{ready_i['ok']} sessions (MemAvailable "
                                  f"{halted[0] / GIB:.1f} GiB)")
            elif ready_i["stopped_early"]:
                self.notes.append(f"the idle start took longer than {START_LIMIT:.0f}s: "
                                  f"{ready_i['ok']} of {idle_n} up")
        idle_up = ready_i["ok"] if ready_i else 0
        idle_ready_at = time.monotonic()
        readings = settle(self.measure, 30 + idle_up / 20)

        # type
        relay_parts = self.relay.parts()
        self.relay_parts = list(relay_parts)
        self.groups = {**relay_parts,
                       **{f"fake hosts ({k})": [f.proc.pid for f in fs]
                          for k, fs in self.fleets.items()},
                       "mate ssh": [t.pty.pid for t in typists],
                       "typing driver": [os.getpid()]}
        # a reading before typing, once every host pings on its idle schedule: the
        # actives' last keys (the attach probes) and the idle hosts' first pings past
        steady = max(attached_at + IDLE_AFTER, idle_ready_at + PING_START * PROVEN_PONGS) + 1
        if (wait := steady - time.monotonic()) > 0:
            log(f"{BENCH}: {wait:.1f}s until every host pings on its idle schedule")
            time.sleep(wait)
        quiet_s = 2.0 if self.quick else 5.0
        log(f"{BENCH}: CPU before typing, {quiet_s:.0f}s")
        before = self.mark()
        time.sleep(quiet_s)  # the reading's window, not a wait for a condition
        quiet = (before, self.mark())
        self.close_drainer()
        for t in typists:
            t.pty.drain()
        warm = 1.5 if self.quick else 3.0
        log(f"{BENCH}: {len(typists)} mates type {KEYS_PER_S:.0f} keys/s each beside "
            f"{idle_up} idle sessions ({warm:.1f}s warm-up)")
        typed = type_all(typists, warm, self.p.seconds, random.Random(self.p.seed), self.mark,
                         log)
        after = self.measure()
        lost_hosts = sum(f.poll_lost(log) for f in self.all_fleets())
        heard: dict[int, list[tuple[float, bytes]]] = {}
        for k, f in enumerate(self.fleets["active"]):
            heard.update(f.heard(self.wd.path / f"heard-{k}.json", log))
        split = split_paths(typists, heard)
        return self.figures(typists, typed, quiet, split, base, with_active, readings, after,
                            ready_a, ready_i, idle_n, fleet_per, lost_hosts)

    # --- figures ------------------------------------------------------------------------------

    def figures(self, typists: list[Typist], typed: dict[str, Any],
                quiet: tuple[dict[str, Any], dict[str, Any]],
                split: tuple[list[float], list[float]], base: list[dict[str, Mem]],
                with_active: list[dict[str, Mem]],
                readings: list[dict[str, Mem]], after: dict[str, Mem],
                ready_a: dict[str, Any], ready_i: dict[str, Any] | None, idle_asked: int,
                fleet_per: float, lost_hosts: int) -> list[Figure]:
        p = self.p
        a, b = typed["marks"]["start"], typed["marks"]["end"]
        secs = b["t"] - a["t"]
        t0, t1 = typed["window"]
        active_up, idle_up = ready_a["ok"], (ready_i["ok"] if ready_i else 0)
        label = f"{idle_up} idle + {len(typists)} typing"
        samples = sorted((s for t in typists for s in t.samples), key=lambda s: s[0])
        ms = [(s[2] - s[1]) * 1000 for s in samples]
        keys = sum(t.typed for t in typists)
        lost = sum(t.lost for t in typists)
        dead = [t.index for t in typists if t.dead]
        quarters = 4
        rounds: list[list[float]] = [[] for _ in range(quarters)]
        for (due, *_), v in zip(samples, ms, strict=True):
            rounds[min(quarters - 1, int((due - t0) / (t1 - t0) * quarters))].append(v)
        p99 = percentile(ms, 99) if ms else math.nan
        on_quic = ready_a["on_quic"] + (ready_i["on_quic"] if ready_i else 0)
        up = active_up + idle_up
        echo_note = (f"{keys} keys counted over {p.seconds:.0f}s from {len(typists)} mates "
                     f"({KEYS_PER_S:.0f}/s each, seed {p.seed}); {lost} lost (not shown "
                     f"within {KEY_DEADLINE:.0f}s); {on_quic}/{up} sessions on QUIC")
        slow = sorted(s[2] for s, v in zip(samples, ms, strict=True) if v >= TARGET_P99_MS)
        if slow:
            bursts = 1 + sum(1 for x, y in itertools.pairwise(slow) if y - x > 0.1)
            echo_note += (f"; {len(slow)} keys took {TARGET_P99_MS:.0f} ms or more, in "
                          f"{bursts} burst(s) (keys seen within 100 ms of each other)")
        if dead:
            echo_note += f"; {len(dead)} mates' ssh ended"
        if lost_hosts:
            echo_note += f"; fake hosts lost: {lost_hosts}"
        out = [Figure(BENCH, f"{label}: mate keystroke echo", "ms", ms,
                      target=f"p99 < {TARGET_P99_MS:.0f} ms",
                      met=(p99 < TARGET_P99_MS and lost == 0) if ms else None,
                      rounds=[r for r in rounds if r], note=echo_note,
                      extra={"keys": keys, "lost": lost, "seed": p.seed})]
        inputs, outputs = split
        out.append(Figure(BENCH, "  input: mate key -> fake host", "ms", inputs,
                          note="until the session's fake host got the mate's Input "
                          f"({len(inputs)} of {len(ms)} keys matched); its clock is ours"))
        out.append(Figure(BENCH, "  output: fake host -> mate screen", "ms", outputs,
                          note="the fake host's echo (Output), the relay, the replica's "
                          "tmux, the mate's ssh"))
        out.append(Figure(BENCH, "  keys lost (not shown within 5 s)", "keys", [float(lost)],
                          note=f"of {keys} counted"))
        per_mate = [percentile([(s[2] - s[1]) * 1000 for s in t.samples], 99)
                    for t in typists if t.samples]
        out.append(Figure(BENCH, "  p99 of each mate", "ms", per_mate,
                          note="runs = mates; the median/p90/p99 over mates of each "
                          "mate's own p99"))

        # CPU
        rate, rates, busy = self.cpu_between(a, b)
        q_rate, q_rates, q_busy = self.cpu_between(*quiet)
        parts = self.relay_parts
        relay_side = {k: rates[k] for k in parts if k in rates}
        relay_total = sum(relay_side.values())
        q_total = sum(q_rates[k] for k in parts if k in q_rates)
        relay_pids = [x for k in parts for x in self.groups.get(k, [])]
        hottest = max(relay_pids, key=lambda x: rate([x]), default=self.relay.pid)
        hot_part = next(k for k in parts if hottest in self.groups.get(k, []))
        hot, q_hot = rate([hottest]), q_rate([hottest])
        cores = os.cpu_count() or 1
        gens = {k: v for k, v in rates.items() if k not in parts}
        out.append(Figure(BENCH, "  relay-side CPU", "ms/s", [relay_total],
                          note=f"over {secs:.1f}s of typing; by part: {_fmt(relay_side, 'ms/s')}",
                          extra={"cpu_ms_per_s": {k: round(v, 2) for k, v in rates.items()}}))
        owners = len(self.groups.get("session processes", []))
        where = (f"sessions are spread over {owners} session processes (--session-procs), "
                 "one asyncio thread each" if owners else
                 "every session is served on the relay's one asyncio thread "
                 "(SSH too, unless --ssh-procs)")
        thread = "the busiest session process's thread" if owners else "the relay's thread"
        out.append(Figure(BENCH, "  busiest relay-side process", "ms/s", [hot],
                          note=f"pid {hottest} ({hot_part}): {hot / 10:.0f}% of one core; "
                          f"{where}"))
        gen_hot = {k: max((rate([x]) for x in self.groups[k]), default=0.0)
                   for k in gens if k != "mate ssh"}
        other = busy - relay_total - sum(gens.values())
        out.append(Figure(BENCH, "  machine CPU (every process)", "ms/s", [busy],
                          note=f"{busy / cores / 10:.0f}% of {cores} cores: relay side "
                          f"{relay_total:.0f}, load generators {_fmt(gens, 'ms/s', 0)}, "
                          f"anything else on the machine {other:.0f} ms/s",
                          extra={"generators_ms_per_s": gens,
                                 "generators_busiest_process_ms_per_s": gen_hot}))
        q_by_part = {k: q_rates[k] for k in parts if k in q_rates}
        out.append(Figure(BENCH, "  relay-side CPU before typing, per session", "ms/s",
                          [q_total / up],
                          note=f"{up} sessions, every host on its idle keep-alive schedule; "
                          f"in all {q_total:.1f} ms/s: {_fmt(q_by_part, 'ms/s')}; the machine "
                          f"{q_busy:.0f} ms/s meanwhile"))
        keys_per_s = len(typists) * KEYS_PER_S
        per_key_hot = (hot - q_hot) / keys_per_s
        per_key_all = (relay_total - q_total) / keys_per_s
        fit_thread = ((1000 - q_hot) / (per_key_hot * KEYS_PER_S) if per_key_hot > 0
                      else math.inf)
        fit_cores = ((cores * 1000 - q_total) / (per_key_all * KEYS_PER_S) if per_key_all > 0
                     else math.inf)
        fits = (f"beside {idle_up} idle sessions {thread} would be full at about "
                f"{fit_thread:.0f} typing mates, and {cores} cores of relay-side work at about "
                f"{fit_cores:.0f} (hosts and mates elsewhere)")
        out.append(Figure(BENCH, "  relay CPU per typed key", "ms", [per_key_all],
                          note=f"(CPU typing - CPU before) / {keys_per_s:.0f} keys/s: every "
                          f"relay-side process {per_key_all:.2f} ms, the busiest "
                          f"({hot_part}) {per_key_hot:.2f} ms; so {fits}",
                          extra={"busiest_ms_per_key": per_key_hot,
                                 "mates_fit_thread": fit_thread, "mates_fit_cores": fit_cores}))

        # keep-alives and input, from the fleets' counters
        def per_s(kind: str, what: str, start: dict[str, Any] = a) -> float:
            fa_all, fb_all = start["fleets"].get(kind, {}), b["fleets"].get(kind, {})
            pairs = [(fa_all[n], fb_all[n]) for n in fa_all if n in fb_all]
            if not pairs or any(fb["when"] <= fa["when"] for fa, fb in pairs):
                return math.nan
            return sum(float(fb[what] - fa[what]) / (fb["when"] - fa["when"])
                       for fa, fb in pairs)

        if ready_i:
            want = idle_up / PING_EVERY
            # from the reading before typing to the end: the widest window in which every
            # idle host is on its idle schedule (hosts that connected together ping
            # together, so a window shorter than PING_EVERY may hold none of their pings)
            start = quiet[0]
            pings = per_s("idle", "pings", start)
            pongs = per_s("idle", "pongs", start)
            out.append(Figure(
                BENCH, "  idle keep-alives sent", "pings/s", [pings],
                note=f"{idle_up} idle hosts, {ready_i['on_quic']} on QUIC (one ping per "
                f"{PING_EVERY:.0f}s each once idle: {want:.0f}/s); {pongs:.1f} pongs/s back; "
                f"over {b['t'] - start['t']:.1f}s"))
        a_pings = per_s("active", "pings")
        inputs = per_s("active", "inputs")
        out.append(Figure(
            BENCH, "  active hosts: mate inputs echoed", "inputs/s", [inputs],
            note=f"{len(typists)} mates typing {KEYS_PER_S * len(typists):.0f} keys/s; the "
            f"active hosts pinged {a_pings:.0f}/s (busy: one per {PING_BUSY}s each)"))

        # memory
        tot = [float(_total(r).pss) for r in readings]
        base_tot = _median([float(_total(r).pss) for r in base])
        act_tot = _median([float(_total(r).pss) for r in with_active])
        by_part = {k: readings[-1][k].pss / MIB for k in readings[-1]}
        out.append(Figure(BENCH, f"{label}: relay-side PSS total", "B", tot,
                          note=f"before typing, MiB: {_fmt(by_part, 'MiB')}; after typing "
                          f"{_total(after).pss / MIB:.0f} MiB; relay alone "
                          f"{base_tot / MIB:.0f} MiB",
                          extra={"by_part_mib": {k: round(v, 1) for k, v in by_part.items()}}))
        per_act = (act_tot - base_tot) / active_up
        out.append(Figure(BENCH, "  PSS per active session (with its mate)", "B", [per_act],
                          note=f"measured with the {active_up} active sessions alone; fake "
                          f"hosts' own PSS {fleet_per / MIB:.2f} MiB per session"))
        if idle_up:
            per_idle = [(t - act_tot) / idle_up for t in tot]
            out.append(Figure(BENCH, "  PSS per idle session", "B", per_idle,
                              note=f"(total - total with the active ones) / {idle_up}"))
        if ready_i:
            lat = ready_i["latencies_ms"]
            out.append(Figure(
                BENCH, f"  time to start {idle_up} idle sessions", "s",
                [ready_i["elapsed_s"]],
                note=f"8 at a time; each Hello -> on QUIC -> snapshot acked: median "
                f"{_median(lat):.0f} ms; {ready_i['failed']} failed"
                + (f" ({'; '.join(ready_i['errors'][:2])})" if ready_i["errors"] else "")
                + (f"; asked for {p.idle}" if idle_asked != p.idle else "")))

        # what binds first
        mi = meminfo()
        mem_used = 1 - mi.get("MemAvailable", 0) / max(1, mi.get("MemTotal", 1))
        bounds = {
            f"the busiest relay-side process ({hot_part}, one thread)": hot / 1000,
            f"CPU ({cores} cores, every process)": busy / (cores * 1000),
            "memory (of MemTotal in use)": mem_used,
            **{f"load generator: {k} (busiest process, one thread)": v / 1000
               for k, v in gen_hot.items()},
        }
        binding = max(bounds, key=lambda k: bounds[k])
        shown = "; ".join(f"{k} {v:.0%}" for k, v in sorted(bounds.items(),
                                                             key=lambda kv: -kv[1]))
        verdict = f"{binding} binds first at {bounds[binding]:.0%}"
        if binding.startswith("load generator") and bounds[binding] >= SATURATED:
            verdict += ": the load generator is saturated, so this figure is not the relay's"
        elif bounds[binding] < SATURATED:
            verdict += f" (nothing is saturated at {label})"
        if not p99 < TARGET_P99_MS:
            verdict += f"; echo p99 {p99:.1f} ms misses {TARGET_P99_MS:.0f} ms"
        if other > 0.1 * cores * 1000:
            verdict += (f"; other work on this machine took {other:.0f} ms/s of CPU meanwhile, "
                        "which shows in the tail")
        verdict += f". Extrapolated: {fits}"
        out.append(Figure(BENCH, "what binds first", "%", [100 * bounds[binding]],
                          note=f"{verdict}. Shares: {shown}"
                          + ("; " + "; ".join(self.notes) if self.notes else ""),
                          extra={"bounds": bounds, "binds": binding}))
        return out


def run(ctx: Ctx) -> list[Figure]:
    p = PARAMS or Params.defaults(ctx.quick)
    _raise_nofile()
    with Workdir("scale-active") as wd:
        bench = _Bench(wd, p, ctx)
        figures = bench.run()
        ctx.log(f"{BENCH}: cleaning up")
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.scale_active",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="Other options go to bench/run.py (--json, -q).")
    ap.add_argument("--quick", action="store_true", help="idle 10, active 4, 8 s")
    ap.add_argument("--idle", type=int, help="idle sessions (default 2000)")
    ap.add_argument("--active", type=int, help="sessions with a typing mate (default 200)")
    ap.add_argument("--seconds", type=float, help="steady period counted (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the mates' start offsets")
    ap.add_argument("--relay-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for `tether relay`, e.g. --relay-arg=--replica "
                    "--relay-arg=worker (repeat)")
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    d = Params.defaults(a.quick)
    params = Params(d.idle if a.idle is None else a.idle,
                    d.active if a.active is None else a.active,
                    d.seconds if a.seconds is None else a.seconds, a.seed,
                    tuple(a.relay_arg))
    if params.active < 1 or params.idle < 0 or params.seconds <= 0:
        ap.error("--active must be at least 1, --idle at least 0, --seconds positive")
    import bench.run as runner
    import bench.scale_active as me  # run.py imports this module by name, not __main__

    me.PARAMS = params
    return runner.main(["--only", BENCH, *(["--quick"] if a.quick else []), *rest])


if __name__ == "__main__":
    sys.exit(main())
