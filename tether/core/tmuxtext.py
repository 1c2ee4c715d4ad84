"""Peer strings made safe for a replica tmux: its format expander and its key tables.

A host chooses its window names, status formats and confirm prompts; a mate
chooses its keys. On the relay all of that is data. tmux expands formats in
``rename-window``, ``display-message``, prompts and status options, and a
format can run a shell command (``#(...)``) or expand a value again as a format
(the ``E:`` and ``T:`` modifiers, e.g. ``#{E:window_name}``), so:

- ``escape_format`` makes text show literally (names, notices);
- ``defuse_format`` keeps a host's status formats working (``#I:#W#F``,
  ``#{?window_active,...}``, styles) but never lets them run or re-expand;
- ``replica_key_policy`` decides which of tmux's default bindings a replica
  may keep: none that opens tmux's command prompt on the relay, runs or pipes
  to a command, or changes the replica behind the host's back.
"""

from __future__ import annotations

import re

__all__ = ["SAFE_PREFIX_KEYS", "defuse_format", "escape_format", "replica_key_policy"]

_REEXPAND = re.compile(r"(?:^|[;{])[ET][;:]")


def escape_format(text: str) -> str:
    """Text the format expander shows literally (``##`` is one ``#``)."""
    return text.replace("#", "##")


def defuse_format(text: str) -> str:
    """A host format without shell commands or re-expansion, otherwise unchanged.

    Walked left to right so the parity of ``#`` runs is kept: ``##(`` is a
    literal ``#`` followed by ``(`` in the host's tmux; a plain replace of ``#(``
    would turn it into ``###(``, which runs a command. A ``#{`` whose modifier
    part (up to its first ``}``) holds an ``E`` or ``T`` modifier is shown
    literally instead: those expand a value (a window name, a pane title the
    host's programs set) as a format again. Over-cautious on purpose: a
    harmless format that merely looks like one shows as text.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "#":
            j = text.find("#", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == "#":
            out.append("##")
            i += 2
        elif nxt == "(":
            out.append("##(")
            i += 2
        elif nxt == "{":
            end = text.find("}", i + 2)
            body = text[i + 1 : n if end < 0 else end]
            out.append("##{" if _REEXPAND.search(body) else "#{")
            i += 2
        else:
            out.append("#")
            i += 1
    return "".join(out)


SAFE_PREFIX_KEYS: dict[str, str] = {
    "d": "detach-client",
    "[": "copy-mode",
    "PPage": "copy-mode -u",
    "r": "refresh-client",
    "t": "clock-mode",
}
"""The replica's own prefix bindings, for the host's local commands that are
not replicated (they act on the client that pressed them): leave, scroll back,
redraw, the clock. Every other key either runs the host's binding on the host
or does nothing; tmux's command prompt, choose-tree, customize-mode and menus
would run commands on the relay."""

_COPY_X = re.compile(r"^send-keys -F?X ([a-z-]+)(?: .*)?$")
_COPY_PROMPT = re.compile(r'^command-prompt [^{};]*\{ send-keys -(?:X [a-z-]+|N) "%%" \}$')


def replica_key_policy(command: str) -> str | None:
    """For one of tmux's default copy-mode bindings: the command the replica binds
    (``command`` itself, or a pipe-free equivalent), or None to unbind it.

    Kept: copy-mode motions and selections (``send-keys -X``) and tmux's own
    prompts for a count, a line or a search (``command-prompt ... { send-keys
    -X search-forward "%%" }``, whose template tmux escapes). A copy that pipes
    to a command becomes the same copy without the pipe; anything else (a
    ``run-shell``, ``if-shell``, menus, ``pipe``) is unbound.
    """
    command = command.strip()
    m = _COPY_X.match(command)
    if m:
        x = m.group(1)
        if x.startswith("pipe"):
            return None
        if "pipe" in x:
            if not x.startswith("copy-pipe"):
                return None
            rest = x[len("copy-pipe") :]
            x = {"": "copy-selection", "-and-cancel": "copy-selection-and-cancel",
                 "-no-clear": "copy-selection-no-clear"}.get(rest, "copy" + rest)  # fmt: skip
            return f"send-keys -X {x}"
        return command
    if _COPY_PROMPT.match(command):
        return command
    return None
