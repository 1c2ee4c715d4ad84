"""Where tether keeps per-user state: cheap to import (the CLI needs it first)."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def state_path() -> str:
    """The state directory, made if missing; without pathlib, whose imports
    (re, urllib.parse, ipaddress) cost the CLI ~9 ms."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    d = os.path.join(base, "tether")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def state_dir() -> Path:
    from pathlib import Path

    return Path(state_path())


def _digest(socket: str) -> str:
    import hashlib

    return hashlib.sha256(os.path.abspath(socket).encode()).hexdigest()[:16]


def messages_path(socket: str) -> Path:
    """Where the agent sharing ``socket`` keeps its message log."""
    return state_dir() / f"messages-{_digest(socket)}.log"


def pid_path(socket: str, state: Path | None = None) -> Path:
    """Where the agent sharing ``socket`` writes its pid (it may be a fork of the
    zygote, whose command line names no socket); ``state``: another user's
    state directory (tests, benchmarks) instead of ours."""
    return (state or state_dir()) / f"agent-{_digest(socket)}.pid"
