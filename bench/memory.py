"""4. Memory of the relay side with idle sessions, then with one mate per session.

For N idle sessions (1, 10, 100; ``--quick``: 1, 5) a fresh ``tether relay``
gets N real hosts (``tether new-session -d``, each with its agent); then one
mate (OpenSSH on a pty) joins each session. PSS comes from
/proc/PID/smaps_rollup of every relay-side process: the relay, the replica
workers, the replica tmux servers, their pane processes and the replica tmux
clients (the workers' control clients and the mates' clients). USS (private
memory) is recorded too: PSS splits shared pages with every process of the
same binary on this machine, hosts included.

Per session = (total - relay alone) / N; marginal = change from the previous
N divided by the added sessions. Per mate = (with mates - without) / N.
Floor: N plain tmux servers with one idle session each (per session), and a
plain tmux client attached to each (per mate).

Run alone: ``python3 -m bench.memory [--quick]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    PY,
    TMUX_CONF,
    Ctx,
    Drainer,
    Figure,
    HostSession,
    Mem,
    PlainTmux,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    cpu_of,
    mem_of,
    memory,
    processes,
    wait_for,
    write_host_home,
)

MIB = 1 << 20
SESSION_TARGET = 1.2 * MIB
MATE_TARGET = 0.6 * MIB
PANE_CMD = ["sleep", "2147483647"]


def _total(parts: dict[str, Mem]) -> Mem:
    total = Mem()
    for m in parts.values():
        total = total + m
    return total


def settle(measure: Callable[[], dict[str, Mem]], timeout: float = 30,
           samples: int = 3) -> list[dict[str, Mem]]:
    """Measure until the total PSS moved less than 0.5% between two readings, then
    return ``samples`` readings (the first is the one that showed it settled)."""
    last = _total(measure()).pss
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.3)
        reading = measure()
        now = _total(reading).pss
        if (last and abs(now - last) / last < 0.005) or time.monotonic() > deadline:
            break
        last = now
    out = [reading]
    for _ in range(samples - 1):
        time.sleep(0.1)
        out.append(measure())
    return out


def python_reference() -> dict[str, Mem]:
    """What an idle interpreter costs, bare and with the worker's imports: how much
    of a worker is Python itself."""
    code = {
        "python3, idle": "import time; time.sleep(600)",
        "python3 + import tether.relay.worker, idle":
            "import sys; sys.modules['ssl'] = None; import tether.relay.worker, time; "
            "time.sleep(600)",
    }
    out = {}
    for label, src in code.items():
        p = subprocess.Popen([PY, "-c", src], stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda p=p: _imported(p.pid), 30, f"{label} to start")
            out[label] = settle(lambda p=p: {"p": memory(p.pid)}, 10, 1)[0]["p"]
        finally:
            p.kill()
            p.wait()
    return out


def _imported(pid: int) -> bool:
    """The interpreter is asleep (its imports are done)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


def run(ctx: Ctx) -> list[Figure]:
    steps = [1, 5] if ctx.quick else [1, 10, 100]
    log = ctx.log
    figures: list[Figure] = []
    prev: tuple[int, float] | None = None
    reference: dict[str, Mem] = {}  # (sessions, sessions' PSS above the bare relay)
    for n in steps:
        with Workdir(f"mem{n}") as wd:
            relay = Relay(wd)
            home = wd.path / "host"
            write_host_home(home, relay.conf(), TMUX_CONF)
            env = wd.env(home)

            def measure(relay: Relay = relay) -> dict[str, Mem]:
                return mem_of(relay.parts())

            bare = settle(measure, 10, 1)[0]
            log(f"memory: starting {n} sessions")

            def start(i: int, wd: Workdir = wd, home: Path = home) -> HostSession:
                return HostSession(wd, home, f"h{i}", (80, 24))

            with ThreadPoolExecutor(8) as pool:
                hosts = list(pool.map(start, range(n)))

            def sessions_up(relay: Relay = relay, n: int = n) -> bool:
                p = relay.parts()
                # a worker and its tmux control client per session (--replica
                # worker), or neither (direct: the relay is the control client)
                workers = len(p["workers"])
                return (workers in (0, n) and len(p["replica tmux servers"]) == n
                        and len(p["replica tmux clients"]) == workers)

            wait_for(sessions_up, 60 + n, f"{n} replicas")
            idle = settle(measure)
            # what idle sessions cost in CPU: keep-alives, the agents' status polls
            groups = relay.parts()
            cpu0, t0 = cpu_of(groups), time.monotonic()
            time.sleep(3)
            cpu1, t1 = cpu_of(groups), time.monotonic()
            idle_cpu = {k: (cpu1[k] - cpu0[k]) / (t1 - t0) / n * 1000 for k in groups}
            log(f"memory: {n} mates joining")
            drainer = Drainer()
            mates = []
            for h in hosts:
                m = PtyProc(h.ssh(), env, (80, 25))
                wd.on_close(m.close)
                drainer.add(m)
                mates.append(m)

            def mates_up(relay: Relay = relay, n: int = n) -> bool:
                p = relay.parts()
                if p["workers"]:  # a tmux client process per mate, beside control clients
                    return len(p["replica tmux clients"]) == n + len(p["workers"])
                # direct: mates' clients are no processes; the relay says each joined
                return relay.log.read_text(errors="replace").count(" joined session ") >= n

            wd.on_close(drainer.close)  # runs before the ptys close
            wait_for(mates_up, 120 + n, f"{n} mates attached")
            with_mates = settle(measure)
            log(f"memory: floor with {n} plain tmux servers and clients")
            floors = [PlainTmux(wd, home, f"f{i}", (80, 24), PANE_CMD) for i in range(n)]

            # one /proc scan: the servers do not change
            socks = {f.sock for f in floors}
            server_pids = [p.pid for p in processes() if p.argv[0].rsplit("/", 1)[-1] == "tmux"
                           and "new-session" in p.argv and socks.intersection(p.argv)]

            def floor_servers(server_pids: list[int] = server_pids) -> dict[str, Mem]:
                return mem_of({"servers": server_pids})

            floor_idle = settle(floor_servers)
            clients = []
            for f in floors:
                c = PtyProc(attach_argv(f.sock), env, (80, 25))
                wd.on_close(c.close)
                drainer.add(c)
                clients.append(c)

            def floor_clients(clients: list[PtyProc] = clients) -> dict[str, Mem]:
                return {"clients": sum((memory(c.pid) for c in clients), Mem())}

            wait_for(lambda clients=clients: all(memory(c.pid).pss for c in clients), 20,
                     "plain tmux clients")
            floor_mates = settle(floor_clients)
            if n == steps[0] and not ctx.quick:
                reference = python_reference()
            log(f"memory: {n} done; cleaning up")
            for c in [*clients, *mates]:
                c.close()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(HostSession.close, hosts))

        base = _total(bare)
        idle_tot = [_total(m) for m in idle]
        mate_tot = [_total(m) for m in with_mates]
        per_session = [(t.pss - base.pss) / n for t in idle_tot]
        per_session_uss = [(t.uss - base.uss) / n for t in idle_tot]
        per_mate = [(w.pss - i.pss) / n for w, i in zip(mate_tot, idle_tot, strict=True)]
        floor_session = [_total(m).pss / n for m in floor_idle]
        floor_mate = [_total(m).pss / n for m in floor_mates]
        breakdown = {
            part: round((idle[-1][part].pss - bare[part].pss) / n / MIB, 3) for part in idle[-1]
        }
        mate_breakdown = {
            part: round((with_mates[-1][part].pss - idle[-1][part].pss) / n / MIB, 3)
            for part in idle[-1]
        }

        def fmt(parts: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if abs(v) >= 0.005)

        med = sorted(per_session)[len(per_session) // 2]
        figures += [
            Figure("memory", f"{n} idle sessions: relay side total", "B",
                   [t.pss for t in idle_tot],
                   note=f"relay alone {base.pss / MIB:.1f} MiB PSS; with mates "
                   f"{mate_tot[-1].pss / MIB:.1f} MiB",
                   extra={"bare": {k: vars(v) for k, v in bare.items()},
                          "idle": {k: vars(v) for k, v in idle[-1].items()},
                          "with_mates": {k: vars(v) for k, v in with_mates[-1].items()}}),
            Figure("memory", f"  {n} sessions: PSS per session", "B", per_session,
                   floor_session, "plain tmux server, one idle session",
                   f"<= {SESSION_TARGET / MIB:.1f} MiB", med <= SESSION_TARGET,
                   note=f"MiB per session: {fmt(breakdown)}; USS per session "
                   f"{sorted(per_session_uss)[len(per_session_uss) // 2] / MIB:.2f} MiB",
                   extra={"per_session_by_part_mib": breakdown}),
        ]
        if prev is not None:
            added = n - prev[0]
            marginal = [((t.pss - base.pss) - prev[1]) / added for t in idle_tot]
            mm = sorted(marginal)[len(marginal) // 2]
            figures.append(Figure("memory", f"  {prev[0]}->{n} sessions: marginal PSS", "B",
                                  marginal, floor_session, "plain tmux server, one idle session",
                                  f"<= {SESSION_TARGET / MIB:.1f} MiB", mm <= SESSION_TARGET))
        pm = sorted(per_mate)[len(per_mate) // 2]
        figures.append(Figure("memory", f"  {n} sessions: PSS per mate", "B", per_mate,
                              floor_mate, "plain tmux client", f"<= {MATE_TARGET / MIB:.1f} MiB",
                              pm <= MATE_TARGET,
                              note=f"MiB per mate: {fmt(mate_breakdown)}",
                              extra={"per_mate_by_part_mib": mate_breakdown}))
        busy = {k: round(v, 2) for k, v in idle_cpu.items() if v > 0}
        figures.append(Figure(
            "memory", f"  {n} idle sessions: relay-side CPU per session", "ms/s",
            [sum(idle_cpu.values())],
            note="CPU ms per second per idle session: "
            + (", ".join(f"{k} {v:.2f}" for k, v in busy.items()) or "none"),
            extra={"idle_cpu_ms_per_s_per_session": busy}))
        if n == steps[0] and reference:
            figures += [
                Figure("memory", f"  reference: {label}", "B", [m.pss],
                       note=f"USS {m.uss / MIB:.1f} MiB, RSS {m.rss / MIB:.1f} MiB")
                for label, m in reference.items()
            ]
        prev = (n, sorted(idle_tot, key=lambda t: t.pss)[len(idle_tot) // 2].pss - base.pss)
    return figures


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
