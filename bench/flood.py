"""3. Flood: the host pane ``cat``s a 50 MB text file, then prints a marker.

Timed from the Enter that starts ``cat`` until the marker shows on the host's
own terminal (a tmux client attached to the host's tmux, on a pty the
benchmark reads) and until it shows on a mate's screen (``ssh`` on a pty).
Floor: plain tmux with a local client on a pty, same file, same size.
Rounds alternate tether and floor. CPU seconds of every process involved come
from /proc/PID/stat (utime + stime) before and after each run.

Run alone: ``python3 -m bench.flood [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import (
    TMUX_CONF,
    Ctx,
    Figure,
    HostSession,
    PlainTmux,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    cpu_of,
    visible,
    wait_visible_all,
    wait_visible_some,
    write_host_home,
)

SIZE = (120, 40)
TERM_SIZE = (SIZE[0], SIZE[1] + 1)  # the status line
SHELL = ["env", "PS1=$ ", "/bin/sh"]
LAG_TARGET_S = 0.5
RATIO_TARGET = 1.6

WORDS = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         b"incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis").split()


def make_text(path: Path, size: int) -> int:
    """A plain-text file of about ``size`` bytes: numbered lines of words."""
    n = 0
    i = 0
    with open(path, "wb") as f:
        while n < size:
            chunk = []
            for _ in range(1000):
                k = i % len(WORDS)
                line = b"%08d " % i + b" ".join(WORDS[k:] + WORDS[:k])[:90] + b"\n"
                chunk.append(line)
                i += 1
            data = b"".join(chunk)
            f.write(data)
            n += len(data)
    return n


def _type_command(term: PtyProc, text: str) -> float:
    """Type ``text`` at the shell prompt, wait for its echo, then Enter: the start time."""
    term.write(text.encode())
    term.wait_visible(text[-12:].encode(), 20)
    t0 = time.perf_counter()
    term.write(b"\r")
    return t0


class TetherSide:
    """A shared session with the host's own terminal and one mate, all on ptys we read."""

    def __init__(self, wd: Workdir, home: Path, name: str) -> None:
        env = wd.env(home)
        self.home = home
        self.host = HostSession(wd, home, name, SIZE, SHELL)
        self.term = PtyProc(attach_argv(self.host.sock), env, TERM_SIZE)
        wd.on_close(self.term.close)
        self.mate = PtyProc(self.host.ssh(), env, TERM_SIZE)
        wd.on_close(self.mate.close)
        # everyone is up once a typed command's output shows everywhere
        self.term.write(b"echo READY-$((1+1))\r")
        wait_visible_all([(self.term, b"READY-2"), (self.mate, b"READY-2")], 30)
        for p in (self.term, self.mate):
            p.wait_quiet(0.3, 30)

    def agent_log_tail(self) -> str:
        path = self.home / "state" / "tether" / f"agent-{Path(self.host.sock).name}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-160:] if lines else ""

    def close(self) -> None:
        self.mate.close()
        self.term.close()
        self.host.close()


def run(ctx: Ctx) -> list[Figure]:
    size = (2 if ctx.quick else 50) * 1000 * 1000
    rounds = 1 if ctx.quick else 2
    log = ctx.log
    host_s: list[float] = []
    mate_s: list[float] = []
    lag_s: list[float] = []
    floor_s: list[float] = []
    cpu_t: list[dict[str, float]] = []
    cpu_f: list[dict[str, float]] = []
    stalls: list[str] = []
    deadline = 120.0 if ctx.quick else 600.0
    with Workdir("flood") as wd:
        text = wd.path / "flood.txt"
        size = make_text(text, size)
        relay = Relay(wd)
        home = wd.path / "host"
        write_host_home(home, relay.conf(), TMUX_CONF)
        env = wd.env(home)
        floor = PlainTmux(wd, home, "floor", SIZE, SHELL)
        floor_term = PtyProc(attach_argv(floor.sock), env, TERM_SIZE)
        wd.on_close(floor_term.close)
        floor_term.write(b"echo READY-$((1+1))\r")
        floor_term.wait_visible(b"READY-2", 10)
        floor_term.wait_quiet(0.3, 30)
        side: list[TetherSide] = [TetherSide(wd, home, "host0")]

        def tether_run(n: int) -> None:
            t = side[0]
            groups = {**t.host.pids(), **relay.parts(), "mate ssh": [t.mate.pid],
                      "host terminal client": [t.term.pid]}
            before = cpu_of(groups)
            marker = f"FLOOD-DONE-{40 + n}".encode()
            t0 = _type_command(t.term, f"cat {text}; echo FLOOD-DONE-$((40+{n}))")
            tails: list[bytes] = []
            t_host, t_mate = wait_visible_some([(t.term, marker), (t.mate, marker)], deadline,
                                               idle_timeout=60, tails=tails)
            if t_host is None or t_mate is None:
                # a stall is a finding, not a reason to lose the other runs
                last = visible(tails[1]).decode(errors="replace").strip().splitlines()
                stalls.append(
                    f"run {n}: the {'mate' if t_host is not None else 'host'} never showed "
                    f"the end marker (host after "
                    f"{'-' if t_host is None else f'{t_host - t0:.1f}s'}); mate's last line "
                    f"{last[-1][:40] if last else ''!r}; agent log: {t.agent_log_tail()!r}")
                log(f"flood: tether run {n} stalled; starting a fresh session")
                t.close()
                side[0] = TetherSide(wd, home, f"host{n + 1}")
                return
            for p in (t.term, t.mate):
                p.wait_quiet(0.5, 120)
            after = cpu_of(groups)
            host_s.append(t_host - t0)
            mate_s.append(t_mate - t0)
            lag_s.append(t_mate - t_host)
            cpu_t.append({k: after[k] - before[k] for k in groups})
            log(f"flood: tether host {t_host - t0:.2f}s mate {t_mate - t0:.2f}s")

        def floor_run(n: int) -> None:
            groups = {"tmux server": floor.server_pids(), "tmux client": [floor_term.pid]}
            before = cpu_of(groups)
            marker = f"FLOOD-DONE-{40 + n}"
            t0 = _type_command(floor_term, f"cat {text}; echo FLOOD-DONE-$((40+{n}))")
            t1 = floor_term.wait_visible(marker.encode(), deadline)
            floor_term.wait_quiet(0.5, 120)
            after = cpu_of(groups)
            floor_s.append(t1 - t0)
            cpu_f.append({k: after[k] - before[k] for k in groups})
            log(f"flood: floor {t1 - t0:.2f}s")

        log(f"flood: {size / 1e6:.0f} MB, {rounds} rounds of tether and floor")
        for r in range(rounds):
            order = (tether_run, floor_run) if r % 2 == 0 else (floor_run, tether_run)
            for fn in order:
                fn(2 * r + (fn is floor_run))

    mb = f"{size / 1e6:.0f} MB"
    stall_note = "; ".join(stalls)
    figures = [
        Figure("flood", f"cat {mb}: host screen shows marker", "s", host_s, floor_s,
               "plain tmux local client", rounds=[[x] for x in host_s],
               floor_rounds=[[x] for x in floor_s]),
        Figure("flood", f"cat {mb}: mate screen shows marker", "s", mate_s, floor_s,
               "plain tmux local client", f"< {RATIO_TARGET}x floor",
               not stalls and bool(mate_s and floor_s) and sorted(mate_s)[len(mate_s) // 2]
               < RATIO_TARGET * sorted(floor_s)[len(floor_s) // 2],
               [[x] for x in mate_s], [[x] for x in floor_s],
               note=f"STALLED {len(stalls)} of {rounds} runs: {stall_note}" if stalls else "",
               extra={"stalls": stalls}),
        Figure("flood", "  mate behind host", "s", lag_s, target=f"< {LAG_TARGET_S} s",
               met=not stalls and bool(lag_s) and sorted(lag_s)[len(lag_s) // 2] < LAG_TARGET_S,
               rounds=[[x] for x in lag_s]),
    ]
    names = list(cpu_t[0]) if cpu_t else []
    floor_total = [sum(c.values()) for c in cpu_f]
    idle = [n for n in names if not any(c[n] for c in cpu_t)]
    figures.append(Figure(
        "flood", "  CPU: all tether processes", "s", [sum(c.values()) for c in cpu_t],
        floor_total, "plain tmux server + client CPU",
        note=f"under one clock tick: {', '.join(idle)}" if idle else "",
        extra={"per_process": cpu_t, "floor_per_process": cpu_f}))
    for name in names:
        if name not in idle:
            figures.append(Figure("flood", f"  CPU: {name}", "s", [c[name] for c in cpu_t]))
    return figures


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "flood", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
