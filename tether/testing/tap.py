"""Watch a tmux server as a benchmark would: a control-mode client (``tmux -C attach``).

``Tap`` types with ``send-keys`` on its own client, timestamps every ``%output``
of the attached pane as it arrives, and confirms with ``capture-pane`` that the
screen shows what is expected; a ``Hit`` is timed at the arrival of the output
that made it true. Used by ``bench/roaming.py`` on each mate's local tmux.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .mate import visible
from .procs import HarnessError

_OCTAL = re.compile(rb"\\([0-7]{3})")
_REP = re.compile(rb"([!-~])\x1b\[(\d*)b")


def expand_rep(data: bytes) -> bytes:
    """Expand REP (``CSI n b``: repeat the character before ``n`` times), as a
    terminal would, so ``visible`` text holds the repeated characters."""
    return _REP.sub(lambda m: m.group(1) * (1 + int(m.group(2) or 1)), data)


@dataclass
class Hit:
    """When a wait was satisfied (``perf_counter``), the screen that satisfied it, and
    whether it was timed by the confirming capture rather than an output chunk."""

    t: float
    screen: str
    late: bool = False


class Tap:
    """A control-mode client of a mate's local tmux: types, and timestamps pane output."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        env = dict(os.environ)
        env.pop("TMUX", None)
        self.proc = subprocess.Popen(
            ["tmux", "-S", sock, "-C", "attach"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0,
        )
        self.cond = threading.Condition()
        self.chunks: list[tuple[float, bytes]] = []
        self.replies: list[tuple[bool, list[bytes]]] = []
        self.dead = False
        self._cmd_lock = threading.Lock()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        # the attach itself is answered with a %begin/%end block: sync past it
        deadline = time.monotonic() + 10
        while True:
            ok, lines = self.command("display -p tap-ready", raw=True)
            if ok and b"tap-ready" in lines:
                break
            if time.monotonic() > deadline:
                raise HarnessError("the control client of the mate's tmux did not answer")

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        block: list[bytes] | None = None
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            now = time.perf_counter()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if block is not None:
                    if line.startswith((b"%end ", b"%error ")):
                        with self.cond:
                            self.replies.append((line.startswith(b"%end"), block))
                            self.cond.notify_all()
                        block = None
                    else:
                        block.append(line)
                elif line.startswith(b"%begin "):
                    block = []
                elif line.startswith(b"%output "):
                    parts = line.split(b" ", 2)
                    payload = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]),
                                         parts[2] if len(parts) > 2 else b"")
                    with self.cond:
                        self.chunks.append((now, payload))
                        self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def command(self, line: str, raw: bool = False, timeout: float = 10) -> tuple[bool, list[Any]]:
        """Run one tmux command on the control client; (ok, output lines)."""
        assert self.proc.stdin is not None
        with self._cmd_lock:
            with self.cond:
                self.replies.clear()
            self.proc.stdin.write(line.encode() + b"\n")
            deadline = time.monotonic() + timeout
            with self.cond:
                while not self.replies:
                    left = deadline - time.monotonic()
                    if self.dead or left <= 0:
                        raise HarnessError(f"no answer from the mate's tmux to {line!r}")
                    self.cond.wait(left)
                ok, lines = self.replies.pop(0)
        if raw:
            return ok, lines
        return ok, [ln.decode(errors="replace") for ln in lines]

    def mark(self) -> int:
        """A position in the output seen so far, for ``wait(since=...)``."""
        with self.cond:
            return len(self.chunks)

    def send_literal(self, text: str) -> float:
        """``send-keys -l`` into the mate's pane; returns the time just before sending."""
        assert "'" not in text
        t0 = time.perf_counter()
        ok, out = self.command(f"send-keys -l -- '{text}'")
        if not ok:
            raise HarnessError(f"send-keys failed: {out}")
        return t0

    def send_key(self, key: str) -> None:
        """``send-keys KEY`` (a key name such as ``Enter``) into the pane."""
        self.command(f"send-keys {key}")

    def screen(self) -> str:
        """What the pane shows now (``capture-pane -p``)."""
        ok, lines = self.command("capture-pane -p")
        if not ok:
            raise HarnessError(f"capture-pane failed: {lines}")
        return "\n".join(lines)

    def wait(self, since: int, pred: Callable[[str], Any], timeout: float,
             needle: Callable[[str], bytes | None] | bytes | None = None,
             poll: float = 0.05, prepare: Callable[[], None] | None = None) -> Hit | None:
        """Until ``pred(screen)`` holds; checked at each output chunk of the mate's pane.

        The hit's time is the arrival of the first chunk (of those that arrived
        since the last check) whose visible text holds ``needle``; without such a
        chunk, the time the confirming capture started (``late``).
        """
        deadline = time.perf_counter() + timeout
        idx = since
        while True:
            with self.cond:
                if len(self.chunks) <= idx and not self.dead:
                    self.cond.wait(max(0.0, min(poll, deadline - time.perf_counter())))
                # each new chunk with the tail of the one before: a needle may straddle two
                new = [(t, (self.chunks[i - 1][1][-64:] if i else b"") + data)
                       for i, (t, data) in enumerate(self.chunks[idx:], idx)]
                idx = len(self.chunks)
                if self.dead:
                    raise HarnessError("the control client of the mate's tmux died")
            if prepare is not None:
                prepare()
            checked = time.perf_counter()
            screen = self.screen()
            res = pred(screen)
            if res:
                want = needle(screen) if callable(needle) else needle
                if want is not None:
                    for t, data in new:
                        if want in visible(expand_rep(data)):
                            return Hit(t, screen)
                return Hit(checked, screen, late=True)
            if checked >= deadline:
                return None

    def close(self) -> None:
        """Detach: end the control client (killed if it will not go)."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


