"""Shared machinery of the benchmarks: statistics, figures, and the harness set for timing.

Processes are started by ``tether.testing``, the harness the tests use too: `tether
relay` on loopback, hosts started with `tether -S SOCK new-session -d`, mates running
OpenSSH under a pty that the benchmark reads directly.  Each benchmark works in its
own ``Workdir``, which is also the HOME, XDG_STATE_HOME and TMPDIR of every process it
starts; at the end, every process whose command line names that directory is ended by
its pid, and the directory is removed.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tether.testing import env as harness_env
from tether.testing.env import PY, SSH_OPTS, tether_cmd, tmux
from tether.testing.host import Host
from tether.testing.host import write_host_home as harness_write_host_home
from tether.testing.join_mate import JoinMate
from tether.testing.mate import (
    Drainer,
    PtyProc,
    visible,
    wait_visible_all,
    wait_visible_some,
)
from tether.testing.procs import (
    HarnessError,
    Mem,
    cpu_seconds,
    memory,
    processes,
    remote_peers,
)
from tether.testing.procs import free_port as harness_free_port
from tether.testing.procs import wait_for as harness_wait_for
from tether.testing.proxy import CountingProxy
from tether.testing.relay import KeyCache, RelayProcess

__all__ = [
    "PY",
    "SSH_OPTS",
    "TMUX_CONF",
    "BenchError",
    "CountingProxy",
    "Ctx",
    "Drainer",
    "Figure",
    "HostSession",
    "JoinMate",
    "Log",
    "Mem",
    "PlainTmux",
    "PtyProc",
    "Relay",
    "Workdir",
    "attach_argv",
    "cpu_of",
    "finite_positive",
    "mem_of",
    "memory",
    "percentile",
    "processes",
    "remote_peers",
    "summary",
    "tether_cmd",
    "tmux",
    "visible",
    "wait_for",
    "wait_idle",
    "wait_visible_all",
    "wait_visible_some",
    "write_host_home",
]

T = TypeVar("T")

CLIENT_TERM = "xterm-256color"
"""What the benchmark's "terminal" claims to be, for tmux clients and ssh alike."""

BenchError = HarnessError
"""What a benchmark raises when it cannot measure; the harness raises the same."""

# --- statistics ------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"median": math.nan, "p90": math.nan, "p99": math.nan, "min": math.nan,
                "max": math.nan, "runs": 0}
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


@dataclass
class Figure:
    """One measured figure, with its floor and target.

    ``rounds`` holds the samples of each interleaved round (A B A B ...), so the
    spread across rounds shows how much the machine drifted during the run.
    """

    bench: str
    metric: str
    unit: str
    values: list[float]
    floor: list[float] | None = None
    floor_label: str = ""
    target: str = ""
    met: bool | None = None
    rounds: list[list[float]] = field(default_factory=list)
    floor_rounds: list[list[float]] = field(default_factory=list)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, float]:
        return summary(self.values)

    @property
    def floor_stats(self) -> dict[str, float] | None:
        return summary(self.floor) if self.floor else None

    @property
    def ratio(self) -> float | None:
        fs = self.floor_stats
        if not fs or not fs["median"]:
            return None
        return self.stats["median"] / fs["median"]

    @property
    def delta(self) -> float | None:
        fs = self.floor_stats
        return None if not fs else self.stats["median"] - fs["median"]

    @staticmethod
    def _spread(rounds: list[list[float]]) -> list[float] | None:
        meds = [percentile(r, 50) for r in rounds if r]
        return [min(meds), max(meds)] if len(meds) > 1 else None

    @property
    def spread(self) -> list[float] | None:
        """[lowest, highest] median of one round (None with a single round)."""
        return self._spread(self.rounds)

    @property
    def floor_spread(self) -> list[float] | None:
        return self._spread(self.floor_rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "metric": self.metric,
            "unit": self.unit,
            "stats": self.stats,
            "floor_label": self.floor_label,
            "floor_stats": self.floor_stats,
            "ratio_to_floor": self.ratio,
            "delta_to_floor": self.delta,
            "spread": self.spread,
            "floor_spread": self.floor_spread,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "extra": self.extra,
            "values": self.values,
            "floor": self.floor,
        }


def finite_positive(values: Iterable[float]) -> bool:
    vals = list(values)
    return bool(vals) and all(math.isfinite(v) and v > 0 for v in vals)




def wait_for(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """The harness's ``wait_for``, polling faster: timings must not wait on the poll."""
    return harness_wait_for(fn, timeout, what, interval)


# --- processes -----------------------------------------------------------------------


class Workdir(harness_env.Workdir):
    """The harness's work directory, its processes on the benchmark's terminal type."""

    def __init__(self, name: str) -> None:
        super().__init__(name, term=CLIENT_TERM)


TMUX_CONF = (
    "set -g default-terminal tmux-256color\n"
    "set -g history-limit 5000\n"
    "set -g escape-time 10\n"
)

KEYS = KeyCache()
"""One set of relay host keys for the whole run."""


class Relay(RelayProcess):
    """`tether relay` on loopback, its keys and temp files inside the workdir."""

    def __init__(self, wd: Workdir, extra: Sequence[str] = ()) -> None:
        self.wd = wd
        port = harness_free_port()
        home = wd.path / f"relay-{port}"
        home.mkdir()
        # the benchmarks' hosts share one account, so one host key, and one
        # address: lift the relay's per-key (50) and per-address (32) limits
        # for the 100-session runs
        # TETHER_BENCH_RELAY_ARGS: more relay flags for every benchmark, e.g.
        # "--replica worker" to measure the previous design beside the current one
        more = shlex.split(os.environ.get("TETHER_BENCH_RELAY_ARGS", ""))
        super().__init__(
            home, port, "--max-sessions-per-key", "100000",
            "--max-connections-per-address", "100000", *extra, *more,
            public=None, env=wd.env(home), verbose=False, keys=KEYS, keep_output=False,
            stop_timeout=15.0,
        )
        wd.on_close(self.close)


def write_host_home(home: Path, conf: str, tmux_conf: str = TMUX_CONF) -> None:
    harness_write_host_home(home, conf, tmux_conf)


class HostSession(Host):
    """`tether -S SOCK new-session -d` in ``home`` (whose ~/.tether.conf names the relay),
    read through its tmux directly so no Python start-up lands in a timing."""

    def __init__(self, wd: Workdir, home: Path, name: str, size: tuple[int, int] = (80, 24),
                 command: Sequence[str] = (), start: bool = True) -> None:
        self.wd = wd
        super().__init__(home, None, size, name=name, env=wd.env(home), command=command,
                         start=start)

    def start(self) -> None:
        super().start()
        self.wd.on_close(self.close)

    def display(self, fmt: str) -> str:
        return self.read_format(fmt)

    def ssh(self, readonly: bool = False) -> list[str]:
        return self.ssh_argv(readonly)

    def join_line(self, readonly: bool = False) -> str:
        """The printed `tether join ...` line (``#{tether_join}``), read directly."""
        return self.read_format("#{tether_join_ro}" if readonly else "#{tether_join}")


class PlainTmux:
    """The floor: a plain tmux server (same ~/.tmux.conf) with one session."""

    def __init__(self, wd: Workdir, home: Path, name: str, size: tuple[int, int] = (80, 24),
                 command: Sequence[str] = ()) -> None:
        self.env = wd.env(home)
        self.sock = str(home / f"{name}.sock")
        conf = home / ".tmux.conf"
        if not conf.exists():
            home.mkdir(parents=True, exist_ok=True)
            conf.write_text(TMUX_CONF)
        subprocess.run(["tmux", "-S", self.sock, "-f", str(conf), "new-session", "-d", "-x",
                        str(size[0]), "-y", str(size[1]), *command],
                       check=True, env=self.env)
        wd.on_close(self.close)

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def server_pids(self) -> list[int]:
        return [p.pid for p in processes() if p.argv[0].rsplit("/", 1)[-1] == "tmux"
                and self.sock in p.argv and "new-session" in p.argv]

    def close(self) -> None:
        tmux(self.sock, "kill-server", check=False)


def attach_argv(sock: str) -> list[str]:
    return ["tmux", "-u", "-S", sock, "attach"]



# --- reporting helpers -----------------------------------------------------------------


class Log:
    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Ctx:
    """What every benchmark gets: the mode and a log."""

    quick: bool = False
    log: Log = field(default_factory=Log)


def wait_idle(pids: Iterable[int], quiet: float = 0.3, timeout: float = 15) -> None:
    """Until these processes used no CPU tick for ``quiet`` seconds (or ``timeout``)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    last = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sum(cpu_seconds(p) for p in pids)
        if now == last:
            return
        last = now


def cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}


def mem_of(groups: dict[str, list[int]]) -> dict[str, Mem]:
    out = {}
    for name, pids in groups.items():
        total = Mem()
        for p in pids:
            total = total + memory(p)
        out[name] = total
    return out
