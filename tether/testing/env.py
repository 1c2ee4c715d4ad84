"""Isolated environments: HOME, XDG_STATE_HOME and TMPDIR of our own, and commands in them.

Every process the harness starts gets a private home, so nothing reads or writes
the user's config, state or tmux sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tether import command

from .procs import HarnessError, end_pids, processes

PY = sys.executable
SSH_OPTS = [
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
]
"""A mate's ssh options: no user config, no host key prompts, never interactive."""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tether_env(home: Path, *, tmp: Path | None = None, term: str = "tmux-256color",
               shell: str | None = None) -> dict[str, str]:
    """This environment with ``home`` as HOME and state (and ``tmp`` as TMPDIR)."""
    env = dict(os.environ)
    for k in ("TMUX", "TMUX_PANE"):
        env.pop(k, None)
    env.update(
        HOME=str(home),
        XDG_STATE_HOME=str(home / "state"),
        TETHER_CONF=str(home / ".tether.conf"),
        LANG="C.UTF-8",
        TERM=term,
    )
    if tmp is not None:
        env.update(TMPDIR=str(tmp), TMUX_TMPDIR=str(tmp))
    if shell is not None:
        env["SHELL"] = shell
    return env


def tether_cmd(*args: str) -> list[str]:
    """argv of the CLI run from this interpreter (the installed or checked-out tether)."""
    return command(*args)


def tmux(sock: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """One tmux command on server ``sock``; its output."""
    p = subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise HarnessError(f"tmux {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def tether(env: dict[str, str], *args: str, timeout: float = 30, check: bool = True,
           prefix: Sequence[str] = ()) -> str:
    """Run the CLI as a user would (``prefix``: e.g. `ip netns exec NS`); its output."""
    p = subprocess.run([*prefix, *tether_cmd(*args)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise HarnessError(f"tether {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p.stdout


def have_tools() -> str | None:
    """Why the real-process harness cannot run here (None: it can)."""
    for tool in ("tmux", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def strip_lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.split("\n")]


class Workdir:
    """A private directory; also HOME, state and TMPDIR of the processes started in it.

    On close, every process whose command line names the directory was started by
    us (tmux servers, agents, the relay and its workers): each is ended by its pid,
    then the directory is removed.
    """

    def __init__(self, name: str, term: str = "tmux-256color") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"tb-{name}-"))
        (self.path / "tmp").mkdir()
        self.term = term
        self._cleanups: list[Callable[[], None]] = []

    def env(self, home: Path | None = None) -> dict[str, str]:
        return tether_env(home or self.path, tmp=self.path / "tmp", term=self.term,
                          shell="/bin/sh")

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        self._cleanups.clear()
        mine = str(self.path)
        end_pids([p.pid for p in processes() if mine in p.cmdline], 5)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
