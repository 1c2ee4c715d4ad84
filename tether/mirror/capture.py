"""Turning a tmux server into replication events: the commands to ask and their parsing.

Pure: the host agent (and later the relay, snapshotting its replica) sends
these command lines through its own tmux client and hands the replies back.
"""

from __future__ import annotations

import shlex

from tether.core.control import Reply, quote
from tether.core.limits import MAX_DATA
from tether.core.messages import STATUS_OPTIONS, Binding, PaneImage, Status, Structure, Window
from tether.core.screen import PANE_FORMAT, parse_pane_state, render_pane

from .apply import KEY_LINE, list_keys

__all__ = [
    "HISTORY_LINES",
    "KEY_LINE",
    "LOCAL_COMMANDS",
    "STATUS_FORMAT",
    "WINDOW_FORMAT",
    "binding_list",
    "capture_cmds",
    "list_keys",
    "pane_image",
    "parse_bindings",
    "parse_status",
    "parse_windows",
    "split_confirm",
    "status_cmd",
    "strip_confirm",
    "windows_cmd",
]

HISTORY_LINES = 2000
"""Scrollback lines a pane image carries."""

LOCAL_COMMANDS = {
    "detach-client",
    "copy-mode",
    "choose-tree",
    "choose-client",
    "choose-buffer",
    "command-prompt",
    "display-panes",
    "clock-mode",
    "customize-mode",
    "show-messages",
    "list-keys",
    "refresh-client",
    "suspend-client",
    "switch-client",
    "list-buffers",
    "display-message",
    "display-menu",
    "display-popup",
    "send-prefix",
    "paste-buffer",
    "choose-window",
    "choose-session",
    "show-buffer",
}
"""Bindings that act on the mate's own client, so the replica keeps its own."""

STATUS_FORMAT = "\x1f".join(
    ["#{prefix}"]
    + [
        f"#{{T:{name}}}" if name in ("status-left", "status-right") else f"#{{{name}}}"
        for name in STATUS_OPTIONS
    ]
)
"""One ``display -p`` for the prefix and every replicated status option, left and
right rendered as the host renders them."""
WINDOW_FORMAT = "\x1f".join(
    [
        "#{window_id}",
        "#{window_index}",
        "#{window_active}",
        "#{window_layout}",
        "#{pane_id}",
        "#{window_name}",
    ]
)


def windows_cmd(session: str) -> str:
    """The ``list-windows`` whose reply ``parse_windows`` reads."""
    return f"list-windows -t {quote(session)} -F {quote(WINDOW_FORMAT)}"


def status_cmd(session: str) -> str:
    """The ``display -p`` whose reply ``parse_status`` reads."""
    return f"display -p -t {quote(session)} {quote(STATUS_FORMAT)}"


def parse_windows(lines: list[bytes]) -> Structure:
    """A ``windows_cmd`` reply as the session's structure."""
    windows = []
    active = -1
    for raw in lines:
        f = raw.decode("utf-8", "replace").split("\x1f", 5)
        if len(f) < 6:
            continue
        wid = int(f[0][1:])
        windows.append(Window(wid, int(f[1]), f[5], f[3], int(f[4][1:])))
        if f[2] == "1":
            active = wid
    return Structure(tuple(windows), active)


def parse_status(lines: list[str]) -> Status:
    """A ``status_cmd`` reply as the replicated status options (the prefix skipped)."""
    values = (lines[0] if lines else "").split("\x1f")[1:]
    values += [""] * (len(STATUS_OPTIONS) - len(values))
    return Status(tuple(zip(STATUS_OPTIONS, values, strict=False)))


def parse_bindings(lines: list[str]) -> dict[tuple[str, str], str]:
    """``list-keys`` output to {(table, key): command}, keeping forwardable ones."""
    out: dict[tuple[str, str], str] = {}
    for table, key, command in list_keys(lines):
        if table not in ("prefix", "root"):
            continue
        if table == "root" and (key.startswith(("Mouse", "Wheel", "Double", "Triple"))):
            continue
        first = command.split(None, 1)[0] if command else ""
        if first in LOCAL_COMMANDS or not first:
            continue
        out[(table, key)] = command
    return out


def split_confirm(command: str) -> tuple[str, str]:
    """``confirm-before -p "kill? (y/n)" kill-pane`` -> (``kill-pane``, ``kill? (y/n)``).

    The mate's replica client asks the question; the host then runs the command."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command, ""
    if not words or words[0] != "confirm-before":
        return command, ""
    i, prompt = 1, ""
    while i < len(words) and words[i].startswith("-"):
        if words[i] == "-p" and i + 1 < len(words):
            prompt = words[i + 1]
        i += 2 if words[i] in ("-p", "-t", "-c") else 1
    inner = " ".join(words[i:])
    return inner, prompt or f"{inner.split(' ', 1)[0]}? (y/n)"


def strip_confirm(command: str) -> str:
    """The command a confirmed binding runs once the mate said yes."""
    return split_confirm(command)[0]


def binding_list(bindings: dict[tuple[str, str], str]) -> tuple[Binding, ...]:
    """Parsed bindings as replicated: the command stays on the host, the prompt travels."""
    return tuple(Binding(t, k, split_confirm(command)[1]) for (t, k), command in bindings.items())


def capture_cmds(pane: int, history: bool = True) -> list[str]:
    """The three commands whose replies ``pane_image`` turns into a pane image."""
    # -N: trailing spaces can carry a background colour (htop's, vim's bars)
    t = f"%{pane}"
    return [
        f"display -p -t {t} {quote(PANE_FORMAT)}",
        f"capture-pane -p -e -N -t {t}" + (f" -S -{HISTORY_LINES}" if history else ""),
        f"capture-pane -p -e -N -a -q -t {t}",
    ]


def pane_image(pane: int, parts: list[Reply]) -> PaneImage | None:
    """The replies to ``capture_cmds`` as bytes that redraw the pane, within MAX_DATA."""
    info, content, normal = parts
    if not info.ok or not content.ok or not info.lines:
        return None
    state = parse_pane_state(info.lines[0].decode("ascii", "replace"))
    lines = content.lines
    height = state.height
    history, screen = lines[:-height] if height else lines, lines[-height:] if height else []
    normal_lines = normal.lines if normal.ok and state.alternate else None
    data = render_pane(state, history, screen, normal_lines)
    while len(data) > MAX_DATA and history:
        history = history[len(history) // 4 + 1 :]
        data = render_pane(state, history, screen, normal_lines)
    return PaneImage(pane, data[-MAX_DATA:])
