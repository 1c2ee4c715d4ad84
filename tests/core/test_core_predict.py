"""Local echo prediction: confirm, contradict, edit keys, wrapping, wide characters, echo off,
the alternate screen, adaptive display, modes and bounds, against a fake pane and a small
readline-like shell that echoes (or not) what it is sent; hypothesis properties over any
keys, echo timings and round-trip times.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.predict import (
    GLITCH_AGE,
    MAX_CELLS,
    MAX_ECHO_WAIT,
    MAX_KEY_BYTES,
    Overlay,
    OverlayCell,
    Predictor,
)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)
SLOW = 0.2  # SRTT of a slow link: display and underline on; echo due 0.65 s after a key
LATER = MAX_ECHO_WAIT + 1  # every prediction is due by then
LEFT, RIGHT, BS, ENTER = b"\x1b[D", b"\x1b[C", b"\x7f", b"\r"


def _w(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class Screen:
    """A pane: a grid of cells and a cursor (a PaneView)."""

    def __init__(self, width: int = 20, height: int = 5) -> None:
        self.width, self.height = width, height
        self.grid = [[" "] * width for _ in range(height)]
        self.cursor = (0, 0)
        self.alternate = False

    def cell(self, col: int, row: int) -> str:
        return self.grid[row][col]

    def row(self, row: int) -> str:
        return "".join(self.grid[row]).rstrip()

    def scroll(self) -> None:
        del self.grid[0]
        self.grid.append([" "] * self.width)

    def newline(self) -> None:
        row = self.cursor[1] + 1
        if row == self.height:
            self.scroll()
            row -= 1
        self.cursor = (0, row)

    def write(self, text: str) -> None:
        for ch in text:
            if ch == "\n":
                self.newline()
                continue
            col, row = self.cursor
            self.grid[row][col] = ch
            self.cursor = (col + 1, row)
            if col + 1 == self.width:
                self.newline()


class Shell:
    """A line editor over a Screen like readline: insert, backspace, arrows, Enter.

    Redraws the whole line after each key, wrapping at the screen's edge (a wide
    character that does not fit goes to the next row) and scrolling at the bottom.
    With ``echo`` off (a password prompt) nothing typed is drawn."""

    def __init__(self, screen: Screen, prompt: str = "$ ", echo: bool = True) -> None:
        self.screen, self.prompt, self.echo = screen, prompt, echo
        # cells the line may take: it always fits on the screen, with a cell lost per row
        self.limit = screen.width * screen.height - len(prompt) - screen.height - 1
        self._new_prompt()

    def _new_prompt(self) -> None:
        self.screen.write(self.prompt)
        self.origin = self.screen.cursor
        self.line: list[str] = []
        self.pos = 0
        self.drawn: list[tuple[int, int]] = []

    def _cells(self) -> int:
        return sum(map(_w, self.line))

    def _layout(self) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        col, row = self.origin
        places = []
        for ch in self.line:
            if col + _w(ch) > self.screen.width:
                col, row = 0, row + 1
            places.append((col, row))
            col += _w(ch)
            if col == self.screen.width:
                col, row = 0, row + 1
        return places, (col, row)

    def _redraw(self) -> None:
        if not self.echo:
            return
        s = self.screen
        for c, r in self.drawn:
            s.grid[r][c] = " "
        places, end = self._layout()
        while end[1] >= s.height:
            s.scroll()
            self.origin = (self.origin[0], self.origin[1] - 1)
            places, end = self._layout()
        self.drawn = []
        for (c, r), ch in zip(places, self.line, strict=True):
            s.grid[r][c] = ch
            self.drawn.append((c, r))
            if _w(ch) == 2:
                s.grid[r][c + 1] = ""
                self.drawn.append((c + 1, r))
        s.cursor = places[self.pos] if self.pos < len(places) else end

    def feed(self, data: bytes) -> None:
        text = data.decode(errors="replace")
        i = 0
        while i < len(text):
            ch = text[i]
            if text.startswith(("\x1b[D", "\x1bOD"), i):
                self.pos = max(0, self.pos - 1)
                i += 3
            elif text.startswith(("\x1b[C", "\x1bOC"), i):
                self.pos = min(len(self.line), self.pos + 1)
                i += 3
            else:
                i += 1
                if ch in "\x7f\b":
                    if self.pos:
                        self.pos -= 1
                        del self.line[self.pos]
                elif ch == "\r":
                    self.pos = len(self.line)
                    self._redraw()
                    self.screen.write("\n")
                    self._new_prompt()
                    continue
                elif ch.isprintable() and self._cells() + _w(ch) <= self.limit:
                    self.line.insert(self.pos, ch)
                    self.pos += 1
                else:
                    continue
            self._redraw()


def world(mode: str = "always", srtt: float = SLOW, **screen: int) -> tuple[Predictor, Shell]:
    p = Predictor(mode)
    p.rtt(srtt, 0.0)
    return p, Shell(Screen(**screen))


def cells(p: Predictor) -> dict[tuple[int, int], str]:
    return {(c.col, c.row): c.text for c in p.overlay().cells}


def type_and_echo(p: Predictor, sh: Shell, data: bytes, now: float, lag: float = 0.1) -> None:
    p.key(data, sh.screen, now)
    sh.feed(data)
    p.observe(sh.screen, now + lag)


def confirmed(p: Predictor, sh: Shell, now: float = 0.0) -> float:
    """Type "e" and have it echoed: the first epoch is confirmed; returns the time after."""
    type_and_echo(p, sh, b"e", now)
    assert not p.overlay().cells
    return now + 0.2


# -- confirm and contradict ------------------------------------------------------


def test_typed_characters_show_once_the_epoch_is_confirmed_and_leave_when_echoed() -> None:
    p, sh = world()
    p.key(b"l", sh.screen, 0.0)
    assert not p.overlay()  # a new epoch is tentative
    sh.feed(b"l")
    p.observe(sh.screen, 0.2)  # the echo confirms it
    assert not p.overlay().cells
    p.key(b"s", sh.screen, 0.3)
    assert p.overlay() == Overlay((OverlayCell(3, 0, "s", True),), (4, 0))
    sh.feed(b"s")
    p.observe(sh.screen, 0.5)
    assert not p.overlay().cells
    p.observe(sh.screen, LATER)
    assert not p.overlay()
    assert p.pending == 0


def test_several_keys_in_one_call_and_multibyte_utf8() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key("ab\u00e9".encode(), sh.screen, now)
    assert cells(p) == {(3, 0): "a", (4, 0): "b", (5, 0): "\u00e9"}
    assert p.overlay().cursor == (6, 0)
    # a character split over two calls is not predicted (the next keys wait for their echo)
    p.key("\u00e9".encode()[:1], sh.screen, now)
    p.key("\u00e9".encode()[1:] + b"z", sh.screen, now)
    assert cells(p) == {(3, 0): "a", (4, 0): "b", (5, 0): "\u00e9"}


def test_a_contradicted_prediction_is_removed_and_prediction_waits_for_a_new_epoch() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(b"x", sh.screen, now)
    assert cells(p) == {(3, 0): "x"}
    sh.feed(b"y")  # the host draws something else there
    p.observe(sh.screen, now + 0.1)
    assert cells(p) == {(3, 0): "x"}  # not due yet: the echo may still come
    p.observe(sh.screen, now + 0.7)  # due (0.65 s) and still wrong
    assert not p.overlay()
    # the next key, once the keys in flight had time to echo, is in a tentative epoch
    now += 2
    p.key(b"z", sh.screen, now)
    assert not p.overlay()
    p.key(b"w", sh.screen, now + 0.05)
    assert not p.overlay()
    sh.feed(b"z")
    p.observe(sh.screen, now + 0.2)
    assert cells(p) == {(5, 0): "w"}  # "z" confirmed the epoch; "w" is still waiting
    assert p.overlay().cursor == (6, 0)


def test_keys_typed_before_the_truth_catches_up_are_not_predicted_after_a_contradiction() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(b"x", sh.screen, now)
    p.key(b"q", sh.screen, now + 0.4)
    sh.feed(b"y")
    p.observe(sh.screen, now + 0.7)  # "x" is due and wrong
    assert not p.overlay()
    p.key(b"a", sh.screen, now + 0.75)  # "q" is in flight: the truth's cursor may lag it
    assert p.pending == 0
    p.key(b"b", sh.screen, now + 0.75 + 0.66)  # all keys had time to echo: predicted again
    assert p.pending == 1


def test_a_cell_that_already_showed_the_character_is_no_echo() -> None:
    p = Predictor("always")
    p.rtt(SLOW, 0)
    s = Screen()
    s.write("$ ls")
    s.cursor = (2, 0)  # the cursor sits on an old "ls" (say, after the shell's redraw)
    p.key(b"l", s, 0.0)
    p.observe(s, 0.1)
    p.observe(s, 0.5)
    assert not p.overlay()  # "l" was already there: not confirmed
    p.key(b"s", s, 0.6)
    p.observe(s, 0.7)
    assert not p.overlay()  # still tentative
    p.observe(s, LATER)  # due: removed without contradiction or confirmation
    assert p.pending == 0
    # a typed blank never confirms either
    s2 = Screen()
    s2.write("$ ab")
    s2.cursor = (2, 0)
    p2 = Predictor("always")
    p2.key(b" ", s2, 0.0)
    s2.grid[0][2] = " "
    p2.observe(s2, 0.1)
    p2.key(b"q", s2, 0.2)
    assert not p2.overlay()


def seen(screen: Screen, ov: Overlay) -> tuple[list[str], tuple[int, int]]:
    """What the mate sees: the truth with the overlay drawn over it."""
    grid = [row[:] for row in screen.grid]
    for c in ov.cells:
        grid[c.row][c.col] = c.text
        if _w(c.text) == 2:
            grid[c.row][c.col + 1] = ""
    return ["".join(row).rstrip() for row in grid], ov.cursor or screen.cursor


def test_steady_typing_over_a_slow_link_shows_the_screen_to_come() -> None:
    p, sh = world(srtt=0.3)
    future = Shell(Screen())  # the same shell, getting every key at once
    keys = [bytes([c]) for c in b"echo helo"] + [LEFT, b"l", RIGHT, b" "]
    keys += ["\u4e16\u754c".encode(), BS, b"!", LEFT, LEFT, BS, "\u00e0".encode()]
    in_flight: list[tuple[float, bytes]] = []
    for i, k in enumerate(keys):
        now = i * 0.1
        while in_flight and in_flight[0][0] <= now:
            at, echo = in_flight.pop(0)
            sh.feed(echo)
            p.observe(sh.screen, at)
        p.key(k, sh.screen, now)
        future.feed(k)
        in_flight.append((now + 0.3, k))
        if i >= 3:  # the first echo has confirmed the epoch
            assert seen(sh.screen, p.overlay()) == seen(future.screen, Overlay()), i
    for at, echo in in_flight:
        sh.feed(echo)
        p.observe(sh.screen, at)
    assert seen(sh.screen, p.overlay()) == seen(future.screen, Overlay())
    p.observe(sh.screen, LATER)
    assert not p.overlay()
    assert sh.screen.row(0) == "$ echo hello\u00e0\u4e16!"


@SETTINGS
@given(
    st.data(),
    st.sampled_from([0.05, 0.1, 0.2]),
    st.sampled_from([0.06, 0.15, 0.4]),
    st.sampled_from(["ab\u00e9", "a\u4e2db"]),
)
def test_steady_editing_over_a_slow_link_shows_the_screen_to_come(
    data: st.DataObject, gap: float, lag: float, alphabet: str
) -> None:
    """A mate types printable characters, backspaces and arrows within the line every
    ``gap`` seconds; each echo arrives ``lag`` later. Whenever the overlay shows anything,
    the mate sees exactly the screen the host will show after the keys typed so far."""
    p, sh = world(srtt=lag, width=16)
    future = Shell(Screen(width=16))
    in_flight: list[tuple[float, bytes]] = []

    def check() -> None:
        if p.overlay():
            assert seen(sh.screen, p.overlay()) == seen(future.screen, Overlay())

    for i in range(data.draw(st.integers(1, 30))):
        now = i * gap
        while in_flight and in_flight[0][0] <= now:
            at, echo = in_flight.pop(0)
            sh.feed(echo)
            p.observe(sh.screen, at)
            check()
        # keys that stay within the line, which stays within the row
        choices = [k.encode() for k in alphabet if future._cells() + _w(k) < 12]
        choices += [BS, LEFT, b"\x1bOD"] if future.pos > 0 else []
        choices += [RIGHT, b"\x1bOC"] if future.pos < len(future.line) else []
        if not choices:
            break
        key = data.draw(st.sampled_from(choices))
        p.key(key, sh.screen, now)
        future.feed(key)
        in_flight.append((now + lag, key))
        check()
    for at, echo in in_flight:
        sh.feed(echo)
        p.observe(sh.screen, at)
        check()
    assert seen(sh.screen, Overlay()) == seen(future.screen, Overlay())
    p.observe(sh.screen, now + LATER)
    assert not p.overlay()


@pytest.mark.parametrize("between", [b"b", b"bcdefghijk"])  # a short and a too long history
def test_the_late_echo_of_an_older_key_is_no_echo_of_a_newer_one(between: bytes) -> None:
    p, sh = world()
    now = confirmed(p, sh)
    keys = [b"a"] + [k for c in between for k in (BS, bytes([c]))] + [BS, b"a"]
    p.key(b"".join(keys), sh.screen, now)  # the cell was predicted a, b, ... k, then a
    assert cells(p) == {(3, 0): "a"}
    sh.feed(b"a")  # the first key's echo: "a" is there, but not the last key's doing
    p.observe(sh.screen, now + 0.1)
    sh.feed(BS)
    p.observe(sh.screen, now + 0.2)
    assert cells(p) == {(3, 0): "a"}  # still predicted over the blank the host shows now
    sh.feed(b"".join(keys[2:]))
    p.observe(sh.screen, now + 0.3)
    assert cells(p) == {(3, 0): "a"}  # right, but no echo can confirm it: it stays until due
    p.observe(sh.screen, now + LATER)
    assert not p.overlay()


# -- backspace, arrows, insert -----------------------------------------------------


def test_backspace_blanks_the_cell_and_moves_the_cursor_left() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    type_and_echo(p, sh, b"bc", now)
    p.key(BS, sh.screen, now + 0.3)
    ov = p.overlay()
    assert ov.cursor == (4, 0)
    assert OverlayCell(4, 0, " ", False) in ov.cells  # a blank is never underlined
    sh.feed(BS)
    p.observe(sh.screen, now + 0.5)
    assert sh.screen.row(0) == "$ eb"
    p.observe(sh.screen, now + LATER)
    assert not p.overlay()
    # backspace at the start of the row: unknown (a wrapped line goes up a row)
    p2, sh2 = world(width=10)
    p2.key(b"abcdefgh", sh2.screen, 0)
    sh2.feed(b"abcdefgh")
    p2.observe(sh2.screen, 0.1)
    p2.key(BS + b"x", sh2.screen, 0.2)
    assert not p2.overlay().cells


def test_backspace_stops_at_the_prompt() -> None:
    p, sh = world()
    now = confirmed(p, sh)  # prediction started at the end of "$ "
    p.key(BS + BS + b"x", sh.screen, now)  # the second one would eat the prompt
    assert p.overlay() == Overlay((OverlayCell(2, 0, " ", False),), (2, 0))
    assert p.pending == 1  # "x" waits: the effect of the second backspace is unknown
    sh.feed(BS + BS + b"x")
    p.observe(sh.screen, now + 0.1)
    p.observe(sh.screen, now + LATER)
    assert not p.overlay() and sh.screen.row(0) == "$ x"


def test_a_wrong_cursor_is_a_contradiction() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(LEFT, sh.screen, now)  # the program ignores arrows
    assert p.overlay().cursor == (2, 0)
    p.observe(sh.screen, now + 0.5)
    assert p.overlay().cursor == (2, 0)  # not due yet
    p.observe(sh.screen, now + 0.7)
    assert not p.overlay()
    p.key(b"a", sh.screen, now + 2)
    assert p.pending == 1 and not p.overlay()  # a new, tentative epoch


def test_a_stalled_link_keeps_its_predictions_on_screen() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(b"ab", sh.screen, now)
    for t in range(1, 30):  # no output for 30 s; only timers
        p.handle_timer(now + t)
        assert cells(p) == {(3, 0): "a", (4, 0): "b"}
    sh.feed(b"ab")
    p.observe(sh.screen, now + 30)  # late, but right
    assert not p.overlay().cells


def test_left_and_right_arrows_move_within_the_line_and_keys_insert() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    type_and_echo(p, sh, b"bc", now)  # "$ ebc"
    p.key(LEFT + b"\x1bOD", sh.screen, now + 0.3)
    assert p.overlay().cursor == (3, 0)
    p.key(RIGHT, sh.screen, now + 0.3)
    assert p.overlay().cursor == (4, 0)
    p.key(b"X", sh.screen, now + 0.3)  # insert: the rest of the line shifts right
    assert cells(p) == {(4, 0): "X", (5, 0): "c"}
    assert p.overlay().cursor == (5, 0)
    p.key(BS, sh.screen, now + 0.3)  # delete it again: the line shifts back
    assert cells(p) == {(4, 0): "c", (5, 0): " "}
    assert p.overlay().cursor == (4, 0)
    sh.feed(LEFT + b"\x1bOD" + RIGHT + b"X" + BS)
    p.observe(sh.screen, now + 0.5)
    p.observe(sh.screen, now + LATER)  # the cursor and the shifted cells were right
    assert not p.overlay()
    assert sh.screen.row(0) == "$ ebc"


def test_arrows_at_the_line_edge_and_modified_arrows_are_not_predicted() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(RIGHT + b"a", sh.screen, now)  # at the line's end (fish would take a suggestion)
    assert not p.overlay().cells
    p2, sh2 = world()
    now = confirmed(p2, sh2)
    p2.key(b"\x1b[1;5D" + b"a", sh2.screen, now)  # ctrl-left: a word, not a cell
    assert not p2.overlay().cells


def test_text_after_a_gap_is_not_shifted() -> None:
    p, sh = world(width=30)
    sh.screen.write(" " * 15 + "[rprompt]")
    sh.screen.cursor = (2, 0)
    now = confirmed(p, sh)
    p.key(b"abc", sh.screen, now)
    assert cells(p) == {(3, 0): "a", (4, 0): "b", (5, 0): "c"}


def test_control_keys_and_enter_start_a_tentative_epoch_and_forget_the_cursor() -> None:
    for key in (b"\t", b"\x01", ENTER, b"\x1b[3~", b"\x1bb", b"\x1b", b"\x1b[200~"):
        p, sh = world()
        now = confirmed(p, sh)
        p.key(key + b"a", sh.screen, now)
        assert not p.overlay().cells, key
        p.key(b"b", sh.screen, now + 0.1)  # keys in flight: the truth's cursor may lag
        assert p.pending == 0, key
        p.key(b"c", sh.screen, now + 2)  # after a pause: predicted, tentative
        assert p.pending == 1 and not p.overlay().cells, key


def test_typing_on_after_enter_finds_the_cursor_by_the_first_echo() -> None:
    """Steady typing after Enter never leaves echo_wait for the truth's cursor: the
    echo of the first character typed blind finds it, and the rest in flight show."""
    p, sh = world()
    now = confirmed(p, sh)
    p.key(ENTER, sh.screen, now)
    t = now
    for ch in b"cat":  # typed 0.1 s apart, before the host has echoed any
        t += 0.1
        p.key(bytes([ch]), sh.screen, t)
    assert not p.overlay().cells and p.pending == 0
    sh.feed(ENTER)  # the output: the line ends, a new prompt
    p.observe(sh.screen, t + 0.01)
    assert not p.overlay().cells
    sh.feed(b"c")  # the echo of the first key typed blind
    p.observe(sh.screen, t + 0.02)
    assert cells(p) == {(3, 1): "a", (4, 1): "t"} and p.overlay().cursor == (5, 1)
    p.key(b"s", sh.screen, t + 0.05)
    assert cells(p) == {(3, 1): "a", (4, 1): "t", (5, 1): "s"}
    sh.feed(b"ats")
    p.observe(sh.screen, t + 0.2)
    assert not p.overlay().cells


def test_a_password_field_showing_stars_never_reveals_a_character() -> None:
    """sudo's pwfeedback draws * for each key: never the echo of what was typed,
    even when the password holds a * (only the first characters, in order, count)."""
    p, sh = world()
    now = confirmed(p, sh)
    p.key(ENTER, sh.screen, now)
    sh.feed(ENTER)
    sh.echo = False
    sh.screen.write("Password: ")
    p.observe(sh.screen, now + 0.01)
    t = now
    for ch in "a*b*c":
        t += 0.1
        p.key(ch.encode(), sh.screen, t)
        sh.screen.write("*")
        p.observe(sh.screen, t + 0.05)
        assert not p.overlay().cells


def test_a_lost_cursor_is_not_drawn_once_nothing_is_predicted() -> None:
    """Enter after the line was echoed: the cursor of the old line must not stay
    on screen until the next output (the truth's cursor is the best there is)."""
    p, sh = world()
    now = confirmed(p, sh)
    type_and_echo(p, sh, b"ab", now)
    assert not p.overlay().cells
    p.key(ENTER, sh.screen, now + 0.2)
    assert p.overlay().cursor is None


def test_an_edit_typed_blind_is_not_tracked() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(ENTER + b"ab" + BS + b"c", sh.screen, now)
    sh.feed(ENTER + b"ab" + BS + b"c")
    p.observe(sh.screen, now + 0.05)
    assert not p.overlay().cells and p.pending == 0


# -- wrapping and wide characters -------------------------------------------------------


def test_wrapping_at_the_line_end() -> None:
    p, sh = world(width=8)
    now = confirmed(p, sh)  # "$ e", cursor (3, 0)
    p.key(b"abcd", sh.screen, now)
    assert cells(p) == {(3, 0): "a", (4, 0): "b", (5, 0): "c", (6, 0): "d"}
    p.key(b"f", sh.screen, now)  # the last column: its own tentative epoch
    p.key(b"gh", sh.screen, now)  # the next row: another one
    assert cells(p) == {(3, 0): "a", (4, 0): "b", (5, 0): "c", (6, 0): "d"}
    assert p.overlay().cursor == (7, 0)
    sh.feed(b"abcdf")
    p.observe(sh.screen, now + 0.1)
    assert not p.overlay().cells  # "f" confirmed its epoch; "g" and "h" wait for theirs
    sh.feed(b"gh")
    p.observe(sh.screen, now + 0.2)
    p.key(b"i", sh.screen, now + 0.3)
    assert cells(p) == {(2, 1): "i"}
    assert p.overlay().cursor == (3, 1)
    sh.feed(b"i")
    p.observe(sh.screen, now + LATER)
    assert not p.overlay()


def test_no_prediction_past_the_last_row() -> None:
    p, sh = world(width=8, height=2)
    sh.feed(ENTER)  # the prompt is on the last row now
    now = confirmed(p, sh)
    p.key(b"abcd", sh.screen, now)
    sh.feed(b"abcd")
    p.observe(sh.screen, now + 0.1)  # "$ eabcd", the cursor in the last column
    assert p.pending == 0
    p.key(b"xy", sh.screen, now + 0.2)  # the screen will scroll: "x" moves up a row
    assert p.pending == 0
    sh.feed(b"xy")
    p.observe(sh.screen, now + 0.3)
    assert sh.screen.row(0) == "$ eabcdx" and sh.screen.row(1) == "y"
    p.key(b"z", sh.screen, now + 2)  # predicted again from the host's cursor
    assert p.pending == 1


def test_wide_characters_take_two_cells() -> None:
    p, sh = world(width=10)
    now = confirmed(p, sh)
    p.key("\u4e2d\u6587".encode(), sh.screen, now)
    assert cells(p) == {(3, 0): "\u4e2d", (5, 0): "\u6587"}  # right halves are not drawn
    assert p.overlay().cursor == (7, 0)
    p.key(LEFT, sh.screen, now)
    assert p.overlay().cursor == (5, 0)
    p.key(BS, sh.screen, now)  # deletes the whole wide character
    assert p.overlay().cursor == (3, 0)
    assert cells(p) == {(3, 0): "\u6587", (5, 0): " ", (6, 0): " "}
    sh.feed("\u4e2d\u6587".encode() + LEFT + BS)
    p.observe(sh.screen, now + 0.1)
    assert sh.screen.row(0) == "$ e\u6587"
    p.observe(sh.screen, now + LATER)
    assert not p.overlay()


def test_a_wide_character_that_does_not_fit_is_not_predicted() -> None:
    p, sh = world(width=8)
    now = confirmed(p, sh)
    type_and_echo(p, sh, b"abcd", now)  # cursor at the last column
    p.key("\u4e2d".encode(), sh.screen, now + 0.3)
    assert p.pending == 0


# -- echo off, alternate screen ---------------------------------------------------------


def test_a_password_prompt_never_shows_a_predicted_character() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(ENTER, sh.screen, now)
    sh.feed(ENTER)
    sh.echo = False
    sh.screen.write("Password: ")
    p.observe(sh.screen, now + 0.1)
    t = now + 2  # the user pauses, then types the password, slowly and quickly
    for i, ch in enumerate(b"hunter2" + BS + b"22"):
        t += 0.05 if i % 3 else 1.0
        p.key(bytes([ch]), sh.screen, t)
        sh.feed(bytes([ch]))
        for dt in (0.0, 0.1, 0.3, 0.7, 2.0):  # output and timers at any time
            p.observe(sh.screen, t + dt)
            p.handle_timer(t + dt)
            assert not p.overlay().cells
    # and after Enter, a confirmed epoch on the next line does not reveal it
    p.key(ENTER, sh.screen, t + 0.1)
    sh.feed(ENTER)
    sh.echo = True
    p.observe(sh.screen, t + 0.2)
    type_and_echo(p, sh, b"l", t + 3)
    p.key(b"s", sh.screen, t + 3.2)
    assert set(cells(p).values()) == {"s"}


def test_nothing_is_predicted_in_the_alternate_screen() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(b"ab", sh.screen, now)
    assert cells(p)
    sh.screen.alternate = True
    p.observe(sh.screen, now + 0.1)  # the host switched: predictions go
    assert not p.overlay()
    p.key(b"cd", sh.screen, now + 2)
    assert p.pending == 0 and not p.overlay()
    sh.screen.alternate = False
    p.observe(sh.screen, now + 3)
    p.key(b"x", sh.screen, now + 5)
    assert p.pending == 1 and not p.overlay()  # tentative again


# -- adaptive display, modes, underline -------------------------------------------------


def test_adaptive_shows_nothing_on_a_fast_link() -> None:
    p, sh = world("adaptive", srtt=0.01)
    now = 0.0
    for ch in b"echo hello":
        type_and_echo(p, sh, bytes([ch]), now, lag=0.02)
        now += 0.1
        assert not p.overlay()
    p.key(b"x", sh.screen, now)
    assert not p.overlay() and p.pending == 1  # predicted, not shown


def test_adaptive_shows_on_a_slow_link_with_hysteresis() -> None:
    p, sh = world("adaptive", srtt=0.05)
    now = confirmed(p, sh)
    p.key(b"a", sh.screen, now)
    assert cells(p) == {(3, 0): "a"}
    assert not p.overlay().cells[0].underlined  # 50 ms: shown, not underlined
    p.rtt(0.025, now)  # between the thresholds: stays on
    assert cells(p)
    p.rtt(0.015, now)  # low, but a prediction is pending: stays on
    assert cells(p)
    sh.feed(b"a")
    p.observe(sh.screen, now + 0.1)  # a quick echo
    p.observe(sh.screen, now + LATER)
    p.rtt(0.015, now + LATER)
    p.key(b"b", sh.screen, now + LATER)
    assert not p.overlay()
    p.rtt(0.035, now + LATER)
    assert cells(p) == {(4, 0): "b"}


def test_glitch_trigger_shows_predictions_on_a_fast_link() -> None:
    p, sh = world("adaptive", srtt=0.01)
    now = confirmed(p, sh)
    p.key(b"a", sh.screen, now)
    assert not p.overlay()
    assert p.next_timer() == now + GLITCH_AGE
    p.handle_timer(now + 0.1)
    assert not p.overlay()
    p.handle_timer(now + GLITCH_AGE)  # pending 250 ms: display on, underlined
    assert p.overlay().cells == (OverlayCell(3, 0, "a", True),)
    assert p.next_timer() is None
    sh.feed(b"a")
    p.observe(sh.screen, now + 0.3)
    # quick echoes, at least 150 ms apart, repair it
    t = now + 0.5
    shown = []
    for ch in b"bcdefghijklmn":
        p.key(bytes([ch]), sh.screen, t)
        shown.append(bool(p.overlay().cells))
        sh.feed(bytes([ch]))
        p.observe(sh.screen, t + 0.02)
        t += 0.2
    assert shown[:10] == [True] * 10 and shown[-1] is False


def test_a_slow_echo_is_a_glitch_too() -> None:
    p, sh = world("adaptive", srtt=0.01)
    p.key(b"a", sh.screen, 0.0)
    sh.feed(b"a")
    p.observe(sh.screen, 0.4)  # the host took 400 ms
    p.key(b"b", sh.screen, 0.5)
    assert cells(p) == {(3, 0): "b"}


def test_never_predicts_and_always_shows_confirmed_epochs() -> None:
    p, sh = world("never")
    p.key(b"ab", sh.screen, 0)
    sh.feed(b"ab")
    p.observe(sh.screen, 0.1)
    p.key(b"c", sh.screen, 0.2)
    assert p.pending == 0 and not p.overlay() and p.next_timer() is None
    p, sh = world("always", srtt=0.001)
    now = confirmed(p, sh)
    p.key(b"c", sh.screen, now)
    assert p.overlay().cells == (OverlayCell(3, 0, "c", False),)  # fast link: no underline


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive"):
        Predictor("sometimes")


def test_reset_and_resize_drop_everything() -> None:
    p, sh = world()
    now = confirmed(p, sh)
    p.key(b"ab", sh.screen, now)
    p.reset()
    assert not p.overlay() and p.pending == 0
    sh.feed(b"ab")
    p.observe(sh.screen, now + 0.1)
    p.key(b"c", sh.screen, now + 2)
    assert p.pending == 1 and not p.overlay()  # tentative
    sh.feed(b"c")
    p.observe(sh.screen, now + 2.1)
    p.key(b"d", sh.screen, now + 2.2)
    assert cells(p) == {(6, 0): "d"}
    big = Screen(width=30)
    p.observe(big, now + 2.3)
    assert not p.overlay() and p.pending == 0


# -- bounds ---------------------------------------------------------------------------------


def test_a_flood_of_keys_stays_bounded() -> None:
    p, sh = world(width=500, height=50)
    now = confirmed(p, sh)
    for i in range(100):
        p.key(b"a" * 40, sh.screen, now + i * 0.001)
        assert p.pending <= MAX_CELLS
    for i in range(100):
        p.key((LEFT + b"b") * 10, sh.screen, now + i * 0.001)  # inserts shift the line
        assert p.pending <= MAX_CELLS
    assert len(p.overlay().cells) <= MAX_CELLS
    q, sh2 = world()
    now = confirmed(q, sh2)
    q.key(b"a" * (MAX_KEY_BYTES + 1), sh2.screen, now)  # a paste: not predicted
    assert q.pending == 0


# -- properties -----------------------------------------------------------------------------

KEYS = [b"a", b"b", b"a", "\u4e2d".encode(), b" ", BS, LEFT, RIGHT, b"\x1bOD", ENTER, b"\t"]
PASSWORD_KEYS = [b"P", b"W", "\u00c9".encode(), b" ", BS, LEFT, RIGHT, ENTER]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("key"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)),
        st.tuples(st.just("echo"), st.integers(1, 5)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.7, 3.0])),
        st.tuples(st.just("rtt"), st.sampled_from([0.001, 0.025, 0.05, 0.1, 0.5])),
        st.tuples(st.just("timer"), st.none()),
    ),
    max_size=40,
)


class Run:
    """A predictor and a shell whose output lags the keys: ``echo`` delivers queued keys."""

    def __init__(self, mode: str, width: int, height: int) -> None:
        self.p = Predictor(mode)
        self.sh = Shell(Screen(width, height), prompt="\u00bb ")
        self.queue: list[bytes] = []
        self.now = 0.0

    def step(self, kind: str, arg: object) -> None:
        p, sh = self.p, self.sh
        if kind == "key":
            data = b"".join(arg)  # type: ignore[arg-type]
            p.key(data, sh.screen, self.now)
            self.queue.append(data)
        elif kind == "echo":
            for data in self.queue[: int(arg)]:  # type: ignore[call-overload]
                self.deliver(data)
            del self.queue[: int(arg)]  # type: ignore[call-overload]
            p.observe(sh.screen, self.now)
        elif kind == "wait":
            self.now += float(arg)  # type: ignore[arg-type]
        elif kind == "rtt":
            p.rtt(float(arg), self.now)  # type: ignore[arg-type]
        else:
            p.handle_timer(self.now)

    def deliver(self, data: bytes) -> None:
        self.sh.feed(data)

    def catch_up(self) -> None:
        for data in self.queue:
            self.deliver(data)
        self.queue.clear()
        self.p.observe(self.sh.screen, self.now)
        self.now += MAX_ECHO_WAIT + 0.1
        self.p.observe(self.sh.screen, self.now)


class PasswordRun(Run):
    """Lines alternate between echo on and off; on echo-off lines the mate types
    only characters that the echo-on lines and the prompts never contain."""

    def deliver(self, data: bytes) -> None:
        self.sh.feed(data)  # one key: the test types one at a time
        if data == ENTER:
            self.sh.echo = not self.sh.echo


@SETTINGS
@given(
    steps,
    st.sampled_from(["adaptive", "always"]),
    st.sampled_from([(8, 3), (12, 4), (20, 2)]),
)
def test_shown_cells_are_of_confirmed_epochs_and_all_go_once_the_truth_catches_up(
    ops: list[tuple[str, object]], mode: str, size: tuple[int, int]
) -> None:
    run = Run(mode, *size)
    for kind, arg in ops:
        run.step(kind, arg)
        ov = run.p.overlay()
        for c in ov.cells:  # every shown cell belongs to a confirmed epoch
            assert 0 <= c.col < size[0] and 0 <= c.row < size[1]
            assert run.p._cells[(c.col, c.row)].epoch <= run.p._confirmed
    run.catch_up()
    assert not run.p.overlay()
    assert run.p.pending == 0


@SETTINGS
@given(st.data(), st.sampled_from(["adaptive", "always"]))
def test_characters_typed_with_echo_off_are_never_shown(data: st.DataObject, mode: str) -> None:
    run = PasswordRun(mode, 12, 4)
    password_chars = {"P", "W", "\u00c9"}
    echo_on = True  # as the mate's keys see it: the shell's state once they arrive
    for _ in range(data.draw(st.integers(0, 40))):
        kind = data.draw(st.sampled_from(["key", "key", "echo", "wait", "rtt", "timer"]))
        if kind == "key":
            key = data.draw(st.sampled_from(KEYS if echo_on else PASSWORD_KEYS))
            if key == ENTER:
                echo_on = not echo_on
            arg: object = [key]
        elif kind == "echo":
            arg = data.draw(st.integers(1, 5))
        elif kind == "wait":
            arg = data.draw(st.sampled_from([0.0, 0.05, 0.2, 0.7, 3.0]))
        elif kind == "rtt":
            arg = data.draw(st.sampled_from([0.001, 0.05, 0.5]))
        else:
            arg = None
        run.step(kind, arg)
        assert not {c.text for c in run.p.overlay().cells} & password_chars


@SETTINGS
@given(
    st.lists(st.binary(max_size=64), max_size=20),
    st.lists(st.text(max_size=6), max_size=20),
    st.sampled_from(["adaptive", "always", "never"]),
)
def test_any_bytes_and_any_truth_are_safe(
    inputs: list[bytes], truths: list[str], mode: str
) -> None:
    p = Predictor(mode)
    s = Screen(10, 3)
    now = 0.0
    for i, data in enumerate(inputs):
        p.key(data, s, now)
        if i < len(truths):
            s.write(truths[i].replace("\n", "").replace("\r", "") or "")
        p.observe(s, now)
        now += 0.3
        ov = p.overlay()
        assert p.pending <= MAX_CELLS
        assert all(0 <= c.col < 10 and 0 <= c.row < 3 for c in ov.cells)
        if ov.cursor is not None:
            assert 0 <= ov.cursor[0] < 10 and 0 <= ov.cursor[1] < 3
    p.observe(s, now + LATER)
    assert not p.overlay()
