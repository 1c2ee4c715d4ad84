"""A private tmux server for the core tests (imported by conftest and test modules)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Tmux:
    """A private tmux server (``-S SOCK -f /dev/null``), driven by subprocess."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.sock = str(directory / "sock")
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        self.env["LANG"] = "C.UTF-8"
        self.env["LC_ALL"] = "C.UTF-8"

    def run_bytes(self, *args: str, check: bool = True) -> bytes:
        done = subprocess.run(
            ["tmux", "-S", self.sock, "-f", "/dev/null", *args],
            capture_output=True,
            env=self.env,
            timeout=10,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {args!r} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout

    def run(self, *args: str, check: bool = True) -> str:
        return self.run_bytes(*args, check=check).decode()

    def wait_running(self, pane: str, command: str = "sleep") -> None:
        """Wait until ``command`` runs in ``pane``: tmux has set up its tty by then, so a
        test's own termios settings (raw mode) are not overwritten afterwards."""
        current = wait_for(
            lambda: self.run("display", "-p", "-t", pane, "#{pane_current_command}").strip(),
            lambda name: name == command,
        )
        assert current == command, f"{pane} runs {current!r}, not {command!r}"

    def kill(self) -> None:
        self.run("kill-server", check=False)


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 5.0) -> T:
    """Poll ``probe`` until ``ok`` holds for its value; return the last value either way."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value
