"""The roaming benchmark's parts: roam, keystroke echo (see bench/roaming.py); the ticker
the outage part (``bench/roaming_outage.py``) prints on the host panes."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Callable, Sequence

from bench.roaming_rig import (
    Rig,
    Series,
    Side,
    agent_events,
    fmt,
    fmt_ms,
    log,
)
from tether.testing.tap import Hit

ECHO_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
ECHO_LINE = 30
"""characters per typed line; then Enter (untimed)"""
ECHO_PACE = 0.050
TICK_EVERY = 0.100


# --- 1. roam --------------------------------------------------------------------------------


def bench_roam(rig: Rig, runs: int, out: dict[str, Series]) -> None:
    """Part 1: a marker line after a move of the host, against no move (A B A B)."""
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
    """What has been typed on the current line of one mate (the host pane runs ``tee -a FILE``,
    a cat)."""

    def __init__(self, side: Side, rng: random.Random) -> None:
        self.side = side
        self.rng = rng
        self.line = ""

    def _row_is(self, text: str) -> Callable[[str], bool]:
        return lambda scr: any(row.rstrip() == text for row in scr.split("\n"))

    def key(self, timeout: float) -> tuple[Hit | None, float]:
        """Type one random character; (the hit, when it was sent)."""
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
        """Enter (untimed), then wait for the pane's copy of the line (tee's output)."""
        line = self.line
        self.line = ""
        if not line:
            return
        tap = self.side.tap
        mark = tap.mark()
        tap.send_key("Enter")
        tap.wait(mark, lambda scr: sum(r.rstrip() == line for r in scr.split("\n")) >= 2,
                 timeout)


def _cell(text: str) -> tuple[int, float]:
    """``RTT/LOSS`` (ms, % each way) as numbers; a loss without decimals as an int."""
    rtt, _, loss = text.partition("/")
    value = float(loss)
    return int(rtt), int(value) if value.is_integer() else value


def bench_echo(rig: Rig, samples: int, warmup: int, cell_budget: float,
               out: dict[str, Series], cells: Sequence[str] | None = None) -> None:
    """Part 2: keystroke echo for each RTT/loss cell on the host's link."""
    sides = list(rig.sides.values())
    rng = random.Random(f"{rig.seed}:echo")
    typists = {s.name: Typist(s, rng) for s in sides}
    link = rig.net.link("host")  # the active one (where the roams left the host)
    timeout = 20.0
    grid = [(rtt, loss) for rtt in (50, 200) for loss in (0, 10, 30)]
    chosen = grid if not cells else [_cell(c) for c in cells]
    for n, (rtt, loss) in enumerate(chosen):
        # the grid's cells keep their seeds whatever else is chosen
        cell = grid.index((rtt, loss)) + 1 if (rtt, loss) in grid else 50 + n
        cell_seed = rig.seed * 100 + cell
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


# --- the ticker (part 3, outage) ---------------------------------------------------------


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
