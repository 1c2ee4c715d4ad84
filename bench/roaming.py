#!/usr/bin/env python3
"""Roaming benchmark: tether on a faulty (namespaced) network, measured from a mate's screen.

    python3 bench/roaming.py [--quick] [--json FILE] [--seed N] [--logs DIR] [--only PART...]
                             [--cells RTT/LOSS...] [--samples N]
                             [--outages S,S..] [--losses PCT,PCT..] [--runs N] [--delay MS]

Needs root and /dev/net/tun (tether netsim).  One ``tether.netsim`` network
(``host`` with links wifi and lte, ``relay``, ``mate``) carries two sessions
side by side, so both transports see the same network at the same moment:

* ``quic``: a relay started normally (port 2222); its host replicates over QUIC.
* ``ssh``:  a second relay process started with ``--no-quic`` (port 2223); its
  host replicates over the SSH channel (a comparison column).

Both hosts live in the ``host`` namespace (so a roam, a blackout or an
impairment hits both), both relays in ``relay``, both mates (OpenSSH inside a
local tmux, as in tests/e2e) in ``mate``.  Each host pane runs ``tee -a FILE``
(a ``cat`` that also appends every line it receives to a file in the host's
home).  The benchmark watches each mate's local tmux through a control-mode
client (``tmux -C attach``): it types with ``send-keys -l`` on that client,
timestamps every ``%output`` of the mate's pane as it arrives, and confirms with
``capture-pane`` that the screen shows what is expected; a sample's time is the
arrival of the output that made it true.

Parts (figures are measured, never asserted):

1. ``roam``: the host's address changes (``net.move("host", "wifi"<->"lte")``);
   right after, a fresh marker line is written to each host pane's terminal;
   time until the marker is on the mate's screen.  Baseline: the same without
   the move, interleaved A B A B.
2. ``echo``: the host pane echoes like ``cat``; the mate types one printable
   character at a time (>= 50 ms apart); time until it is on the mate's screen.
   Delay RTT/2 and the loss rate are set on the host's link, each direction (so a
   round trip crosses two lossy hops); the mate's link is clean.  Transports
   alternate sample by sample.
3. ``outage`` (alias ``blackout``): a table of cells, blackout length x loss
   rate (``--outages 5,15,60,600 --losses 0,10,30 --runs 5`` by default; with
   ``--quick`` 5 s at 0% and 30%, 2 runs).  In each run the loss rate and a
   delay (``--delay``, 25 ms) are set each way on both host links for the whole
   run; each mate types a numbered line every 0.3-0.5 s into its host pane
   before, during and after the blackout; both host links go dark for the
   blackout's length; the 2nd, 4th, ... run of a cell moves the host to its
   other link halfway through, so it comes back on a new address.  Per run:
   (1) from the link's return until the last line typed in the dark is in the
   host's file (inotify on it), (2) the worst wait of a line typed while the
   link was up, before and after the blackout, (3) from the link's return until
   the mate's screen shows the host's newest line (a line printed every 100 ms);
   median and worst per cell, each against its target (printed as information).
   Every typed line must reach the host's file exactly once and in order: a
   violation is printed and makes the exit status 1.  Details in
   ``bench/roaming_outage.py``; a full table takes about 3.5 hours (the 10 minute
   cells alone 2.6).

Every random choice (netsim's decisions, the links' loss, the typed lines and
their pace) derives from ``--seed``, printed at the start and in the report.

Modules: this entry (parts, report, command line); ``bench/roaming_rig.py``
(network, relays, hosts, mates, samples, ``LineWatch``); ``bench/roaming_parts.py``
(roam, echo, the ticker); ``bench/roaming_outage.py`` (the outage part); the
mates' taps are ``tether.testing.tap.Tap``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python3 bench/roaming.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchError
from bench.roaming_outage import (
    FULL,
    QUICK,
    TARGETS,
    bench_outage,
    cells,
    report_outage,
    violations,
)
from bench.roaming_parts import bench_echo, bench_roam
from bench.roaming_rig import TRANSPORTS, Rig, Series, fmt, interrupt_on_sigterm, log
from tether.netsim import nsutil

PARTS = ("roam", "echo", "outage")
ALIASES = {"blackout": "outage"}


# --- report ------------------------------------------------------------------------------


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def report(series: dict[str, Series], args: argparse.Namespace, seed: int,
           outage: list[dict[str, Any]] | None = None) -> str:
    """The figures as the text table the benchmark prints."""
    lines: list[str] = []
    mode = "quick" if args.quick else "full"
    lines.append(f"tether roaming benchmark ({mode}), seed {seed} (netsim, loss, typed lines); "
                 "times in ms (s where marked)")
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
    parts = [k.split("/") for k in series]  # echo cells: "quic/50/10"
    echo = sorted({(p[1], p[2]) for p in parts
                   if len(p) == 3 and p[0] in TRANSPORTS and _number(p[1]) and _number(p[2])},
                  key=lambda c: (float(c[0]), float(c[1])))
    if echo:
        lines.append("")
        lines.append("2. keystroke echo (mate types, tee echoes as cat); delay RTT/2 and loss "
                     "set on the host's link, each direction; mate link clean")
        lines.append(f"  {'RTT':>5} {'loss':>5} | {'quic median':>11} {'p90':>7} {'max':>7} "
                     f"{'n':>3} {'fail':>4} | {'ssh median':>11} {'p90':>7} {'max':>7} "
                     f"{'n':>3} {'fail':>4}")
        for rtt, loss in echo:
            cols = []
            for t in TRANSPORTS:
                s = series.get(f"{t}/{rtt}/{loss}")
                if s is None:
                    cols.append(f"{'-':>11} {'-':>7} {'-':>7} {'-':>3} {'-':>4}")
                    continue
                st = s.stats()
                cols.append(f"{fmt(st['median']):>11} {fmt(st['p90']):>7} {fmt(st['max']):>7} "
                            f"{st['runs']:>3} {st['failed']:>4}")
            lines.append(f"  {rtt:>5} {loss:>4}% | {cols[0]} | {cols[1]}")
    if outage:
        lines.append("")
        lines.extend(report_outage(outage, args.delay, args.outages, args.losses, args.runs))
    if series:
        lines.append("")
        lines.append("notes: a roam/echo sample is timed from just before the marker write / "
                     "send-keys to the arrival (tmux -C %output)")
        lines.append("  of the mate-pane output that made capture-pane show it; 'late' = confirmed "
                     "but not matched in one chunk, timed")
        lines.append("  at the confirming capture instead. Roam samples run one transport after "
                     "the other (quic first); both count")
        lines.append("  from the end of net.move. Echo cells alternate transports key by key; a "
                     "cell stops early when its time budget is spent.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts asked for on a fresh rig; 1 if a part failed, 2 if netsim cannot run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer samples; outage: 5 s at 0%% and 30%% loss, 2 runs")
    ap.add_argument("--json", metavar="FILE", help="write the figures and samples as JSON")
    ap.add_argument("--seed", type=int,
                    help="seed of every random choice: netsim, the links' loss, the typed "
                         "lines and their pace (default: random, printed)")
    ap.add_argument("--logs", metavar="DIR", help="copy relay/agent logs and netsim events here")
    ap.add_argument("--only", nargs="+", choices=[*PARTS, *ALIASES],
                    help="run only these parts (blackout = outage)")
    ap.add_argument("--cells", nargs="+", metavar="RTT/LOSS",
                    help="echo: these cells, e.g. 200/30 or 50/1 (default: 50|200 x 0|10|30)")
    ap.add_argument("--samples", type=int, metavar="N",
                    help="echo: keystrokes per cell and transport (default 40, quick 10)")
    ap.add_argument("--outages", type=_numbers, metavar="S,S..",
                    help="outage: blackout lengths in seconds (default 5,15,60,600; quick 5)")
    ap.add_argument("--losses", type=_numbers, metavar="PCT,PCT..",
                    help="outage: loss rates each way on the host's links (default 0,10,30; "
                         "quick 0,30)")
    ap.add_argument("--runs", type=int, metavar="N",
                    help="outage: runs per cell (default 5, quick 2)")
    ap.add_argument("--delay", type=float, default=25.0, metavar="MS",
                    help="outage: delay each way on the host's links (default 25)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.outages = args.outages or preset["outages"]
    args.losses = args.losses or preset["losses"]
    args.runs = args.runs or preset["runs"]
    reason = nsutil.unavailable_reason()
    if reason:
        print(f"roaming benchmark cannot run: {reason}", file=sys.stderr)
        return 2
    parts = [ALIASES.get(p, p) for p in args.only or PARTS]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"roaming benchmark: seed={seed} ({'quick' if args.quick else 'full'})", flush=True)
    args.loadavg = [os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="tb-roam-"))
    rig = Rig(root, seed)
    series: dict[str, Series] = {}
    outage: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.monotonic()

    interrupt_on_sigterm()
    try:
        rig.start()
        log(f"rig ready in {time.monotonic() - started:.1f}s")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("roam", lambda: bench_roam(rig, 3 if args.quick else 10, series)),
            ("echo", lambda: bench_echo(rig, args.samples or (10 if args.quick else 40),
                                        1 if args.quick else 3,
                                        7.0 if args.quick else 100.0 * (args.samples or 40) / 40,
                                        series, args.cells)),
            ("outage", lambda: bench_outage(rig, args.outages, args.losses, args.runs,
                                            args.delay, outage)),
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
    print(report(series, args, seed, outage))
    print(f"\ntotal {total:.0f}s on {platform.node()} ({os.cpu_count()} cores), seed {seed}")
    broken = violations(outage)
    for e in errors:
        print(f"error: {e}")
    for v in broken:
        print(f"CORRECTNESS FAILURE: {v}")
    if args.json:
        data = {
            "seed": seed, "quick": args.quick, "seconds": total, "errors": errors,
            "loadavg": args.loadavg,
            "figures": {k: s.to_json() for k, s in series.items()},
            "outage": {
                "settings": {"outages_s": args.outages, "losses_pct": args.losses,
                             "runs": args.runs, "delay_ms": args.delay, "targets": TARGETS,
                             "moves": "the 2nd, 4th, ... run of a cell"},
                "cells": cells(outage),
                "runs": outage,
            },
            "violations": broken,
        }
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 1 if errors or broken else 0


def _numbers(text: str) -> list[float]:
    """``5,15,60`` as numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
