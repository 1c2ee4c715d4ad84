"""Host strings for the replica's format expander, and the replica's key policy."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tether.core.tmuxtext import defuse_format, escape_format, replica_key_policy


def active(fmt: str) -> list[str]:
    """What tmux's expander would act on: ``#(`` and ``#{`` not escaped by ``##``."""
    found, i = [], 0
    while i < len(fmt):
        if fmt[i] == "#" and i + 1 < len(fmt):
            if fmt[i + 1] == "#":
                i += 2
                continue
            if fmt[i + 1] in "({":
                end = fmt.find("}", i)
                found.append(fmt[i : len(fmt) if end < 0 else end + 1])
        i += 1
    return found


def runs_or_reexpands(fmt: str) -> bool:
    import re

    return any(
        a.startswith("#(") or re.search(r"(?:^|[;{])[ET][;:]", a[1:]) for a in active(fmt)
    )


def test_ordinary_formats_are_untouched() -> None:
    for fmt in ("#I:#W#F", "#[fg=red]#{?window_active,*,-}#[default]", "%H:%M %d-%b",
                "#{=20:pane_title}", "#{t:window_activity}", "#{s/a/b/:window_name}",
                "#{?#{==:#{pane_mode},copy-mode},COPY,}", "## literal", "#"):
        assert defuse_format(fmt) == fmt, fmt


def test_commands_and_reexpansion_are_shown_literally() -> None:
    assert defuse_format("#(id)") == "##(id)"
    assert defuse_format("##(id)") == "##(id)"  # literal already; was '###(id)': a command
    assert defuse_format("###(id)") == "####(id)"
    assert defuse_format("#{E:window_name}") == "##{E:window_name}"
    assert defuse_format("#{=5;E:window_name}") == "##{=5;E:window_name}"
    assert defuse_format("#{T:status-left}") == "##{T:status-left}"
    assert defuse_format("#{?c,#{E:x},}") == "##{?c,##{E:x},}"


@given(st.text(alphabet="#(){}ET:;=5aW ", max_size=40))
def test_nothing_survives_that_runs_or_reexpands(text: str) -> None:
    assert not runs_or_reexpands(defuse_format(text))


@given(st.text(max_size=40))
def test_escaped_text_has_nothing_active(text: str) -> None:
    assert active(escape_format(text)) == []


def test_copy_mode_policy() -> None:
    assert replica_key_policy("send-keys -X cursor-up") == "send-keys -X cursor-up"
    assert replica_key_policy('send-keys -FX search-forward "#{copy_cursor_word}"') is not None
    assert replica_key_policy("send-keys -X copy-pipe-and-cancel") == (
        "send-keys -X copy-selection-and-cancel"
    )
    assert replica_key_policy("send-keys -X copy-pipe-end-of-line-and-cancel") == (
        "send-keys -X copy-end-of-line-and-cancel"
    )
    assert replica_key_policy("send-keys -X copy-pipe-and-cancel 'sh -c x'") == (
        "send-keys -X copy-selection-and-cancel"
    )
    assert replica_key_policy("send-keys -X pipe-and-cancel 'sh'") is None
    assert replica_key_policy(
        'command-prompt -p "(search down)" { send-keys -X search-forward "%%" }'
    ) is not None
    assert replica_key_policy('command-prompt { run-shell "%%" }') is None
    assert replica_key_policy("select-pane \\; run-shell -d 0.3") is None
    assert replica_key_policy("display-menu -T x") is None
