"""The scale benchmarks' fake hosts: many sessions from one Python process.

Real agents cost ~30 MB each, so ``bench/scale.py`` and ``bench/scale_active.py``
start their sessions here (``python3 -m bench.scale_fleet``): one asyncio process
that opens one SSH connection per session as ``tether-host`` with its own ed25519
key and the ``tether`` subsystem, as a host agent's bootstrap does. Each session is
driven by a ``tether.core.host_endpoint.HostEndpoint``, the host's end of the
session protocol: it says ``Hello``, asks for the snapshot once welcomed, decides
when to ping (``tether.core.liveness.Pinger``: fast while busy, every
``PING_IDLE`` s once idle on a proven link), answers the relay's pings and gives
up a link the relay leaves silent. The fake host only moves messages (over
tether's own ``SSHLink`` and ``QuicLink``), logs the snapshot the endpoint asks
for, and sleeps until a message comes or ``next_timer()`` is due.

``--quic``: once the SSH bootstrap's ``Welcome`` came, the host moves to QUIC as
the agent does (``RelaySide._upgrade``): tether's ``Connector`` learns the
Welcome's endpoints and certificate fingerprint and makes one QUIC attempt; on
success the SSH link is closed and the endpoint resumes the session on QUIC
(``Hello`` with the session's secret), so its keep-alives are real QUIC
datagrams. A host whose attempt fails stays on SSH, as the agent would, and is
counted.

``--echo``: the pane echoes what mates type, as ``cat`` under a tty echoes
printable keys: each mate ``Input`` for a pane is logged back as ``Output`` of
that pane (a carriage return as CR LF). The READY report then carries each
session's read-write ``ssh`` line for the benchmark's mates.
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

from bench.common import PY, TMUX_CONF, BenchError, PlainTmux, Workdir
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    Bindings,
    Event,
    EventBody,
    MessageDecoder,
    Output,
    PaneImage,
    PaneReset,
    Ping,
    Pong,
    Snapshot,
)
from tether.core.session import (
    PING_IDLE,
    InputReceived,
    LinkDead,
    PeerClosed,
    ProtocolFailed,
    SessionEvent,
    SnapshotNeeded,
    State,
    Welcomed,
)
from tether.mirror.capture import (
    STATUS_FORMAT,
    WINDOW_FORMAT,
    binding_list,
    parse_bindings,
    parse_status,
    parse_windows,
)
from tether.transport.link import Link, LinkClosed, send_out
from tether.transport.openssh import RelayAddress
from tether.transport.reconnect import Connector

START_LIMIT = 600.0
"""seconds the fake hosts may take to start one step's sessions"""
CONCURRENCY = 8
"""sessions being started at once"""
PING_EVERY = PING_IDLE
"""an idle host endpoint on a proven link pings once every ``PING_IDLE`` s"""
ROOT = Path(__file__).resolve().parents[1]
SHELL_PROMPT = "\x1b[32mmate@box\x1b[0m:\x1b[34m~/src\x1b[0m$ "


# --- what every fake host replicates ---------------------------------------------------


def snapshot_payload(wd: Workdir, size: tuple[int, int], status: bool = True,
                     screen: str | None = None, name: str = "template") -> bytes:
    """The first events a real agent logs for a fresh session, encoded: a snapshot
    read from a plain tmux server with the benchmark's tmux.conf (status on unless
    ``status`` is False), then a pane image: ``screen``, or a shell screen."""
    home = wd.path / name
    if not status:  # PlainTmux keeps a ~/.tmux.conf it finds
        home.mkdir(parents=True, exist_ok=True)
        (home / ".tmux.conf").write_text(TMUX_CONF + "set -g status off\n")
    tpl = PlainTmux(wd, home, name, size)
    try:
        lines = tpl.tmux("list-windows", "-F", WINDOW_FORMAT).encode().splitlines()
        structure = parse_windows(lines)
        status_opts = parse_status([tpl.tmux("display", "-p", STATUS_FORMAT).rstrip("\n")])
        keys = parse_bindings(tpl.tmux("list-keys").splitlines())
        prefix = tpl.tmux("show", "-gv", "prefix").strip() or "C-b"
    finally:
        tpl.close()
    if not structure.windows:
        raise BenchError("template tmux server showed no window")
    if screen is None:
        screen = "".join(f"{SHELL_PROMPT}ls -l\r\n" + "".join(
            f"-rw-r--r-- 1 mate mate {1000 * i + 17:6d} Nov 27 10:{i:02d} file{i:02d}.py\r\n"
            for i in range(5)) for _ in range(3)) + SHELL_PROMPT
    pane = structure.windows[0].active_pane
    image = PaneImage(pane, f"\x1bc\x1b[H\x1b[2J{screen}".encode())
    return (Event(1, Snapshot(structure, status_opts, Bindings(prefix, binding_list(keys))))
            .encode() + Event(2, PaneReset(image)).encode())


def decode_payload(payload: bytes) -> tuple[Snapshot, list[EventBody]]:
    """``snapshot_payload``'s frames back as (the snapshot, the events after it)."""
    bodies = [m.body for m in MessageDecoder().feed(payload) if isinstance(m, Event)]
    if not bodies or not isinstance(bodies[0], Snapshot):
        raise ValueError("the payload does not start with a snapshot")
    return bodies[0], bodies[1:]


# --- one fake host -------------------------------------------------------------------------


class FakeHost:
    """One session: a link to the relay (SSH, then QUIC with ``quic``) and the
    endpoint that speaks on it; with ``echo`` its pane echoes mate input."""

    def __init__(self, index: int, counts: dict[str, int], snapshot: Snapshot,
                 after: list[EventBody], quic: bool = False, echo: bool = False) -> None:
        self.index = index
        self.counts = counts
        self.snapshot = snapshot
        self.after = after
        self.want_quic = quic
        self.echo = echo
        self.ep = HostEndpoint()
        self.loop = asyncio.get_running_loop()
        self.conn: Any = None
        """the asyncssh connection, while the session is on SSH"""
        self.link: Link | None = None
        self.on_quic = False
        self.quic_error = ""
        self.ssh_rw = ""
        """the session's read-write ``ssh`` line, from its Welcome"""
        self.heard: list[tuple[float, bytes]] = []
        """with ``echo``: (time.monotonic(), keys) of each mate input, for the
        benchmark's split of the echo into its input and output paths"""
        self.last_seq = 0
        """seq of the last event of the snapshot: when the relay acks it, the session is up"""
        self.why: str | None = None
        """why the endpoint gave the link up"""

    async def start(self, port: int) -> float:
        """Connect (then move to QUIC if asked), and pump until the relay acked the
        snapshot; seconds it took."""
        import asyncssh

        from tether.transport.ssh import SSHLink

        t0 = time.perf_counter()
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.conn = await asyncssh.connect(
            "127.0.0.1", port, username="tether-host", client_keys=[key], known_hosts=None,
            agent_path=None, connect_timeout=30, keepalive_interval=10, keepalive_count_max=3)
        try:
            writer, reader, _ = await self.conn.open_session(subsystem="tether",
                                                             encoding=None)
            self.link = SSHLink(reader, writer, f"ssh 127.0.0.1:{port}")
            self.ep.connect(self.loop.time())
            if self.want_quic:
                # the snapshot goes out on SSH meanwhile, as the agent's does; what
                # the relay has not acked is replayed on QUIC
                why = await self._pump(lambda: self.ep.state is State.CONNECTED)
                if why is not None:
                    raise ConnectionError(why)
                await self._move_to_quic(port)
            why = await self._pump(lambda: self.last_seq > 0 and
                                   self.ep.log.acked >= self.last_seq)
            if why is not None:
                raise ConnectionError(why)
        except BaseException:
            self.close()
            raise
        return time.perf_counter() - t0

    async def _move_to_quic(self, port: int) -> None:
        """The agent's move (``RelaySide._upgrade``): one QUIC attempt to what the
        Welcome announced; on success the SSH link closes and the session resumes
        on QUIC, else it stays on SSH (``quic_error`` says why)."""
        assert self.ep.shared is not None and self.link is not None
        connector = Connector(RelayAddress("127.0.0.1", port))
        connector.learn(self.ep.shared)
        if connector.quic is None:
            self.quic_error = "the relay's Welcome named no QUIC endpoint"
            return
        quic = await connector.try_quic()
        if quic is None:
            self.quic_error = connector.last_error or "QUIC failed"
            return
        self.link.close()
        self.conn.close()
        self.conn = None
        self.ep.connection_lost(self.loop.time())
        self.link = quic
        self.on_quic = True
        self.ep.connect(self.loop.time())

    async def live(self) -> str:
        """Pump until the connection ends; why it ended."""
        try:
            return await self._pump(lambda: False) or "stopped"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _pump(self, done: Callable[[], bool]) -> str | None:
        """Move messages between the link and the endpoint until ``done()`` (None)
        or the link ends (why)."""
        link = self.link
        assert link is not None
        while True:
            self._act()
            try:
                await self._flush(link)
            except (LinkClosed, OSError) as exc:
                return str(exc) or "connection closed"
            if self.why is not None:
                return self.why
            if done():
                return None
            due = self.ep.next_timer()
            msg = None
            try:
                async with asyncio.timeout_at(due):
                    msg = await link.recv()
            except TimeoutError:
                pass
            except LinkClosed as exc:
                return str(exc) or "connection closed"
            now = self.loop.time()
            if msg is not None:
                if isinstance(msg, Pong):
                    self.counts["pongs"] += 1
                self.ep.receive(msg, now)
            due = self.ep.next_timer()
            if due is not None and now >= due:
                activity = getattr(link, "last_activity", None)
                if activity is not None:  # QUIC hears the relay below the messages
                    self.ep.note_activity(activity)
                self.ep.handle_timer(now)

    def _act(self) -> None:
        """What the endpoint asks of its host: a snapshot, an echo, giving the link up."""
        while (ev := self.ep.next_event()) is not None:
            self._on_event(ev)

    def _on_event(self, ev: SessionEvent) -> None:
        now = self.loop.time()
        if isinstance(ev, SnapshotNeeded):
            self.last_seq = self.ep.push_snapshot(self.snapshot, now)
            for body in self.after:
                self.last_seq = self.ep.append(body, now) or self.last_seq
        elif isinstance(ev, InputReceived):
            self.counts["inputs"] += 1
            inp = ev.input
            if self.echo and inp.binding is None and inp.keys:
                self.heard.append((now, inp.keys))
                self.ep.append(Output(inp.pane, inp.keys.replace(b"\r", b"\r\n")), now)
        elif isinstance(ev, Welcomed):
            self.ssh_rw = ev.welcome.ssh_rw
        elif isinstance(ev, LinkDead):
            self.why = f"no word from the relay for {ev.quiet:.1f}s"
        elif isinstance(ev, PeerClosed):
            self.why = ev.reason
        elif isinstance(ev, ProtocolFailed):
            self.why = ev.text
        # ResizeRequested, MatesChanged, LinkQuiet, LinkBack: nothing to do here

    async def _flush(self, link: Link) -> None:
        """Send what the endpoint has, batch by batch, each by its channel."""
        while out := self.ep.messages_to_send(self.loop.time()):
            for o in out:
                if isinstance(o.message, Ping):
                    self.counts["pings"] += 1
                send_out(link, o)
            await link.drain()

    def close(self) -> None:
        if self.ep.state not in (State.IDLE, State.ENDED):
            self.ep.connection_lost(self.loop.time())
        if self.link is not None:
            self.link.close()
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
        self.counts = {"pings": 0, "pongs": 0, "inputs": 0}
        self.hosts: list[FakeHost] = []
        self.lives: set[asyncio.Task[None]] = set()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.quic_errors: list[str] = []
        self.failed = 0
        self.halted = False
        self.sem = asyncio.Semaphore(a.concurrency)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.deadline
        self.last_report = self.t0

    async def keep(self, h: FakeHost) -> None:
        why = await h.live()
        if not self.stop.is_set():
            _say("LOST", h.index, why)

    def halt(self) -> None:
        """Start no more sessions (the benchmark's memory guard)."""
        self.halted = True
        self.deadline = min(self.deadline, time.monotonic())

    async def slot(self, i: int) -> None:
        """Start session ``first + i`` (three tries), then keep it alive."""
        async with self.sem:
            last: BaseException | None = None
            for _attempt in range(3):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                h = FakeHost(self.a.first + i, self.counts, self.snapshot, self.after,
                             quic=self.a.quic, echo=self.a.echo)
                try:
                    async with asyncio.timeout(60):
                        self.latencies.append(await h.start(self.a.port))
                except Exception as exc:
                    last = exc
                    continue
                self.hosts.append(h)
                if h.quic_error and len(self.quic_errors) < 5:
                    self.quic_errors.append(f"session {h.index}: {h.quic_error}")
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
        out = {
            "ok": len(self.hosts), "failed": self.failed,
            "elapsed_s": time.monotonic() - self.t0,
            "stopped_early": ((self.halted or time.monotonic() > self.deadline)
                              and len(self.hosts) + self.failed < self.a.count),
            "halted": self.halted,
            "latencies_ms": [round(x * 1000, 2) for x in self.latencies],
            "errors": self.errors,
            "on_quic": sum(h.on_quic for h in self.hosts),
            "quic_errors": self.quic_errors,
        }
        if self.a.echo:
            out["mates"] = {str(h.index): h.ssh_rw for h in self.hosts}
        return out

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "when": time.monotonic(),
                "on_quic": sum(h.on_quic for h in self.hosts), "hosts": len(self.hosts)}

    def dump(self, path: str) -> None:
        """Every echo host's mate input so far: {index: [[time.monotonic(), keys as
        latin-1], ...]}, as JSON in ``path``."""
        heard = {str(h.index): [[t, k.decode("latin-1")] for t, k in h.heard]
                 for h in self.hosts if h.heard}
        Path(path).write_text(json.dumps(heard))


async def _fleet(a: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = _Run(a, stop)
    # the benchmark holds our stdin: "stats" asks for the counters, "halt" stops
    # starting sessions; its end (the benchmark is gone) ends us too
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def watch_stdin() -> None:
        while line := await stdin.readline():
            if line.strip() == b"stats":
                _say("STATS", json.dumps(run.stats()))
            elif line.strip() == b"halt":
                run.halt()
            elif line.startswith(b"dump "):
                run.dump(line[5:].strip().decode())
                _say("DUMPED")
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
                                 description="fake hosts for bench/scale.py and "
                                 "bench/scale_active.py")
    ap.add_argument("--dir", required=True, help="the benchmark's workdir (names us for cleanup)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="index of the first session")
    ap.add_argument("--payload", required=True, help="file of the encoded snapshot events")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    ap.add_argument("--deadline", type=float, default=START_LIMIT)
    ap.add_argument("--quic", action="store_true",
                    help="move each session to QUIC after the SSH bootstrap, as agents do")
    ap.add_argument("--echo", action="store_true",
                    help="panes echo mate input (as cat under a tty); report ssh lines")
    ap.add_argument("--nice", type=int, default=10,
                    help="niceness increment (default 10: the relay goes first)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.nice:
        os.nice(a.nice)
    return asyncio.run(_fleet(a))


# --- the benchmark's handle ------------------------------------------------------------------


class Fleet:
    """The benchmark's handle on one fake-host process."""

    def __init__(self, wd: Workdir, port: int, count: int, first: int, payload: Path,
                 quic: bool = False, echo: bool = False, nice: int = 10,
                 deadline: float = START_LIMIT) -> None:
        self.count = count
        self.stderr = wd.path / f"fleet-{first}.err"
        env = wd.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        argv = [PY, "-m", "bench.scale_fleet", "--dir", str(wd.path), "--port", str(port),
                "--count", str(count), "--first", str(first), "--payload", str(payload),
                "--concurrency", str(CONCURRENCY), "--deadline", str(deadline),
                "--nice", str(nice), *(["--quic"] if quic else []),
                *(["--echo"] if echo else [])]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=env, cwd=str(ROOT), text=True)
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

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def halt(self) -> None:
        """Start no more sessions; READY follows once those being started are up."""
        self._send("halt")

    def wait_ready(self, timeout: float, log: Callable[[str], None],
                   tick: Callable[[], None]) -> dict[str, Any]:
        """The process's READY report (sessions up, failed, latencies), calling
        ``tick`` every half second meanwhile."""
        deadline = time.monotonic() + timeout
        ticked = time.monotonic()
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise BenchError(f"fake hosts not ready after {timeout:.0f}s")
            if now - ticked >= 0.5:
                ticked = now
                tick()
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except Empty:
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
                log(f"scale: {ok}/{count} sessions up, {failed} failed, {elapsed}s")
            else:
                self._line(kind, rest, log)

    def _ask(self, command: str, answer: str, log: Callable[[str], None],
             timeout: float) -> str:
        """Send ``command``; the rest of the ``answer`` line that comes back."""
        self._send(command)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except Empty:
                break
            if line is None:
                break
            kind, _, rest = line.partition(" ")
            if kind == answer:
                return rest
            self._line(kind, rest, log)
        raise BenchError(f"the fake hosts did not answer {command!r} within {timeout:.0f}s")

    def counters(self, log: Callable[[str], None], timeout: float = 10) -> dict[str, Any]:
        """The process's counters so far: pings sent, pongs received, mate inputs,
        sessions on QUIC, and ``when`` (its time.monotonic())."""
        stats: dict[str, Any] = json.loads(self._ask("stats", "STATS", log, timeout))
        return stats

    def heard(self, path: Path, log: Callable[[str], None],
              timeout: float = 30) -> dict[int, list[tuple[float, bytes]]]:
        """When each echo host got each mate input (time.monotonic(), keys), by
        session index, through the file ``path``."""
        self._ask(f"dump {path}", "DUMPED", log, timeout)
        raw = json.loads(path.read_text())
        return {int(k): [(float(t), s.encode("latin-1")) for t, s in v]
                for k, v in raw.items()}

    def stats(self, log: Callable[[str], None], timeout: float = 10) -> tuple[int, int, float]:
        """(pings sent, pongs received, when: time.monotonic()) so far."""
        c = self.counters(log, timeout)
        return int(c["pings"]), int(c["pongs"]), float(c["when"])

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
