"""The mirror's capture side without tmux: command lines out, parsed replies in."""

from __future__ import annotations

from tether.core.control import Reply
from tether.core.messages import STATUS_OPTIONS, Binding, Status, Structure, Window
from tether.mirror.capture import (
    HISTORY_LINES,
    binding_list,
    capture_cmds,
    pane_image,
    parse_bindings,
    parse_status,
    parse_windows,
    split_confirm,
    status_cmd,
    strip_confirm,
    windows_cmd,
)


def test_windows_parse_with_hostile_names() -> None:
    lines = [
        b"@1\x1f0\x1f0\x1fabcd,80x24,0,0,5\x1f%5\x1fone",
        "@2\x1f1\x1f1\x1fabcd,80x24,0,0,6\x1f%6\x1fa\x1fb #(id) é".encode(),
        b"short",
    ]
    assert parse_windows(lines) == Structure(
        (
            Window(1, 0, "one", "abcd,80x24,0,0,5", 5),
            Window(2, 1, "a\x1fb #(id) é", "abcd,80x24,0,0,6", 6),
        ),
        2,
    )
    assert windows_cmd("it's").startswith("list-windows -t 'it'\\''s' -F '#{window_id}")


def test_status_parse_skips_the_prefix_and_pads() -> None:
    got = parse_status(["C-b\x1fon\x1fbottom"])
    assert got == Status(tuple(zip(STATUS_OPTIONS, ["on", "bottom"] + [""] * 99, strict=False)))
    assert parse_status([]).options[0] == (STATUS_OPTIONS[0], "")
    assert "#{T:status-left}" in status_cmd("s")


def test_bindings_keep_what_acts_on_the_host() -> None:
    lines = [
        "bind-key    -T prefix       %                    split-window -h",
        "bind-key    -T prefix       d                    detach-client",
        "bind-key -r -T prefix       Up                   select-pane -U",
        "bind-key    -T root         MouseDown1Pane       select-pane -t =",
        "bind-key    -T root         M-x                  kill-pane",
        "bind-key    -T copy-mode    q                    send-keys -X cancel",
        'bind-key -T prefix x confirm-before -p "kill-pane #P? (y/n)" kill-pane',
        "not a binding",
    ]  # fmt: skip
    got = parse_bindings(lines)
    assert got == {
        ("prefix", "%"): "split-window -h",
        ("prefix", "Up"): "select-pane -U",
        ("root", "M-x"): "kill-pane",
        ("prefix", "x"): 'confirm-before -p "kill-pane #P? (y/n)" kill-pane',
    }
    assert binding_list(got)[-1] == Binding("prefix", "x", "kill-pane #P? (y/n)")


def test_confirm_is_split_into_command_and_prompt() -> None:
    got = split_confirm("confirm-before -p 'kill? (y/n)' kill-pane")
    assert got == ("kill-pane", "kill? (y/n)")
    assert split_confirm("confirm-before kill-window") == ("kill-window", "kill-window? (y/n)")
    assert split_confirm("split-window -h") == ("split-window -h", "")
    assert split_confirm("confirm-before 'unterminated") == ("confirm-before 'unterminated", "")
    assert strip_confirm("confirm-before -t %1 kill-pane") == "kill-pane"


def test_capture_commands_and_a_failed_capture() -> None:
    cmds = capture_cmds(7)
    assert cmds[0].startswith("display -p -t %7 ")
    assert cmds[1] == f"capture-pane -p -e -N -t %7 -S -{HISTORY_LINES}"
    assert capture_cmds(7, history=False)[1] == "capture-pane -p -e -N -t %7"
    failed = Reply(1, False, [b"no such pane"])
    assert pane_image(7, [failed, failed, failed]) is None
