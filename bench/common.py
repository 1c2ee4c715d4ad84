"""Shared machinery of the benchmarks: processes, ptys, /proc readers, statistics.

Everything runs as a person would run it: `tether relay` on loopback, hosts
started with `tether -S SOCK new-session -d`, mates running OpenSSH under a
pty that the benchmark reads directly.  Each benchmark works in its own
temporary directory, which is also the HOME, XDG_STATE_HOME and TMPDIR of
every process it starts; at the end, every process whose command line names
that directory is ended by its pid, and the directory is removed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PY = sys.executable
SSH_OPTS = [
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
]
CLIENT_TERM = "xterm-256color"
"""What the benchmark's "terminal" claims to be, for tmux clients and ssh alike."""

TICK = os.sysconf("SC_CLK_TCK")


# --- statistics ------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"median": math.nan, "p90": math.nan, "p99": math.nan, "min": math.nan,
                "max": math.nan, "runs": 0}
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


@dataclass
class Figure:
    """One measured figure, with its floor and target.

    ``rounds`` holds the samples of each interleaved round (A B A B ...), so the
    spread across rounds shows how much the machine drifted during the run.
    """

    bench: str
    metric: str
    unit: str
    values: list[float]
    floor: list[float] | None = None
    floor_label: str = ""
    target: str = ""
    met: bool | None = None
    rounds: list[list[float]] = field(default_factory=list)
    floor_rounds: list[list[float]] = field(default_factory=list)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, float]:
        return summary(self.values)

    @property
    def floor_stats(self) -> dict[str, float] | None:
        return summary(self.floor) if self.floor else None

    @property
    def ratio(self) -> float | None:
        fs = self.floor_stats
        if not fs or not fs["median"]:
            return None
        return self.stats["median"] / fs["median"]

    @property
    def delta(self) -> float | None:
        fs = self.floor_stats
        return None if not fs else self.stats["median"] - fs["median"]

    @staticmethod
    def _spread(rounds: list[list[float]]) -> list[float] | None:
        meds = [percentile(r, 50) for r in rounds if r]
        return [min(meds), max(meds)] if len(meds) > 1 else None

    @property
    def spread(self) -> list[float] | None:
        """[lowest, highest] median of one round (None with a single round)."""
        return self._spread(self.rounds)

    @property
    def floor_spread(self) -> list[float] | None:
        return self._spread(self.floor_rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "metric": self.metric,
            "unit": self.unit,
            "stats": self.stats,
            "floor_label": self.floor_label,
            "floor_stats": self.floor_stats,
            "ratio_to_floor": self.ratio,
            "delta_to_floor": self.delta,
            "spread": self.spread,
            "floor_spread": self.floor_spread,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "extra": self.extra,
            "values": self.values,
            "floor": self.floor,
        }


def finite_positive(values: Iterable[float]) -> bool:
    vals = list(values)
    return bool(vals) and all(math.isfinite(v) and v > 0 for v in vals)


# --- waiting --------------------------------------------------------------------


class BenchError(Exception):
    pass


def wait_for(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll ``fn`` until it returns something truthy; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- /proc --------------------------------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    argv: list[str]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def processes() -> list[ProcInfo]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv:
            out.append(ProcInfo(int(entry), ppid, argv))
    return out


def descendants(root: int, procs: list[ProcInfo] | None = None) -> list[ProcInfo]:
    procs = processes() if procs is None else procs
    kids: dict[int, list[ProcInfo]] = {}
    for p in procs:
        kids.setdefault(p.ppid, []).append(p)
    out: list[ProcInfo] = []
    todo = [root]
    while todo:
        for p in kids.get(todo.pop(), []):
            out.append(p)
            todo.append(p.pid)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Mem:
    pss: int = 0
    rss: int = 0
    uss: int = 0
    """bytes"""

    def __add__(self, other: Mem) -> Mem:
        return Mem(self.pss + other.pss, self.rss + other.rss, self.uss + other.uss)


def memory(pid: int) -> Mem:
    """PSS, RSS and USS (private clean + dirty) from /proc/PID/smaps_rollup."""
    vals: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    vals[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        return Mem()
    return Mem(vals.get("Pss", 0), vals.get("Rss", 0),
               vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def end_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM these pids (ours), then SIGKILL what is left after ``timeout``."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.02)
    for p in pids:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


# --- environment -------------------------------------------------------------------


class Workdir:
    """A benchmark's private directory; also HOME, state and TMPDIR of its processes."""

    def __init__(self, name: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"tb-{name}-"))
        (self.path / "tmp").mkdir()
        self._cleanups: list[Callable[[], None]] = []

    def env(self, home: Path | None = None) -> dict[str, str]:
        home = home or self.path
        env = dict(os.environ)
        for k in ("TMUX", "TMUX_PANE"):
            env.pop(k, None)
        env.update(
            HOME=str(home),
            XDG_STATE_HOME=str(home / "state"),
            TETHER_CONF=str(home / ".tether.conf"),
            TMPDIR=str(self.path / "tmp"),
            TMUX_TMPDIR=str(self.path / "tmp"),
            LANG="C.UTF-8",
            TERM=CLIENT_TERM,
            SHELL="/bin/sh",
        )
        return env

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        self._cleanups.clear()
        mine = str(self.path)
        # everything that names our directory was started by us: tmux servers,
        # agents, the relay and its workers; end them by pid
        end_pids([p.pid for p in processes() if mine in p.cmdline], 5)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TMUX_CONF = (
    "set -g default-terminal tmux-256color\n"
    "set -g history-limit 5000\n"
    "set -g escape-time 10\n"
)


def tmux(sock: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise BenchError(f"tmux {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def tether_cmd(*args: str) -> list[str]:
    return [PY, "-m", "tether", *args]


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


_KEYS: list[Path] = []


def _cached_keys(keys: Path) -> None:
    """Reuse one set of relay host keys per run: RSA-3072 generation takes seconds."""
    if _KEYS and _KEYS[0].is_dir():
        shutil.copytree(_KEYS[0], keys)


def _cache_keys(keys: Path) -> None:
    if _KEYS and _KEYS[0].is_dir():
        return
    cache = Path(tempfile.mkdtemp(prefix="tb-keys-"))
    shutil.copytree(keys, cache / "keys")
    _KEYS[:] = [cache / "keys"]
    atexit.register(shutil.rmtree, cache, True)


class Relay:
    """`tether relay` on loopback, its keys and temp files inside the workdir."""

    def __init__(self, wd: Workdir, extra: Sequence[str] = ()) -> None:
        self.wd = wd
        self.port = free_port()
        self.dir = wd.path / f"relay-{self.port}"
        self.dir.mkdir()
        _cached_keys(self.dir / "keys")
        self.log = self.dir / "relay.log"
        env = wd.env(self.dir)
        self.proc = subprocess.Popen(
            # the benchmarks' hosts share one account, so one host key, and one
            # address: lift the relay's per-key (50) and per-address (32) limits
            # for the 100-session runs
            tether_cmd("relay", "-k", str(self.dir / "keys"), "-b", "127.0.0.1", "-p",
                       str(self.port), "-l", str(self.log), "--max-sessions-per-key",
                       "100000", "--max-connections-per-address", "100000", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        wd.on_close(self.close)
        assert self.proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"relay exited: {''.join(lines)}")
            lines.append(line)
            if "fingerprint" in line and "rsa" in line:
                break
        self.config_lines = [ln.strip() for ln in lines if ln.strip().startswith("set -g")]
        self.proc.stdout.close()
        _cache_keys(self.dir / "keys")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def conf(self, port: int | None = None) -> str:
        out = []
        for ln in self.config_lines:
            if "tether-server-host" in ln:
                ln = "set -g tether-server-host 127.0.0.1"
            elif "tether-server-port" in ln:
                ln = f"set -g tether-server-port {port or self.port}"
            out.append(ln)
        return "\n".join(out) + "\n"

    def parts(self) -> dict[str, list[int]]:
        """The relay's processes by role: the relay, jail wrappers (bwrap) if the
        workers are jailed, replica workers, replica tmux servers and their pane
        processes, replica tmux clients (the workers' control clients and mates')."""
        procs = processes()
        below = descendants(self.pid, procs)
        workers = [p for p in below
                   if any("tether.relay.worker" in a for a in p.argv)
                   and _base(p.argv[0]) != "bwrap"]
        socks = {os.path.join(p.argv[-1], "tmux.sock") for p in workers}
        servers, clients = [], []
        for p in procs:
            if _base(p.argv[0]) != "tmux" or "-S" not in p.argv:
                continue
            i = p.argv.index("-S")
            if i + 1 < len(p.argv) and p.argv[i + 1] in socks:
                (servers if "new-session" in p.argv else clients).append(p.pid)
        panes = [d.pid for s in servers for d in descendants(s, procs)]
        known = {self.pid, *servers, *clients, *panes, *(p.pid for p in workers)}
        jail = [p.pid for p in below if _base(p.argv[0]) == "bwrap"]
        other = [p.pid for p in below if p.pid not in known and p.pid not in jail]
        return {
            "relay": [self.pid],
            "jail (bwrap)": jail,
            "workers": [p.pid for p in workers],
            "replica tmux servers": servers,
            "replica panes": panes,
            "replica tmux clients": clients,
            "other": other,
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_host_home(home: Path, conf: str, tmux_conf: str = TMUX_CONF) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / ".tether.conf").write_text(conf)
    (home / ".tmux.conf").write_text(tmux_conf)


def agent_pid(env: dict[str, str], sock: str) -> int | None:
    """The live agent sharing ``sock``, from its pid file: an agent forked by the
    zygote (``tether.zygote``) has the zygote's command line."""
    from tether.client.paths import pid_path

    path = pid_path(sock, Path(env["XDG_STATE_HOME"]) / "tether")
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


class HostSession:
    """`tether -S SOCK new-session -d` in ``home`` (whose ~/.tether.conf names the relay)."""

    def __init__(self, wd: Workdir, home: Path, name: str, size: tuple[int, int] = (80, 24),
                 command: Sequence[str] = (), start: bool = True) -> None:
        self.wd = wd
        self.env = wd.env(home)
        self.sock = str(home / f"{name}.sock")
        self.size = size
        self.command = list(command)
        self.started_at = 0.0
        if start:
            self.start()
            self.wait_ready()

    def start(self) -> None:
        self.started_at = time.perf_counter()
        p = subprocess.run(
            tether_cmd("-S", self.sock, "new-session", "-d", "-x", str(self.size[0]), "-y",
                       str(self.size[1]), *self.command),
            env=self.env, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise BenchError(f"tether new-session failed: {p.stderr}")
        self.wd.on_close(self.close)

    def wait_ready(self, timeout: float = 30) -> None:
        p = subprocess.run(tether_cmd("-S", self.sock, "wait", "tether-ready"), env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise BenchError(f"tether wait tether-ready failed: {p.stderr}")

    def display(self, fmt: str) -> str:
        return tmux(self.sock, "display", "-p", fmt.replace("#{tether_", "#{@tether_")).strip()

    def ssh(self, readonly: bool = False) -> list[str]:
        """The mate's ssh command (argv), with options that keep it non-interactive."""
        line = self.display("#{tether_ssh_ro}" if readonly else "#{tether_ssh}")
        words = line.split()
        if not words or words[0] != "ssh":
            raise BenchError(f"no ssh connection string: {line!r}")
        return ["ssh", *SSH_OPTS, *words[1:]]

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def agent_pids(self) -> list[int]:
        pid = agent_pid(self.env, self.sock)
        return [pid] if pid is not None else []

    def pids(self) -> dict[str, list[int]]:
        """The host side: agent, its control-mode tmux client, the host tmux server."""
        procs = processes()
        agent = self.agent_pids()
        ctl = [d.pid for a in agent for d in descendants(a, procs) if "-C" in d.argv]
        server = [p.pid for p in procs if p.argv[0].rsplit("/", 1)[-1] == "tmux"
                  and self.sock in p.argv and "new-session" in p.argv]
        return {"agent": agent, "agent tmux client": ctl, "host tmux server": server}

    def close(self) -> None:
        agents = self.agent_pids()
        tmux(self.sock, "kill-server", check=False)
        # the agent exits when its tmux server does; end it by pid if it lingers
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in agents):
            time.sleep(0.01)
        end_pids([p for p in agents if pid_alive(p)], 3)


class PlainTmux:
    """The floor: a plain tmux server (same ~/.tmux.conf) with one session."""

    def __init__(self, wd: Workdir, home: Path, name: str, size: tuple[int, int] = (80, 24),
                 command: Sequence[str] = ()) -> None:
        self.env = wd.env(home)
        self.sock = str(home / f"{name}.sock")
        conf = home / ".tmux.conf"
        if not conf.exists():
            home.mkdir(parents=True, exist_ok=True)
            conf.write_text(TMUX_CONF)
        subprocess.run(["tmux", "-S", self.sock, "-f", str(conf), "new-session", "-d", "-x",
                        str(size[0]), "-y", str(size[1]), *command],
                       check=True, env=self.env)
        wd.on_close(self.close)

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def server_pids(self) -> list[int]:
        return [p.pid for p in processes() if p.argv[0].rsplit("/", 1)[-1] == "tmux"
                and self.sock in p.argv and "new-session" in p.argv]

    def close(self) -> None:
        tmux(self.sock, "kill-server", check=False)


def attach_argv(sock: str) -> list[str]:
    return ["tmux", "-u", "-S", sock, "attach"]


# --- ptys ----------------------------------------------------------------------------

_ESC = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]"          # CSI
    rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC
    rb"|\x1b[P_^X][^\x1b]*\x1b\\"         # DCS, APC, PM, SOS
    rb"|\x1b[()*+][ -~]"                  # charset designation
    rb"|\x1b[ -/]*[0-~]"                  # other two-byte escapes
    rb"|[\x00-\x08\x0b-\x1f\x7f]"          # controls (keeps \t and \n)
)


def visible(data: bytes) -> bytes:
    """The printable text of a terminal byte stream (escape sequences removed)."""
    return _ESC.sub(b"", data)


class PtyProc:
    """A process on its own pty (new session, controlling tty); we are its terminal."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], size: tuple[int, int],
                 cwd: str | None = None) -> None:
        master, slave = os.openpty()
        cols, rows = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def ctty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=ctty, close_fds=True,
        )
        os.close(slave)
        os.set_blocking(master, False)
        self.fd = master
        self.received = 0
        self.closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1)
                continue
            view = view[n:]

    def read(self) -> bytes:
        """What is there now (b'' when nothing; raises EOFError at the end)."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return b""
        except OSError as exc:  # EIO: the other side is gone
            raise EOFError from exc
        if not data:
            raise EOFError
        self.received += len(data)
        return data

    def drain(self) -> int:
        n = 0
        with contextlib.suppress(EOFError):
            while data := self.read():
                n += len(data)
        return n

    def wait_visible(self, needle: bytes, timeout: float) -> float:
        """Read until ``needle`` shows among the visible text; perf_counter when it did."""
        return wait_visible_all([(self, needle)], timeout)[0]

    def wait_quiet(self, quiet: float = 0.1, timeout: float = 10.0) -> None:
        """Read until nothing arrived for ``quiet`` seconds (deadline ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], quiet)
            if not r:
                return
            try:
                self.read()
            except EOFError:
                return
        raise BenchError(f"output did not settle within {timeout:.0f}s")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        os.close(self.fd)


def wait_visible_all(targets: Sequence[tuple[PtyProc, bytes]], timeout: float,
                     keep: int = 4096) -> list[float]:
    """Read every pty until its needle shows among its visible text.

    Returns, per target, the perf_counter() of the read that showed it.
    """
    found = wait_visible_some(targets, timeout, keep=keep)
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        what = ", ".join(repr(targets[i][1]) for i in missing)
        raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
    return [f for f in found if f is not None]


def wait_visible_some(targets: Sequence[tuple[PtyProc, bytes]], timeout: float,
                      idle_timeout: float | None = None, keep: int = 4096,
                      tails: list[bytes] | None = None) -> list[float | None]:
    """Like ``wait_visible_all`` but gives up quietly: None for each needle not seen
    within ``timeout``, or once no pty still waited on printed anything for
    ``idle_timeout`` seconds. ``tails`` receives the last output of each pty."""
    tails = tails if tails is not None else []
    tails[:] = [b""] * len(targets)
    found: list[float | None] = [None] * len(targets)
    deadline = time.perf_counter() + timeout
    last_output = time.perf_counter()
    while True:
        waiting = [i for i, f in enumerate(found) if f is None]
        now = time.perf_counter()
        if not waiting or now >= deadline:
            return found
        if idle_timeout is not None and now - last_output > idle_timeout:
            return found
        left = deadline - now
        if idle_timeout is not None:
            left = min(left, idle_timeout)
        r, _, _ = select.select([targets[i][0].fd for i in waiting], [], [], left)
        now = time.perf_counter()
        for i in waiting:
            p, needle = targets[i]
            if p.fd not in r:
                continue
            try:
                data = p.read()
            except EOFError:
                raise BenchError(f"{p.proc.args!r} ended: {tails[i][-300:]!r}") from None
            if data:
                last_output = now
            buf = tails[i] + data
            if needle in visible(buf):
                found[i] = now
            tails[i] = buf[-keep:]


class Drainer:
    """A thread that keeps reading many ptys (idle mates must never block on output)."""

    def __init__(self) -> None:
        self.procs: dict[int, PtyProc] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, p: PtyProc) -> None:
        with self._lock:
            self.procs[p.fd] = p
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                for fd in [fd for fd, p in self.procs.items() if p.closed]:
                    del self.procs[fd]
                fds = list(self.procs)
            try:
                r, _, _ = select.select([*fds, self._wake_r], [], [], 0.5)
            except OSError:  # a pty closed under us; drop it next time round
                continue
            for fd in r:
                if fd == self._wake_r:
                    os.read(self._wake_r, 1024)
                    continue
                with self._lock:
                    p = self.procs.get(fd)
                if p is None:
                    continue
                try:
                    while p.read():
                        pass
                except (EOFError, OSError):
                    with self._lock:
                        self.procs.pop(fd, None)

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)


# --- a counting TCP proxy ------------------------------------------------------------


class CountingProxy:
    """Loopback proxy counting bytes each way: TCP, and optionally UDP on the same port.

    ``up`` counts bytes from the connecting side towards the target, ``down`` the
    bytes back (TCP payload and UDP datagram payload, in ``tcp_*``/``udp_*`` too).
    """

    def __init__(self, target_port: int, listen: tuple[str, int] | None = None,
                 target_host: str = "127.0.0.1", udp: bool = False) -> None:
        self.target = (target_host, target_port)
        self.listen = listen or ("127.0.0.1", free_port())
        self.tcp_up = self.tcp_down = self.udp_up = self.udp_down = 0
        self.last_activity = time.monotonic()
        self._udp = udp
        self._closers: list[Callable[[], None]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("proxy did not start")
        if self._error is not None:
            raise BenchError(f"proxy: {self._error}")

    @property
    def host(self) -> str:
        return self.listen[0]

    @property
    def port(self) -> int:
        return self.listen[1]

    @property
    def up(self) -> int:
        return self.tcp_up + self.udp_up

    @property
    def down(self) -> int:
        return self.tcp_down + self.udp_down

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        server = await asyncio.start_server(self._handle, *self.listen)
        self._closers.append(server.close)
        if self._udp:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpFront(self), local_addr=self.listen)
            self._closers.append(transport.close)

    def _count(self, n: int, up: bool, udp: bool) -> None:
        if udp:
            if up:
                self.udp_up += n
            else:
                self.udp_down += n
        elif up:
            self.tcp_up += n
        else:
            self.tcp_down += n
        self.last_activity = time.monotonic()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for w in (writer, uw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closers += [writer.close, uw.close]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(1 << 16):
                    self._count(len(data), up, False)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, uw, True), pipe(ur, writer, False))

    def reset(self) -> None:
        self.tcp_up = self.tcp_down = self.udp_up = self.udp_down = 0

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_activity

    def close(self) -> None:
        def stop() -> None:
            for fn in self._closers:
                with contextlib.suppress(Exception):
                    fn()
            self._loop.stop()

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(5)


class _UdpFront(asyncio.DatagramProtocol):
    """The proxy's UDP side: one upstream socket per client address."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._count(len(data), True, True)
        up = self.upstreams.get(addr)
        if up is not None:
            up.sendto(data)
            return
        if addr in self.pending:
            self.pending[addr].append(data)
            return
        self.pending[addr] = [data]
        task = asyncio.get_running_loop().create_task(self._open(addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        front = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _src: tuple[str, int]) -> None:
                front.proxy._count(len(data), False, True)
                if front.transport is not None:
                    front.transport.sendto(data, addr)

        transport, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=self.proxy.target)
        self.proxy._closers.append(transport.close)
        self.upstreams[addr] = transport
        for data in self.pending.pop(addr, []):
            transport.sendto(data)


def remote_peers(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, remote address, remote port) of the IPv4 sockets of a process."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    out = []
    for proto in ("tcp", "udp"):
        with contextlib.suppress(OSError), open(f"/proc/net/{proto}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] not in inodes:
                    continue
                addr_hex, port_hex = parts[2].split(":")
                addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex, 16)))
                out.append((proto, addr, int(port_hex, 16)))
    return out


# --- reporting helpers -----------------------------------------------------------------


class Log:
    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Ctx:
    """What every benchmark gets: the mode and a log."""

    quick: bool = False
    log: Log = field(default_factory=Log)


def wait_idle(pids: Iterable[int], quiet: float = 0.3, timeout: float = 15) -> None:
    """Until these processes used no CPU tick for ``quiet`` seconds (or ``timeout``)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    last = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sum(cpu_seconds(p) for p in pids)
        if now == last:
            return
        last = now


def cpu_of(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}


def mem_of(groups: dict[str, list[int]]) -> dict[str, Mem]:
    out = {}
    for name, pids in groups.items():
        total = Mem()
        for p in pids:
            total = total + memory(p)
        out[name] = total
    return out
