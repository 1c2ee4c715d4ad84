"""1. Keystroke echo for a mate.

The host pane runs ``cat``; a mate's ``ssh`` runs under a pty the benchmark
reads. One printable character at a time is typed into the mate's terminal
(20 ms apart) and timed until it appears in the mate's output. The host has
its own terminal attached too, so each sample splits into the input path
(mate key -> host screen) and the output path (host screen -> mate screen).

A second mate, `tether join` (the host's printed ``#{tether_join}`` line), runs
on another pty the benchmark reads, in the same session: the key is typed
into its terminal (the local tmux client it attaches) and timed the same way.

Floor: a plain tmux server running ``cat`` with a local client on a pty the
benchmark reads directly. Keystrokes go round ssh / join / floor, each order
in turn (with two sides, A B B A ...).

Run alone: ``python3 -m bench.echo [--quick]``.
"""

from __future__ import annotations

import itertools
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
    JoinMate,
    Log,
    PlainTmux,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    cpu_of,
    percentile,
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
                 warm: int = 10, budget: float = 300,
                 join: PtyProc | None = None) -> dict[str, Any]:
    """Keystrokes into the mate's ssh, the join mate's terminal (if ``join``) and
    the floor's tmux client, each order of the three in turn (A B B A ... for
    two), each timed until visible; the host's own terminal is read too (the
    input path). Stops early after ``budget`` seconds (a relay too busy to echo).

    Both mates type into the one ``cat``: each gets its own characters, so a
    line never shows one twice, and a line ends after ``LINE`` of them."""
    deadline = time.monotonic() + budget
    stopped = False
    sides = ["tether", "join", "floor"] if join is not None else ["tether", "floor"]
    orders = list(itertools.permutations(sides))
    mates = {"tether": mate, **({"join": join} if join is not None else {})}
    per_line = LINE // len(mates)
    """rounds per line: every mate types one character a round"""
    got: dict[str, list[float]] = {k: [] for k in (
        "mate", "input", "output", "floor", "join", "join_input", "join_output")}
    keys = {"tether": ("mate", "input", "output"),
            "join": ("join", "join_input", "join_output")}
    lost = dict.fromkeys(sides, 0)
    ptys = [*mates.values(), local, host_term]
    for p in (mate, local):
        p.write(b"\r")
    _settle(*ptys)
    for i in range(warm + samples):
        if time.monotonic() > deadline:
            stopped = True
            break
        k = i % per_line
        for side in orders[i % len(orders)]:
            time.sleep(PACE)
            if side in mates:
                m = mates[side]
                j = k * len(mates) + (0 if side == "tether" else 1)
                ch = ALPHABET[j : j + 1]
                m.drain()
                host_term.drain()
                t0 = time.perf_counter()
                m.write(ch)
                try:
                    t_mate, t_host = wait_visible_all([(m, ch), (host_term, ch)], 5)
                except BenchError:
                    lost[side] += 1
                    _settle(*ptys)
                    continue
                if i >= warm:
                    whole, inp, out = keys[side]
                    got[whole].append((t_mate - t0) * 1000)
                    got[inp].append((t_host - t0) * 1000)
                    got[out].append((t_mate - t_host) * 1000)
            else:
                ch = ALPHABET[k : k + 1]
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
                    got["floor"].append((t1 - t0) * 1000)
        if (i + 1) % per_line == 0:
            mate.write(b"\r")  # ends the shared line for both mates
            local.write(b"\r")
            _settle(*ptys)
    return {**got, "lost": lost, "stopped": stopped, "per_line": per_line}


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


def join_rig(wd: Workdir, host: HostSession, host_term: PtyProc, log: Log) -> JoinMate:
    """A second mate on the host's session: the host's printed `tether join` line on
    a pty of its own (the mate's home with the host's ~/.tmux.conf, the same size
    as the ssh mate's terminal), once a key typed in it shows on both screens."""
    home = wd.path / "join-mate"
    home.mkdir()
    # timed on the host's real echo, as the ssh mate is: local echo (which shows a
    # key before the host echoes it) has a benchmark of its own, bench/local_echo.py
    (home / ".tmux.conf").write_text((wd.path / "host" / ".tmux.conf").read_text()
                                     + "\nset -g @tether-predict never\n")
    line = host.join_line()
    join = JoinMate(line, wd.env(home), (SIZE[0], SIZE[1] + 1))
    wd.on_close(join.close)
    log("echo: waiting for the join mate to attach")
    join.wait_attached(40)
    # its keys typed before the attach are the pty's own echo: only now is a key
    # seen on both screens proof that the path is up
    deadline = time.monotonic() + 30
    while True:
        join.drain()
        host_term.drain()
        join.write(b"?")
        try:
            wait_visible_all([(join, b"?"), (host_term, b"?")], 3)
            break
        except BenchError:
            if time.monotonic() > deadline:
                raise
    return join


def _ratios(a: list[float], b: list[float]) -> str:
    """a / b at the median, p90 and p99."""
    if not a or not b:
        return "-"
    return ", ".join(f"{q} {percentile(a, p) / percentile(b, p):.2f}"
                     for q, p in (("median", 50), ("p90", 90), ("p99", 99)))


def run(ctx: Ctx) -> list[Figure]:
    samples = 40 if ctx.quick else 330
    warm = 10
    log = ctx.log
    with Workdir("echo") as wd:
        relay = Relay(wd)
        host, host_term, mate, local = echo_rig(wd, relay, log)
        join = join_rig(wd, host, host_term, log)
        for p in (mate, local):
            p.write(b"\r")
        _settle(mate, join, local, host_term)

        # the join's own processes once it settled on its link (QUIC: no ssh left)
        groups = {**host.pids(), **relay.parts(), "mate ssh": [mate.pid],
                  **{k: v for k, v in join.pids().items() if v}}
        cpu0 = cpu_of(groups)
        log(f"echo: {samples} keystrokes each, ssh mate, join mate and floor interleaved")
        got = measure_echo(mate, host_term, local, samples, warm, budget=3600, join=join)
        mate_ms, input_ms, output_ms, floor_ms = (
            got["mate"], got["input"], got["output"], got["floor"])
        join_ms, join_in, join_out = got["join"], got["join_input"], got["join_output"]
        lost = got["lost"]
        cpu1 = cpu_of(groups)
        typed = 2 * (warm + samples) - lost["tether"] - lost["join"]
        # every keystroke plus a little idle time (keep-alives, the status poll)
        cpu_per_key = {k: (cpu1[k] - cpu0[k]) * 1000 / typed for k in groups}

    def rounds(xs: list[float]) -> list[list[float]]:
        return [xs[k : k + LINE] for k in range(0, len(xs), LINE)]

    delta = (sorted(mate_ms)[len(mate_ms) // 2] - sorted(floor_ms)[len(floor_ms) // 2]
             if mate_ms and floor_ms else float("nan"))
    note = (f"ssh mate (a join mate on the session too); lost keystrokes: ssh "
            f"{lost['tether']}, join {lost['join']}, floor {lost['floor']}")
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
        Figure("echo", "join mate keystroke echo", "ms", join_ms, floor_ms,
               "plain tmux local client", rounds=rounds(join_ms),
               floor_rounds=rounds(floor_ms),
               note="`tether join` (the host's printed line) on the benchmark's pty, "
               "the same session and run as the ssh mate; join / ssh: "
               + _ratios(join_ms, mate_ms)),
        Figure("echo", "  join / ssh mate", "ms", join_ms, mate_ms, "ssh mate, same run",
               rounds=rounds(join_ms), floor_rounds=rounds(mate_ms),
               note="x floor = join median / ssh median"),
        Figure("echo", "  join input: mate key -> host screen", "ms", join_in, input_ms,
               "ssh mate's input", rounds=rounds(join_in), floor_rounds=rounds(input_ms)),
        Figure("echo", "  join output: host screen -> mate screen", "ms", join_out,
               output_ms, "ssh mate's output", rounds=rounds(join_out),
               floor_rounds=rounds(output_ms)),
    ]
    busy = {k: round(v, 3) for k, v in sorted(cpu_per_key.items(), key=lambda kv: -kv[1])
            if v > 0}
    join_own = sum(v for k, v in cpu_per_key.items() if k.startswith("join "))
    parts.append(Figure(
        "echo", "  CPU per keystroke, all tether processes", "ms", [sum(cpu_per_key.values())],
        note=f"both mates attached, per key typed by either ({typed}); the join mate's "
        f"own processes {join_own:.2f}, ms per keystroke: "
        + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()),
        extra={"cpu_ms_per_keystroke": busy, "keystrokes": typed}))
    return [main, *parts]


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "echo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
