"""Turn a captured pane into bytes that redraw it: pure, no tmux needed.

The host captures a pane with ``capture-pane -p -e`` (history and screen,
with attributes as escape sequences) and a few format variables; writing the
result of ``render_pane`` into an empty pane of the same size reproduces its
history, screen, cursor and terminal modes.
"""

from __future__ import annotations

from dataclasses import dataclass

RESET = b"\x1bc"  # RIS: full terminal reset, including modes and scroll region


@dataclass(frozen=True, slots=True)
class PaneState:
    """What ``display -p`` tells about a pane besides its text."""

    width: int
    height: int
    cursor_x: int
    cursor_y: int
    cursor_visible: bool = True
    alternate: bool = False
    keypad_cursor: bool = False
    keypad: bool = False
    insert: bool = False
    wrap: bool = True
    origin: bool = False
    bracketed_paste: bool = False
    focus_events: bool = False
    mouse_standard: bool = False
    mouse_button: bool = False
    mouse_any: bool = False
    mouse_sgr: bool = False
    mouse_utf8: bool = False
    scroll_upper: int = 0
    scroll_lower: int = -1


PANE_FORMAT = (
    "#{pane_width} #{pane_height} #{cursor_x} #{cursor_y} #{cursor_flag} #{alternate_on} "
    "#{keypad_cursor_flag} #{keypad_flag} #{insert_flag} #{wrap_flag} #{origin_flag} "
    "#{bracketed_paste}#{?bracketed_paste,,0} #{focus_events}#{?focus_events,,0} "
    "#{mouse_standard_flag} #{mouse_button_flag} #{mouse_all_flag} #{mouse_sgr_flag} "
    "#{mouse_utf8_flag} #{scroll_region_upper} #{scroll_region_lower}"
)
"""``display -p`` format whose output ``parse_pane_state`` reads.

``mouse_any`` is xterm's any-event tracking (mode 1003), tmux's ``mouse_all_flag``;
tmux's ``mouse_any_flag`` means "some mouse mode is on" and must not be used here."""


def parse_pane_state(line: str) -> PaneState:
    f = line.split()
    n = [int(x) if x.lstrip("-").isdigit() else 0 for x in f]
    n += [0] * (21 - len(n))
    return PaneState(
        width=n[0],
        height=n[1],
        cursor_x=n[2],
        cursor_y=n[3],
        cursor_visible=bool(n[4]),
        alternate=bool(n[5]),
        keypad_cursor=bool(n[6]),
        keypad=bool(n[7]),
        insert=bool(n[8]),
        wrap=bool(n[9]),
        origin=bool(n[10]),
        bracketed_paste=bool(n[11]),
        focus_events=bool(n[12]),
        mouse_standard=bool(n[13]),
        mouse_button=bool(n[14]),
        mouse_any=bool(n[15]),
        mouse_sgr=bool(n[16]),
        mouse_utf8=bool(n[17]),
        scroll_upper=n[18],
        scroll_lower=n[19] if len(f) > 19 else -1,
    )


def _lines(lines: list[bytes]) -> bytes:
    # Each captured line starts at column 0; the attribute state is reset at the
    # start of every line so colours never bleed.
    return b"\r\n".join(b"\x1b[0m" + line for line in lines)


def render_pane(
    state: PaneState,
    history: list[bytes],
    screen: list[bytes],
    normal_screen: list[bytes] | None = None,
) -> bytes:
    """Bytes that rebuild a pane from scratch.

    ``history`` and ``screen`` are captured lines of the current grid. When the
    pane is in the alternate screen, ``normal_screen`` is the saved normal grid
    (``capture-pane -a``): it is drawn first, then the alternate screen entered.
    """
    out = [RESET, b"\x1b[H\x1b[2J"]
    base = normal_screen if state.alternate and normal_screen is not None else screen
    body = list(history) + list(base[: state.height])
    if body:
        out.append(_lines(body))
    if state.alternate:
        out.append(b"\x1b[0m\x1b[?1049h\x1b[H\x1b[2J")
        out.append(_lines(list(screen[: state.height])))
    out.append(b"\x1b[0m")
    if state.scroll_lower >= 0 and (state.scroll_upper, state.scroll_lower) != (
        0,
        state.height - 1,
    ):
        out.append(b"\x1b[%d;%dr" % (state.scroll_upper + 1, state.scroll_lower + 1))
    modes = [
        (state.keypad_cursor, b"\x1b[?1h"),
        (state.origin, b"\x1b[?6h"),
        (not state.wrap, b"\x1b[?7l"),
        (state.insert, b"\x1b[4h"),
        (state.bracketed_paste, b"\x1b[?2004h"),
        (state.focus_events, b"\x1b[?1004h"),
        (state.mouse_standard, b"\x1b[?1000h"),
        (state.mouse_button, b"\x1b[?1002h"),
        (state.mouse_any, b"\x1b[?1003h"),
        (state.mouse_sgr, b"\x1b[?1006h"),
        (state.mouse_utf8, b"\x1b[?1005h"),
        (not state.cursor_visible, b"\x1b[?25l"),
    ]
    out.extend(seq for on, seq in modes if on)
    if state.keypad:
        out.append(b"\x1b=")
    y = state.cursor_y + 1
    if state.origin:
        y -= state.scroll_upper
    out.append(b"\x1b[%d;%dH" % (y, state.cursor_x + 1))
    return b"".join(out)
