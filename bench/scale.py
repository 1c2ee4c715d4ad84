"""Scale: how many idle sessions one relay holds, and one mate's echo among them.

One ``tether relay`` on loopback holds one *active* session (a real host,
``tether new-session`` running ``cat``, with its own terminal attached and a mate
on OpenSSH under a pty) and N *idle* sessions (N = 0, 100, 1,000; ``--quick``:
0, 10). Real agents cost ~30 MB each, so the idle sessions come from fake hosts:
one Python process (asyncio + asyncssh, ``python3 -m bench.scale _fleet``) that
opens one SSH connection per session as ``tether-host`` with its own ed25519 key,
sends ``Hello``, waits for ``Welcome``, sends the snapshot a real agent would send
for a fresh 80x24 session (structure, status options and key bindings read from
a plain tmux server with the benchmark's ~/.tmux.conf, and a pane image of a
shell screen), waits for the relay's ``Ack`` (the jailed replica worker and its
tmux server applied it) and then pings once a second, as an idle agent does.
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

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    BenchError,
    Ctx,
    Figure,
    Mem,
    PlainTmux,
    Relay,
    Workdir,
    cpu_of,
    mem_of,
    percentile,
    wait_for,
)
from bench.echo import LINE, SIZE, echo_rig, measure_echo
from bench.memory import settle

MIB = 1 << 20
GIB = 1 << 30
MEM_LIMIT = 24 * GIB
CORES = 2
START_LIMIT = 600.0
"""seconds the fake hosts may take to start one step's sessions"""
CONCURRENCY = 8
"""sessions being started at once"""
PING_EVERY = 1.0
"""an idle agent pings once a second (tether.client.host.PING_IDLE)"""
FIRST_GUESS = 24 * MIB
"""PSS per session assumed before any was measured"""
MEM_SHARE = 0.8
ROOT = Path(__file__).resolve().parents[1]


# --- the fake hosts (a process of their own) -----------------------------------------


def _snapshot_payload(wd: Workdir) -> tuple[bytes, int]:
    """The first events a real agent sends for a fresh session, encoded: a snapshot
    read from a plain tmux server with the benchmark's tmux.conf (status on), then
    a pane image of a shell screen. Returns (frames, seq the relay acks last)."""
    from tether.client.host import (
        STATUS_FORMAT,
        WINDOW_FORMAT,
        HostAgent,
        parse_bindings,
        split_confirm,
    )
    from tether.core.messages import (
        STATUS_OPTIONS,
        Binding,
        Bindings,
        Event,
        PaneImage,
        PaneReset,
        Snapshot,
        Status,
    )

    tpl = PlainTmux(wd, wd.path / "template", "template", SIZE)
    try:
        lines = tpl.tmux("list-windows", "-F", WINDOW_FORMAT).encode().splitlines()
        structure = HostAgent._parse_windows(lines)
        values = tpl.tmux("display", "-p", STATUS_FORMAT).rstrip("\n").split("\x1f")[1:]
        values += [""] * (len(STATUS_OPTIONS) - len(values))
        status = Status(tuple(zip(STATUS_OPTIONS, values, strict=False)))
        keys = parse_bindings(tpl.tmux("list-keys").splitlines())
        prefix = tpl.tmux("show", "-gv", "prefix").strip() or "C-b"
    finally:
        tpl.close()
    if not structure.windows:
        raise BenchError("template tmux server showed no window")
    bindings = Bindings(prefix, tuple(Binding(t, k, split_confirm(c)[1])
                                      for (t, k), c in keys.items()))
    prompt = "\x1b[32mmate@box\x1b[0m:\x1b[34m~/src\x1b[0m$ "
    screen = "".join(f"{prompt}ls -l\r\n" + "".join(
        f"-rw-r--r-- 1 mate mate {1000 * i + 17:6d} Nov 27 10:{i:02d} file{i:02d}.py\r\n"
        for i in range(5)) for _ in range(3)) + prompt
    pane = structure.windows[0].active_pane
    image = PaneImage(pane, f"\x1bc\x1b[H\x1b[2J{screen}".encode())
    frames = (Event(1, Snapshot(structure, status, bindings)).encode()
              + Event(2, PaneReset(image)).encode())
    return frames, 2


class _FakeHost:
    def __init__(self, index: int, counts: dict[str, int]) -> None:
        self.index = index
        self.counts = counts
        self.conn: Any = None
        self.writer: Any = None
        self.reader: Any = None
        self.decoder: Any = None

    async def start(self, port: int, payload: bytes, ack_seq: int) -> float:
        """Hello, Welcome, the snapshot, until its Ack; seconds it took."""
        import asyncssh

        from tether.core.messages import (
            PROTOCOL_VERSION,
            Ack,
            Error,
            Hello,
            MessageDecoder,
            Welcome,
        )

        t0 = time.perf_counter()
        key = asyncssh.generate_private_key("ssh-ed25519")
        conn = await asyncssh.connect(
            "127.0.0.1", port, username="tether-host", client_keys=[key], known_hosts=None,
            agent_path=None, connect_timeout=30, keepalive_interval=10, keepalive_count_max=3)
        try:
            writer, reader, _ = await conn.open_session(subsystem="tether", encoding=None)
            writer.write(Hello(PROTOCOL_VERSION, "tether-host").encode())
            decoder = MessageDecoder()
            welcomed = acked = False
            while not acked:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the relay closed the channel")
                for m in decoder.feed(data):
                    if isinstance(m, Error):
                        raise ConnectionError(f"relay: {m.message}")
                    if isinstance(m, Welcome) and not welcomed:
                        welcomed = True
                        writer.write(payload)
                    elif isinstance(m, Ack) and m.seq >= ack_seq:
                        acked = True
        except BaseException:
            conn.close()
            raise
        self.conn, self.writer, self.reader, self.decoder = conn, writer, reader, decoder
        return time.perf_counter() - t0

    async def live(self) -> str:
        """Ping once a second and read whatever comes (pongs, acks, resizes) until
        the connection ends; why it ended."""
        from tether.core.messages import Error, Ping, Pong

        async def read() -> str:
            while data := await self.reader.read(65536):
                for m in self.decoder.feed(data):
                    if isinstance(m, Pong):
                        self.counts["pongs"] += 1
                    elif isinstance(m, Error):
                        return f"relay: {m.message}"
            return "connection closed"

        reading = asyncio.create_task(read())
        token = 0
        # spread the pings over the second, as hosts started at random times would
        await asyncio.sleep(random.random() * PING_EVERY)
        try:
            while not reading.done():
                token += 1
                self.writer.write(Ping(token).encode())
                self.counts["pings"] += 1
                await asyncio.sleep(PING_EVERY)
            return reading.result()
        except Exception as exc:  # the channel closed under a write
            return f"{type(exc).__name__}: {exc}"
        finally:
            reading.cancel()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _say(*words: object) -> None:
    print(*words, flush=True)


async def _fleet(a: argparse.Namespace) -> int:
    payload = Path(a.payload).read_bytes()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counts = {"pings": 0, "pongs": 0}
    # the benchmark holds our stdin: "stats" asks for the counters; its end (the
    # benchmark is gone) ends us too
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def watch_stdin() -> None:
        while line := await stdin.readline():
            if line.strip() == b"stats":
                _say("STATS", counts["pings"], counts["pongs"], time.monotonic())
        stop.set()

    watcher = asyncio.create_task(watch_stdin())
    hosts: list[_FakeHost] = []
    lives: set[asyncio.Task[None]] = set()
    latencies: list[float] = []
    errors: list[str] = []
    failed = 0
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    deadline = t0 + a.deadline
    last_report = t0

    async def keep(h: _FakeHost) -> None:
        why = await h.live()
        if not stop.is_set():
            _say("LOST", h.index, why)

    async def slot(i: int) -> None:
        nonlocal failed, last_report
        async with sem:
            last: BaseException | None = None
            for _attempt in range(3):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                h = _FakeHost(a.first + i, counts)
                try:
                    async with asyncio.timeout(60):
                        latencies.append(await h.start(a.port, payload, a.ack_seq))
                except Exception as exc:
                    last = exc
                    continue
                hosts.append(h)
                task = asyncio.create_task(keep(h))
                lives.add(task)
                task.add_done_callback(lives.discard)
                break
            else:
                failed += 1
                if len(errors) < 5:
                    errors.append(f"session {a.first + i}: {type(last).__name__}: {last}")
            now = time.monotonic()
            if now - last_report >= 5:
                last_report = now
                _say("PROGRESS", len(hosts), failed, a.count, round(now - t0, 1))

    starting = asyncio.gather(*(slot(i) for i in range(a.count)))
    await asyncio.wait([starting, asyncio.create_task(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        _say("READY", json.dumps({
            "ok": len(hosts), "failed": failed, "elapsed_s": time.monotonic() - t0,
            "stopped_early": time.monotonic() > deadline and len(hosts) + failed < a.count,
            "latencies_ms": [round(x * 1000, 2) for x in latencies], "errors": errors,
        }))
        await stop.wait()
    starting.cancel()
    watcher.cancel()
    for t in list(lives):
        t.cancel()
    for h in hosts:
        h.close()
    return 0


def fleet_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.scale _fleet")
    ap.add_argument("--dir", required=True, help="the benchmark's workdir (names us for cleanup)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="index of the first session")
    ap.add_argument("--payload", required=True, help="file of the encoded snapshot events")
    ap.add_argument("--ack-seq", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    ap.add_argument("--deadline", type=float, default=START_LIMIT)
    a = ap.parse_args(argv)
    # the hosts would be elsewhere: the relay and the measured session go first
    os.nice(10)
    return asyncio.run(_fleet(a))


class Fleet:
    """The benchmark's handle on one fake-host process."""

    def __init__(self, wd: Workdir, port: int, count: int, first: int, payload: Path,
                 ack_seq: int) -> None:
        self.count = count
        self.stderr = wd.path / f"fleet-{first}.err"
        env = wd.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [PY, "-m", "bench.scale", "_fleet", "--dir", str(wd.path), "--port", str(port),
                 "--count", str(count), "--first", str(first), "--payload", str(payload),
                 "--ack-seq", str(ack_seq), "--concurrency", str(CONCURRENCY),
                 "--deadline", str(START_LIMIT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                cwd=str(ROOT), text=True)
        wd.on_close(self.close)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.lost: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _line(self, kind: str, rest: str, log: Callable[[str], None]) -> None:
        if kind == "LOST":
            self.lost.append(rest)
            if len(self.lost) <= 3:
                log(f"scale: fake host lost: {rest}")

    def wait_ready(self, timeout: float, log: Callable[[str], None],
                   tick: Callable[[], None]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"fake hosts not ready after {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                tick()
                continue
            if line is None:
                tail = self.stderr.read_text(errors="replace")[-800:]
                raise BenchError(f"the fake hosts exited ({self.proc.poll()}): {tail}")
            kind, _, rest = line.partition(" ")
            if kind == "READY":
                ready: dict[str, Any] = json.loads(rest)
                return ready
            if kind == "PROGRESS":
                ok, failed, count, elapsed = rest.split()
                log(f"scale: {ok}/{count} idle sessions up, {failed} failed, {elapsed}s")
            else:
                self._line(kind, rest, log)

    def stats(self, log: Callable[[str], None], timeout: float = 10) -> tuple[int, int, float]:
        """(pings sent, pongs received, when: time.monotonic()) so far."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            kind, _, rest = line.partition(" ")
            if kind == "STATS":
                pings, pongs, when = rest.split()
                return int(pings), int(pongs), float(when)
            self._line(kind, rest, log)
        raise BenchError(f"the fake hosts did not answer within {timeout:.0f}s")

    def poll_lost(self, log: Callable[[str], None]) -> int:
        with contextlib.suppress(queue.Empty):
            while (line := self.lines.get_nowait()) is not None:
                kind, _, rest = line.partition(" ")
                self._line(kind, rest, log)
        return len(self.lost)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


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

        payload, ack_seq = _snapshot_payload(wd)
        payload_file = wd.path / "snapshot.bin"
        payload_file.write_bytes(payload)

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
                    fleet = Fleet(wd, relay.port, add, live, payload_file, ack_seq)
                    fleets.append(fleet)
                    started = fleet.wait_ready(START_LIMIT + 120, log, drain_all)
                    live += started["ok"]
                    log(f"scale: {started['ok']} up, {started['failed']} failed in "
                        f"{started['elapsed_s']:.1f}s")

                    def replicas_up(want: int = live + 1) -> bool:
                        drain_all()
                        return len(relay.parts()["workers"]) >= want

                    wait_for(replicas_up, 60 + live / 10, f"{live + 1} replica workers", 0.5)
                drain_all()
                readings = settle(measure, 30 + live / 20)
                drain_all()
                groups = relay.parts()
                sessions = len(groups["workers"]) - 1
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
    if args[:1] == ["_fleet"]:
        return fleet_main(args[1:])
    import bench.run as runner

    if "scale" not in runner.BENCHMARKS:  # until bench/run.py lists it
        runner.BENCHMARKS.append("scale")
    return runner.main(["--only", "scale", *args])


if __name__ == "__main__":
    sys.exit(main())
