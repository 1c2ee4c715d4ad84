"""The roaming benchmark's rig: one netsim network, two relays, two hosts, two mates.

``Rig`` starts a ``tether.netsim`` network (``host`` with links wifi and lte,
``relay``, ``mate``) and on it one session per transport: ``quic`` (a relay on
port 2222, its host replicating over QUIC) and ``ssh`` (a relay with
``--no-quic`` on 2223). Each ``Side`` is one transport's relay, host, mate and a
``Tap`` on the mate's local tmux; the host pane runs ``tee -a FILE`` (a ``cat``
that also appends what the pane receives to ``Side.typed``, the file the outage
part watches with ``LineWatch``). Also: the samples (``Series``), logging and
formatting shared by ``bench/roaming.py``, ``bench/roaming_parts.py`` and
``bench/roaming_outage.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import select
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import percentile
from tether.netsim.network import Network
from tether.netsim.pytest_plugin import DEFAULT_TOPOLOGY
from tether.testing.host import Host
from tether.testing.mate import Mate
from tether.testing.procs import processes, wait_for
from tether.testing.relay import RelayProcess
from tether.testing.tap import Hit, Tap

TRANSPORTS = ("quic", "ssh")
RELAY_PORTS = {"quic": 2222, "ssh": 2223}
SIZE = (100, 30)
STATUS_OK = re.compile(r"^\[tether (quic|ssh) \d+ms\]$")
TYPED_FILE = "typed.txt"
"""in each host's home: what its pane received, line by line (``Side.typed``)"""


def log(msg: str) -> None:
    """One line on stderr, stamped with the seconds since the benchmark began."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


wait_until = wait_for
"""Poll a condition until a deadline (the harness's; BenchError is HarnessError)."""


# --- statistics ------------------------------------------------------------------------


@dataclass
class Series:
    """Samples of one figure, in milliseconds; ``failed`` counts samples that timed out."""

    name: str
    values: list[float] = field(default_factory=list)
    failed: int = 0
    late: int = 0
    """samples confirmed by a periodic capture rather than an output chunk"""
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, hit: Hit | None, t0: float) -> float | None:
        """Record a sample timed from ``t0`` (a miss counts as failed); its ms."""
        if hit is None:
            self.failed += 1
            return None
        self.late += hit.late
        ms = (hit.t - t0) * 1000
        self.values.append(ms)
        return ms

    def stats(self) -> dict[str, Any]:
        v = self.values
        return {
            "median": percentile(v, 50), "p90": percentile(v, 90),
            "min": min(v) if v else math.nan, "max": max(v) if v else math.nan,
            "runs": len(v), "failed": self.failed, "late": self.late,
        }

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": "ms", "stats": self.stats(), "values": self.values,
                **({"extra": self.extra} if self.extra else {})}


def clock_text(wall: float) -> str:
    """Wall-clock time as the agent and relay logs print it."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f",{int(wall % 1 * 1000):03d}"


def fmt_ms(v: float | None) -> str:
    """A sample for the log: ``fmt`` with its unit, TIMEOUT for a missed one."""
    if v is None:
        return "TIMEOUT"
    text = fmt(v)
    return text if text.endswith("s") else text + "ms"


def fmt(v: float) -> str:
    """Milliseconds as shown: seconds from 1000 on, fewer digits as they grow."""
    if not math.isfinite(v):
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


# --- the rig ------------------------------------------------------------------------------



@dataclass
class Side:
    """One transport: its relay, host, mate and the mate's tap."""

    name: str
    relay: RelayProcess
    host: Host
    mate: Mate
    tap: Tap
    typed: Path
    """the host's file: the host pane runs ``tee -a`` on it, so it gets every line the
    pane receives (each when its Enter arrives)"""
    tty_fd: int = -1

    def status(self) -> str:
        return self.host.tmux("show", "-gv", "@tether_status", check=False).strip()

    def write(self, text: str) -> None:
        """Print on the host pane's terminal (as a program in the pane would)."""
        os.write(self.tty_fd, text.encode())

    def attaches(self) -> int:
        """How often the host attached to its relay (SSH bootstrap + QUIC/SSH re-attaches)."""
        try:
            return self.relay.log.read_text(errors="replace").count("attached to session")
        except OSError:
            return 0


class Rig:
    """The network and both sides on it; ``start`` brings them up, ``close`` ends them."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.net = Network(DEFAULT_TOPOLOGY, seed=seed)
        self.relays: list[RelayProcess] = []
        self.hosts: list[Host] = []
        self.mates: list[Mate] = []
        self.taps: list[Tap] = []
        self.sides: dict[str, Side] = {}

    def start(self) -> None:
        """Network, relays, hosts running ``cat``, mates and their taps; until connected."""
        net = self.net
        net.start()
        print(f"netsim: run {net.run_id} seed={net.seed}", flush=True)
        relays: dict[str, RelayProcess] = {}
        hosts: dict[str, Host] = {}

        def relay(name: str) -> None:
            workdir = self.root / f"relay-{name}"
            if relays:  # same host keys as the first relay: RSA generation takes seconds
                workdir.mkdir(parents=True)
                shutil.copytree(relays["quic"].workdir / "keys", workdir / "keys")
            extra = ["--no-quic"] if name == "ssh" else []
            r = RelayProcess(workdir, RELAY_PORTS[name], *extra, prefix=net.exec_argv("relay"),
                             bind="0.0.0.0", public=net.addr("relay"))
            self.relays.append(r)
            relays[name] = r
            log(f"relay {name}: port {r.port} {' '.join(extra)}".rstrip())

        def host(name: str) -> None:
            if name not in relays:
                relay(name)
            h = Host(self.root / f"host-{name}", relays[name].conf(), SIZE,
                     prefix=net.exec_argv("host"))
            self.hosts.append(h)
            hosts[name] = h
            # a cat (the echo part waits for its copy of a line) that also appends each
            # line it receives to a file (the outage part watches it)
            h.type(f"exec tee -a {shlex.quote(str(h.home / TYPED_FILE))}")

        relay("quic")
        with ThreadPoolExecutor(len(TRANSPORTS)) as pool:  # start both sessions at once
            for f in [pool.submit(host, name) for name in TRANSPORTS]:
                f.result()
        for name in TRANSPORTS:
            host = hosts[name]
            wait_until(lambda h=host: h.display("#{pane_current_command}") == "tee", 15,
                       "tee in the host pane")
            mate = Mate(self.root, host.ssh_rw, SIZE, name=f"mate-{name}",
                        prefix=net.exec_argv("mate"))
            self.mates.append(mate)
            tap = Tap(mate.sock)
            self.taps.append(tap)
            side = Side(name, relays[name], host, mate, tap, host.home / TYPED_FILE)
            tty = host.display("#{pane_tty}")
            side.tty_fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
            self.sides[name] = side
        for side in self.sides.values():
            wait_until(lambda s=side: "0:" in s.tap.screen().rstrip("\n").split("\n")[-1], 30,
                       f"the {side.name} mate to attach")
        self.settle(60)
        for side in self.sides.values():
            size = side.mate.tmux("display", "-p", "#{window_width}x#{window_height}").strip()
            log(f"{side.name}: {side.status()}; mate window {size}")

    def settle(self, timeout: float = 60) -> None:
        """Until every host says it is connected over its own transport."""
        for side in self.sides.values():
            wait_until(lambda s=side: (m := STATUS_OK.match(s.status())) and m.group(1) == s.name,
                       timeout, f"the {side.name} host to be connected over {side.name}",
                       interval=0.1)

    def close(self) -> None:
        """End everything the rig started, then whatever still names its directory."""
        for side in self.sides.values():
            with contextlib.suppress(OSError):
                os.close(side.tty_fd)
        for tap in self.taps:
            with contextlib.suppress(Exception):
                tap.close()
        for mate in self.mates:
            with contextlib.suppress(Exception):
                mate.close()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.close()
        for relay in self.relays:
            with contextlib.suppress(Exception):
                relay.close()
        with contextlib.suppress(Exception):
            self.net.close()
        # anything still naming our directory was started by us (agents, tmux, ssh)
        leftovers = [p.pid for p in processes()
                     if str(self.root) in p.cmdline and p.pid != os.getpid()]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def collect_logs(self, dest: Path) -> None:
        """Copy the relays' and agents' logs and the netsim events to ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, side in self.sides.items():
            with contextlib.suppress(OSError):
                shutil.copy(side.relay.log, dest / f"relay-{name}.log")
            for p in (side.host.home / "state" / "tether").glob("agent-*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(p, dest / f"{name}-{p.name}")
        (dest / "netsim-events.log").write_text("\n".join(str(e) for e in self.net.events) + "\n")


def agent_events(side: Side) -> dict[str, int]:
    """Counts of connection events in the side's agent log."""
    text = side.host.agent_log()
    return {
        "connects": text.count("connected to the relay over"),
        "quic_unavailable": text.count("QUIC unavailable"),
    }


# --- the host's file, watched -------------------------------------------------------------

IN_MODIFY = 0x2


class LineWatch:
    """The lines appended to a file from now on, each with the time it appeared there.

    Woken by inotify (``IN_MODIFY``) where the C library has it, else by polling
    every ``poll`` seconds; a line's time (``perf_counter``) is that of the wake-up
    that found it complete. ``lines`` holds (time, text) in file order.
    """

    def __init__(self, path: Path, poll: float = 0.01) -> None:
        self.path = path
        self.poll = poll
        self.offset = path.stat().st_size
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self._buf = b""
        self._stop = threading.Event()
        self._ino = -1
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
                os.close(fd)
                fd = -1
            self._ino = fd
        self.inotify = self._ino >= 0
        """whether inotify wakes it (else it polls)"""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, now: float) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        if not data:
            return
        self.offset += len(data)
        self._buf += data
        *done, self._buf = self._buf.split(b"\n")
        if done:
            with self.cond:
                self.lines.extend((now, ln.decode(errors="replace")) for ln in done)
                self.cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._ino >= 0:
                ready, _, _ = select.select([self._ino], [], [], 0.1)
                now = time.perf_counter()
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._ino, 4096):
                            pass
            else:
                self._stop.wait(self.poll)
                now = time.perf_counter()
            with contextlib.suppress(OSError):
                self._read(now)

    def wait(self, pred: Callable[[list[tuple[float, str]]], Any], timeout: float) -> Any:
        """Until ``pred(lines)`` is truthy (checked at each new line); its value, or None."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                res = pred(self.lines)
                if res:
                    return res
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop watching (what has arrived stays in ``lines``)."""
        self._stop.set()
        self._thread.join(5)
        if self._ino >= 0:
            with contextlib.suppress(OSError):
                os.close(self._ino)
            self._ino = -1


def tear_down(root: Path, host: Host | None, relay: RelayProcess | None, net: Network) -> None:
    """End a netsim bench's host, relay and network, then anything still naming its
    directory (started by it: joins, their tmux, ssh), whatever failed before."""
    for part in (host, relay, net):
        if part is not None:
            with contextlib.suppress(Exception):
                part.close()
    for p in processes():
        if str(root) in p.cmdline and p.pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


def copy_logs(root: Path, relay: RelayProcess | None, dest: Path) -> None:
    """The relay's and the agent's logs (of a host under ``root/host``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if relay is not None:
        with contextlib.suppress(OSError):
            shutil.copy(relay.log, dest / "relay.log")
    for p in (root / "host" / "state" / "tether").glob("agent-*.log"):
        with contextlib.suppress(OSError):
            shutil.copy(p, dest / p.name)


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a bench as Ctrl-C does: its ``finally`` tears the network down."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
