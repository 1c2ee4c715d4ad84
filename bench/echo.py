"""1. Keystroke echo for a mate.

The host pane runs ``cat``; a mate's ``ssh`` runs under a pty the benchmark
reads. One printable character at a time is typed into the mate's terminal
(20 ms apart) and timed until it appears in the mate's output. The host has
its own terminal attached too, so each sample splits into the input path
(mate key -> host screen) and the output path (host screen -> mate screen).

Floor: a plain tmux server running ``cat`` with a local client on a pty the
benchmark reads directly. Keystrokes alternate tether / floor (A B B A ...).

Run alone: ``python3 -m bench.echo [--quick]``.
"""

from __future__ import annotations

import string
import sys
import time
from typing import Any

from bench.common import (
    TMUX_CONF,
    BenchError,
    Ctx,
    Figure,
    HostSession,
    Log,
    PlainTmux,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    cpu_of,
    wait_visible_all,
    write_host_home,
)

ALPHABET = (string.ascii_letters + string.digits).encode()
LINE = 60
"""keystrokes per line: then Enter (untimed), so cat's line buffer never fills
and no character repeats on a line"""
PACE = 0.020
TARGET_MS = 0.6
SIZE = (80, 24)


def _settle(*ptys: PtyProc) -> None:
    for p in ptys:
        p.wait_quiet(0.1, 10)


def measure_echo(mate: PtyProc, host_term: PtyProc, local: PtyProc, samples: int,
                 warm: int = 10, budget: float = 300) -> dict[str, Any]:
    """Keystrokes into the mate's ssh and the floor's tmux client, A B B A ..., each
    timed until visible; the host's own terminal is read too (the input path).
    Stops early after ``budget`` seconds (a relay too busy to echo)."""
    deadline = time.monotonic() + budget
    stopped = False
    mate_ms: list[float] = []
    input_ms: list[float] = []
    output_ms: list[float] = []
    floor_ms: list[float] = []
    lost = {"tether": 0, "floor": 0}
    for p in (mate, local):
        p.write(b"\r")
    _settle(mate, local, host_term)
    for i in range(warm + samples):
        if time.monotonic() > deadline:
            stopped = True
            break
        ch = ALPHABET[i % LINE : i % LINE + 1]
        for side in ("tether", "floor") if i % 2 == 0 else ("floor", "tether"):
            time.sleep(PACE)
            if side == "tether":
                mate.drain()
                host_term.drain()
                t0 = time.perf_counter()
                mate.write(ch)
                try:
                    t_mate, t_host = wait_visible_all([(mate, ch), (host_term, ch)], 5)
                except BenchError:
                    lost["tether"] += 1
                    _settle(mate, host_term)
                    continue
                if i >= warm:
                    mate_ms.append((t_mate - t0) * 1000)
                    input_ms.append((t_host - t0) * 1000)
                    output_ms.append((t_mate - t_host) * 1000)
            else:
                local.drain()
                t0 = time.perf_counter()
                local.write(ch)
                try:
                    t1 = local.wait_visible(ch, 5)
                except BenchError:
                    lost["floor"] += 1
                    _settle(local)
                    continue
                if i >= warm:
                    floor_ms.append((t1 - t0) * 1000)
        if (i + 1) % LINE == 0:
            mate.write(b"\r")
            local.write(b"\r")
            _settle(mate, local, host_term)
    return {"mate": mate_ms, "input": input_ms, "output": output_ms, "floor": floor_ms,
            "lost": lost, "stopped": stopped}


def echo_rig(wd: Workdir, relay: Relay, log: Log
             ) -> tuple[HostSession, PtyProc, PtyProc, PtyProc]:
    """A shared host pane running ``cat`` with the host's own terminal on it, a mate's
    ``ssh`` joined to it, and the floor (a plain tmux running ``cat`` with a local
    client): (host, host terminal, mate, floor client), once every path echoes."""
    home = wd.path / "host"
    write_host_home(home, relay.conf(), TMUX_CONF + "set -g status off\n")
    env = wd.env(home)
    host = HostSession(wd, home, "host", SIZE, ["cat"])
    floor = PlainTmux(wd, home, "floor", SIZE, ["cat"])
    host_term = PtyProc(attach_argv(host.sock), env, SIZE)
    wd.on_close(host_term.close)
    mate = PtyProc(host.ssh(), env, (SIZE[0], SIZE[1] + 1))
    wd.on_close(mate.close)
    local = PtyProc(attach_argv(floor.sock), env, SIZE)
    wd.on_close(local.close)
    log("echo: waiting for the mate to attach")
    # the first character typed proves every path is up
    deadline = time.monotonic() + 30
    while True:
        mate.drain()
        mate.write(b"!")
        try:
            wait_visible_all([(mate, b"!"), (host_term, b"!")], 3)
            break
        except BenchError:
            if time.monotonic() > deadline:
                raise
    local.write(b"!")
    local.wait_visible(b"!", 10)
    return host, host_term, mate, local


def run(ctx: Ctx) -> list[Figure]:
    samples = 40 if ctx.quick else 330
    warm = 10
    log = ctx.log
    with Workdir("echo") as wd:
        relay = Relay(wd)
        host, host_term, mate, local = echo_rig(wd, relay, log)
        for p in (mate, local):
            p.write(b"\r")
        _settle(mate, local, host_term)

        groups = {**host.pids(), **relay.parts(), "mate ssh": [mate.pid]}
        cpu0 = cpu_of(groups)
        log(f"echo: {samples} keystrokes each, tether and floor interleaved")
        got = measure_echo(mate, host_term, local, samples, warm, budget=3600)
        mate_ms, input_ms, output_ms, floor_ms = (
            got["mate"], got["input"], got["output"], got["floor"])
        lost = got["lost"]
        cpu1 = cpu_of(groups)
        typed = warm + samples - lost["tether"]
        # every keystroke plus a little idle time (keep-alives, the status poll)
        cpu_per_key = {k: (cpu1[k] - cpu0[k]) * 1000 / typed for k in groups}

    def rounds(xs: list[float]) -> list[list[float]]:
        return [xs[k : k + LINE] for k in range(0, len(xs), LINE)]

    delta = (sorted(mate_ms)[len(mate_ms) // 2] - sorted(floor_ms)[len(floor_ms) // 2]
             if mate_ms and floor_ms else float("nan"))
    note = f"lost keystrokes: tether {lost['tether']}, floor {lost['floor']}"
    main = Figure(
        "echo", "mate keystroke echo", "ms", mate_ms, floor_ms,
        "plain tmux local client", f"median within {TARGET_MS} ms of the floor",
        delta <= TARGET_MS, rounds(mate_ms), rounds(floor_ms), note,
    )
    parts = [
        Figure("echo", "  input: mate key -> host screen", "ms", input_ms, floor_ms,
               "plain tmux local client", rounds=rounds(input_ms), floor_rounds=rounds(floor_ms),
               note="host's own attached client shows the echo"),
        Figure("echo", "  output: host screen -> mate screen", "ms", output_ms,
               rounds=rounds(output_ms)),
    ]
    busy = {k: round(v, 3) for k, v in sorted(cpu_per_key.items(), key=lambda kv: -kv[1])
            if v > 0}
    parts.append(Figure(
        "echo", "  CPU per keystroke, all tether processes", "ms", [sum(cpu_per_key.values())],
        note="ms per keystroke: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()),
        extra={"cpu_ms_per_keystroke": busy}))
    return [main, *parts]


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "echo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
