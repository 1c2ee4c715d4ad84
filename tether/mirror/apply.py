"""Applying replication events to a tmux server, decided without I/O.

``Mirror`` holds what the replica looks like (host ids to replica ids, names,
bindings, status options as set) and turns a desired ``Structure``,
``Status`` or ``Bindings`` into a plan (see ``tether.mirror.plan``): the tmux
commands to run, in order, fed with tmux's replies. Runners carry plans out
(``run_sync`` for the jailed worker, ``run_async`` for asyncio).

Everything a host sends is data here: names are escaped for tmux's format
expander, status formats and prompts defused, key and table names validated,
panes started as argv (``sleep``, the jail has no shell), counts and sizes
bounded, and tmux's default key tables replaced by ones that run nothing.
"""

from __future__ import annotations

import re

from tether.core.control import layout_panes, layout_size, quote
from tether.core.limits import MAX_DIMENSION, MAX_PANES, MAX_WINDOWS
from tether.core.messages import STATUS_OPTIONS, Binding, Bindings, Status, Structure
from tether.core.tmuxtext import SAFE_PREFIX_KEYS, defuse_format, escape_format, replica_key_policy

from .plan import DONE, RUN, SEND, TRY, ClosePane, Command, OpenPane, Plan, Result

SESSION = "tether"
PANE_ARGV = ("sleep", "2147483647")
"""What a replica pane runs: a process that never reads its tty, started as argv
(tmux runs a single-string command through a shell, and the jail has none)."""
PANE_CMD = " ".join(PANE_ARGV)
MAGIC = b"\x1b_tether:"
MAGIC_END = b"\x1b\\"
"""A replicated binding types MAGIC, its index, MAGIC_END into the mate's pane;
the pane's owner reads it back as "run host binding N"."""
AWAY = "#{?@tether_notice,#[reverse] #{@tether_notice} #[default] ,}"
KEY = re.compile(
    r"^(?:[CMS]-)*(?:\\[!-~]|[!%&()*+,\-./0-9:<=>?@A-Z\[\]^_`a-z|]|[A-Za-z][A-Za-z0-9]*)$"
)
TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
KEY_LINE = re.compile(r"^bind-key\s+(?:-r\s+)?-T\s+(\S+)\s+(\S+)\s+(.*)$")
"""A line of ``list-keys``: table, key (escaped for tmux's parser), command."""
OPTIONS = (
    # not "window-size manual" globally: tmux 3.3a crashes creating windows
    # with a control client attached then; resize-window makes each window
    # manual instead
    "exit-empty off",
    "destroy-unattached off",
    "history-limit 5000",
    "escape-time 10",
    "status-interval 0",
    "remain-on-exit off",
    "set-titles off",
    "default-terminal tmux-256color",
    "focus-events off",
    "terminal-features[99] '*:RGB'",
    "status-left-length 40",
    "automatic-rename off",
    "allow-rename off",
    "@tether_notice ''",
    "mouse off",
    "copy-command ''",
)
"""Global options of a replica server, set once before anything is mirrored."""

WindowPlan = tuple[int, list[int], tuple[int, int]]


def _run(line: str) -> Command:
    return Command(line, RUN)


class Mirror:
    """A replica tmux server as last set; its methods return plans that change it.

    State changes as a plan proceeds, right after the command that made them,
    so a plan aborted by a failing command leaves the state matching tmux.
    """

    status_prefix = AWAY
    """What the replica puts before the host's status-left: the host's absence."""
    options: tuple[str, ...] = OPTIONS
    pane_cmd: str = PANE_CMD
    """What a new replica pane runs, as a tmux command line's arguments (the
    relay's own replica sets a helper that hands the pane's tty out first)."""

    def __init__(self) -> None:
        self.windows: dict[int, str] = {}  # host window id -> replica "@N"
        self.window_panes: dict[int, list[int]] = {}  # host window -> host panes in order
        self.panes: dict[int, str] = {}  # host pane id -> replica "%N"
        self.names: dict[int, str] = {}
        self.bindings: list[Binding] = []
        """The host bindings bound now; MAGIC's index points into this list."""
        self.bound: list[tuple[str, str]] = []
        self.placeholder: str | None = None
        """The window tmux started with, killed once the host's windows exist."""
        self.status: dict[str, str] = {}
        """Status options as last set: a host's status line changes one option at
        a time (its clock, once a minute, in every session at once)."""

    # --- a fresh server ----------------------------------------------------------

    def setup(self) -> Plan:
        """Options, a locked key table, and the placeholder window to replace."""
        for opt in self.options:
            yield _run(f"set -g {opt}")
        # a pane redraw (a host frame, a reset) must not push the old screen
        # into the mates' scrollback as a copy
        yield Command("set -g scroll-on-clear off", TRY)
        yield _run(f"set -g status-left {quote(self.status_prefix + '[tether] ')}")
        yield from self.lock_keys()
        reply = yield _run(f"list-windows -t {SESSION} -F '#{{window_id}}'")
        self.placeholder = reply.lines[0].strip() if reply.lines else None

    def lock_keys(self) -> Plan:
        """Replace tmux's default key tables with ones that run nothing on the relay.

        The replica starts with ``-f /dev/null``, so a mate's ``C-b :`` would open
        the replica's command prompt (``run-shell`` in the jail), ``C-b c`` would
        start a shell there, and copy mode could pipe to a command. Mates' keys
        either run the host's bindings (``set_bindings``) or the few local ones
        in ``SAFE_PREFIX_KEYS``.
        """
        for table in ("prefix", "root"):
            yield _run(f"unbind-key -a -T {table}")
        for key, command in SAFE_PREFIX_KEYS.items():
            yield _run(f"bind-key -T prefix {key} {command}")
        for table in ("copy-mode", "copy-mode-vi"):
            reply = yield _run(f"list-keys -T {table}")
            for _table, key, command in list_keys(list(reply.lines)):
                keep = replica_key_policy(command)
                if keep is None:
                    yield _run(f"unbind-key -T {table} {key}")
                elif keep != command.strip():
                    yield _run(f"bind-key -T {table} {key} {keep}")

    # --- structure ---------------------------------------------------------------

    def reconcile(self, st: Structure) -> Plan:
        """Windows, panes, layouts, names, order and selection as the host has them."""
        plans = _check(st)
        wanted = {w.id for w in st.windows}
        for w in st.windows:
            if w.id not in self.windows:
                yield from self._new_window(w.id, layout_panes(w.layout)[0])
        if self.placeholder is not None and st.windows:
            yield Command(f"kill-window -t {self.placeholder}", TRY)
            self.placeholder = None
        for hid in [h for h in self.windows if h not in wanted]:
            if len(self.windows) <= 1:
                break
            wid = self.windows.pop(hid)
            for hp in self.window_panes.pop(hid, []):
                yield from self._drop_pane(hp)
            self.names.pop(hid, None)
            yield Command(f"kill-window -t {wid}", TRY)
        for (hid, panes, (cols, rows)), w in zip(plans, st.windows, strict=True):
            yield from self._reconcile_window(hid, panes, cols, rows, w.layout)
            if self.names.get(hid) != w.name:
                # rename-window expands formats: the host's name must stay data
                yield _run(f"rename-window -t {self.windows[hid]} {quote(escape_format(w.name))}")
                self.names[hid] = w.name
            yield Command(f"move-window -d -s {self.windows[hid]} -t {SESSION}:{w.index}", TRY)
            active = self.panes.get(w.active_pane)
            if active is not None:
                yield _run(f"select-pane -t {active}")
        yield from self.select_active(st.active_window)

    def select_active(self, host_window: int) -> Plan:
        """Show the host's active window: every mate follows the host."""
        target = self.windows.get(host_window)
        if target is not None:
            yield _run(f"select-window -t {target}")

    def _new_window(self, hid: int, first: int) -> Plan:
        reply = yield _run(
            f"new-window -d -t {SESSION}: -P "
            f"-F '#{{window_id}} #{{pane_id}} #{{pane_tty}}' {self.pane_cmd}"
        )
        wid, pid, ptty = reply.lines[0].split()
        self.windows[hid] = wid
        yield from self._add_pane(first, pid, ptty)
        self.window_panes[hid] = [first]

    def _reconcile_window(
        self, hid: int, desired: list[int], cols: int, rows: int, layout: str
    ) -> Plan:
        wid = self.windows[hid]
        current = self.window_panes.get(hid, [])
        if current != desired:
            # room to split however many panes arrive, then the real size below
            yield _run(f"resize-window -t {wid} -x 1000 -y 1000")
            for i, hp in enumerate(desired):
                if hp not in current:
                    yield from self._split(wid, current, desired, i)
            for hp in [p for p in current if p not in desired]:
                yield from self._drop_pane(hp, kill=True)
                current.remove(hp)
            # same set, maybe another order (swap-pane on the host): swap into place
            for i, hp in enumerate(desired):
                if current[i] != hp:
                    j = current.index(hp)
                    yield _run(f"swap-pane -d -s {self.panes[hp]} -t {self.panes[current[i]]}")
                    current[i], current[j] = current[j], current[i]
            self.window_panes[hid] = current
        yield _run(f"resize-window -t {wid} -x {cols} -y {rows}")
        yield _run(f"select-layout -t {wid} {quote(layout)}")

    def _split(self, wid: str, current: list[int], desired: list[int], i: int) -> Plan:
        """Make ``desired[i]`` next to its predecessor (or first, before the first)."""
        hp = desired[i]
        if hp in self.panes:  # moved from another window (join-pane/break-pane)
            yield from self._drop_pane(hp, kill=True)
            for other in self.window_panes.values():
                if hp in other:
                    other.remove(hp)
        where = f"-t {self.panes[desired[i - 1]]}" if i else f"-b -t {self.panes[current[0]]}"
        reply = yield _run(
            f"split-window -d {where} -P -F '#{{pane_id}} #{{pane_tty}}' {self.pane_cmd}"
        )
        pid, ptty = reply.lines[0].split()
        yield from self._add_pane(hp, pid, ptty)
        current.insert(current.index(desired[i - 1]) + 1 if i else 0, hp)
        # share the room out again, or repeated splits halve one pane to nothing
        yield _run(f"select-layout -t {wid} tiled")

    def _add_pane(self, host: int, replica: str, tty: str) -> Plan:
        yield OpenPane(host, replica, tty)
        self.panes[host] = replica

    def _drop_pane(self, host: int, kill: bool = False) -> Plan:
        replica = self.panes.pop(host, None)
        if replica is None:
            return
        yield ClosePane(host)
        if kill:
            yield Command(f"kill-pane -t {replica}", SEND)

    # --- pane resets, status line, bindings, presence -------------------------------

    def reset(self, host_pane: int) -> Plan:
        """Before a pane image is written: drop the pane's scrollback."""
        replica = self.panes.get(host_pane)
        if replica is not None:
            yield _run(f"clear-history -t {replica}")

    def set_status(self, status: Status) -> Plan:
        """The host's status options, defused (left and right shown literally)."""
        for name, value in status.options:
            if name not in STATUS_OPTIONS:
                continue
            if name in ("status-left", "status-right"):
                value = escape_format(value)
                if name == "status-left":
                    value = self.status_prefix + value
            else:
                value = defuse_format(value)
            if self.status.get(name) == value:
                continue
            reply = yield Command(f"set -g {name} {quote(value)}", TRY)
            if reply.ok:
                self.status[name] = value

    def set_bindings(self, b: Bindings) -> Plan:
        """Bind the host's keys to type MAGIC into the pane; drop the old ones first."""
        for table, key in self.bound:
            reply = yield Command(f"unbind-key -T {table} {key}", TRY)
            if reply.ok and table == "prefix" and key in SAFE_PREFIX_KEYS:
                yield Command(f"bind-key -T prefix {key} {SAFE_PREFIX_KEYS[key]}", TRY)
        self.bound = []
        self.bindings = []
        if KEY.match(b.prefix):
            yield Command(f"set -g prefix {b.prefix}", TRY)
        for binding in b.keys:
            if not (TABLE.match(binding.table) and KEY.match(binding.key)):
                continue
            magic = MAGIC + str(len(self.bindings)).encode() + MAGIC_END
            action = "send-keys -H " + " ".join(f"{c:02x}" for c in magic)
            if binding.confirm:
                # ask on the mate's own client, as the host's tmux would ask the host
                prompt = defuse_format(binding.confirm[:200])
                action = f"confirm-before -p {quote(prompt)} {quote(action)}"
            reply = yield Command(f"bind-key -T {binding.table} {binding.key} {action}", TRY)
            if reply.ok:
                self.bindings.append(binding)
                self.bound.append((binding.table, binding.key))

    def presence(self, present: bool, text: str) -> Plan:
        """The host's absence in the status line, and once as a message to every mate."""
        note = "" if present else text
        yield _run(f"set -g @tether_notice {quote(escape_format(note))}")
        if not present:
            # the notice leaves the status line when the host is back; a message
            # then would freeze the mates' screens for display-time
            yield from self.tell(text)
        yield Command("refresh-client -S", TRY)

    def tell(self, text: str) -> Plan:
        """``text`` shown once to every attached client (tmux shows it to one if not told which)."""
        reply = yield Command("list-clients -F '#{client_name}'", TRY)
        for c in reply.lines if reply.ok else ():
            if c.strip():
                yield Command(
                    f"display-message -c {quote(c.strip())} {quote(escape_format(text))}", SEND
                )


def list_keys(lines: list[str]) -> list[tuple[str, str, str]]:
    """``list-keys`` output as (table, key, command), lines of another shape skipped."""
    out = []
    for line in lines:
        m = KEY_LINE.match(line.strip())
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
    return out


def _check(st: Structure) -> list[WindowPlan]:
    """Each window's panes and size, or ValueError for a structure out of bounds."""
    if len(st.windows) > MAX_WINDOWS:
        raise ValueError(f"more than {MAX_WINDOWS} windows")
    total = 0
    plans: list[WindowPlan] = []
    for w in st.windows:
        panes = layout_panes(w.layout)
        if not panes or len(set(panes)) != len(panes):
            raise ValueError(f"bad layout for window {w.id}")
        cols, rows = layout_size(w.layout)
        if not (1 <= cols <= MAX_DIMENSION and 1 <= rows <= MAX_DIMENSION):
            raise ValueError("window size out of range")
        total += len(panes)
        plans.append((w.id, panes, (cols, rows)))
    if total > MAX_PANES:
        raise ValueError(f"more than {MAX_PANES} panes")
    return plans


__all__ = [
    "AWAY", "DONE", "KEY_LINE", "MAGIC", "MAGIC_END", "PANE_ARGV", "SESSION", "Mirror", "Result",
    "list_keys",
]  # fmt: skip
