#!/usr/bin/env python3
"""Run tether's benchmarks and print each figure next to its floor.

    python3 bench/run.py [--quick] [--only NAME...] [--json FILE] [-q]

Benchmarks (in priority order): echo, startup, flood, memory, idle, wire, scale,
scale-active.
Netsim benchmarks run on their own: bench/roaming.py, bench/join_roaming.py,
bench/local_echo.py.
Writes a JSON file (default bench-results.json in the current directory) and
prints a table. Figures are measured, never asserted; a missed target is
reported, not an error. The exit status is non-zero only when a benchmark
could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python3 bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Ctx, Figure, Log

BENCHMARKS = ["echo", "startup", "flood", "memory", "idle", "wire", "scale", "scale-active"]


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    a = abs(v)
    if unit == "B":
        for div, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if a >= div:
                return f"{v / div:.2f}{u}"
        return f"{v:.0f}B"
    if a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s


def table(figures: list[Figure]) -> str:
    head = ["benchmark", "metric", "unit", "median", "p90", "p99", "runs", "floor", "x floor",
            "spread", "target", "met"]
    rows = [head]
    for f in figures:
        st = f.stats
        fs = f.floor_stats
        unit = f.unit
        shown_unit = "MiB" if unit == "B" else unit
        conv = (1 / (1 << 20)) if unit == "B" else 1.0

        def num(v: float | None, conv: float = conv) -> str:
            return "-" if v is None else _fmt(v * conv)

        spread = f.spread
        rows.append([
            f.bench,
            f.metric,
            shown_unit,
            num(st["median"]),
            num(st["p90"]),
            num(st["p99"]),
            str(st["runs"]),
            num(fs["median"]) if fs else "-",
            _fmt(f.ratio) if f.ratio is not None else "-",
            f"{num(spread[0])}..{num(spread[1])}" if spread else "-",
            f.target or "-",
            {True: "yes", False: "NO", None: "-"}[f.met],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    numeric = {3, 4, 5, 6, 7, 8}
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in numeric and n else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(figures: list[Figure]) -> str:
    out = []
    for f in figures:
        bits = []
        if f.floor_label:
            bits.append(f"floor = {f.floor_label}")
        if f.floor_spread:
            conv = (1 / (1 << 20)) if f.unit == "B" else 1.0
            lo, hi = f.floor_spread
            bits.append(f"floor spread {_fmt(lo * conv)}..{_fmt(hi * conv)}")
        if f.note:
            bits.append(f.note)
        if bits:
            out.append(f"  {f.bench} / {f.metric.strip()}: " + "; ".join(bits))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"

    load = os.getloadavg()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "tmux": version(["tmux", "-V"]),
        "ssh": version(["ssh", "-V"]),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a sanity check in < 1 min")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--json", type=Path, default=Path("bench-results.json"), metavar="FILE",
                    help="where to write the results (default bench-results.json)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress log on stderr")
    a = ap.parse_args(argv)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: every workdir ends its processes

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    for tool in ("tmux", "ssh"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    # what ./run and ./test do: tether's modules byte-compiled, so that a
    # PYTHONDONTWRITEBYTECODE environment does not time the compiler
    import compileall

    import tether

    compileall.compile_dir(os.path.dirname(tether.__file__), quiet=2)
    names = [n for n in BENCHMARKS if not a.only or n in a.only]
    ctx = Ctx(quick=a.quick, log=Log(not a.quiet))
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    loads: dict[str, list[float]] = {}
    info = machine()
    for name in names:
        t0 = time.monotonic()
        ctx.log(f"== {name}")
        try:
            mod = importlib.import_module(f"bench.{name.replace('-', '_')}")
            figures.extend(mod.run(ctx))
        except Exception as exc:
            errors[name] = "".join(traceback.format_exception(exc))
            ctx.log(f"{name} failed: {exc}")
        durations[name] = time.monotonic() - t0
        loads[name] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "quick": a.quick,
        "machine": info,
        "durations_s": durations,
        "loadavg_after": loads,
        "figures": [f.to_json() for f in figures],
        "errors": errors,
    }
    a.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    mode = "quick" if a.quick else "full"
    print(f"tether benchmarks ({mode}; {info['cpus']} cpus, load {info['loadavg_at_start']}, "
          f"{info['tmux']}, Python {info['python']})")
    print(table(figures))
    extra = notes(figures)
    if extra:
        print("notes:")
        print(extra)
    for name, err in errors.items():
        print(f"\n{name} FAILED:\n{err}", file=sys.stderr)
    print("load average after each benchmark (other work on this machine shows here): "
          + ", ".join(f"{k} {v[0]}" for k, v in loads.items()))
    print(f"results: {a.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
