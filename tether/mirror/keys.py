"""What a mate typed into a replica pane, read back from its tty.

A replicated binding types MAGIC, a mark, MAGIC_END into the pane (see
``Mirror.set_bindings``); the pane's owner (the relay's worker for ssh mates,
the join client's local tmux) reads keys and marks mixed, in reads that may
split a marker anywhere. ``PaneKeys`` undoes that, one instance per pane.
"""

from __future__ import annotations

from .apply import MAGIC, MAGIC_END

__all__ = ["MAX_MARK", "Mark", "PaneKeys"]

MAX_MARK = 64
"""Bytes after MAGIC before a marker is given up on (a mark is a few characters)."""


class Mark(bytes):
    """A marker's body (a binding's index, or a local command's name), not keys."""


class PaneKeys:
    """Splits a pane's tty reads into keys (``bytes``) and ``Mark``s, in order."""

    __slots__ = ("carry",)

    def __init__(self) -> None:
        self.carry = b""
        """A partial marker at the end of the last read."""

    def feed(self, data: bytes) -> list[bytes]:
        """The keys and marks in ``data`` (after what the last read left open)."""
        out: list[bytes] = []
        data = self.carry + data
        self.carry = b""
        while data:
            i = data.find(MAGIC)
            if i < 0:
                # keep a possible partial marker for the next read
                for k in range(min(len(MAGIC) - 1, len(data)), 0, -1):
                    if MAGIC.startswith(data[-k:]):
                        self.carry = data[-k:]
                        data = data[:-k]
                        break
                if data:
                    out.append(data)
                break
            if i:
                out.append(data[:i])
            j = data.find(MAGIC_END, i)
            if j < 0:
                if len(data) - i > MAX_MARK:
                    out.append(data[i : i + 1])  # not ours after all: the ESC was a key
                    data = data[i + 1 :]
                    continue
                self.carry = data[i:]
                break
            out.append(Mark(data[i + len(MAGIC) : j]))
            data = data[j + len(MAGIC_END) :]
        return out
