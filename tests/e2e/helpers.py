"""End-to-end helpers: a real relay, real hosts, mates running real `ssh` in tmux.

Everything is driven as a person would: the mate's `ssh` runs inside a
separate local tmux server; we type with send-keys and read the screen with
capture-pane. Waits are on conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tether.client.paths import pid_path

T = TypeVar("T")

SSH_OPTS = [
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
]


def wait_for(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def tmux(sock: str, *args: str, check: bool = True) -> str:
    p = subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"tmux {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def tether_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TMUX", None)
    env["HOME"] = str(home)
    env["XDG_STATE_HOME"] = str(home / "state")
    env["TETHER_CONF"] = str(home / ".tether.conf")
    env["LANG"] = "C.UTF-8"
    env["TERM"] = "tmux-256color"
    return env


def tether(env: dict[str, str], *args: str, timeout: float = 30, check: bool = True,
           prefix: Sequence[str] = ()) -> str:
    p = subprocess.run([*prefix, sys.executable, "-m", "tether", *args], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"tether {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    """`tether relay` as a user runs it, on loopback."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str,
                 prefix: Sequence[str] = (), bind: str = "127.0.0.1",
                 public: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.public = public
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = workdir / "relay.log"
        env = tether_env(workdir)
        # the relay's own temporary files (the replicas' directories) where a test
        # can look at them; short, for the tmux sockets in them (108 bytes at most)
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-test-"))
        env["TMPDIR"] = str(self.tmp)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tether", "relay", "-k", str(workdir / "keys"),
             "-b", bind, "-h", public, "-p", str(self.port), "-l", str(self.log), "-v", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        assert self.proc.stdout is not None
        self.banner: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"relay exited: {''.join(self.banner)}")
            self.banner.append(line)
            if "fingerprint" in line and "rsa" in line:
                break
        self.config_lines = [ln.strip() for ln in self.banner if ln.strip().startswith("set -g")]
        self.fingerprint = next(ln.split()[-1] for ln in self.config_lines if "ed25519" in ln)

    def replica_dirs(self) -> list[Path]:
        """The session directories of this relay's replicas (jailed or not)."""
        return sorted(self.tmp.glob("tether-relay-*/tether-replica-*")) + sorted(
            self.tmp.glob("tether-replica-*")
        )

    def conf(self, port: int | None = None) -> str:
        lines = []
        for ln in self.config_lines:
            if "tether-server-host" in ln:
                ln = f"set -g tether-server-host {self.public}"
            if "tether-server-port" in ln and port is not None:
                ln = f"set -g tether-server-port {port}"
            lines.append(ln)
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Host:
    """A shared session: `tether -S SOCK new-session -d`, then `wait tether-ready`."""

    def __init__(self, home: Path, conf: str, size: tuple[int, int] = (100, 30),
                 ready: bool = True, prefix: Sequence[str] = (), name: str = "tmux") -> None:
        self.home = home
        self.prefix = list(prefix)
        home.mkdir(parents=True, exist_ok=True)
        (home / ".tether.conf").write_text(conf)
        (home / ".tmux.conf").write_text(
            "set -g default-terminal tmux-256color\nset -g history-limit 5000\n"
        )
        self.env = tether_env(home)
        self.sock = str(home / f"{name}.sock")
        tether(self.env, "-S", self.sock, "new-session", "-d", "-x", str(size[0]), "-y",
               str(size[1]), prefix=self.prefix)
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        tether(self.env, "-S", self.sock, "wait", "tether-ready", timeout=timeout)

    def display(self, fmt: str) -> str:
        return tether(self.env, "-S", self.sock, "display", "-p", fmt).strip()

    @property
    def ssh_rw(self) -> str:
        return self.display("#{tether_ssh}")

    @property
    def ssh_ro(self) -> str:
        return self.display("#{tether_ssh_ro}")

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def type(self, text: str, enter: bool = True, target: str | None = None) -> None:
        args = ["send-keys"] + (["-t", target] if target else []) + ["-l", text]
        self.tmux(*args)
        if enter:
            self.tmux(*(["send-keys"] + (["-t", target] if target else []) + ["Enter"]))

    def screen(self, target: str | None = None, escapes: bool = False) -> str:
        args = ["capture-pane", "-p"] + (["-e"] if escapes else [])
        args += ["-t", target] if target else []
        return self.tmux(*args)

    def messages(self) -> str:
        return tether(self.env, "-S", self.sock, "show-messages", check=False)

    def agent_pid(self) -> int:
        """From the agent's pid file: one forked by the zygote has its command line."""
        path = pid_path(self.sock, self.home / "state" / "tether")
        assert path.exists(), "no agent pid file"
        pid = int(path.read_text())
        os.kill(pid, 0)  # alive
        return pid

    def agent_log(self) -> str:
        logs = list((self.home / "state" / "tether").glob("agent-*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def close(self) -> None:
        try:
            pid: int | None = self.agent_pid()
        except (AssertionError, OSError, ValueError):
            pid = None
        self.tmux("kill-server", check=False)
        # the agent exits when its tmux server does; end it if it lingers
        deadline = time.monotonic() + 5
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.02)
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


class Mate:
    """A person at another terminal: `ssh` inside a local tmux, read with capture-pane."""

    def __init__(self, workdir: Path, ssh_command: str, size: tuple[int, int] = (100, 30),
                 name: str = "mate", prefix: Sequence[str] = ()) -> None:
        self.sock = str(workdir / f"{name}.sock")
        words = ssh_command.split()
        assert words[0] == "ssh", ssh_command
        # run from a shell as people do, and keep the pane open after ssh exits:
        # tmux 3.3 can lose what a pane showed when its process exits
        debug = ["-vvv", "-E", str(workdir / f"{name}.ssh.log")] if os.environ.get(
            "TETHER_TEST_SSHLOG") else []
        cmd = " ".join([*prefix, "ssh", *debug, *SSH_OPTS, *words[1:]])
        cmd += '; echo "[ssh exited: $?]"; sleep 3600'
        env = dict(os.environ, TERM="tmux-256color", LANG="C.UTF-8")
        env.pop("TMUX", None)
        conf = workdir / f"{name}.tmux.conf"
        # remain-on-exit from the start: a refused ssh exits at once, and its last
        # words must stay readable
        conf.write_text("set -g remain-on-exit on\nset -g default-terminal tmux-256color\n")
        subprocess.run(
            ["tmux", "-S", self.sock, "-f", str(conf), "new-session", "-d", "-x",
             str(size[0]), "-y", str(size[1]), cmd],
            check=True, env=env,
        )

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []))

    def lines(self) -> list[str]:
        return self.screen().split("\n")

    def status_line(self) -> str:
        """The bottom row, where the replica's status line is."""
        return self.screen().rstrip("\n").split("\n")[-1]

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-l", text)
        if enter:
            self.tmux("send-keys", "Enter")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def resize(self, cols: int, rows: int) -> None:
        self.tmux("resize-window", "-x", str(cols), "-y", str(rows))

    def alive(self) -> bool:
        """Whether the mate's ssh is still running."""
        return "[ssh exited:" not in self.screen()

    def wait_text(self, text: str, timeout: float = 15, escapes: bool = False) -> str:
        try:
            return wait_for(lambda: s if text in (s := self.screen(escapes)) else "", timeout,
                            f"{text!r} on the mate's screen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe mate's screen:\n{self.screen()}") from None

    def close(self) -> None:
        self.tmux("kill-server", check=False)


class TcpProxy:
    """A loopback TCP proxy the test can cut, to drop the host's connection on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.accepting = True
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, uw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self._conns.discard(writer)
        self._conns.discard(uw)

    def cut(self) -> int:
        """Abort every proxied connection; returns how many were cut."""

        async def abort() -> int:
            n = len(self._conns)
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()
            return n

        return asyncio.run_coroutine_threadsafe(abort(), self._loop).result(5)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def strip_lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.split("\n")]


def have_tools() -> str | None:
    for tool in ("tmux", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
