"""Scale: how many idle sessions one relay holds, and one mate's echo among them.

One ``tether relay`` on loopback holds one *active* session (a real host,
``tether new-session`` running ``cat``, with its own terminal attached and a mate
on OpenSSH under a pty) and N *idle* sessions (N = 0, 100, 1,000; ``--quick``:
0, 10). Real agents cost ~30 MB each, so the idle sessions come from fake hosts
(``bench/scale_fleet.py``): one Python process (asyncio + asyncssh) that opens one
SSH connection per session as ``tether-host`` with its own ed25519 key, each
driven by the host's protocol endpoint (``tether.core.host_endpoint``): ``Hello``,
``Welcome``, the snapshot a real agent would send for a fresh 80x24 session
(structure, status options and key bindings read from a plain tmux server with
the benchmark's ~/.tmux.conf, and a pane image of a shell screen), the relay's
``Ack`` (the jailed replica worker and its tmux server applied it), then a ping
a second, as an idle agent sends.
The fleet grows between steps (0 -> 100 -> 1,000), so each step adds sessions.

For each N: relay-side PSS (every process ``Relay.parts()`` finds: the relay,
bwrap, replica workers, replica tmux servers, their panes, replica tmux clients)
in total and per idle session (change from N = 0 divided by N); relay-side CPU
per second while idle, over a few seconds; the time the fake hosts took to start
the step's sessions (8 at a time); and the mate's keystroke echo with N idle
sessions, measured as bench/echo.py measures it (one printable key every 20 ms,
timed until it is visible), interleaved with the floor, a plain tmux server
running ``cat`` with a local client.

Finally an extrapolation from the largest N: sessions that fit in
min(24 GiB, MemTotal) of PSS, on 2 cores of idle CPU, and in the one core the
relay process (a single asyncio thread) can use; the note says which binds.

Guards: before a step, the memory it needs is estimated from the previous step
(relay-side PSS plus the fake hosts' own PSS per session; 24 MiB per session
before any was measured); a step that would take more than 80% of MemAvailable
is skipped, with the larger ones. The fleet stops starting sessions after 10
minutes; that step is measured with what came up and the larger ones skipped.

The fake hosts run at nice 10 (real hosts would be on other machines: the relay
and the measured session go first) and count the pings they send and the pongs
they get back, so a relay (or a fleet) that falls behind shows in the notes.
They replicate over SSH only; real agents move to QUIC when UDP gets through,
which costs the relay differently per ping.

Run alone: ``python3 -m bench.scale [--quick]``.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    Ctx,
    Figure,
    Mem,
    Relay,
    Workdir,
    cpu_of,
    mem_of,
    percentile,
    wait_for,
)
from bench.echo import LINE, SIZE, echo_rig, measure_echo
from bench.memory import settle
from bench.scale_fleet import (
    CONCURRENCY,
    PING_EVERY,
    START_LIMIT,
    Fleet,
    snapshot_payload,
)

MIB = 1 << 20
GIB = 1 << 30
MEM_LIMIT = 24 * GIB
CORES = 2
FIRST_GUESS = 24 * MIB
"""PSS per session assumed before any was measured"""
MEM_SHARE = 0.8


# --- echo, as bench/echo.py measures it ---------------------------------------------


def _rounds(xs: list[float]) -> list[list[float]]:
    return [xs[k : k + LINE] for k in range(0, len(xs), LINE)]


# --- helpers ---------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            words = rest.split()
            if words and words[0].isdigit():
                out[name] = int(words[0]) * 1024
    return out


def _total(parts: dict[str, Mem]) -> Mem:
    total = Mem()
    for m in parts.values():
        total = total + m
    return total


def _median(xs: list[float]) -> float:
    return percentile(xs, 50) if xs else math.nan


def _raise_nofile() -> None:
    """A relay with 1,000 sessions holds several thousand descriptors; so do the
    fake hosts. Children inherit the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _cpu_rates(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """CPU ms per second of each group over ``seconds``."""
    c0, t0 = cpu_of(groups), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_of(groups), time.monotonic()
    return {k: (c1[k] - c0[k]) * 1000 / (t1 - t0) for k in groups}


def _fmt_parts(parts: dict[str, float], unit: str, digits: int = 2) -> str:
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in parts.items()
                     if abs(v) >= 0.5 * 10 ** -digits) + f" {unit}" if parts else "none"


# --- the benchmark -----------------------------------------------------------------------


def run(ctx: Ctx) -> list[Figure]:
    steps = [0, 10] if ctx.quick else [0, 100, 1000]
    samples = 40 if ctx.quick else 300
    cpu_window = 3.0 if ctx.quick else 10.0
    log = ctx.log
    figures: list[Figure] = []
    _raise_nofile()
    with Workdir("scale") as wd:
        cap = str(max(steps) + 16)
        relay = Relay(wd, ["--max-sessions", cap, "--max-sessions-per-key", cap])
        host, host_term, mate, local = echo_rig(wd, relay, log)
        ptys = (mate, host_term, local)

        def drain_all() -> None:
            for p in ptys:
                p.drain()

        payload_file = wd.path / "snapshot.bin"
        payload_file.write_bytes(snapshot_payload(wd, SIZE))

        def measure() -> dict[str, Mem]:
            return mem_of(relay.parts())

        fleets: list[Fleet] = []
        live = 0  # idle sessions asked for so far
        base: dict[str, Any] | None = None
        last: dict[str, Any] | None = None
        for n in steps:
            add = n - live
            if add < 0:
                continue
            try:
                skip = _guard(n, add, last, fleets, log)
                if skip:
                    figures.append(Figure("scale", f"{n} idle sessions: skipped", "",
                                          [], note=skip))
                    break
                started: dict[str, Any] | None = None
                if add:
                    log(f"scale: starting {add} idle sessions ({live} -> {n}), "
                        f"{CONCURRENCY} at a time")
                    fleet = Fleet(wd, relay.port, add, live, payload_file)
                    fleets.append(fleet)
                    started = fleet.wait_ready(START_LIMIT + 120, log, drain_all)
                    live += started["ok"]
                    log(f"scale: {started['ok']} up, {started['failed']} failed in "
                        f"{started['elapsed_s']:.1f}s")

                    def replicas_up(want: int = live + 1) -> bool:
                        drain_all()
                        # one replica tmux server per session, fed by the relay or
                        # (--replica worker) a worker process each
                        return len(relay.parts()["replica tmux servers"]) >= want

                    wait_for(replicas_up, 60 + live / 10, f"{live + 1} replicas", 0.5)
                drain_all()
                readings = settle(measure, 30 + live / 20)
                drain_all()
                groups = relay.parts()
                sessions = len(groups["replica tmux servers"]) - 1
                live_fleets = [f for f in fleets if f.proc.poll() is None]
                fleet_pids = [f.proc.pid for f in live_fleets]
                before = [f.stats(log) for f in live_fleets]
                rates = _cpu_rates({**groups, "fake hosts": fleet_pids,
                                    **{f"host {k}": v for k, v in host.pids().items()}},
                                   cpu_window)
                after = [f.stats(log) for f in live_fleets]
                pings = sum((b[0] - a[0]) / (b[2] - a[2]) for a, b in zip(before, after,
                                                                         strict=True))
                pongs = sum((b[1] - a[1]) / (b[2] - a[2]) for a, b in zip(before, after,
                                                                         strict=True))
                fleet_mem = mem_of({"fleet": fleet_pids})["fleet"]
                drain_all()
                log(f"scale: mate echo with {sessions} idle sessions, {samples} keystrokes "
                    "each, tether and floor interleaved")
                echo = measure_echo(mate, host_term, local, samples)
                lost = sum(f.poll_lost(log) for f in fleets)
                step = {"n": n, "sessions": sessions, "readings": readings, "rates": rates,
                        "pings": pings, "pongs": pongs,
                        "fleet_mem": fleet_mem, "echo": echo, "started": started,
                        "lost": lost, "groups": list(groups)}
                if base is None:
                    base = step
                figures += _figures(step, base)
                last = step
                if started and started["stopped_early"]:
                    note = (f"starting sessions took longer than {START_LIMIT:.0f}s: "
                            f"stopped at {live} of {n}; larger steps skipped")
                    log(f"scale: {note}")
                    figures.append(Figure("scale", f"{n} idle sessions: stopped early", "",
                                          [], note=note))
                    break
            except Exception as exc:
                if not figures:
                    raise
                log(f"scale: step {n} failed: {exc}")
                figures.append(Figure("scale", f"{n} idle sessions: FAILED", "", [],
                                      note=f"{type(exc).__name__}: {exc}"))
                break
        log("scale: cleaning up")
        for f in fleets:
            f.close()
    if base is not None and last is not None and last["sessions"] > 0:
        figures.append(_fit(base, last))
    return figures


def _guard(n: int, add: int, last: dict[str, Any] | None, fleets: list[Fleet],
           log: Callable[[str], None]) -> str:
    """Why step ``n`` must be skipped ('' if it may run)."""
    if add <= 0:
        return ""
    per = FIRST_GUESS
    how = f"{FIRST_GUESS / MIB:.0f} MiB per session, a first guess"
    if last is not None and last["sessions"] > 0:
        relay_side = last["per_session_pss"]
        fleet_side = last["fleet_mem"].pss / max(1, sum(f.count for f in fleets))
        per = relay_side + fleet_side
        how = (f"{per / MIB:.1f} MiB per session as measured with {last['sessions']} "
               f"(relay side {relay_side / MIB:.1f}, fake hosts {fleet_side / MIB:.2f})")
    need = add * per
    avail = meminfo().get("MemAvailable", 0)
    log(f"scale: {add} more sessions need about {need / GIB:.2f} GiB ({how}); "
        f"MemAvailable {avail / GIB:.2f} GiB")
    if need > MEM_SHARE * avail:
        why = (f"skipped: {add} more sessions need about {need / GIB:.2f} GiB ({how}), more "
               f"than {MEM_SHARE:.0%} of MemAvailable {avail / GIB:.2f} GiB; larger steps "
               "skipped too")
        log(f"scale: {why}")
        return why
    return ""


def _figures(step: dict[str, Any], base: dict[str, Any]) -> list[Figure]:
    n, sessions = step["n"], step["sessions"]
    readings: list[dict[str, Mem]] = step["readings"]
    totals = [_total(r) for r in readings]
    base_tot = _median([float(_total(r).pss) for r in base["readings"]])
    base_uss = _median([float(_total(r).uss) for r in base["readings"]])
    rates: dict[str, float] = step["rates"]
    parts: list[str] = step["groups"]
    relay_cpu = sum(rates[k] for k in parts)
    by_part_mib = {k: readings[-1][k].pss / MIB for k in parts}
    label = f"{n} idle sessions" if sessions == n else f"{n} idle sessions ({sessions} up)"
    out = [Figure(
        "scale", f"{label}: relay-side PSS total", "B", [float(t.pss) for t in totals],
        note=f"MiB: {_fmt_parts(by_part_mib, 'MiB', 1)}; includes the active session "
        f"and its mate; USS {totals[-1].uss / MIB:.1f} MiB",
        extra={"by_part": {k: vars(v) for k, v in readings[-1].items()}})]
    step["per_session_pss"] = math.nan
    step["cpu_per_session"] = step["relay_cpu_per_session"] = math.nan
    if sessions > 0:
        per = [(t.pss - base_tot) / sessions for t in totals]
        per_uss = _median([(t.uss - base_uss) / sessions for t in totals])
        step["per_session_pss"] = _median(per)
        per_part = {k: (readings[-1][k].pss - base["readings"][-1][k].pss) / sessions / MIB
                    for k in parts}
        out.append(Figure(
            "scale", f"  {n} idle: PSS per idle session", "B", per,
            note=f"(total - total at N=0) / {sessions}; MiB per session: "
            f"{_fmt_parts(per_part, 'MiB')}; USS per session {per_uss / MIB:.2f} MiB",
            extra={"per_session_by_part_mib": {k: round(v, 3) for k, v in per_part.items()}}))
    busy = {k: v for k, v in rates.items() if k in parts and v > 0}
    others = {k: v for k, v in rates.items() if k not in parts}
    cpu_note = (f"ms/s: {_fmt_parts(busy, 'ms/s')}; outside the relay: "
                f"{_fmt_parts(others, 'ms/s')}")
    if sessions > 0:
        cpu_note += (f"; fake hosts sent {step['pings']:.0f} pings/s (want "
                     f"{sessions / PING_EVERY:.0f}), got {step['pongs']:.0f} pongs/s")
    out.append(Figure("scale", f"  {n} idle: relay-side CPU", "ms/s", [relay_cpu],
                      note=cpu_note, extra={"cpu_ms_per_s": {k: round(v, 3)
                                                             for k, v in rates.items()}}))
    if sessions > 0:
        base_cpu = sum(base["rates"][k] for k in base["groups"])
        per_cpu = (relay_cpu - base_cpu) / sessions
        per_relay = (rates["relay"] - base["rates"]["relay"]) / sessions
        step["cpu_per_session"], step["relay_cpu_per_session"] = per_cpu, per_relay
        per_ping = ((rates["relay"] - base["rates"]["relay"]) / step["pings"]
                    if step["pings"] > 0 else math.nan)
        out.append(Figure(
            "scale", f"  {n} idle: relay-side CPU per idle session", "ms/s", [per_cpu],
            note=f"(CPU - CPU at N=0) / {sessions}; of which the relay process "
            f"{per_relay:.3f} ms/s, {per_ping:.3f} ms per ping",
            extra={"relay_process_ms_per_s": per_relay, "relay_process_ms_per_ping": per_ping,
                   "pings_per_s": step["pings"], "pongs_per_s": step["pongs"]}))
    started = step["started"]
    if started:
        lat = started["latencies_ms"]
        out.append(Figure(
            "scale", f"  {n} idle: time to start {started['ok'] + started['failed']} "
            "sessions", "s", [started["elapsed_s"]],
            note=f"{CONCURRENCY} at a time; each Hello -> snapshot acked: median "
            f"{_median(lat):.0f} ms, p90 {percentile(lat, 90) if lat else math.nan:.0f} ms, "
            f"p99 {percentile(lat, 99) if lat else math.nan:.0f} ms; {started['ok']} up, "
            f"{started['failed']} failed" + (f" ({'; '.join(started['errors'])})"
                                             if started["errors"] else ""),
            extra={"per_session_ms": lat}))
    echo = step["echo"]
    out.append(Figure(
        "scale", f"  {n} idle: mate keystroke echo", "ms", echo["mate"], echo["floor"],
        "plain tmux local client", rounds=_rounds(echo["mate"]),
        floor_rounds=_rounds(echo["floor"]),
        note=f"lost keystrokes: tether {echo['lost']['tether']}, floor "
        f"{echo['lost']['floor']}; input path (mate key -> host screen) median "
        f"{_median(echo['input']):.2f} ms"
        + (f"; fake hosts lost so far: {step['lost']}" if step["lost"] else "")
        + ("; stopped early: the time budget ran out" if echo["stopped"] else ""),
        extra={"input_ms": echo["input"]}))
    return out


def _fit(base: dict[str, Any], last: dict[str, Any]) -> Figure:
    total = meminfo().get("MemTotal", MEM_LIMIT)
    limit = min(MEM_LIMIT, total)
    per_mem = last["per_session_pss"]
    per_cpu = last["cpu_per_session"]
    per_relay = last["relay_cpu_per_session"]
    want = last["sessions"] / PING_EVERY

    def fits(budget: float, per: float) -> float:
        return math.floor(budget / per) if per > 0 and math.isfinite(per) else math.inf

    bounds = {
        f"memory ({limit / GIB:.1f} GiB / {per_mem / MIB:.2f} MiB PSS)": fits(limit, per_mem),
        f"CPU ({CORES} cores x 1000 ms/s / {per_cpu:.3f} ms/s)": fits(CORES * 1000, per_cpu),
        f"relay process (one asyncio thread: 1000 ms/s / {per_relay:.3f} ms/s)":
            fits(1000, per_relay),
    }
    binding = min(bounds, key=lambda k: bounds[k])
    value = bounds[binding]
    shown = "; ".join(f"{k}: {'unbounded' if math.isinf(v) else f'{v:.0f}'}"
                      for k, v in bounds.items())
    return Figure(
        "scale", f"sessions that fit: {CORES} cores, {limit / GIB:.1f} GiB (extrapolated)",
        "sessions", [float(value)] if math.isfinite(value) else [],
        note=f"from {last['sessions']} idle sessions; {binding.split(' (')[0]} binds; {shown}"
        + ("; idle CPU per session not measurable (no more than at N=0)"
           if not per_cpu > 0 else "")
        + (f"; the fake hosts sent only {last['pings']:.0f} of {want:.0f} pings/s, so "
           "CPU per session is underestimated" if last["pings"] < 0.9 * want else ""),
        extra={"bounds": {k: (None if math.isinf(v) else v) for k, v in bounds.items()},
               "binds": binding, "from_sessions": last["sessions"],
               "baseline_sessions": base["sessions"]})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["_fleet"]:  # the fake hosts' old entry point
        import bench.scale_fleet

        return bench.scale_fleet.main(args[1:])
    import bench.run as runner

    if "scale" not in runner.BENCHMARKS:  # until bench/run.py lists it
        runner.BENCHMARKS.append("scale")
    return runner.main(["--only", "scale", *args])


if __name__ == "__main__":
    sys.exit(main())
