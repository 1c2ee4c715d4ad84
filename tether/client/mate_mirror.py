"""The mate's own view of the host's session in the join client's tmux.

``MateMirror`` is the relay's ``Mirror`` (``tether.mirror.apply``) with what is the
mate's rather than the host's: copy mode as the mate's config has it, tmux's pane
mouse bindings (not its menus), the mate's mouse, scrollback and copy command, and
a view that follows the host's active window or looks around (``FOLLOW_KEY``)
while the host stays where it is. Plans only, as ``Mirror``'s: no I/O here.
"""

from __future__ import annotations

from tether.core.messages import Bindings
from tether.core.tmuxtext import SAFE_PREFIX_KEYS
from tether.mirror.apply import AWAY, MAGIC, MAGIC_END, OPTIONS, Mirror
from tether.mirror.plan import TRY, Command, Plan

__all__ = [
    "FOLLOWING_TEXT", "FOLLOW_KEY", "FOLLOW_MARK", "LOOKING_TEXT", "LOOK_KEYS", "LOOK_MOUSE_KEYS",
    "MATE_MOUSE_KEYS", "MATE_OWNED_OPTIONS", "MATE_PREFIX_KEYS", "MateMirror",
]

MATE_PREFIX_KEYS: dict[str, str] = {**SAFE_PREFIX_KEYS, "]": "paste-buffer -p"}
"""The local prefix keys: the relay's, plus pasting the mate's own buffer (on a
relay buffers are shared by every mate, here they are the mate's alone)."""

FOLLOW_KEY = "F"
"""The prefix key that switches between following the host's window and looking
around; the join client's own, whatever the host binds to it."""
FOLLOW_MARK = b"follow"
LOOK_KEYS: dict[str, str] = {
    **{str(i): f"select-window -t :={i}" for i in range(10)},
    "n": "next-window",
    "p": "previous-window",
    "l": "last-window",
}
"""While looking around, these prefix keys change the mate's view only; while
following they run the host's bindings, which move the host (and every mate)."""
IN_MODE = "#{||:#{pane_in_mode},#{mouse_any_flag}}"
MATE_MOUSE_KEYS: dict[str, str] = {
    "MouseDown1Pane": "select-pane -t = \\; send-keys -M",
    "MouseDown2Pane": f"select-pane -t = \\; if -F '{IN_MODE}' {{ send-keys -M }} "
    "{ paste-buffer -p }",
    "MouseDrag1Pane": f"if -F '{IN_MODE}' {{ send-keys -M }} {{ copy-mode -M }}",
    "WheelUpPane": f"if -F '{IN_MODE}' {{ send-keys -M }} {{ copy-mode -e }}",
    "DoubleClick1Pane": f"select-pane -t = \\; if -F '{IN_MODE}' {{ send-keys -M }} "
    "{ copy-mode -H ; send-keys -X select-word ; run-shell -d 0.3 ; "
    "send-keys -X copy-pipe-and-cancel }",
    "TripleClick1Pane": f"select-pane -t = \\; if -F '{IN_MODE}' {{ send-keys -M }} "
    "{ copy-mode -H ; send-keys -X select-line ; run-shell -d 0.3 ; "
    "send-keys -X copy-pipe-and-cancel }",
}
"""tmux's mouse bindings of panes, for a mate whose config turns the mouse on:
a click selects the pane to type into, a drag or the wheel enters copy mode,
a program that asked for the mouse gets it. Not the menus (they split and
kill panes here), nor the border drag (resizes here), nor the status line's
window clicks while following."""
LOOK_MOUSE_KEYS: dict[str, str] = {
    "MouseDown1Status": "select-window -t =",
    "WheelUpStatus": "previous-window",
    "WheelDownStatus": "next-window",
}
MATE_OWNED_OPTIONS = frozenset({"mouse", "history-limit", "set-titles", "copy-command"})
"""Options the mate's config sets for their own tmux, which the relay's replica forces."""
LOOKING = "#{?@tether_looking,#[reverse] looking #[default] ,}"
FOLLOWING_TEXT = "tether: following the host's window"
LOOKING_TEXT = (
    "tether: looking around: window keys (0-9 n p l) move only your view; "
    f"prefix {FOLLOW_KEY} follows the host again"
)



def _typing(mark: bytes) -> str:
    """A tmux command typing MAGIC, ``mark``, MAGIC_END into the pane (read in ``_on_keys``)."""
    return "send-keys -H " + " ".join(f"{c:02x}" for c in MAGIC + mark + MAGIC_END)


class MateMirror(Mirror):
    """The relay's ``Mirror`` with the mate's copy-mode tables left alone (see above),
    and a view of the mate's own: following the host's active window (the default),
    or looking at another one while the host stays where it is."""

    status_prefix = AWAY + LOOKING
    options = tuple(o for o in OPTIONS if o.split()[0] not in MATE_OWNED_OPTIONS)

    def __init__(self, follow: bool = True) -> None:
        super().__init__()
        self.following = follow
        self.host_window: int | None = None
        """The host's active window, as last reconciled."""
        self.host_bindings: Bindings | None = None
        self.look_bound: list[tuple[str, str]] = []
        """(table, key) bound here to look around, over the host's bindings."""

    def setup(self) -> Plan:
        yield from super().setup()
        yield Command(f"set -g @tether_looking {'0' if self.following else '1'}")

    def lock_keys(self) -> Plan:
        """Lock the prefix and root tables as the relay does; keep copy mode as configured."""
        for table in ("prefix", "root"):
            yield Command(f"unbind-key -a -T {table}")
        for key, command in MATE_PREFIX_KEYS.items():
            yield Command(f"bind-key -T prefix {key} {command}")
        for key, command in MATE_MOUSE_KEYS.items():
            yield Command(f"bind-key -T root {key} {command}")
        yield from self._own_keys()

    def select_active(self, host_window: int) -> Plan:
        """The host's active window, shown while following (and at first, to start somewhere)."""
        first = self.host_window is None
        self.host_window = host_window
        if self.following or first:
            yield from super().select_active(host_window)

    def set_bindings(self, b: Bindings) -> Plan:
        self.host_bindings = b
        yield from self._unbind_look()
        yield from super().set_bindings(b)
        yield from self._own_keys()

    def _own_keys(self) -> Plan:
        """The follow switch, and while looking around the window keys, over the host's."""
        yield Command(f"bind-key -T prefix {FOLLOW_KEY} {_typing(FOLLOW_MARK)}", TRY)
        if self.following:
            return
        keys = [("prefix", k, c) for k, c in LOOK_KEYS.items()]
        keys += [("root", k, c) for k, c in LOOK_MOUSE_KEYS.items()]
        for table, key, command in keys:
            reply = yield Command(f"bind-key -T {table} {key} {command}", TRY)
            if reply.ok:
                self.look_bound.append((table, key))

    def _unbind_look(self) -> Plan:
        for table, key in self.look_bound:
            yield Command(f"unbind-key -T {table} {key}", TRY)
        self.look_bound = []

    def follow(self, on: bool) -> Plan:
        """Switch between following the host's window and looking around."""
        self.following = on
        yield Command(f"set -g @tether_looking {'0' if on else '1'}")
        if self.host_bindings is not None:
            yield from self.set_bindings(self.host_bindings)  # the host's keys back, or ours
        else:
            yield from self._unbind_look()
            yield from self._own_keys()
        if on and self.host_window is not None:
            yield from super().select_active(self.host_window)
        yield Command("refresh-client -S", TRY)
