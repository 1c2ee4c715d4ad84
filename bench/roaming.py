#!/usr/bin/env python3
"""Roaming benchmark: tether on a faulty (namespaced) network, measured from a mate's screen.

    python3 bench/roaming.py [--quick] [--json FILE] [--seed N] [--logs DIR] [--only PART...]
                             [--cells RTT/LOSS...] [--samples N]

Needs root and /dev/net/tun (tether netsim).  One ``tether.netsim`` network
(``host`` with links wifi and lte, ``relay``, ``mate``) carries two sessions
side by side, so both transports see the same network at the same moment:

* ``quic``: a relay started normally (port 2222); its host replicates over QUIC.
* ``ssh``:  a second relay process started with ``--no-quic`` (port 2223); its
  host replicates over the SSH channel.

Both hosts live in the ``host`` namespace (so a roam, a blackout or an
impairment hits both), both relays in ``relay``, both mates (OpenSSH inside a
local tmux, as in tests/e2e) in ``mate``.  The benchmark watches each mate's
local tmux through a control-mode client (``tmux -C attach``): it types with
``send-keys -l`` on that client, timestamps every ``%output`` of the mate's
pane as it arrives, and confirms with ``capture-pane`` that the screen shows
what is expected; a sample's time is the arrival of the output that made it
true.

Parts (figures are measured, never asserted):

1. ``roam``: the host's address changes (``net.move("host", "wifi"<->"lte")``);
   right after, a fresh marker line is written to each host pane's terminal;
   time until the marker is on the mate's screen.  Baseline: the same without
   the move, interleaved A B A B.
2. ``echo``: the host pane runs ``cat``; the mate types one printable character
   at a time (>= 50 ms apart); time until it is on the mate's screen.  Delay
   RTT/2 and the loss rate are set on the host's link, each direction (so a
   round trip crosses two lossy hops); the mate's link is clean.  Transports
   alternate sample by sample.
3. ``blackout``: the host's link drops everything for 60 s (10 s with
   ``--quick``) while the host pane keeps printing a line every 100 ms; time
   from the end of the blackout until the mate's screen shows the host's
   newest line.
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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python3 bench/roaming.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.helpers import Host, Mate, RelayProcess
from tether.netsim import nsutil
from tether.netsim.network import Network
from tether.netsim.pytest_plugin import DEFAULT_TOPOLOGY

TRANSPORTS = ("quic", "ssh")
RELAY_PORTS = {"quic": 2222, "ssh": 2223}
SIZE = (100, 30)
PARTS = ("roam", "echo", "blackout")
ECHO_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
ECHO_LINE = 30
"""characters per typed line; then Enter (untimed)"""
ECHO_PACE = 0.050
TICK_EVERY = 0.100
STATUS_OK = re.compile(r"^\[tether (quic|ssh) \d+ms\]$")

_ESC = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]"
    rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    rb"|\x1b[P_^X][^\x1b]*\x1b\\"
    rb"|\x1b[()*+][ -~]"
    rb"|\x1b[ -/]*[0-~]"
    rb"|[\x00-\x08\x0b-\x1f\x7f]"
)
_OCTAL = re.compile(rb"\\([0-7]{3})")


_REP = re.compile(rb"([!-~])\x1b\[(\d*)b")


def visible(data: bytes) -> bytes:
    """Printable text of a terminal byte stream (REP, ``CSI n b``, expanded)."""
    data = _REP.sub(lambda m: m.group(1) * (1 + int(m.group(2) or 1)), data)
    return _ESC.sub(b"", data)


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def wait_until(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


# --- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Series:
    """Samples of one figure, in milliseconds; ``failed`` counts samples that timed out."""

    name: str
    values: list[float] = field(default_factory=list)
    failed: int = 0
    late: int = 0
    """samples confirmed by a periodic capture rather than an output chunk"""
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, hit: Hit | None, t0: float) -> float | None:
        if hit is None:
            self.failed += 1
            return None
        self.late += hit.late
        ms = (hit.t - t0) * 1000
        self.values.append(ms)
        return ms

    def stats(self) -> dict[str, Any]:
        v = self.values
        return {
            "median": percentile(v, 50), "p90": percentile(v, 90),
            "min": min(v) if v else math.nan, "max": max(v) if v else math.nan,
            "runs": len(v), "failed": self.failed, "late": self.late,
        }

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": "ms", "stats": self.stats(), "values": self.values,
                **({"extra": self.extra} if self.extra else {})}


def _clock(wall: float) -> str:
    """Wall-clock time as the agent and relay logs print it."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f",{int(wall % 1 * 1000):03d}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "TIMEOUT"
    text = fmt(v)
    return text if text.endswith("s") else text + "ms"


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


# --- watching a mate's local tmux -------------------------------------------------------


@dataclass
class Hit:
    t: float
    screen: str
    late: bool = False


class Tap:
    """A control-mode client of a mate's local tmux: types, and timestamps pane output."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        env = dict(os.environ)
        env.pop("TMUX", None)
        self.proc = subprocess.Popen(
            ["tmux", "-S", sock, "-C", "attach"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0,
        )
        self.cond = threading.Condition()
        self.chunks: list[tuple[float, bytes]] = []
        self.replies: list[tuple[bool, list[bytes]]] = []
        self.dead = False
        self._cmd_lock = threading.Lock()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        # the attach itself is answered with a %begin/%end block: sync past it
        deadline = time.monotonic() + 10
        while True:
            ok, lines = self.command("display -p tap-ready", raw=True)
            if ok and b"tap-ready" in lines:
                break
            if time.monotonic() > deadline:
                raise BenchError("the control client of the mate's tmux did not answer")

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        block: list[bytes] | None = None
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            now = time.perf_counter()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if block is not None:
                    if line.startswith((b"%end ", b"%error ")):
                        with self.cond:
                            self.replies.append((line.startswith(b"%end"), block))
                            self.cond.notify_all()
                        block = None
                    else:
                        block.append(line)
                elif line.startswith(b"%begin "):
                    block = []
                elif line.startswith(b"%output "):
                    parts = line.split(b" ", 2)
                    payload = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]),
                                         parts[2] if len(parts) > 2 else b"")
                    with self.cond:
                        self.chunks.append((now, payload))
                        self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def command(self, line: str, raw: bool = False, timeout: float = 10) -> tuple[bool, list[Any]]:
        """Run one tmux command on the control client; (ok, output lines)."""
        assert self.proc.stdin is not None
        with self._cmd_lock:
            with self.cond:
                self.replies.clear()
            self.proc.stdin.write(line.encode() + b"\n")
            deadline = time.monotonic() + timeout
            with self.cond:
                while not self.replies:
                    left = deadline - time.monotonic()
                    if self.dead or left <= 0:
                        raise BenchError(f"no answer from the mate's tmux to {line!r}")
                    self.cond.wait(left)
                ok, lines = self.replies.pop(0)
        if raw:
            return ok, lines
        return ok, [ln.decode(errors="replace") for ln in lines]

    def mark(self) -> int:
        with self.cond:
            return len(self.chunks)

    def send_literal(self, text: str) -> float:
        """``send-keys -l`` into the mate's pane; returns the time just before sending."""
        assert "'" not in text
        t0 = time.perf_counter()
        ok, out = self.command(f"send-keys -l -- '{text}'")
        if not ok:
            raise BenchError(f"send-keys failed: {out}")
        return t0

    def send_key(self, key: str) -> None:
        self.command(f"send-keys {key}")

    def screen(self) -> str:
        ok, lines = self.command("capture-pane -p")
        if not ok:
            raise BenchError(f"capture-pane failed: {lines}")
        return "\n".join(lines)

    def wait(self, since: int, pred: Callable[[str], Any], timeout: float,
             needle: Callable[[str], bytes | None] | bytes | None = None,
             poll: float = 0.05, prepare: Callable[[], None] | None = None) -> Hit | None:
        """Until ``pred(screen)`` holds; checked at each output chunk of the mate's pane.

        The hit's time is the arrival of the first chunk (of those that arrived
        since the last check) whose visible text holds ``needle``; without such a
        chunk, the time the confirming capture started (``late``).
        """
        deadline = time.perf_counter() + timeout
        idx = since
        while True:
            with self.cond:
                if len(self.chunks) <= idx and not self.dead:
                    self.cond.wait(max(0.0, min(poll, deadline - time.perf_counter())))
                # each new chunk with the tail of the one before: a needle may straddle two
                new = [(t, (self.chunks[i - 1][1][-64:] if i else b"") + data)
                       for i, (t, data) in enumerate(self.chunks[idx:], idx)]
                idx = len(self.chunks)
                if self.dead:
                    raise BenchError("the control client of the mate's tmux died")
            if prepare is not None:
                prepare()
            checked = time.perf_counter()
            screen = self.screen()
            res = pred(screen)
            if res:
                want = needle(screen) if callable(needle) else needle
                if want is not None:
                    for t, data in new:
                        if want in visible(data):
                            return Hit(t, screen)
                return Hit(checked, screen, late=True)
            if checked >= deadline:
                return None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the rig ------------------------------------------------------------------------------


def ns(net: Network, host: str) -> list[str]:
    return ["ip", "netns", "exec", net.netns(host)]


@dataclass
class Side:
    """One transport: its relay, host, mate and the mate's tap."""

    name: str
    relay: RelayProcess
    host: Host
    mate: Mate
    tap: Tap
    tty_fd: int = -1

    def status(self) -> str:
        return self.host.tmux("show", "-gv", "@tether_status", check=False).strip()

    def write(self, text: str) -> None:
        """Print on the host pane's terminal (as a program in the pane would)."""
        os.write(self.tty_fd, text.encode())

    def attaches(self) -> int:
        """How often the host attached to its relay (SSH bootstrap + QUIC/SSH re-attaches)."""
        try:
            return self.relay.log.read_text(errors="replace").count("attached to session")
        except OSError:
            return 0


class Rig:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.net = Network(DEFAULT_TOPOLOGY, seed=seed)
        self.relays: list[RelayProcess] = []
        self.hosts: list[Host] = []
        self.mates: list[Mate] = []
        self.taps: list[Tap] = []
        self.sides: dict[str, Side] = {}

    def start(self) -> None:
        net = self.net
        net.start()
        print(f"netsim: run {net.run_id} seed={net.seed}", flush=True)
        relays: dict[str, RelayProcess] = {}
        hosts: dict[str, Host] = {}

        def relay(name: str) -> None:
            workdir = self.root / f"relay-{name}"
            if relays:  # same host keys as the first relay: RSA generation takes seconds
                workdir.mkdir(parents=True)
                shutil.copytree(relays["quic"].workdir / "keys", workdir / "keys")
            extra = ["--no-quic"] if name == "ssh" else []
            r = RelayProcess(workdir, RELAY_PORTS[name], *extra, prefix=ns(net, "relay"),
                             bind="0.0.0.0", public=net.addr("relay"))
            self.relays.append(r)
            relays[name] = r
            log(f"relay {name}: port {r.port} {' '.join(extra)}".rstrip())

        def host(name: str) -> None:
            if name not in relays:
                relay(name)
            h = Host(self.root / f"host-{name}", relays[name].conf(), SIZE,
                     prefix=ns(net, "host"))
            self.hosts.append(h)
            hosts[name] = h
            h.type("exec cat")

        relay("quic")
        with ThreadPoolExecutor(len(TRANSPORTS)) as pool:  # start both sessions at once
            for f in [pool.submit(host, name) for name in TRANSPORTS]:
                f.result()
        for name in TRANSPORTS:
            host = hosts[name]
            wait_until(lambda h=host: h.display("#{pane_current_command}") == "cat", 15,
                       "cat in the host pane")
            mate = Mate(self.root, host.ssh_rw, SIZE, name=f"mate-{name}",
                        prefix=ns(net, "mate"))
            self.mates.append(mate)
            tap = Tap(mate.sock)
            self.taps.append(tap)
            side = Side(name, relays[name], host, mate, tap)
            tty = host.display("#{pane_tty}")
            side.tty_fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
            self.sides[name] = side
        for side in self.sides.values():
            wait_until(lambda s=side: "0:" in s.tap.screen().rstrip("\n").split("\n")[-1], 30,
                       f"the {side.name} mate to attach")
        self.settle(60)
        for side in self.sides.values():
            size = side.mate.tmux("display", "-p", "#{window_width}x#{window_height}").strip()
            log(f"{side.name}: {side.status()}; mate window {size}")

    def settle(self, timeout: float = 60) -> None:
        """Until every host says it is connected over its own transport."""
        for side in self.sides.values():
            wait_until(lambda s=side: (m := STATUS_OK.match(s.status())) and m.group(1) == s.name,
                       timeout, f"the {side.name} host to be connected over {side.name}",
                       interval=0.1)

    def close(self) -> None:
        for side in self.sides.values():
            with contextlib.suppress(OSError):
                os.close(side.tty_fd)
        for tap in self.taps:
            with contextlib.suppress(Exception):
                tap.close()
        for mate in self.mates:
            with contextlib.suppress(Exception):
                mate.close()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.close()
        for relay in self.relays:
            with contextlib.suppress(Exception):
                relay.close()
        with contextlib.suppress(Exception):
            self.net.close()
        # anything still naming our directory was started by us (agents, tmux, ssh)
        leftovers = [p for p in _pids_naming(str(self.root)) if p != os.getpid()]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def collect_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for name, side in self.sides.items():
            with contextlib.suppress(OSError):
                shutil.copy(side.relay.log, dest / f"relay-{name}.log")
            for p in (side.host.home / "state" / "tether").glob("agent-*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(p, dest / f"{name}-{p.name}")
        (dest / "netsim-events.log").write_text("\n".join(str(e) for e in self.net.events) + "\n")


def _pids_naming(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


def both(fn: Callable[[Side], Any], sides: Sequence[Side]) -> list[Any]:
    """Run ``fn`` for every side at once (waits on several mates in parallel)."""
    with ThreadPoolExecutor(len(sides)) as pool:
        return list(pool.map(fn, sides))


def agent_events(side: Side) -> dict[str, int]:
    text = side.host.agent_log()
    return {
        "connects": text.count("connected to the relay over"),
        "quic_unavailable": text.count("QUIC unavailable"),
    }


# --- 1. roam --------------------------------------------------------------------------------


def bench_roam(rig: Rig, runs: int, out: dict[str, Series]) -> None:
    sides = list(rig.sides.values())
    for s in sides:
        for kind in ("baseline", "roam"):
            out[f"{s.name}/{kind}"] = Series(f"{kind} ({s.name})")
    move_ms = Series("net.move duration")
    out["move"] = move_ms
    timeout = 60.0
    attaches0 = {s.name: s.attaches() for s in sides}
    n = 0
    for i in range(runs):
        for kind in ("baseline", "roam"):  # A B A B
            n += 1
            _roam_sample(rig, n, kind, timeout, out, move_ms, f"{i + 1}/{runs}")
    for s in sides:
        out[f"{s.name}/roam"].extra["attaches_during_part"] = s.attaches() - attaches0[s.name]


def _roam_sample(rig: Rig, n: int, kind: str, timeout: float, out: dict[str, Series],
                 move_ms: Series, label: str) -> None:
    sides = list(rig.sides.values())
    rig.settle(90)
    time.sleep(1.0)  # a quiet gap between samples, not a wait for a condition
    marks = {s.name: s.tap.mark() for s in sides}
    to = ""
    tm_end = 0.0
    if kind == "roam":
        to = "lte" if rig.net.active_link("host") == "wifi" else "wifi"
        tm = time.perf_counter()
        rig.net.move("host", to)
        tm_end = time.perf_counter()
        move_ms.values.append((tm_end - tm) * 1000)
    got = []
    for s in sides:  # one transport at a time, so they do not compete for the CPU
        # roam: a fresh line right after the move; the first side's is written at once,
        # the second's once the first side's has arrived (its time still counts from the move)
        m = f"mark{n:03d}{kind[0]}"
        t0 = time.perf_counter()
        s.write(m + "\n")
        if kind == "roam":
            t0 = tm_end
        hit = s.tap.wait(marks[s.name], lambda scr, m=m: m in scr, timeout, m[-4:].encode())
        got.append(out[f"{s.name}/{kind}"].add(hit, t0))
    desc = ", ".join(f"{s.name} {fmt_ms(v)}"
                     for s, v in zip(sides, got, strict=True))
    log(f"roam {label} {kind}{' -> ' + to if to else ''}: {desc}")


# --- 2. keystroke echo ------------------------------------------------------------------------


class Typist:
    """What has been typed on the current line of one mate (the host pane runs cat)."""

    def __init__(self, side: Side, rng: random.Random) -> None:
        self.side = side
        self.rng = rng
        self.line = ""

    def _row_is(self, text: str) -> Callable[[str], bool]:
        return lambda scr: any(row.rstrip() == text for row in scr.split("\n"))

    def key(self, timeout: float) -> tuple[Hit | None, float]:
        if len(self.line) >= ECHO_LINE:
            self.newline(timeout)
        prev = self.line[-1:] or " "
        c = self.rng.choice([x for x in ECHO_ALPHABET if x != prev])
        self.line += c
        tap = self.side.tap
        mark = tap.mark()
        t0 = tap.send_literal(c)
        return tap.wait(mark, self._row_is(self.line), timeout, c.encode()), t0

    def newline(self, timeout: float) -> None:
        """Enter (untimed), then wait for cat's copy of the line."""
        line = self.line
        self.line = ""
        if not line:
            return
        tap = self.side.tap
        mark = tap.mark()
        tap.send_key("Enter")
        tap.wait(mark, lambda scr: sum(r.rstrip() == line for r in scr.split("\n")) >= 2,
                 timeout)


def bench_echo(rig: Rig, samples: int, warmup: int, cell_budget: float,
               out: dict[str, Series], cells: Sequence[str] | None = None) -> None:
    sides = list(rig.sides.values())
    rng = random.Random(f"{rig.seed}:echo")
    typists = {s.name: Typist(s, rng) for s in sides}
    link = rig.net.link("host")  # the active one (where the roams left the host)
    timeout = 20.0
    cell = 0
    for rtt in (50, 200):
        for loss in (0, 10, 30):
            cell += 1
            cell_seed = rig.seed * 100 + cell
            if cells and f"{rtt}/{loss}" not in cells:
                continue
            rig.settle(90)
            link.set(delay=f"{rtt / 2:g}ms", loss=f"{loss}%", seed=cell_seed)
            events0 = {s.name: agent_events(s) for s in sides}
            log(f"echo: RTT {rtt} ms, loss {loss}% each way on {link.key} (seed {cell_seed})")
            series = {s.name: Series(f"echo {s.name} rtt={rtt} loss={loss}") for s in sides}
            for s in sides:
                out[f"{s.name}/{rtt}/{loss}"] = series[s.name]
                series[s.name].extra.update(rtt_ms=rtt, loss_pct=loss, link_seed=cell_seed)
            try:
                start = time.monotonic()
                # warm-up: untimed keystrokes per transport under the new conditions
                for _ in range(warmup):
                    for s in sides:
                        typists[s.name].key(timeout)
                        time.sleep(ECHO_PACE)
                for _ in range(samples):
                    if time.monotonic() - start > cell_budget:
                        log(f"echo: cell budget {cell_budget:.0f}s used up")
                        break
                    for s in sides:
                        hit, t0 = typists[s.name].key(timeout)
                        series[s.name].add(hit, t0)
                        time.sleep(ECHO_PACE)  # a typist's pace: >= 50 ms between keys
                for s in sides:
                    typists[s.name].newline(timeout)
                    ev = agent_events(s)
                    series[s.name].extra["agent_events"] = {
                        k: ev[k] - events0[s.name][k] for k in ev}
                    st = series[s.name].stats()
                    log(f"  {s.name}: median {fmt(st['median'])} p90 {fmt(st['p90'])} "
                        f"n={st['runs']} failed={st['failed']} "
                        f"agent log: {series[s.name].extra['agent_events']}")
            finally:
                link.clear()


# --- 3. blackout -------------------------------------------------------------------------------


class Ticker:
    """Writes ``tickR-N`` lines to every host pane every 100 ms; remembers the newest N."""

    def __init__(self, sides: Sequence[Side], run: int) -> None:
        self.sides = sides
        self.prefix = f"tick{run}-"
        self.n = 0
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nxt = time.perf_counter()
        while not self._stop.is_set():
            n = self.n + 1
            for s in self.sides:
                with contextlib.suppress(OSError):
                    s.write(f"{self.prefix}{n}\n")
            self.times.append(time.perf_counter())
            self.n = n
            nxt += TICK_EVERY
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def newest_on(self, screen: str) -> int:
        found = re.findall(re.escape(self.prefix) + r"(\d+)\b", screen)
        return max((int(x) for x in found), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def bench_blackout(rig: Rig, runs: int, seconds: float, out: dict[str, Series]) -> None:
    sides = list(rig.sides.values())
    for s in sides:
        out[f"{s.name}/blackout"] = Series(f"blackout {seconds:g}s -> newest line ({s.name})")
        out[f"{s.name}/blackout_end_line"] = Series(
            f"blackout {seconds:g}s -> line printed at its end ({s.name})")
        out[f"{s.name}/blackout_status"] = Series(
            f"blackout {seconds:g}s -> host status connected ({s.name})")
        out[f"{s.name}/blackout"].extra["runs"] = []
    for run in range(runs):
        _blackout_run(rig, run, runs, seconds, out)


def _blackout_run(rig: Rig, run: int, runs: int, seconds: float, out: dict[str, Series]) -> None:
    sides = list(rig.sides.values())
    rig.settle(120)
    ticker = Ticker(sides, run)
    try:
        for s in sides:
            wait_until(lambda s=s: ticker.newest_on(s.tap.screen()) > 0, 30,
                       f"the ticker on the {s.name} mate's screen")
        marks = {s.name: s.tap.mark() for s in sides}
        events0 = {s.name: agent_events(s) for s in sides}
        link = rig.net.link("host")
        tb = time.perf_counter()
        wall = time.time()
        link.blackout(seconds)
        t_end = tb + seconds
        log(f"blackout {run + 1}/{runs}: {link.key} dark for {seconds:g}s, "
            f"{_clock(wall)} to {_clock(wall + seconds)}")

        def away(s: Side) -> float | None:
            hit = s.tap.wait(marks[s.name], lambda scr: "host is away" in scr, seconds)
            return None if hit is None else hit.t - tb

        aways = both(away, sides)
        time.sleep(max(0.0, t_end - time.perf_counter()))  # the blackout runs its course
        n_end = ticker.n
        marks = {s.name: s.tap.mark() for s in sides}

        def newest_needle(scr: str) -> bytes:
            return f"{ticker.prefix}{ticker.newest_on(scr)}".encode()

        def wait_line(job: tuple[Side, str]) -> float | None:
            s, which = job
            if which == "status":
                return out[f"{s.name}/blackout_status"].add(wait_status(s, 180), t_end)
            if which == "end":
                hit = s.tap.wait(marks[s.name], lambda scr: ticker.newest_on(scr) >= n_end, 180,
                                 newest_needle)
                return out[f"{s.name}/blackout_end_line"].add(hit, t_end)
            want = [0]

            def prepare() -> None:  # the host's newest line, read before the capture
                want[0] = ticker.n

            hit = s.tap.wait(marks[s.name], lambda scr: ticker.newest_on(scr) >= want[0], 180,
                             newest_needle, prepare=prepare)
            return out[f"{s.name}/blackout"].add(hit, t_end)

        jobs = [(s, which) for s in sides for which in ("end", "newest", "status")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = dict(zip([(s.name, w) for s, w in jobs], pool.map(wait_line, jobs),
                           strict=True))

        results = [{"end_line": got[(s.name, "end")], "newest": got[(s.name, "newest")],
                    "status": got[(s.name, "status")], "status_text": s.status()}
                   for s in sides]
    finally:
        ticker.stop()
    for s, res, aw in zip(sides, results, aways, strict=True):
        ev = agent_events(s)
        res["away_shown_after_s"] = aw
        res["wall_start"] = _clock(wall)
        res["wall_end"] = _clock(wall + seconds)
        res["agent_events"] = {k: ev[k] - events0[s.name][k] for k in ev}
        out[f"{s.name}/blackout"].extra["runs"].append(res)
        log(f"  {s.name}: newest line {fmt_ms(res['newest'])}, line at end "
            f"{fmt_ms(res['end_line'])}, status {fmt_ms(res['status'])} "
            f"({res['status_text']}), 'host is away' after "
            f"{'-' if aw is None else f'{aw:.1f}s'}, agent {res['agent_events']}")


def wait_status(s: Side, timeout: float) -> Hit | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        st = s.status()
        if STATUS_OK.match(st):
            return Hit(time.perf_counter(), st)
        time.sleep(0.05)
    return None


# --- report ------------------------------------------------------------------------------


def report(series: dict[str, Series], args: argparse.Namespace, seed: int) -> str:
    lines: list[str] = []
    mode = "quick" if args.quick else "full"
    lines.append(f"tether roaming benchmark ({mode}), netsim seed {seed}; times in ms "
                 "(s where marked)")
    lines.append("  quic: relay on port 2222 (host replicates over QUIC); ssh: a second relay "
                 "process with --no-quic (port 2223);")
    lines.append("  both sessions share the netsim network: hosts in 'host', relays in 'relay', "
                 "mates (ssh in a local tmux) in 'mate'")
    la = " -> ".join(" ".join(f"{x:.1f}" for x in v) for v in args.loadavg)
    lines.append(f"  load average (1/5/15 min) at start -> end: {la}")

    def row(label: str, s: Series | None) -> str:
        if s is None:
            return f"  {label:<44} (not run)"
        st = s.stats()
        fail = f"  failed {st['failed']}" if st["failed"] else ""
        late = f"  late {st['late']}" if st["late"] else ""
        return (f"  {label:<44} median {fmt(st['median']):>7}  p90 {fmt(st['p90']):>7}  "
                f"max {fmt(st['max']):>7}  runs {st['runs']}{fail}{late}")

    if "quic/roam" in series:
        lines.append("")
        lines.append("1. roam: host address change (net.move wifi<->lte) -> marker on the "
                     "mate's screen (A/B interleaved)")
        for t in TRANSPORTS:
            lines.append(row(f"{t}: baseline (no move)", series.get(f"{t}/baseline")))
            lines.append(row(f"{t}: roam", series.get(f"{t}/roam")))
            att = series[f"{t}/roam"].extra.get("attaches_during_part")
            if att is not None:
                lines.append(f"  {'':<44} host (re)attached {att}x during the part")
        lines.append(row("net.move itself (before the marker)", series.get("move")))
    if any(k.endswith("/50/0") for k in series):
        lines.append("")
        lines.append("2. keystroke echo (mate types, cat echoes); delay RTT/2 and loss set on "
                     "the host's link, each direction; mate link clean")
        lines.append(f"  {'RTT':>5} {'loss':>5} | {'quic median':>11} {'p90':>7} {'n':>3} "
                     f"{'fail':>4} | {'ssh median':>11} {'p90':>7} {'n':>3} {'fail':>4}")
        for rtt in (50, 200):
            for loss in (0, 10, 30):
                cells = []
                for t in TRANSPORTS:
                    s = series.get(f"{t}/{rtt}/{loss}")
                    if s is None:
                        cells.append(f"{'-':>11} {'-':>7} {'-':>3} {'-':>4}")
                        continue
                    st = s.stats()
                    cells.append(f"{fmt(st['median']):>11} {fmt(st['p90']):>7} "
                                 f"{st['runs']:>3} {st['failed']:>4}")
                lines.append(f"  {rtt:>5} {loss:>4}% | {cells[0]} | {cells[1]}")
    if "quic/blackout" in series:
        lines.append("")
        secs = "10" if args.quick else "60"
        lines.append(f"3. blackout of the host's link for {secs}s, host printing every 100 ms; "
                     "from the end of the blackout")
        for t in TRANSPORTS:
            lines.append(row(f"{t}: mate shows the host's newest line",
                             series.get(f"{t}/blackout")))
            lines.append(row(f"{t}: mate shows the line printed at the end",
                             series.get(f"{t}/blackout_end_line")))
            lines.append(row(f"{t}: host status back to connected",
                             series.get(f"{t}/blackout_status")))
    lines.append("")
    lines.append("notes: a sample is timed from just before the marker write / send-keys to the "
                 "arrival (tmux -C %output) of the")
    lines.append("  mate-pane output that made capture-pane show it; 'late' = confirmed but not "
                 "matched in one chunk, timed at the")
    lines.append("  confirming capture instead. Roam samples run one transport after the other "
                 "(quic first); both count from the")
    lines.append("  end of net.move. Echo cells alternate transports key by key; a cell stops "
                 "early when its time budget is spent.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples, 10 s blackout")
    ap.add_argument("--json", metavar="FILE", help="write the figures and samples as JSON")
    ap.add_argument("--seed", type=int, help="netsim seed (default: random, printed)")
    ap.add_argument("--logs", metavar="DIR", help="copy relay/agent logs and netsim events here")
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    ap.add_argument("--cells", nargs="+", metavar="RTT/LOSS",
                    help="echo: only these cells, e.g. 200/30 (of 50|200 / 0|10|30)")
    ap.add_argument("--samples", type=int, metavar="N",
                    help="echo: keystrokes per cell and transport (default 40, quick 10)")
    args = ap.parse_args(argv)
    reason = nsutil.unavailable_reason()
    if reason:
        print(f"roaming benchmark cannot run: {reason}", file=sys.stderr)
        return 2
    parts = args.only or list(PARTS)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"roaming benchmark: seed={seed} ({'quick' if args.quick else 'full'})", flush=True)
    args.loadavg = [os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="tb-roam-"))
    rig = Rig(root, seed)
    series: dict[str, Series] = {}
    errors: list[str] = []
    started = time.monotonic()

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        rig.start()
        log(f"rig ready in {time.monotonic() - started:.1f}s")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("roam", lambda: bench_roam(rig, 3 if args.quick else 10, series)),
            ("echo", lambda: bench_echo(rig, args.samples or (10 if args.quick else 40),
                                        1 if args.quick else 3,
                                        7.0 if args.quick else 100.0 * (args.samples or 40) / 40,
                                        series, args.cells)),
            ("blackout", lambda: bench_blackout(rig, 1 if args.quick else 3,
                                                10.0 if args.quick else 60.0, series)),
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
    print()
    print(report(series, args, seed))
    print(f"\ntotal {total:.0f}s on {platform.node()} ({os.cpu_count()} cores)")
    for e in errors:
        print(f"error: {e}")
    if args.json:
        data = {
            "seed": seed, "quick": args.quick, "seconds": total, "errors": errors,
            "loadavg": args.loadavg,
            "figures": {k: s.to_json() for k, s in series.items()},
        }
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
