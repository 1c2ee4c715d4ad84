"""A parser for tmux control mode (``tmux -C``), with no I/O.

Lines go in; typed notifications and command replies come out. ``%output``
payloads are octal-escaped by tmux and are decoded here byte-exact.
"""

from __future__ import annotations

import re

from .records import Record

_OCTAL = re.compile(rb"\\([0-7]{3})")


def unescape(data: bytes) -> bytes:
    """Undo tmux's escaping of control-mode output (``\\ooo`` for <32 and backslash)."""
    if b"\\" not in data:
        return data
    return _OCTAL.sub(lambda m: bytes((int(m.group(1), 8) & 0xFF,)), data)


class Reply(Record, frozen=False):
    """The output of one command, ``%begin`` to ``%end`` (or ``%error``)."""

    number: int
    ok: bool
    lines: list[bytes]


class Notification(Record):
    """Any other ``%`` line: ``name`` without the percent, the rest split once."""

    name: str
    args: bytes


class PaneOutput(Record):
    pane: int
    data: bytes


class ControlParser:
    """Feeds on complete lines (without the newline)."""

    def __init__(self, muted: set[int] | None = None) -> None:
        self._reply: Reply | None = None
        self.muted = muted if muted is not None else set()
        """Panes whose output is skipped unread (not even unescaped)."""

    def line(self, raw: bytes) -> Reply | Notification | PaneOutput | None:
        if self._reply is not None:
            if raw.startswith((b"%end ", b"%error ")):
                parts = raw.split(b" ")
                if (
                    len(parts) >= 3
                    and parts[2].isdigit()
                    and int(parts[2]) == self._reply.number
                ):
                    reply = self._reply
                    reply.ok = raw.startswith(b"%end")
                    self._reply = None
                    return reply
            self._reply.lines.append(raw)
            return None
        if raw.startswith(b"%output "):
            _, pane, data = raw.split(b" ", 2) if raw.count(b" ") >= 2 else (*raw.split(b" "), b"")
            pid = int(pane[1:])
            return None if pid in self.muted else PaneOutput(pid, unescape(data))
        if raw.startswith(b"%extended-output "):
            # %extended-output %PANE AGE ... : DATA
            head, _, data = raw.partition(b" : ")
            pid = int(head.split(b" ")[1][1:])
            return None if pid in self.muted else PaneOutput(pid, unescape(data))
        if raw.startswith(b"%begin "):
            parts = raw.split(b" ")
            self._reply = Reply(int(parts[2]), True, [])
            return None
        if raw.startswith(b"%"):
            name, _, args = raw[1:].partition(b" ")
            return Notification(name.decode("ascii", "replace"), args)
        return None  # stray line (e.g. before the first %begin)


_LEAF = re.compile(r"(\d+)x(\d+),(\d+),(\d+),(\d+)")
_SIZE = re.compile(r"^[0-9a-f]{4},(\d+)x(\d+),")


def layout_panes(layout: str) -> list[int]:
    """Pane ids named by a tmux layout string, in pane order."""
    return [int(m.group(5)) for m in _LEAF.finditer(layout)]


def layout_size(layout: str) -> tuple[int, int]:
    """The window size a layout string describes."""
    m = _SIZE.match(layout)
    if not m:
        raise ValueError(f"not a tmux layout: {layout[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def layout_pane_sizes(layout: str) -> dict[int, tuple[int, int]]:
    return {int(m.group(5)): (int(m.group(1)), int(m.group(2))) for m in _LEAF.finditer(layout)}


def quote(arg: str) -> str:
    """Quote one argument for a tmux command line.

    Inside single quotes tmux takes every character literally (backslashes
    included), so only the quote itself needs the ``'\\''`` dance.
    """
    return "'" + arg.replace("'", "'\\''") + "'"
