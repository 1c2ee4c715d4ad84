"""A blocking tmux control-mode client, for a process without asyncio.

The relay's replica worker runs once per session, so every MiB it imports is
paid per session: asyncio and ``subprocess`` are most of a worker's private
memory. This client needs neither. ``run`` blocks until its reply (tmux
answers a command in well under a millisecond); between commands the owner
polls ``fd`` for notifications and the replies of commands it sent without
waiting.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from collections.abc import Callable, Sequence

from tether.core.control import ControlParser, Notification, PaneOutput, Reply
from tether.core.errors import TetherError

EventHandler = Callable[[PaneOutput | Notification], None]

MAX_LINE = 4 * 1024 * 1024
"""A longer line than tmux ever sends is dropped, not buffered without bound."""


def spawn(
    argv: Sequence[str], env: dict[str, str], stdin: int, stdout: int, stderr: int
) -> int:
    """Start ``argv`` (looked up on PATH) with the given fds as 0, 1 and 2; its pid.

    ``posix_spawn`` rather than ``subprocess``: no module to import and no
    fork of a large process."""
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    return os.posix_spawnp(argv[0], list(argv), env, file_actions=actions)


class TmuxError(TetherError):
    """A tmux command failed; the message is tmux's own."""


class BlockingTmuxControl:
    """``tmux -S SOCKET -C ARGS`` with replies matched to commands in order."""

    def __init__(self, socket: str, on_event: EventHandler, tmux: str = "tmux") -> None:
        self.socket = socket
        self.tmux = tmux
        self._on_event = on_event
        self._parser = ControlParser()
        self._waiting: deque[bool] = deque()  # per command sent: does run() wait for it
        self._replies: dict[int, Reply] = {}  # position in the order -> reply, for run()
        self._sent = 0
        self._answered = 0
        self._buf = b""
        self.pid = 0
        self.fd = -1  # tmux's stdout, non-blocking; poll it for readability
        self._in = -1
        self.closed = False

    def start(self, args: Sequence[str], env: dict[str, str], timeout: float = 10) -> None:
        """Start the client and wait until tmux has answered the attach."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            self.pid = spawn(
                [self.tmux, "-S", self.socket, "-C", *args], env, in_r, out_w, null
            )
        finally:
            for fd in (in_r, out_w, null):
                os.close(fd)
        self._in, self.fd = in_w, out_r
        os.set_blocking(self.fd, False)
        os.set_inheritable(self._in, False)
        # tmux answers the attach itself with the first %begin/%end block; until
        # then this client is not attached and commands fail with "no current client"
        self._waiting.append(True)
        self._sent = 1
        reply = self._wait(0, timeout, "attach")
        if not reply.ok:
            raise TmuxError(b"; ".join(reply.lines).decode(errors="replace") or "attach failed")

    def send(self, command: str) -> None:
        """Send one command line without waiting; its reply is read and dropped."""
        self._write(command, wait=False)

    def run(self, command: str, timeout: float = 10) -> list[str]:
        """Run a command and return its output lines; raise ``TmuxError`` on failure."""
        n = self._write(command, wait=True)
        reply = self._wait(n, timeout, command)
        lines = [line.decode("utf-8", "replace") for line in reply.lines]
        if not reply.ok:
            raise TmuxError("; ".join(lines) or f"tmux command failed: {command}")
        return lines

    def read(self) -> None:
        """Take in what tmux has written (call when ``fd`` is readable)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            return
        self._buf += data
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > MAX_LINE:
                    self._buf = b""
                return
            raw, self._buf = self._buf[:i], self._buf[i + 1 :]
            item = self._parser.line(raw)
            if item is None:
                continue
            if isinstance(item, Reply):
                if self._waiting:
                    if self._waiting.popleft():
                        self._replies[self._answered] = item
                    self._answered += 1
            else:
                self._on_event(item)

    def close(self) -> None:
        """Close our end; tmux sees EOF and the client exits."""
        if self._in >= 0:
            os.close(self._in)
            self._in = -1
        self.closed = True

    # --- internals ----------------------------------------------------------

    def _write(self, command: str, wait: bool) -> int:
        if "\n" in command:
            raise ValueError("a tmux command line cannot contain a newline")
        if self.closed or self._in < 0:
            raise TmuxError("tmux control connection closed")
        data = command.encode() + b"\n"
        try:
            while data:
                data = data[os.write(self._in, data) :]
        except OSError:
            self._close()
            raise TmuxError("tmux control connection closed") from None
        self._waiting.append(wait)
        self._sent += 1
        return self._sent - 1

    def _wait(self, n: int, timeout: float, what: str) -> Reply:
        deadline = time.monotonic() + timeout
        while n not in self._replies:
            if self.closed:
                raise TmuxError("tmux control connection closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TmuxError(f"tmux did not answer {what.split(' ')[0]!r} in {timeout:g} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                self.read()
        return self._replies.pop(n)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_event(Notification("exit", b""))
