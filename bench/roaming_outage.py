"""The roaming benchmark's outage part: blackouts of the host's link while a mate types.

For every cell (blackout length x loss rate) and run, on the rig of
``bench/roaming_rig.py`` (both transports side by side, same network):

* loss L% and a delay (25 ms by default) each way on both of the host's links
  (wifi and lte), seeded per run, on for the whole run: before, during and after
  the blackout;
* each mate types a numbered line (``oG-NNNN-`` and 16 random letters, then
  Enter) every 0.3-0.5 s into its host pane, which runs ``tee -a FILE``: the
  host's file gets each line when its Enter arrives; ``LineWatch`` (inotify)
  timestamps it there;
* a ``Ticker`` prints a line on every host pane every 100 ms;
* after 5 s of typing, both host links go dark for N s (``Link.blackout``, both,
  so the host is cut whichever link it is on); in the 2nd, 4th, ... run of a cell
  the host moves to its other link (``net.move``) halfway through the blackout,
  so it comes back on a new address; typing goes on throughout and for at least
  10 s after the link's return (and until the figures below are in).

Figures per run and transport (times in ms, from the link's return unless marked):

1. ``dark_ms``: until the last line typed during the blackout is in the host's file;
2. ``up_before_ms`` / ``up_after_ms``: the worst wait (typed -> in the host's file)
   of a line typed while the link was up, before / after the blackout. A line
   typed less than 2 s before the blackout that had not arrived when it began is
   left out (``caught``): its wait is the blackout's;
3. ``screen_ms``: until the mate's screen shows the host's newest ticker line.

Also ``away_s`` ("host is away" on the mate's screen, from the blackout's start)
and the host's status line before and after the run. Every line must
reach the host exactly once and in order; anything else is a ``violation``.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import textwrap
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import BenchError
from bench.roaming_parts import Ticker
from bench.roaming_rig import (
    STATUS_OK,
    LineWatch,
    Rig,
    Side,
    agent_events,
    clock_text,
    fmt,
    fmt_ms,
    log,
    wait_until,
)

PACE = (0.3, 0.5)
"""seconds between two typed lines (uniform, seeded)"""
PAYLOAD = 16
ALPHABET = "abcdefghijkmnopqrstuvwxyz"
BEFORE_S = 5.0
"""typing with the link up before the blackout"""
AFTER_S = 10.0
"""typing after the link's return, at least"""
CAUGHT_S = 2.0
"""a line typed this close before the blackout and not yet arrived is the blackout's"""
RECOVERY_TIMEOUT = 180.0
DRAIN_TIMEOUT = 60.0
TARGET_MS = 2000.0
TARGETS = ("lines typed during a blackout reach the host within 2 s of the link's return; "
           "lines typed while up never wait more than 2 s at 30% loss")

QUICK = {"outages": [5.0], "losses": [0.0, 30.0], "runs": 2}
FULL = {"outages": [5.0, 15.0, 60.0, 600.0], "losses": [0.0, 10.0, 30.0], "runs": 5}


class LineTypist:
    """Types numbered lines into one mate, one every 0.3-0.5 s, in a thread."""

    def __init__(self, side: Side, rng: random.Random, tag: str) -> None:
        self.side = side
        self.rng = rng
        self.tag = tag
        self.typed: list[tuple[int, str, float]] = []
        """(number, text, time just before it was sent), in order"""
        self.error: str | None = None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tap = self.side.tap
        n = 0
        nxt = time.perf_counter()
        while not self._stop.is_set():
            n += 1
            text = f"{self.tag}-{n:04d}-" + "".join(self.rng.choice(ALPHABET)
                                                    for _ in range(PAYLOAD))
            try:
                t0 = tap.send_literal(text)
                tap.send_key("Enter")
            except BenchError as exc:
                self.error = str(exc)
                break
            with self.lock:
                self.typed.append((n, text, t0))
            nxt += self.rng.uniform(*PACE)
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def snapshot(self) -> list[tuple[int, str, float]]:
        with self.lock:
            return list(self.typed)

    def typed_since(self, t: float) -> bool:
        """Whether a line was typed at or after ``t`` (or typing has ended)."""
        with self.lock:
            return bool(self.typed and self.typed[-1][2] >= t) or not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# --- one run ---------------------------------------------------------------------------------


def _settle(rig: Rig, timeout: float) -> None:
    """Every host connected over its own transport; if one stays on the other (QUIC
    given up under loss), connected at all is enough: the run notes its status."""
    try:
        rig.settle(timeout)
    except BenchError as exc:
        log(f"outage: {exc}; going on with: "
            + ", ".join(f"{s.name} {s.status()}" for s in rig.sides.values()))
        for s in rig.sides.values():
            wait_until(lambda s=s: STATUS_OK.match(s.status()), 60,
                       f"the {s.name} host to be connected")


def _analyse(typed: Sequence[tuple[int, str, float]], lines: Sequence[tuple[float, str]],
             tb: float, te: float) -> dict[str, Any]:
    """The figures of one side's run, and what arrived wrong (``violations``)."""
    index = {text: (n, t0) for n, text, t0 in typed}
    arrived: dict[int, float] = {}
    order: list[int] = []
    violations: list[str] = []
    for t, text in lines:
        if text not in index:
            violations.append(f"a line that was not typed (garbled?) arrived: {text!r}")
            continue
        n = index[text][0]
        if n in arrived:
            violations.append(f"line {n} arrived again (duplicate)")
            continue
        arrived[n] = t
        order.append(n)
    for a, b in itertools.pairwise(order):
        if b < a:
            violations.append(f"line {b} arrived after line {a} (out of order)")
    missing = [n for n, _, _ in typed if n not in arrived]
    if missing:
        violations.append(f"{len(missing)} of {len(typed)} lines never arrived: "
                          + _ranges(missing))
    if len(violations) > 12:
        violations[11:] = [f"... and {len(violations) - 11} more"]
    recs = []
    before: list[float] = []
    after: list[float] = []
    caught = 0
    dark_last: tuple[int, float] | None = None
    for n, _text, t0 in typed:
        t = arrived.get(n)
        wait = None if t is None else (t - t0) * 1000
        phase = "before" if t0 < tb else "dark" if t0 < te else "after"
        if phase == "before" and t0 >= tb - CAUGHT_S and (t is None or t >= tb):
            phase = "caught"
            caught += 1
        if phase == "dark":
            dark_last = (n, t0)
        if wait is not None and phase in ("before", "after"):
            (before if phase == "before" else after).append(wait)
        recs.append({"n": n, "phase": phase, "typed_s": round(t0 - tb, 4),
                     "arrived_s": None if t is None else round(t - tb, 4),
                     "wait_ms": None if wait is None else round(wait, 1)})
    dark_ms = None
    if dark_last is not None and dark_last[0] in arrived:
        dark_ms = (arrived[dark_last[0]] - te) * 1000
    return {
        "dark_ms": dark_ms,
        "dark_lines": sum(r["phase"] == "dark" for r in recs),
        "up_before_ms": max(before) if before else None,
        "up_after_ms": max(after) if after else None,
        "up_lines": len(before) + len(after),
        "caught": caught,
        "typed": len(typed),
        "violations": violations,
        "lines": recs,
    }


def _ranges(ns: Sequence[int]) -> str:
    out: list[str] = []
    start = prev = ns[0]
    for n in [*ns[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out[:10]) + (" ..." if len(out) > 10 else "")


def _outage_run(rig: Rig, secs: float, loss: float, k: int, runs: int, gid: int,
                delay_ms: float, seed_text: str) -> list[dict[str, Any]]:
    """One run of a cell: ``secs`` of darkness at ``loss``; a result per side."""
    sides = list(rig.sides.values())
    net = rig.net
    rng = random.Random(seed_text)
    link_names = list(net.topology.hosts["host"])
    link_seed = rng.randrange(1, 2**31)
    for i, name in enumerate(link_names):
        net.link("host", name).set(delay=f"{delay_ms:g}ms", loss=f"{loss:g}%",
                                   seed=link_seed + i)
    _settle(rig, 90)
    status0 = {s.name: s.status() for s in sides}
    move = k % 2 == 1  # the 2nd, 4th, ... run of a cell
    start_link = net.active_link("host")
    end_link = next(n for n in link_names if n != start_link) if move else start_link
    addr0 = net.addr("host")
    watches = {s.name: LineWatch(s.typed) for s in sides}
    ticker = Ticker(sides, gid)
    typists: dict[str, LineTypist] = {}
    pool = ThreadPoolExecutor(4 * len(sides))
    try:
        for s in sides:
            wait_until(lambda s=s: ticker.newest_on(s.tap.screen()) > 0, 30,
                       f"the ticker on the {s.name} mate's screen")
        typists = {s.name: LineTypist(s, random.Random(f"{seed_text}:{s.name}"), f"o{gid}")
                   for s in sides}
        time.sleep(BEFORE_S)  # typing with the link up first
        marks = {s.name: s.tap.mark() for s in sides}
        events0 = {s.name: agent_events(s) for s in sides}
        # both links dark (the host is cut whichever it is on); the one it ends on last,
        # timed: the forwarder's blackout ends at most a request's time after tb + secs
        tb = 0.0
        for name in sorted(link_names, key=lambda n: n == end_link):
            if name == end_link:
                tb = time.perf_counter()
            net.link("host", name).blackout(secs)
        te = tb + secs
        wall = time.time() - (time.perf_counter() - tb)
        log(f"outage {secs:g}s loss {loss:g}% run {k + 1}/{runs}: host links dark "
            f"{clock_text(wall)} to {clock_text(wall + secs)}"
            + (f", host moves {start_link} -> {end_link} at {secs / 2:g}s" if move else ""))

        def away(s: Side) -> float | None:
            hit = s.tap.wait(marks[s.name], lambda scr: "host is away" in scr, secs)
            return None if hit is None else hit.t - tb

        aways = {s.name: pool.submit(away, s) for s in sides}
        addr1 = addr0
        if move:
            time.sleep(max(0.0, tb + secs / 2 - time.perf_counter()))
            addr1 = net.move("host", end_link)
        time.sleep(max(0.0, te - time.perf_counter()))  # the blackout runs its course
        marks = {s.name: s.tap.mark() for s in sides}

        def newest_needle(scr: str) -> bytes:
            return f"{ticker.prefix}{ticker.newest_on(scr)}".encode()

        def screen(s: Side) -> float | None:
            want = [0]

            def prepare() -> None:  # the host's newest line, read before the capture
                want[0] = ticker.n

            hit = s.tap.wait(marks[s.name], lambda scr: ticker.newest_on(scr) >= want[0],
                             RECOVERY_TIMEOUT, newest_needle, prepare=prepare)
            return None if hit is None else (hit.t - te) * 1000

        def dark_arrived(s: Side) -> None:
            """Until the last line typed in the dark is in the host's file (or time's up)."""
            ty = typists[s.name]
            deadline = time.perf_counter() + RECOVERY_TIMEOUT
            while not ty.typed_since(te) and time.perf_counter() < deadline:
                time.sleep(0.05)
            dark = [text for _, text, t0 in ty.snapshot() if tb <= t0 < te]
            if dark:
                watches[s.name].wait(lambda lines: any(x == dark[-1] for _, x in lines),
                                     max(0.0, deadline - time.perf_counter()))

        waits = {(s.name, w): pool.submit(fn, s) for s in sides
                 for w, fn in (("screen", screen), ("dark", dark_arrived))}
        got = {key: f.result() for key, f in waits.items()}
        # typing goes on: at least AFTER_S after the return, and 2 s past the figures
        time.sleep(max(2.0, te + AFTER_S - time.perf_counter()))
        for ty in typists.values():
            ty.stop()
        for s in sides:
            want = {text for _, text, _ in typists[s.name].snapshot()}
            watches[s.name].wait(lambda lines, want=want: want <= {x for _, x in lines},
                                 DRAIN_TIMEOUT)
    finally:
        for ty in typists.values():
            ty.stop()
        ticker.stop()
        for w in watches.values():
            w.close()
        pool.shutdown(wait=False, cancel_futures=True)
    out = []
    for s in sides:
        ty = typists[s.name]
        res = _analyse(ty.snapshot(), watches[s.name].lines, tb, te)
        if ty.error:
            res["violations"].append(f"typing stopped: {ty.error}")
        ev = agent_events(s)
        res.update({
            "transport": s.name, "outage_s": secs, "loss_pct": loss, "delay_ms": delay_ms,
            "run": k + 1, "moved": move, "link_seed": link_seed, "rng_seed": seed_text,
            "links": f"{start_link} -> {end_link}", "addr": f"{addr0} -> {addr1}",
            "wall_start": clock_text(wall), "wall_end": clock_text(wall + secs),
            "screen_ms": got[(s.name, "screen")],
            "away_s": aways[s.name].result() if aways[s.name].done() else None,
            "status_before": status0[s.name], "status_after": s.status(),
            "inotify": watches[s.name].inotify,
            "agent_events": {key: ev[key] - events0[s.name][key] for key in ev},
        })
        out.append(res)
        log(f"  {s.name}: dark->host {fmt_ms(res['dark_ms'])} ({res['dark_lines']} lines "
            f"typed dark), up wait before {fmt_ms(res['up_before_ms'])} after "
            f"{fmt_ms(res['up_after_ms'])} ({res['caught']} caught), screen "
            f"{fmt_ms(res['screen_ms'])}, status {res['status_before']} -> "
            f"{res['status_after']}, {res['typed']} lines"
            + "".join(f"\n    VIOLATION: {v}" for v in res["violations"]))
    return out


def bench_outage(rig: Rig, outages: Sequence[float], losses: Sequence[float], runs: int,
                 delay_ms: float, results: list[dict[str, Any]]) -> None:
    """The outage part: ``runs`` runs of every (blackout, loss) cell; results per run and
    transport appended to ``results`` as they come."""
    links = [rig.net.link("host", n) for n in rig.net.topology.hosts["host"]]
    gid = 0
    try:
        for secs in outages:
            for loss in losses:
                for k in range(runs):
                    gid += 1
                    results.extend(_outage_run(rig, secs, loss, k, runs, gid, delay_ms,
                                               f"{rig.seed}:outage:{secs:g}:{loss:g}:{k}"))
    finally:
        for link in links:
            link.clear()


# --- the table -------------------------------------------------------------------------------


def _agg(vals: Sequence[float | None]) -> tuple[float, float]:
    """(median, worst) of per-run figures; a missing figure makes the worst infinite."""
    ok = [v for v in vals if v is not None]
    med = statistics.median(ok) if ok else math.nan
    worst = math.inf if len(ok) < len(vals) else max(ok, default=math.nan)
    return med, worst


def _cell(v: float) -> str:
    return "none" if v == math.inf else fmt(v)


def cells(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs grouped by (blackout, loss, transport), with median and worst of each
    figure and whether the targets are met (information only)."""
    groups: dict[tuple[float, float, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["outage_s"], r["loss_pct"], r["transport"]), []).append(r)
    out = []
    for (secs, loss, t), rs in groups.items():
        c: dict[str, Any] = {"outage_s": secs, "loss_pct": loss, "transport": t,
                             "runs": len(rs), "moved": sum(r["moved"] for r in rs)}
        for key in ("dark_ms", "up_before_ms", "up_after_ms", "screen_ms"):
            c[key] = dict(zip(("median", "worst"), _agg([r[key] for r in rs]), strict=True))
        up_worst = max(c["up_before_ms"]["worst"], c["up_after_ms"]["worst"])
        c["target_dark_met"] = c["dark_ms"]["worst"] <= TARGET_MS
        c["target_up_met"] = up_worst <= TARGET_MS
        c["violations"] = sum(len(r["violations"]) for r in rs)
        out.append(c)
    return out


def report_outage(results: Sequence[dict[str, Any]], delay_ms: float,
                  outages: Sequence[float], losses: Sequence[float], runs: int) -> list[str]:
    """The outage part's table, targets and correctness lines."""
    lines = [
        "3. outage: both host links dark for N s while each mate types a numbered line every "
        f"{PACE[0]:g}-{PACE[1]:g} s",
        f"   into its host pane (tee -a FILE); L% loss and {delay_ms:g} ms delay each way on the "
        "host's links all through the run;",
        "   the 2nd, 4th, ... run of a cell moves the host to its other link mid-blackout "
        "(back on a new address)",
        "   (1) dark->host: from the link's return until the last line typed in the dark is in "
        "the host's file",
        "   (2) up wait: the worst wait (typed -> in the host's file) of a line typed while the "
        "link was up,",
        f"       before / after the blackout (lines typed < {CAUGHT_S:g} s before it and still "
        "in flight when it began left out)",
        "   (3) screen: from the link's return until the mate's screen shows the host's newest "
        "line (one every 100 ms)",
        "   median / worst of the runs' figures; 'none' = a run where it never happened",
        f"   asked: blackouts {', '.join(_secs(x) for x in outages)} x loss "
        f"{', '.join(f'{x:g}%' for x in losses)}, {runs} runs each",
        f"  {'outage':>6} {'loss':>4} {'via':<4} {'runs':>4} {'moved':>5} | "
        f"{'(1) dark->host':^15} | {'(2) up before':^15} | {'(2) up after':^15} | "
        f"{'(3) screen':^15} | targets",
        f"  {'':>6} {'':>4} {'':<4} {'':>4} {'':>5} | "
        + " | ".join(f"{'median':>7} {'worst':>7}" for _ in range(4)) + " | (1)  (2)",
    ]
    for c in cells(results):
        label = _secs(c["outage_s"])
        figs = " | ".join(f"{_cell(c[k]['median']):>7} {_cell(c[k]['worst']):>7}"
                          for k in ("dark_ms", "up_before_ms", "up_after_ms", "screen_ms"))
        met = " ".join("yes" if c[k] else "NO " for k in ("target_dark_met", "target_up_met"))
        row = (f"  {label:>6} {c['loss_pct']:>3g}% {c['transport']:<4} {c['runs']:>4} "
               f"{c['moved']:>5} | {figs} | {met}"
               + (f"  {c['violations']} VIOLATIONS" if c["violations"] else ""))
        lines.append(row.rstrip())
    lines.extend(textwrap.wrap(
        f'targets (information, never pass/fail): "{TARGETS}". A cell meets (1) when its worst '
        "dark->host is <= 2 s, (2) when its worst up wait (before or after) is <= 2 s",
        108, initial_indent="  ", subsequent_indent="    "))
    bad = [r for r in results if r["violations"]]
    total = sum(r["typed"] for r in results)
    if not bad:
        lines.append(f"  correctness: every typed line ({total} in {len(results)} runs) reached "
                     "the host exactly once and in order")
    else:
        lines.append(f"  CORRECTNESS FAILURE: {len(bad)} of {len(results)} runs lost, doubled, "
                     "reordered or garbled typed lines:")
        for r in bad:
            for v in r["violations"]:
                lines.append(f"  !! {r['transport']} {r['outage_s']:g}s {r['loss_pct']:g}% run "
                             f"{r['run']}: {v}")
    return lines


def _secs(secs: float) -> str:
    return f"{secs / 60:g}min" if secs >= 60 and secs % 60 == 0 else f"{secs:g}s"


def violations(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per run that broke exactly-once-in-order."""
    return [f"outage {r['transport']} {r['outage_s']:g}s {r['loss_pct']:g}% run {r['run']}: "
            + "; ".join(r["violations"]) for r in results if r["violations"]]
