"""The tmux control-mode parser, layout helpers and argument quoting.

Transcripts are what tmux 3.3 really prints; the quoting and ``%output``
decoding are also checked against a real tmux server.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
import tty

import pytest
from core_tmux import Tmux
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tether.core.control import (
    ControlParser,
    Notification,
    PaneOutput,
    Reply,
    layout_pane_sizes,
    layout_panes,
    layout_size,
    quote,
    unescape,
)

TMUX_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


def tmux_escape(data: bytes) -> bytes:
    """What tmux's control mode does to pane output: ``\\ooo`` for < 32 and backslash."""
    return b"".join(b"\\%03o" % b if b < 32 or b == 0x5C else bytes([b]) for b in data)


# --- unescape ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200))
def test_unescape_is_byte_exact(data: bytes) -> None:
    assert unescape(tmux_escape(data)) == data


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.lists(st.sampled_from([b"\\", b"0", b"1", b"7", b"8", b"\n", b"a", b"\x00"])))
def test_unescape_is_byte_exact_around_backslashes_and_digits(data: list[bytes]) -> None:
    raw = b"".join(data)
    assert unescape(tmux_escape(raw)) == raw


def test_unescape_examples() -> None:
    assert unescape(b"plain") == b"plain"
    assert unescape(b"a\\134b") == b"a\\b"
    assert unescape(b"\\033[1m\\015\\012") == b"\x1b[1m\r\n"
    assert unescape(b"\\134101") == b"\\101"  # an escaped backslash before digits
    assert unescape(bytes(range(32, 256)).replace(b"\\", b"\\134")) == bytes(range(32, 256))
    assert unescape(tmux_escape(bytes(range(256)))) == bytes(range(256))


# --- the parser -------------------------------------------------------------------

# A real tmux 3.3a ``-C`` session (one line per element, newline stripped), including
# command output lines that begin with %, an error, layouts and both output forms.
TRANSCRIPT = [
    b"%begin 1795707703 264 0",
    b"%end 1795707703 264 0",
    b"%session-changed $0 s1",
    b"%begin 1795707709 269 1",
    b"%end of the line",
    b"%end 1795707709 269 1",
    b"%begin 1795707709 270 1",
    b"%error in line 3",
    b"%end 1795707709 270 1",
    b"%begin 1795707709 271 1",
    b"%end 1 276 1",
    b"%end",
    b"%error 1795707709 999 1",
    b"%begin 1795707709 12 1",
    b"%end 1795707709 271 1",
    b"%begin 1795707703 271 1",
    b"parse error: unknown command: nosuchcmd",
    b"%error 1795707703 271 1",
    b"%begin 1795707703 272 1",
    b"b25d,80x24,0,0,0",
    b"%end 1795707703 272 1",
    b"%layout-change @0 c195,80x24,0,0[80x12,0,0,0,80x11,0,13,1] "
    b"c195,80x24,0,0[80x12,0,0,0,80x11,0,13,1] *",
    b"%output %1 a\\134b\\033[1m\\001z\\015\\012",
    b"%output %12 ",
    b"%window-add @1",
    b"%extended-output %3 0 : xyz",
    b"%extended-output %2 12 : \\033[?2004h",
    b"%extended-output %2 0 : a : b\\134",
    b"%begin 1795707705 280 1",
    b"",
    b"%output %1 not output: inside a reply",
    b"%end 1795707705 280 1",
    b"%exit",
]


def parse(lines: list[bytes]) -> list[Reply | Notification | PaneOutput]:
    parser = ControlParser()
    out: list[Reply | Notification | PaneOutput] = []
    for line in lines:
        item = parser.line(line)
        if item is not None:
            out.append(item)
    return out


def test_transcript() -> None:
    assert parse(TRANSCRIPT) == [
        Reply(264, True, []),
        Notification("session-changed", b"$0 s1"),
        Reply(269, True, [b"%end of the line"]),
        Reply(270, True, [b"%error in line 3"]),
        Reply(
            271,
            True,
            [b"%end 1 276 1", b"%end", b"%error 1795707709 999 1", b"%begin 1795707709 12 1"],
        ),
        Reply(271, False, [b"parse error: unknown command: nosuchcmd"]),
        Reply(272, True, [b"b25d,80x24,0,0,0"]),
        Notification(
            "layout-change",
            b"@0 c195,80x24,0,0[80x12,0,0,0,80x11,0,13,1] "
            b"c195,80x24,0,0[80x12,0,0,0,80x11,0,13,1] *",
        ),
        PaneOutput(1, b"a\\b\x1b[1m\x01z\r\n"),
        PaneOutput(12, b""),
        Notification("window-add", b"@1"),
        PaneOutput(3, b"xyz"),
        PaneOutput(2, b"\x1b[?2004h"),
        PaneOutput(2, b"a : b\\"),
        Reply(280, True, [b"", b"%output %1 not output: inside a reply"]),
        Notification("exit", b""),
    ]


def test_stray_lines_outside_blocks_are_ignored() -> None:
    assert parse([b"", b"garbage", b"\x1bP1000p"]) == []


@settings(max_examples=200, deadline=None, derandomize=True)
@given(body=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=8))
def test_any_reply_body_is_returned_verbatim(body: list[bytes]) -> None:
    """Command output (e.g. a capture of a pane showing ``%end x``) cannot end a block
    unless it repeats the block's own number."""
    body = [line for line in body if not line.startswith((b"%end 1 7", b"%error 1 7"))]
    lines = [b"%begin 1 7 1", *body, b"%end 1 7 1"]
    assert parse(lines) == [Reply(7, True, body)]


# --- against a real tmux: control mode ---------------------------------------------


def control_lines(tmux: Tmux, feed: bytes, until: bytes, timeout: float = 5.0) -> list[bytes]:
    """Run ``tmux -C attach``, write ``feed`` to it and collect lines until ``until``."""
    proc = subprocess.Popen(
        ["tmux", "-S", tmux.sock, "-f", "/dev/null", "-C", "attach", "-t", "base"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=tmux.env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(feed)
        proc.stdin.flush()
        buf = b""
        deadline = time.monotonic() + timeout
        while until not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
        return buf.split(b"\n")
    finally:
        proc.stdin.close()
        proc.wait(timeout=5)


def test_real_control_mode_output_is_byte_exact(tmux: Tmux) -> None:
    pane = tmux.run("split-window", "-d", "-t", "base", "-P", "-F", "#{pane_id}", "sleep 1000")
    pane = pane.strip()
    pane_tty = tmux.run("display", "-p", "-t", pane, "#{pane_tty}").strip()
    tmux.wait_running(pane)
    payload = bytes(range(256)) * 2 + "héllo ✓ 日本".encode() + b"END\\MARK"
    lines: list[bytes] = []

    fd = os.open(pane_tty, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        proc = subprocess.Popen(
            ["tmux", "-S", tmux.sock, "-f", "/dev/null", "-C", "attach", "-t", "base"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=tmux.env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"display -p '%%end marker'\n")
            proc.stdin.flush()
            buf = b""
            deadline = time.monotonic() + 5
            written = False
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 0.05)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    buf += chunk
                # our command may run before the attach completes: wait for both
                if not written and b"%end marker" in buf and b"%session-changed" in buf:
                    os.write(fd, payload)  # the control client is attached by now
                    written = True
                if written and b"MARK" in buf:
                    break
            lines = buf.split(b"\n")
        finally:
            proc.stdin.close()
            proc.wait(timeout=5)
    finally:
        os.close(fd)
        tmux.run("kill-pane", "-t", pane)
    items = parse(lines)
    assert any(isinstance(i, Reply) and i.lines == [b"%end marker"] for i in items)
    number = int(pane[1:])
    got = b"".join(i.data for i in items if isinstance(i, PaneOutput) and i.pane == number)
    assert got == payload


def test_real_control_mode_replies(tmux: Tmux) -> None:
    lines = control_lines(
        tmux,
        b"display -p '%%end of the line'\n"
        b"display -p '%%error 1 2 3 in line 3'\n"
        b"nosuchcommand\n"
        b"display -p 'last'\n",
        until=b"last\n%end",
    )
    replies = [i for i in parse(lines) if isinstance(i, Reply)]
    bodies = [(r.ok, r.lines) for r in replies]
    assert (True, [b"%end of the line"]) in bodies
    assert (True, [b"%error 1 2 3 in line 3"]) in bodies
    assert (True, [b"last"]) in bodies
    assert any(not ok and b"nosuchcommand" in b"".join(body) for ok, body in bodies)
    numbers = [r.number for r in replies]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


# --- layouts ------------------------------------------------------------------------

LAYOUTS = [
    ("b25d,80x24,0,0,0", (80, 24), {0: (80, 24)}),
    (
        "c195,80x24,0,0[80x12,0,0,0,80x11,0,13,1]",
        (80, 24),
        {0: (80, 12), 1: (80, 11)},
    ),
    (
        "bb62,159x48,0,0{79x48,0,0,79,79x48,80,0[79x24,80,0,80,79x23,80,25,81]}",
        (159, 48),
        {79: (79, 48), 80: (79, 24), 81: (79, 23)},
    ),
    (
        "4403,80x24,0,0[80x6,0,0,0,80x5,0,7,3,80x11,0,13,1]",
        (80, 24),
        {0: (80, 6), 3: (80, 5), 1: (80, 11)},
    ),
    (
        "1a2b,200x50,0,0{100x50,0,0[100x25,0,0,11,100x24,0,26{50x24,0,26,12,49x24,51,26,13}],"
        "99x50,101,0,14}",
        (200, 50),
        {11: (100, 25), 12: (50, 24), 13: (49, 24), 14: (99, 50)},
    ),
]


@pytest.mark.parametrize(("layout", "size", "panes"), LAYOUTS)
def test_layout_helpers(
    layout: str, size: tuple[int, int], panes: dict[int, tuple[int, int]]
) -> None:
    assert layout_size(layout) == size
    assert layout_panes(layout) == list(panes)
    assert layout_pane_sizes(layout) == panes


def test_layout_size_rejects_garbage() -> None:
    for bad in ["", "80x24", "zzzz,80x24,0,0,0", "b25d 80x24"]:
        with pytest.raises(ValueError):
            layout_size(bad)


def test_layouts_of_a_real_tmux_window(tmux: Tmux) -> None:
    win = tmux.run("new-window", "-d", "-t", "base", "-P", "-F", "#{window_id}", "sleep 1000")
    win = win.strip()
    try:

        def split(target: str, how: str) -> str:
            out = tmux.run("split-window", "-d", how, "-t", target, "-P", "-F", "#{pane_id}",
                           "sleep 1000")  # fmt: skip
            return out.strip()

        first = tmux.run("list-panes", "-t", win, "-F", "#{pane_id}").split()[0]
        p2 = split(first, "-h")  # {first, p2}
        split(p2, "-v")  # {first, [p2, p3]}
        split(first, "-v")  # {[first, p4], [p2, p3]}
        split(split(p2, "-h"), "-v")  # ... p2 becomes {p2, [p5, p6]}
        layout = tmux.run("display", "-p", "-t", win, "#{window_layout}").strip()
        assert "{" in layout and "[" in layout
        listed = [
            line.split()
            for line in tmux.run(
                "list-panes", "-t", win, "-F", "#{pane_id} #{pane_width} #{pane_height}"
            ).splitlines()
        ]
        ids = [int(pid[1:]) for pid, _, _ in listed]
        assert layout_panes(layout) == ids
        assert layout_pane_sizes(layout) == {int(p[1:]): (int(w), int(h)) for p, w, h in listed}
        w, h = tmux.run("display", "-p", "-t", win, "#{window_width} #{window_height}").split()
        assert layout_size(layout) == (int(w), int(h))
    finally:
        tmux.run("kill-window", "-t", win)


# --- quoting, against tmux's own parser ------------------------------------------------

quotable = st.text(
    alphabet=st.characters(
        codec="utf-8",
        categories=["L", "N", "P", "S", "Zs"],
        include_characters="'\"\\#$;{}~%",
    ),
    max_size=30,
)


def tmux_reads(tmux: Tmux, value: str) -> str:
    """What tmux's own parser makes of ``quote(value)`` (via source-file)."""
    path = tmux.dir / "quote.conf"
    path.write_text(f"set -g @x {quote(value)}\n", encoding="utf-8")
    tmux.run("set", "-g", "@x", "sentinel")
    tmux.run("source-file", str(path))
    return tmux.run_bytes("show", "-gv", "@x").decode("utf-8").removesuffix("\n")


QUOTE_EXAMPLES = [
    "", "plain", "a b", "it's", "'", "''", "\\", "a\\b", "\\'", "\\\\", "#{host}", "#(id)",
    "$HOME", "${HOME}", "~", "~/x", "a;b", "a ; b", "{", "}", "%if 1", "é ✓ 日本", '"\\"',
    "\\n", "\\033", "-x", "--",
]  # fmt: skip


def test_quote_examples(tmux: Tmux) -> None:
    for value in QUOTE_EXAMPLES:
        assert tmux_reads(tmux, value) == value, value


@TMUX_SETTINGS
@given(value=quotable)
def test_quote_round_trips_through_tmux(tmux: Tmux, value: str) -> None:
    assert tmux_reads(tmux, value) == value


def test_muted_panes_are_skipped_and_replies_still_come_in_order() -> None:
    muted: set[int] = set()
    p = ControlParser(muted)
    assert p.line(b"%output %1 a\\012") == PaneOutput(1, b"a\n")
    muted.add(1)  # the set is shared: the agent mutes a flooding pane in place
    assert p.line(b"%output %1 b") is None
    assert p.line(b"%extended-output %1 40 : c") is None
    assert p.line(b"%output %2 d") == PaneOutput(2, b"d")
    assert p.line(b"%begin 1 7 1") is None
    assert p.line(b"%output %1 inside a reply body") is None
    reply = p.line(b"%end 1 7 1")
    assert isinstance(reply, Reply) and reply.lines == [b"%output %1 inside a reply body"]
    muted.discard(1)
    assert p.line(b"%extended-output %1 40 : e") == PaneOutput(1, b"e")
