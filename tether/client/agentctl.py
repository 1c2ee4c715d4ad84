"""The agent's control socket: how `tether list-mates` and `tether kick-mate`
reach the agent sharing a tmux socket. Cheap to import (the CLI's side).

A unix socket next to the agent's pid file, in tether's state directory
(mode 0700), the socket itself 0600; the agent also checks its peer's uid.
One request a connection: a JSON line ``{"op": "mates"}`` or
``{"op": "kick", "mate": N}``; one JSON line back: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import os
import socket

from tether.core.errors import TetherError

from .paths import pid_path

MAX_LINE = 1024 * 1024
"""Longest answer read (a list of 1024 mates fits)."""
TIMEOUT = 10.0
"""How long the CLI waits for an answer (a kick waits up to 5 s for the relay)."""
_SUN_PATH = 100
"""Past this a unix socket's path does not fit ``sockaddr_un`` (108 bytes on Linux)."""


class AgentUnreachable(TetherError):
    """No agent answers for this tmux socket."""


def control_path(tmux_socket: str) -> str:
    """Where the agent sharing ``tmux_socket`` listens."""
    return str(pid_path(tmux_socket).with_suffix(".ctl"))


def short_path(path: str) -> tuple[str, int | None]:
    """``path`` as bind() and connect() take it: a long one through an open
    descriptor of its directory (``/proc/self/fd/N/NAME``), which the caller
    closes once done."""
    if len(path.encode()) <= _SUN_PATH:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{name}", fd


def request(tmux_socket: str, req: dict[str, object]) -> dict[str, object]:
    """One request to the agent; raises ``AgentUnreachable`` if none listens."""
    import json

    path, fd = short_path(control_path(tmux_socket))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnreachable(str(exc)) from None
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_LINE:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        if fd is not None:
            os.close(fd)
    try:
        answer = json.loads(data)
    except ValueError:
        raise AgentUnreachable("the agent's answer was cut short") from None
    if not isinstance(answer, dict):
        raise AgentUnreachable("the agent's answer is not an object")
    return answer
