"""Mates: OpenSSH `ssh` in a local tmux (read with capture-pane), or under a pty.

In tmux, a test types with send-keys and reads the screen as a person would; under
a pty, a benchmark is the terminal itself and times the bytes as they arrive.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .env import SSH_OPTS, tmux
from .procs import HarnessError, wait_for


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


# --- ptys ------------------------------------------------------------------------

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
        raise HarnessError(f"output did not settle within {timeout:.0f}s")

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
        raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
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
                raise HarnessError(f"{p.proc.args!r} ended: {tails[i][-300:]!r}") from None
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
