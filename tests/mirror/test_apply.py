"""The mirror's apply planner without tmux: from state A and desired B, the commands."""

from __future__ import annotations

import pytest
from fake_tmux import FakeTmux

from tether.core.limits import MAX_DIMENSION, MAX_PANES, MAX_WINDOWS
from tether.core.messages import Binding, Bindings, Status, Structure, Window
from tether.mirror.apply import AWAY, MAGIC, MAGIC_END, Mirror
from tether.mirror.plan import SEND, TRY, ClosePane, Command, OpenPane


def layout(*panes: int, cols: int = 80, rows: int = 24) -> str:
    """A layout string naming ``panes`` side by side (checksum not checked here)."""
    if len(panes) == 1:
        return f"abcd,{cols}x{rows},0,0,{panes[0]}"
    leaves = ",".join(f"{cols}x{rows},0,0,{p}" for p in panes)
    return f"abcd,{cols}x{rows},0,0{{{leaves}}}"


def structure(*windows: tuple[int, str, tuple[int, ...]], active: int | None = None) -> Structure:
    ws = tuple(
        Window(wid, i, name, layout(*panes), panes[0])
        for i, (wid, name, panes) in enumerate(windows)
    )
    return Structure(ws, windows[0][0] if active is None else active)


def mirrored(fake: FakeTmux, *windows: tuple[int, str, tuple[int, ...]]) -> Mirror:
    m = Mirror()
    fake.drive(m.setup())
    fake.drive(m.reconcile(structure(*windows)))
    return m


def test_setup_sets_options_locks_keys_and_finds_the_placeholder(fake: FakeTmux) -> None:
    fake.keys["copy-mode"] = [
        "bind-key -T copy-mode C-Space send-keys -X begin-selection",
        "bind-key -T copy-mode M-w send-keys -X copy-pipe-and-cancel",
        "bind-key -T copy-mode C-r command-prompt -i -I '#{pane_search_string}' "
        "-T search -p '(search up)' { send-keys -X search-backward-incremental '%%' }",
        "bind-key -T copy-mode X run-shell 'rm -rf /'",
    ]
    m = Mirror()
    lines = fake.lines(m.setup())
    assert "set -g exit-empty off" in lines
    unbind_all = lines.index("unbind-key -a -T prefix")
    assert unbind_all < lines.index("bind-key -T prefix d detach-client")
    assert "unbind-key -a -T root" in lines
    assert "bind-key -T copy-mode M-w send-keys -X copy-selection-and-cancel" in lines
    assert "unbind-key -T copy-mode X" in lines
    assert "unbind-key -T copy-mode C-r" in lines
    assert not [x for x in lines if "C-Space" in x]  # kept as it is
    assert m.placeholder == "@0"
    scroll = [e for e in fake.effects if isinstance(e, Command) and "scroll-on-clear" in e.line]
    assert scroll[0].mode == TRY  # older tmux lacks it


def test_first_structure_creates_windows_and_kills_the_placeholder(fake: FakeTmux) -> None:
    m = Mirror()
    fake.drive(m.setup())
    effects = fake.drive(m.reconcile(structure((1, "one", (5,)), (2, "two", (6,)), active=2)))
    lines = [e.line for e in effects if isinstance(e, Command)]
    assert lines[0].startswith("new-window -d -t tether: -P")
    assert lines[0].endswith(" sleep 2147483647")  # argv: no shell in the jail
    assert effects[1] == OpenPane(5, "%101", "/dev/pts/101")
    assert "kill-window -t @0" in lines and m.placeholder is None
    assert m.windows == {1: "@11", 2: "@12"} and m.panes == {5: "%101", 6: "%102"}
    assert "rename-window -t @11 'one'" in lines
    assert "move-window -d -s @12 -t tether:1" in lines
    assert lines[-1] == "select-window -t @12"
    assert f"select-layout -t @11 '{layout(5)}'" in lines


def test_unchanged_structure_only_resizes_and_selects(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "one", (5,)))
    lines = fake.lines(m.reconcile(structure((1, "one", (5,)))))
    assert [x.split()[0] for x in lines] == [
        "resize-window", "select-layout", "move-window", "select-pane", "select-window",
    ]  # fmt: skip


def test_split_adds_a_pane_after_its_predecessor(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "w", (5,)))
    effects = fake.drive(m.reconcile(structure((1, "w", (5, 6)))))
    lines = [e.line for e in effects if isinstance(e, Command)]
    assert lines[0] == "resize-window -t @11 -x 1000 -y 1000"
    assert lines[1].startswith("split-window -d -t %101 -P")
    assert OpenPane(6, "%102", "/dev/pts/102") in effects
    assert lines[2] == "select-layout -t @11 tiled"
    assert m.window_panes[1] == [5, 6]


def test_a_new_first_pane_splits_before(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "w", (5,)))
    lines = fake.lines(m.reconcile(structure((1, "w", (4, 5)))))
    assert lines[1].startswith("split-window -d -b -t %101 -P")
    assert m.window_panes[1] == [4, 5]


def test_a_closed_pane_is_closed_then_killed(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "w", (5, 6)))
    effects = fake.drive(m.reconcile(structure((1, "w", (5,)))))
    i = effects.index(ClosePane(6))
    assert effects[i + 1] == Command("kill-pane -t %102", SEND)
    assert m.panes == {5: "%101"} and m.window_panes[1] == [5]


def test_swapped_panes_swap(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "w", (5, 6)))
    lines = fake.lines(m.reconcile(structure((1, "w", (6, 5)))))
    assert "swap-pane -d -s %102 -t %101" in lines
    assert not [x for x in lines if x.startswith(("split-window", "kill-pane"))]
    assert m.window_panes[1] == [6, 5]


def test_a_pane_moved_to_another_window_is_remade_there(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "a", (5, 6)), (2, "b", (7,)))
    old = m.panes[6]
    effects = fake.drive(m.reconcile(structure((2, "b", (7, 6)), (1, "a", (5,)))))
    assert effects.index(ClosePane(6)) < effects.index(OpenPane(6, "%104", "/dev/pts/104"))
    assert Command(f"kill-pane -t {old}", SEND) in effects
    assert m.window_panes == {1: [5], 2: [7, 6]}
    assert m.panes[6] == "%104"


def test_a_closed_window_is_killed_but_never_the_last(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "a", (5,)), (2, "b", (6, 7)))
    effects = fake.drive(m.reconcile(structure((1, "a", (5,)))))
    assert ClosePane(6) in effects and ClosePane(7) in effects
    assert Command("kill-window -t @12", TRY) in effects
    assert not [e for e in effects if isinstance(e, Command) and "kill-pane" in e.line]
    assert set(m.windows) == {1} and 2 not in m.names
    # the last window stays (tmux would end the session): a new one is added first
    effects = fake.drive(m.reconcile(structure((3, "c", (8,)))))
    assert Command("kill-window -t @11", TRY) in effects and set(m.windows) == {3}


def test_rename_only_when_changed(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "a", (5,)))
    lines = fake.lines(m.reconcile(structure((1, "b", (5,)))))
    assert "rename-window -t @11 'b'" in lines
    assert not [x for x in fake.lines(m.reconcile(structure((1, "b", (5,))))) if "rename" in x]


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("#(touch /tmp/x)", "'##(touch /tmp/x)'"),
        ("#{E:window_name}", "'##{E:window_name}'"),
        ("a'; run-shell 'touch /tmp/x", "'a'\\''; run-shell '\\''touch /tmp/x'"),
        ("x ; kill-server", "'x ; kill-server'"),
    ],
)
def test_hostile_names_stay_data(fake: FakeTmux, name: str, shown: str) -> None:
    m = mirrored(fake, (1, "a", (5,)))
    assert f"rename-window -t @11 {shown}" in fake.lines(m.reconcile(structure((1, name, (5,)))))


def test_a_newline_never_reaches_tmux(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "a", (5,)))
    with pytest.raises(ValueError, match="newline"):
        fake.drive(m.reconcile(structure((1, "x\nrun-shell 'touch /tmp/x'", (5,)))))
    with pytest.raises(ValueError, match="newline"):
        Command("display x\nkill-server")


@pytest.mark.parametrize(
    ("st", "why"),
    [
        (structure(*[(i, "w", (i,)) for i in range(MAX_WINDOWS + 1)]), "windows"),
        (Structure((Window(1, 0, "w", layout(*range(MAX_PANES + 1)), 0),), 1), "panes"),
        (Structure((Window(1, 0, "w", layout(5, cols=MAX_DIMENSION + 1), 5),), 1), "size"),
        (Structure((Window(1, 0, "w", layout(5, 5), 5),), 1), "bad layout"),
        (Structure((Window(1, 0, "w", "garbage", 5),), 1), "bad layout"),
    ],
)
def test_out_of_bounds_is_refused_before_any_command(
    fake: FakeTmux, st: Structure, why: str
) -> None:
    m = Mirror()
    with pytest.raises(ValueError, match=why):
        fake.drive(m.reconcile(st))
    assert fake.effects == [] and m.windows == {}


def test_status_is_defused_and_set_once(fake: FakeTmux) -> None:
    m = Mirror()
    status = Status((
        ("status-right", "#(touch /tmp/x) %H:%M"),
        ("status-left", "#[fg=red]#S"),
        ("window-status-format", "#I:#W #(id) #{E:pane_title}"),
        ("not-an-option", "x"),
    ))  # fmt: skip
    lines = fake.lines(m.set_status(status))
    assert lines == [
        "set -g status-right '##(touch /tmp/x) %H:%M'",
        f"set -g status-left '{AWAY}##[fg=red]##S'",
        "set -g window-status-format '#I:#W ##(id) ##{E:pane_title}'",
    ]
    assert fake.lines(m.set_status(status)) == []


def test_a_status_option_tmux_refused_is_tried_again(fake: FakeTmux) -> None:
    m = Mirror()
    fake.fail = ("set -g status-style",)
    status = Status((("status-style", "bg=nope"),))
    assert fake.lines(m.set_status(status)) == ["set -g status-style 'bg=nope'"]
    fake.fail = ()
    assert fake.lines(m.set_status(status)) == ["set -g status-style 'bg=nope'"]
    assert fake.lines(m.set_status(status)) == []


def magic_hex(i: int) -> str:
    return " ".join(f"{c:02x}" for c in MAGIC + str(i).encode() + MAGIC_END)


def test_bindings_type_magic_and_skip_bad_names(fake: FakeTmux) -> None:
    m = Mirror()
    b = Bindings("C-a", (
        Binding("prefix", "%", ""),
        Binding("prefix", "x", "kill-pane #(touch /tmp/x)? (y/n)"),
        Binding("prefix", "a;run-shell", ""),
        Binding("pre fix", "c", ""),
        Binding("root", "M-Left", ""),
    ))  # fmt: skip
    lines = fake.lines(m.set_bindings(b))
    assert lines == [
        "set -g prefix C-a",
        f"bind-key -T prefix % send-keys -H {magic_hex(0)}",
        "bind-key -T prefix x confirm-before -p 'kill-pane ##(touch /tmp/x)? (y/n)' "
        f"'send-keys -H {magic_hex(1)}'",
        f"bind-key -T root M-Left send-keys -H {magic_hex(2)}",
    ]
    assert [x.key for x in m.bindings] == ["%", "x", "M-Left"]


def test_dropped_bindings_restore_the_safe_prefix_keys(fake: FakeTmux) -> None:
    m = Mirror()
    fake.drive(m.set_bindings(Bindings("C-b", (Binding("prefix", "d", ""),
                                               Binding("prefix", "%", "")))))  # fmt: skip
    lines = fake.lines(m.set_bindings(Bindings("C-b", ())))
    assert lines == [
        "unbind-key -T prefix d",
        "bind-key -T prefix d detach-client",
        "unbind-key -T prefix %",
        "set -g prefix C-b",
    ]
    assert m.bindings == [] and m.bound == []


def test_a_binding_tmux_refused_takes_no_index(fake: FakeTmux) -> None:
    m = Mirror()
    fake.fail = ("bind-key -T prefix F1",)
    b = Bindings("bad prefix", (Binding("prefix", "F1", ""), Binding("prefix", "F2", "")))
    lines = fake.lines(m.set_bindings(b))
    assert lines[-1] == f"bind-key -T prefix F2 send-keys -H {magic_hex(0)}"
    assert not [x for x in lines if "set -g prefix" in x]
    assert [x.key for x in m.bindings] == ["F2"]


def test_presence_notice_is_escaped_and_told_once(fake: FakeTmux) -> None:
    m = Mirror()
    fake.clients = ["/dev/pts/3", ""]
    effects = fake.drive(m.presence(False, "host away #(id)"))
    assert effects == [
        Command("set -g @tether_notice 'host away ##(id)'"),
        Command("list-clients -F '#{client_name}'", TRY),
        Command("display-message -c '/dev/pts/3' 'host away ##(id)'", SEND),
        Command("refresh-client -S", TRY),
    ]
    assert fake.lines(m.presence(True, "back")) == [
        "set -g @tether_notice ''",
        "refresh-client -S",
    ]


def test_reset_clears_a_known_panes_history(fake: FakeTmux) -> None:
    m = mirrored(fake, (1, "w", (5,)))
    assert fake.lines(m.reset(5)) == ["clear-history -t %101"]
    assert fake.lines(m.reset(99)) == []
