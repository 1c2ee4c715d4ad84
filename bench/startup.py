"""2. Start-up: `tether -S SOCK new-session -d` until `tether -S SOCK wait tether-ready` returns.

With a relay already running:

* cold: no tether process of this user is running yet;
* warm: a second session while another one is shared (its agent is forked
  by the zygote the first one left, ``tether.zygote``).

Floor: plain tmux doing the same two steps, ``tmux -S SOCK new-session -d`` then
``tmux -S SOCK display -p x``. Each round runs cold, floor, warm, floor.

The agent's own log (millisecond timestamps) splits the time into: the
``new-session`` command, the agent's start (interpreter, imports, config) up
to "connecting to relay", and the SSH connection and handshake up to the
session being shared. ``python -X importtime`` then lists the imports that
cost most, with the tether module that pulls each in.

Run alone: ``python3 -m bench.startup [--quick]``.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    PY,
    TMUX_CONF,
    BenchError,
    Ctx,
    Figure,
    HostSession,
    Relay,
    Workdir,
    percentile,
    processes,
    tether_cmd,
    wait_for,
    wait_idle,
    write_host_home,
)

WARM_TARGET_MS = 60.0
COLD_TARGET_MS = 400.0
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) \S+ (.*)$")


def _run(argv: list[str], env: dict[str, str], timeout: float = 30) -> None:
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")


@dataclass
class Timing:
    total: float
    command: float
    """``new-session`` returned"""
    agent_up: float | None = None
    """the agent logged "connecting to relay" (interpreter, imports, config done)"""
    shared: float | None = None
    """the agent logged the connection strings (SSH up, session created)"""


def _agent_marks(log: Path, since: float) -> tuple[float | None, float | None]:
    """Wall-clock times of the agent's "connecting" and "ssh session:" lines after ``since``."""
    up = shared = None
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, None
    for line in text.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t < since - 0.002:
            continue
        msg = m.group(3)
        if up is None and msg.startswith("connecting to relay"):
            up = t
        elif shared is None and msg.startswith("ssh session"):
            shared = t
    return up, shared


def tether_start(wd: Workdir, home: Path, name: str) -> tuple[Timing, HostSession]:
    env = wd.env(home)
    session = HostSession(wd, home, name, start=False)
    wall0 = time.time()
    t0 = time.perf_counter()
    _run(tether_cmd("-S", session.sock, "new-session", "-d", "-x", "80", "-y", "24"), env)
    wd.on_close(session.close)
    t1 = time.perf_counter()
    _run(tether_cmd("-S", session.sock, "wait", "tether-ready"), env)
    t2 = time.perf_counter()
    timing = Timing((t2 - t0) * 1000, (t1 - t0) * 1000)
    log = home / "state" / "tether" / f"agent-{name}.sock.log"
    up, shared = _agent_marks(log, wall0)
    if up is not None:
        timing.agent_up = (up - wall0) * 1000
    if shared is not None:
        timing.shared = (shared - wall0) * 1000
    return timing, session


def floor_start(wd: Workdir, home: Path, name: str) -> float:
    env = wd.env(home)
    sock = str(home / f"{name}.sock")
    t0 = time.perf_counter()
    _run(["tmux", "-S", sock, "-f", str(home / ".tmux.conf"), "new-session", "-d", "-x", "80",
          "-y", "24"], env)
    _run(["tmux", "-S", sock, "display", "-p", "x"], env)
    t1 = time.perf_counter()
    subprocess.run(["tmux", "-S", sock, "kill-server"], env=env, capture_output=True)
    return (t1 - t0) * 1000


def _zygotes(wd: Workdir) -> list[int]:
    """This benchmark's zygotes (``tether.zygote``), told by their environment."""
    mine = str(wd.path).encode()
    found = []
    for p in processes():
        if "_zygote" in p.argv:
            try:
                environ = Path(f"/proc/{p.pid}/environ").read_bytes()
            except OSError:
                continue
            if mine in environ:
                found.append(p.pid)
    return found


def _no_agents(wd: Workdir) -> bool:
    """Cold: neither an agent nor a zygote of this benchmark runs."""
    mine = str(wd.path)
    agents = any("_agent" in p.argv and mine in p.cmdline for p in processes())
    return not agents and not _zygotes(wd)


# --- python -X importtime ------------------------------------------------------------


@dataclass
class Imp:
    name: str
    self_us: int
    cum_us: int
    level: int
    children: list[Imp] = field(default_factory=list)
    parent: Imp | None = None


def parse_importtime(text: str) -> list[Imp]:
    """Top-level imports of one ``-X importtime`` run, as trees."""
    pending: dict[int, list[Imp]] = {}
    roots: list[Imp] = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_s, cum_s, name = line[len("import time:") :].split("|", 2)
        spaces = len(name) - len(name.lstrip(" "))
        level = max(0, (spaces - 1) // 2)
        node = Imp(name.strip(), int(self_s), int(cum_s), level)
        node.children = pending.pop(level + 1, [])
        for c in node.children:
            c.parent = node
        pending.setdefault(level, []).append(node)
        if level == 0:
            roots.append(node)
    return roots


def _walk(nodes: list[Imp]) -> list[Imp]:
    out = []
    todo = list(nodes)
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(n.children)
    return out


def _importer(n: Imp) -> str:
    p = n.parent
    while p is not None and not p.name.startswith("tether"):
        p = p.parent
    return p.name if p is not None else "(top level)"


def _chain(n: Imp) -> str:
    """The tether modules through which ``n`` is imported, outermost first."""
    names = []
    p = n.parent
    while p is not None:
        if p.name.startswith("tether"):
            names.append(p.name)
        p = p.parent
    return " > ".join(reversed(names))


def import_costs(module: str, runs: int) -> tuple[list[float], list[dict[str, object]]]:
    """Total import time of ``module`` per run (ms) and its heaviest non-tether imports."""
    totals: list[float] = []
    trees: list[list[Imp]] = []
    for _ in range(runs):
        p = subprocess.run([PY, "-X", "importtime", "-c", f"import {module}"],
                           capture_output=True, text=True, timeout=60)
        roots = parse_importtime(p.stderr)
        target = [r for r in roots if r.name == module]
        if not target:
            raise BenchError(f"python -X importtime -c 'import {module}' showed no {module}")
        # on top of the interpreter's own start (site and what it imported)
        totals.append(target[0].cum_us / 1000)
        trees.append(target)
    median = percentile(totals, 50)
    best = min(range(runs), key=lambda i: abs(totals[i] - median))
    heavy: dict[str, Imp] = {}
    for n in _walk(trees[best]):
        if n.name.startswith("tether"):
            continue
        top = n.name.split(".")[0]
        # the outermost import of each top-level package carries its whole cost
        if top not in heavy or heavy[top].cum_us < n.cum_us:
            heavy[top] = n
    ranked = sorted(heavy.values(), key=lambda n: -n.cum_us)[:10]
    tether_self = [n for n in _walk(trees[best]) if n.name.startswith("tether")]
    rows: list[dict[str, object]] = [
        {"module": n.name, "cumulative_ms": round(n.cum_us / 1000, 1),
         "imported_by": _importer(n), "chain": _chain(n)}
        for n in ranked
    ]
    rows.append({"module": "tether.* (own code, self time)",
                 "cumulative_ms": round(sum(n.self_us for n in tether_self) / 1000, 1),
                 "imported_by": module,
                 "heaviest": {n.name: round(n.self_us / 1000, 1) for n in
                              sorted(tether_self, key=lambda n: -n.self_us)[:4]}})
    return totals, rows


# --- the benchmark --------------------------------------------------------------------


def run(ctx: Ctx) -> list[Figure]:
    rounds = 1 if ctx.quick else 12
    log = ctx.log
    cold: list[Timing] = []
    warm: list[Timing] = []
    floor: list[float] = []
    cold_r: list[list[float]] = []
    warm_r: list[list[float]] = []
    floor_r: list[list[float]] = []
    with Workdir("startup") as wd:
        # sessions end soon after their host: the relay stays as idle as it started
        relay = Relay(wd, ["--host-away-timeout", "1"])
        home = wd.path / "host"
        write_host_home(home, relay.conf(), TMUX_CONF)
        if not ctx.quick:
            # one untimed session first: the relay's first session and the page cache
            _, s = tether_start(wd, home, "prime")
            s.close()
        log(f"startup: {rounds} rounds of cold, floor, warm, floor")
        def quiet(*extra: int) -> None:
            """Nothing of ours still busy (a session that just started or ended)."""
            parts = relay.parts()
            wait_idle([*parts["relay"], *parts["workers"], *extra], 0.2, 10)

        for r in range(rounds):
            wait_for(lambda: _no_agents(wd), 10, "no tether agent running")
            quiet()
            t, s = tether_start(wd, home, f"cold{r}")
            s.close()
            cold.append(t)
            f1 = floor_start(wd, home, f"floor{r}a")
            resident = HostSession(wd, home, f"resident{r}")
            # warm: the resident session's agent has started the zygote by now
            wait_for(lambda: bool(_zygotes(wd)), 10, "the zygote started")
            quiet(*(p for pids in resident.pids().values() for p in pids), *_zygotes(wd))
            t, s = tether_start(wd, home, f"warm{r}")
            s.close()
            resident.close()
            warm.append(t)
            f2 = floor_start(wd, home, f"floor{r}b")
            floor += [f1, f2]
            cold_r.append([cold[-1].total])
            warm_r.append([warm[-1].total])
            floor_r.append([f1, f2])
    log("startup: python -X importtime")
    imp_runs = 2 if ctx.quick else 7
    agent_imp, agent_rows = import_costs("tether.agent", imp_runs)
    worker_imp, worker_rows = import_costs("tether.relay.worker", imp_runs)
    cli_imp, cli_rows = import_costs("tether.cli", imp_runs)
    bare: list[float] = []
    for _ in range(imp_runs):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        bare.append((time.perf_counter() - t0) * 1000)

    def col(ts: list[Timing], attr: str) -> list[float]:
        return [v for t in ts if (v := getattr(t, attr)) is not None]

    figures = [
        Figure("startup", "cold: new-session -> ready", "ms", [t.total for t in cold], floor,
               "tmux new-session -d; tmux display", f"< {COLD_TARGET_MS:.0f} ms",
               percentile([t.total for t in cold], 50) < COLD_TARGET_MS, cold_r, floor_r),
        Figure("startup", "warm: 2nd session -> ready", "ms", [t.total for t in warm], floor,
               "tmux new-session -d; tmux display", f"< {WARM_TARGET_MS:.0f} ms",
               percentile([t.total for t in warm], 50) < WARM_TARGET_MS, warm_r, floor_r),
    ]
    for label, ts in (("cold", cold), ("warm", warm)):
        figures += [
            Figure("startup", f"  {label}: new-session command returns", "ms",
                   col(ts, "command")),
            Figure("startup", f"  {label}: agent up (imports, config)", "ms", col(ts, "agent_up"),
                   note="agent log 'connecting to relay', from the start of new-session"),
            Figure("startup", f"  {label}: session shared (ssh + relay)", "ms", col(ts, "shared"),
                   note="agent log 'ssh session:', from the start of new-session"),
        ]
    def top(rows: list[dict[str, object]], n: int) -> str:
        return "top imports: " + "; ".join(
            f"{r['module']} {r['cumulative_ms']} ms (via {r['imported_by']})" for r in rows[:n])

    figures += [
        Figure("startup", "python3 -c pass (interpreter start)", "ms", bare,
               note="every tether process pays this first (site and .pth files included)"),
        Figure("startup", "import tether.agent", "ms", agent_imp, note=top(agent_rows, 6),
               extra={"top_imports": agent_rows}),
        Figure("startup", "import tether.relay.worker", "ms", worker_imp,
               note=top(worker_rows, 4), extra={"top_imports": worker_rows}),
        Figure("startup", "import tether.cli", "ms", cli_imp, note=top(cli_rows, 3),
               extra={"top_imports": cli_rows}),
    ]
    return figures


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "startup", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
