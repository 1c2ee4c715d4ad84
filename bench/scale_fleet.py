"""The scale benchmark's fake hosts: many idle sessions from one Python process.

Real agents cost ~30 MB each, so ``bench/scale.py`` starts its idle sessions
here (``python3 -m bench.scale_fleet``): one asyncio process that opens one SSH
connection per session as ``tether-host`` with its own ed25519 key and the
``tether`` subsystem, as a host agent without QUIC does. Each connection is
driven by a ``tether.core.host_endpoint.HostEndpoint``, the host's end of the
session protocol: it says ``Hello``, asks for the snapshot once welcomed, pings
(once a second while idle), answers the relay's pings and gives up a link the
relay leaves silent. The fake host only moves bytes, logs the snapshot the
endpoint asks for, and sleeps until data comes or ``next_timer()`` is due.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from bench.common import PY, BenchError, PlainTmux, Workdir
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    Bindings,
    Event,
    EventBody,
    MessageDecoder,
    PaneImage,
    PaneReset,
    Ping,
    Pong,
    Snapshot,
)
from tether.core.session import (
    PING_IDLE,
    LinkDead,
    PeerClosed,
    ProtocolFailed,
    SessionEvent,
    SnapshotNeeded,
    State,
)
from tether.mirror.capture import (
    STATUS_FORMAT,
    WINDOW_FORMAT,
    binding_list,
    parse_bindings,
    parse_status,
    parse_windows,
)

START_LIMIT = 600.0
"""seconds the fake hosts may take to start one step's sessions"""
CONCURRENCY = 8
"""sessions being started at once"""
PING_EVERY = PING_IDLE
"""an idle host endpoint pings once a second"""
ROOT = Path(__file__).resolve().parents[1]


# --- what every fake host replicates ---------------------------------------------------


def snapshot_payload(wd: Workdir, size: tuple[int, int]) -> bytes:
    """The first events a real agent logs for a fresh session, encoded: a snapshot
    read from a plain tmux server with the benchmark's tmux.conf (status on), then
    a pane image of a shell screen."""
    tpl = PlainTmux(wd, wd.path / "template", "template", size)
    try:
        lines = tpl.tmux("list-windows", "-F", WINDOW_FORMAT).encode().splitlines()
        structure = parse_windows(lines)
        status = parse_status([tpl.tmux("display", "-p", STATUS_FORMAT).rstrip("\n")])
        keys = parse_bindings(tpl.tmux("list-keys").splitlines())
        prefix = tpl.tmux("show", "-gv", "prefix").strip() or "C-b"
    finally:
        tpl.close()
    if not structure.windows:
        raise BenchError("template tmux server showed no window")
    prompt = "\x1b[32mmate@box\x1b[0m:\x1b[34m~/src\x1b[0m$ "
    screen = "".join(f"{prompt}ls -l\r\n" + "".join(
        f"-rw-r--r-- 1 mate mate {1000 * i + 17:6d} Nov 27 10:{i:02d} file{i:02d}.py\r\n"
        for i in range(5)) for _ in range(3)) + prompt
    pane = structure.windows[0].active_pane
    image = PaneImage(pane, f"\x1bc\x1b[H\x1b[2J{screen}".encode())
    return (Event(1, Snapshot(structure, status, Bindings(prefix, binding_list(keys)))).encode()
            + Event(2, PaneReset(image)).encode())


def decode_payload(payload: bytes) -> tuple[Snapshot, list[EventBody]]:
    """``snapshot_payload``'s frames back as (the snapshot, the events after it)."""
    bodies = [m.body for m in MessageDecoder().feed(payload) if isinstance(m, Event)]
    if not bodies or not isinstance(bodies[0], Snapshot):
        raise ValueError("the payload does not start with a snapshot")
    return bodies[0], bodies[1:]


# --- one fake host -------------------------------------------------------------------------


class FakeHost:
    """One idle session: an SSH channel to the relay and the endpoint that speaks on it."""

    def __init__(self, index: int, counts: dict[str, int], snapshot: Snapshot,
                 after: list[EventBody]) -> None:
        self.index = index
        self.counts = counts
        self.snapshot = snapshot
        self.after = after
        self.ep = HostEndpoint()
        self.loop = asyncio.get_running_loop()
        self.decoder = MessageDecoder()
        self.conn: Any = None
        self.writer: Any = None
        self.reader: Any = None
        self.last_seq = 0
        """seq of the last event of the snapshot: when the relay acks it, the session is up"""
        self.why: str | None = None
        """why the endpoint gave the link up"""

    async def start(self, port: int) -> float:
        """Connect, then pump until the relay acked the snapshot; seconds it took."""
        import asyncssh

        t0 = time.perf_counter()
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.conn = await asyncssh.connect(
            "127.0.0.1", port, username="tether-host", client_keys=[key], known_hosts=None,
            agent_path=None, connect_timeout=30, keepalive_interval=10, keepalive_count_max=3)
        try:
            self.writer, self.reader, _ = await self.conn.open_session(
                subsystem="tether", encoding=None)
            self.ep.connect(self.loop.time())
            why = await self._pump(lambda: self.last_seq > 0 and
                                   self.ep.log.acked >= self.last_seq)
            if why is not None:
                raise ConnectionError(why)
        except BaseException:
            self.close()
            raise
        return time.perf_counter() - t0

    async def live(self) -> str:
        """Pump until the connection ends; why it ended."""
        try:
            return await self._pump(lambda: False) or "stopped"
        except Exception as exc:  # the channel closed under a write
            return f"{type(exc).__name__}: {exc}"

    async def _pump(self, done: Callable[[], bool]) -> str | None:
        """Move bytes between the channel and the endpoint until ``done()`` (None) or
        the link ends (why)."""
        while True:
            self._act()
            await self._flush()
            if self.why is not None:
                return self.why
            if done():
                return None
            due = self.ep.next_timer()
            data = b""
            try:
                async with asyncio.timeout_at(due):
                    data = await self.reader.read(65536)
                if not data:
                    return "connection closed"
            except TimeoutError:
                pass
            now = self.loop.time()
            for m in self.decoder.feed(data):
                if isinstance(m, Pong):
                    self.counts["pongs"] += 1
                self.ep.receive(m, now)
            due = self.ep.next_timer()
            if due is not None and now >= due:
                self.ep.handle_timer(now)

    def _act(self) -> None:
        """What the endpoint asks of its host: a snapshot, or giving the link up."""
        while (ev := self.ep.next_event()) is not None:
            self._on_event(ev)

    def _on_event(self, ev: SessionEvent) -> None:
        now = self.loop.time()
        if isinstance(ev, SnapshotNeeded):
            self.last_seq = self.ep.push_snapshot(self.snapshot, now)
            for body in self.after:
                self.last_seq = self.ep.append(body, now) or self.last_seq
        elif isinstance(ev, LinkDead):
            self.why = f"no word from the relay for {ev.quiet:.1f}s"
        elif isinstance(ev, PeerClosed):
            self.why = ev.reason
        elif isinstance(ev, ProtocolFailed):
            self.why = ev.text
        # Welcomed, InputReceived, ResizeRequested: an idle host has nothing to do

    async def _flush(self) -> None:
        """Send what the endpoint has, batch by batch."""
        while out := self.ep.messages_to_send(self.loop.time()):
            for o in out:
                if isinstance(o.message, Ping):
                    self.counts["pings"] += 1
                self.writer.write(o.message.encode())
            await self.writer.drain()

    def close(self) -> None:
        if self.ep.state not in (State.IDLE, State.ENDED):
            self.ep.connection_lost(self.loop.time())
        if self.conn is not None:
            self.conn.close()


# --- the fleet process ---------------------------------------------------------------------


def _say(*words: object) -> None:
    print(*words, flush=True)


class _Run:
    """One fleet process's state: its hosts, their counters and the step's figures."""

    def __init__(self, a: argparse.Namespace, stop: asyncio.Event) -> None:
        self.a = a
        self.stop = stop
        self.snapshot, self.after = decode_payload(Path(a.payload).read_bytes())
        self.counts = {"pings": 0, "pongs": 0}
        self.hosts: list[FakeHost] = []
        self.lives: set[asyncio.Task[None]] = set()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.failed = 0
        self.sem = asyncio.Semaphore(a.concurrency)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.deadline
        self.last_report = self.t0

    async def keep(self, h: FakeHost) -> None:
        why = await h.live()
        if not self.stop.is_set():
            _say("LOST", h.index, why)

    async def slot(self, i: int) -> None:
        """Start session ``first + i`` (three tries), then keep it alive."""
        async with self.sem:
            last: BaseException | None = None
            for _attempt in range(3):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                h = FakeHost(self.a.first + i, self.counts, self.snapshot, self.after)
                try:
                    async with asyncio.timeout(60):
                        self.latencies.append(await h.start(self.a.port))
                except Exception as exc:
                    last = exc
                    continue
                self.hosts.append(h)
                task = asyncio.create_task(self.keep(h))
                self.lives.add(task)
                task.add_done_callback(self.lives.discard)
                break
            else:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(
                        f"session {self.a.first + i}: {type(last).__name__}: {last}")
            now = time.monotonic()
            if now - self.last_report >= 5:
                self.last_report = now
                _say("PROGRESS", len(self.hosts), self.failed, self.a.count,
                     round(now - self.t0, 1))

    def ready(self) -> dict[str, Any]:
        return {
            "ok": len(self.hosts), "failed": self.failed,
            "elapsed_s": time.monotonic() - self.t0,
            "stopped_early": (time.monotonic() > self.deadline
                              and len(self.hosts) + self.failed < self.a.count),
            "latencies_ms": [round(x * 1000, 2) for x in self.latencies],
            "errors": self.errors,
        }


async def _fleet(a: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = _Run(a, stop)
    # the benchmark holds our stdin: "stats" asks for the counters; its end (the
    # benchmark is gone) ends us too
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def watch_stdin() -> None:
        while line := await stdin.readline():
            if line.strip() == b"stats":
                _say("STATS", run.counts["pings"], run.counts["pongs"], time.monotonic())
        stop.set()

    watcher = asyncio.create_task(watch_stdin())
    starting = asyncio.gather(*(run.slot(i) for i in range(a.count)))
    await asyncio.wait([starting, asyncio.create_task(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        _say("READY", json.dumps(run.ready()))
        await stop.wait()
    starting.cancel()
    watcher.cancel()
    for t in list(run.lives):
        t.cancel()
    for h in run.hosts:
        h.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start ``--count`` fake hosts, report READY, keep them up until stdin ends."""
    ap = argparse.ArgumentParser(prog="python3 -m bench.scale_fleet",
                                 description="fake hosts for bench/scale.py")
    ap.add_argument("--dir", required=True, help="the benchmark's workdir (names us for cleanup)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="index of the first session")
    ap.add_argument("--payload", required=True, help="file of the encoded snapshot events")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    ap.add_argument("--deadline", type=float, default=START_LIMIT)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    # the hosts would be elsewhere: the relay and the measured session go first
    os.nice(10)
    return asyncio.run(_fleet(a))


# --- the benchmark's handle ------------------------------------------------------------------


class Fleet:
    """The benchmark's handle on one fake-host process."""

    def __init__(self, wd: Workdir, port: int, count: int, first: int, payload: Path) -> None:
        self.count = count
        self.stderr = wd.path / f"fleet-{first}.err"
        env = wd.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [PY, "-m", "bench.scale_fleet", "--dir", str(wd.path), "--port", str(port),
                 "--count", str(count), "--first", str(first), "--payload", str(payload),
                 "--concurrency", str(CONCURRENCY), "--deadline", str(START_LIMIT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                cwd=str(ROOT), text=True)
        wd.on_close(self.close)
        self.lines: Queue[str | None] = Queue()
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
        """The process's READY report (sessions up, failed, latencies), ticking meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"fake hosts not ready after {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except Empty:
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
            except Empty:
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
        """Hosts lost so far (each reported line is logged, the first three)."""
        try:
            while (line := self.lines.get_nowait()) is not None:
                kind, _, rest = line.partition(" ")
                self._line(kind, rest, log)
        except Empty:
            pass
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
            try:
                self.proc.stdin.close()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
