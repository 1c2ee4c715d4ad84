"""Local echo prediction for a join mate's active pane (issue 16), with no I/O and no clock.

Over a slow link a mate's keys show up a round trip (plus the host's own link)
later. ``Predictor`` guesses the echo of easy keys (printable characters,
backspace, left and right arrows within the line) and tells the join client
what to draw over the pane until the host's output arrives. It keeps the ideas
of mosh's ``PredictionEngine`` (``src/frontend/terminaloverlay.cc``):

* **Truth and overlay.** The pane as the host drew it (``PaneView``) is the
  truth; ``overlay()`` lists predicted cells and cursor to draw on top. A
  confirmed prediction drops out (the truth shows it), a wrong one is removed:
  the mate ends up seeing exactly the host's screen.
* **Epochs.** A new epoch is tentative: none of its predictions is shown until
  the host echoes one of them. A key whose effect cannot be guessed (Enter,
  Tab, other controls and escape sequences, a right arrow at the line's end, a
  left arrow or backspace at the start of a row or left of where prediction last
  started (a prompt's end, usually), a character that would scroll the screen)
  starts a new epoch and makes the engine forget the cursor; it starts again
  from the host's cursor once no prediction is left and every key had time to
  echo (``echo_wait``). So a password typed after Enter is in an epoch no echo
  ever confirms, and never shows. Confirming an epoch drops older epochs never
  confirmed (echoes come in order: theirs never will). The last column starts
  an epoch too (programs wrap differently), and so does the row after it.
* **Judged by time** (tether has no echo ack from the host, mosh has): a key's
  echo is due ``echo_wait = 0.25 s + 2 * SRTT`` (at most 5 s) after it. When
  host output has been applied (``observe``), a typed character found in its
  cell confirms its epoch at once, unless it is a blank or the cell showed it
  before (no credit: that is not an echo); one still missing when due is a
  contradiction: every prediction goes and a new tentative epoch begins. The
  predicted cursor is checked when due the same way. Cells that only follow
  from a key (the blank a backspace leaves, the rest of the line shifted by an
  insert or delete, a wide character's right half) are shown until due and
  never judged. Without output nothing is judged: a stalled link keeps its
  predictions on screen.
* **Display.** ``adaptive`` (default) shows confirmed epochs while the SRTT is
  above 30 ms (off at or below 20 ms once nothing is pending) or during a
  glitch: a shown prediction pending, or an echo taking, 250 ms turns display
  on until 10 quick echoes at least 150 ms apart. ``always`` shows confirmed
  epochs, ``never`` predicts nothing; none predicts in the alternate screen.
  Cells other than blanks are underlined while the SRTT is above 80 ms (off at
  or below 50 ms) or during a glitch.
* **Bounds.** At most ``MAX_CELLS`` cells (a key that would pass it is not
  predicted) and ``MAX_KEY_BYTES`` per ``key`` call (more is a paste: not
  predicted). A key costs the length of the rest of its line, ``observe`` the
  number of predictions.

The join client keeps one ``Predictor`` for the active pane and calls
``rtt(srtt, now)`` when the SRTT changes; ``key(data, view, now)`` with what the
mate typed into the pane, before sending it; ``observe(view, now)`` after
applying host output to its local copy of the pane; ``reset()`` when the pane is
redrawn from a snapshot, resized or another pane becomes active;
``handle_timer(now)`` at ``next_timer()``. After each call it draws ``overlay()``
over the pane (a wide character's text at its left cell), replacing what it drew
before.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

MODES = ("adaptive", "always", "never")
MAX_CELLS = 256
"""Most predicted cells held at once."""
MAX_KEY_BYTES = 4096
"""Longest input predicted in one ``key`` call; more is a paste, not typing."""
SRTT_ON, SRTT_OFF = 0.030, 0.020
"""Adaptive display turns on above ``SRTT_ON``, off at or below ``SRTT_OFF``."""
FLAG_ON, FLAG_OFF = 0.080, 0.050
"""Underlining turns on above ``FLAG_ON``, off at or below ``FLAG_OFF``."""
GLITCH_AGE = 0.25
"""A shown prediction pending this long (or an echo this slow) is a glitch."""
GLITCH_REPAIR = 10
"""Quick echoes that end a glitch ..."""
GLITCH_REPAIR_GAP = 0.15
"""... counted at most one per this many seconds."""
ECHO_SLACK, ECHO_RTTS, MAX_ECHO_WAIT = 0.25, 2.0, 5.0
"""A key's echo is due ``ECHO_SLACK + ECHO_RTTS * srtt`` (at most ``MAX_ECHO_WAIT``) after it."""
INITIAL_SRTT = 0.1
"""Assumed until ``rtt`` is called: a slow link, like mosh's first send interval."""
MAX_BLIND = 64
"""Characters typed blind (cursor lost) kept to find the cursor by their echo."""
_MAX_STALE = 8
_MAX_CURSORS = 16


class PaneView(Protocol):
    """The pane as the host last drew it (the truth), read by the engine."""

    width: int
    height: int
    cursor: tuple[int, int]
    """(col, row), 0-based."""
    alternate: bool
    """The alternate screen is on."""

    def cell(self, col: int, row: int) -> str:
        """The cell's text: ``" "`` blank, ``""`` the right half of a wide character."""
        ...


@dataclass(frozen=True, slots=True)
class OverlayCell:
    col: int
    row: int
    text: str
    """Its text; a wide character also covers ``col + 1``."""
    underlined: bool


@dataclass(frozen=True, slots=True)
class Overlay:
    """What to draw over the truth: cells in (row, col) order, the cursor or None (the truth's)."""

    cells: tuple[OverlayCell, ...] = ()
    cursor: tuple[int, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.cells) or self.cursor is not None


EMPTY = Overlay()


@dataclass(slots=True)
class _Cell:
    text: str
    typed: bool
    """The typed character itself, which the echo confirms or contradicts; other cells
    (blanks after a backspace, shifted rest of the line, right halves) are shown until due."""
    epoch: int
    t: float
    """When its key was typed."""
    due: float
    stale: frozenset[str] | None
    """Texts the cell showed, or was predicted to show, while keys were in flight: finding
    one of them is no echo. None: too many to keep, nothing found there is an echo."""
    credit: bool
    """Typed, not blank, not stale: finding it in the cell confirms its epoch."""


@dataclass(slots=True)
class _Cursor:
    col: int
    row: int
    epoch: int
    due: float
    check: bool
    """The newest move and the engine still knows the cursor: judged when due."""


_LEFT, _RIGHT, _BACKSPACE, _OTHER = range(4)


def _width(ch: str) -> int:
    """Cells a single typed character takes: 0 for what is not predicted (controls, combining)."""
    cat = unicodedata.category(ch)
    if cat[0] in "CM" or cat in ("Zl", "Zp"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _wide(text: str) -> bool:
    return bool(text) and unicodedata.east_asian_width(text[0]) in ("W", "F")


def _keys(data: bytes) -> Iterator[str | int]:
    """Split typed bytes into keys: a printable character, or one of _LEFT ... _OTHER."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x1B:
            i, key = _escape(data, i)
            yield key
        elif b in (0x7F, 0x08):
            i += 1
            yield _BACKSPACE
        elif b < 0x80:
            i += 1
            yield chr(b) if b >= 0x20 else _OTHER
        else:
            size = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            try:
                ch = data[i : i + size].decode()
            except UnicodeDecodeError:
                i += 1
                yield _OTHER
                continue
            i += size
            yield ch if _width(ch) else _OTHER


def _escape(data: bytes, i: int) -> tuple[int, int]:
    """The key at the ESC at ``i``: plain arrows (CSI or SS3 C/D) or _OTHER; returns (end, key)."""
    arrows = {0x43: _RIGHT, 0x44: _LEFT}
    n = len(data)
    if i + 1 >= n or data[i + 1] not in b"[O":
        return i + 1, _OTHER  # ESC alone, or Meta: ESC then the next key
    j = i + 2
    if data[i + 1] == 0x4F:  # SS3
        return (j + 1, arrows.get(data[j], _OTHER)) if j < n else (n, _OTHER)
    k = j
    while k < n and 0x20 <= data[k] <= 0x3F:  # parameters and intermediates
        k += 1
    if k < n and 0x40 <= data[k] <= 0x7E:
        return k + 1, arrows.get(data[k], _OTHER) if k == j else _OTHER
    return k, _OTHER  # cut short or malformed


class Predictor:
    """Local echo prediction for one pane; see the module docstring."""

    def __init__(self, mode: str = "adaptive") -> None:
        if mode not in MODES:
            raise ValueError(f"prediction mode must be one of {', '.join(MODES)}: {mode!r}")
        self.mode = mode
        self._srtt = INITIAL_SRTT
        self._srtt_on = self._flag_on = False
        self._glitch = 0
        self._last_quick = -math.inf
        self._epoch = 1
        self._confirmed = 0
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._cursors: list[_Cursor] = []
        self._cur: tuple[int, int] | None = None
        """Where the next key lands, as predicted; None: unknown."""
        self._home = (0, 0)
        """Where ``_cur`` was last taken from the truth: the line starts there at the latest."""
        self._quiet_at = -math.inf
        """When every key typed so far has had time to echo."""
        self._blind: list[str] | None = []
        """Characters typed since the cursor was lost (None: not trackable), whose
        echo can find the cursor again before every key had time to echo."""
        self._blind_at: tuple[int, int] | None = None
        """The truth's cursor when last looked at while typing blind."""
        self._size: tuple[int, int] | None = None
        self._triggers()

    @property
    def echo_wait(self) -> float:
        """Seconds after a key by which its echo is due."""
        return min(MAX_ECHO_WAIT, ECHO_SLACK + ECHO_RTTS * self._srtt)

    @property
    def pending(self) -> int:
        """Predicted cells not yet judged or expired."""
        return len(self._cells)

    def rtt(self, srtt: float, now: float) -> None:
        """The link's smoothed round-trip time in seconds."""
        if 0.0 <= srtt < math.inf:
            self._srtt = min(srtt, 2 * MAX_ECHO_WAIT)
            self._triggers()
            self.handle_timer(now)

    def key(self, data: bytes, view: PaneView, now: float) -> None:
        """The mate typed ``data`` into the pane (any bytes, possibly several keys)."""
        if self.mode == "never":
            return
        if self._check(view) or len(data) > MAX_KEY_BYTES:
            self._lose()
            self._quiet_at = max(self._quiet_at, now + self.echo_wait)
            return
        for key in _keys(data):
            quiet = now >= self._quiet_at
            self._quiet_at = max(self._quiet_at, now + self.echo_wait)
            if isinstance(key, str):
                self._type(key, view, now, quiet)
            elif key == _OTHER:
                self._lose()
            else:
                self._edit(key, view, now, quiet)

    def observe(self, view: PaneView, now: float) -> None:
        """Host output was applied to the pane: judge the predictions against it."""
        if self.mode == "never" or self._check(view):
            return
        confirmed = 0
        for pos, p in list(self._cells.items()):
            truth = view.cell(*pos)
            if p.credit and truth == p.text:
                del self._cells[pos]
                confirmed = max(confirmed, p.epoch)
                self._echoed(now - p.t, now)
            elif now >= p.due:
                if p.typed and truth != p.text:
                    self._drop()  # contradicted
                    return
                del self._cells[pos]
        for c in list(self._cursors):
            if now >= c.due:
                if c.check and tuple(view.cursor) != (c.col, c.row):
                    self._drop()
                    return
                self._cursors.remove(c)
        if confirmed > self._confirmed:
            lo = self._confirmed
            self._cells = {k: p for k, p in self._cells.items() if not lo < p.epoch < confirmed}
            self._cursors = [c for c in self._cursors if not lo < c.epoch < confirmed]
            self._confirmed = confirmed
        if self._cur is None:
            self._anchor(view, now)
        self._triggers()
        self.handle_timer(now)

    def reset(self) -> None:
        """The pane was redrawn from a snapshot, resized or switched: drop all predictions."""
        self._drop()

    def next_timer(self) -> float | None:
        """When ``handle_timer`` may turn display on (a glitch), or None."""
        if self.mode == "never" or self._glitch >= GLITCH_REPAIR:
            return None
        return min((p.t + GLITCH_AGE for p in self._awaited()), default=None)

    def handle_timer(self, now: float) -> None:
        """Time passed: a shown prediction pending too long is a glitch."""
        if any(now - p.t >= GLITCH_AGE for p in self._awaited()):
            self._glitch = GLITCH_REPAIR

    def overlay(self) -> Overlay:
        """What to draw over the truth now."""
        if not self._display():
            return EMPTY
        flag = self._flag_on or self._glitch > 0
        cells = tuple(
            OverlayCell(col, row, p.text, flag and p.text != " ")
            for (col, row), p in sorted(self._cells.items(), key=lambda kv: kv[0][::-1])
            if p.epoch <= self._confirmed and p.text
        )
        shown = (c for c in reversed(self._cursors) if c.epoch <= self._confirmed)
        cursor = next(((c.col, c.row) for c in shown), None)
        if self._cur is None and not cells:
            cursor = None  # lost (Enter, ...) and nothing drawn: the truth's cursor is best
        return Overlay(cells, cursor) if cells or cursor else EMPTY

    def _display(self) -> bool:
        if self.mode == "always":
            return True
        return self.mode == "adaptive" and (self._srtt_on or self._glitch > 0)

    def _awaited(self) -> Iterator[_Cell]:
        """Shown typed characters that an echo can still confirm."""
        return (p for p in self._cells.values() if p.credit and p.epoch <= self._confirmed)

    def _triggers(self) -> None:
        idle = not self._cells  # a cursor waiting to be judged is not a pending echo
        if self._srtt > SRTT_ON:
            self._srtt_on = True
        elif self._srtt <= SRTT_OFF and idle:
            self._srtt_on = False
        if self._srtt > FLAG_ON:
            self._flag_on = True
        elif self._srtt <= FLAG_OFF:
            self._flag_on = False

    def _echoed(self, age: float, now: float) -> None:
        if age >= GLITCH_AGE:
            self._glitch = GLITCH_REPAIR
        elif self._glitch and now - self._last_quick >= GLITCH_REPAIR_GAP:
            self._glitch -= 1
            self._last_quick = now

    def _check(self, view: PaneView) -> bool:
        """Drop everything on a new size or in the alternate screen; True if not to predict."""
        size = (view.width, view.height)
        if size != self._size:
            self._size = size
            self._drop()
        if view.alternate or view.width < 1 or view.height < 1:
            self._drop()
            return True
        return False

    def _drop(self) -> None:
        """Forget every prediction and the cursor; the next predictions are tentative."""
        self._cells.clear()
        self._cursors.clear()
        self._lose()

    def _lose(self) -> None:
        """A key with an unknown effect: forget the cursor, start a new epoch."""
        self._cur = None
        self._blind, self._blind_at = [], None
        for c in self._cursors:
            c.check = False
        self._epoch += 1

    def _start(self, view: PaneView, quiet: bool) -> tuple[int, int] | None:
        """The predicted cursor; if unknown, the truth's once every key had time to echo and
        every prediction is gone (none from before can leak into the new line)."""
        if self._cur is None and quiet and not self._cells:
            col, row = view.cursor
            if 0 <= col < view.width and 0 <= row < view.height:
                self._cur = self._home = (col, row)
                self._blind, self._blind_at = [], None
        return self._cur

    def _typed_blind(self, ch: str, view: PaneView) -> None:
        """A character typed while the cursor is lost: kept for ``_anchor``."""
        if self._blind is None:
            return
        if _width(ch) != 1 or len(self._blind) >= MAX_BLIND:
            self._blind = None
            return
        if not self._blind:
            self._blind_at = tuple(view.cursor)  # type: ignore[assignment]
        self._blind.append(ch)

    def _anchor(self, view: PaneView, now: float) -> None:
        """The cursor found again by the echo of what was typed blind.

        After Enter, typing on at once never leaves the echo_wait for the truth's
        cursor to be trusted again. But when the truth's cursor moves right along
        its row over cells that spell the first characters typed blind, this
        line echoes, and the cursor is there: the echo confirms a new epoch and
        the characters still in flight are predicted from it. Only the first
        characters, in order, count (a password field that shows a ``*`` a key
        never matches a password's first character, and nothing of it is shown)."""
        if not self._blind:
            return
        col, row = view.cursor
        before, self._blind_at = self._blind_at, (col, row)
        if before is None or before[1] != row or not before[0] < col < view.width:
            return
        written = [view.cell(c, row) for c in range(before[0], col)]
        if written != self._blind[: len(written)] or not "".join(written).strip():
            return
        rest = self._blind[len(written) :]
        self._blind, self._blind_at = [], None
        self._epoch += 1
        lo, self._confirmed = self._confirmed, self._epoch
        self._cells = {k: p for k, p in self._cells.items() if not lo < p.epoch < self._epoch}
        self._cursors = [c for c in self._cursors if not lo < c.epoch < self._epoch]
        self._cur = self._home = (col, row)
        for ch in rest:
            self._type(ch, view, now, False)

    def _content(self, view: PaneView, col: int, row: int) -> str:
        p = self._cells.get((col, row))
        return p.text if p is not None else view.cell(col, row)

    def _line_end(self, view: PaneView, col: int, row: int) -> int:
        """Where the text from ``col`` on ends: at the first two blanks (or the row's end).
        Text after such a gap (zsh's right prompt) is not part of the line being edited."""
        width = view.width
        for i in range(col, width):
            if self._content(view, i, row) == " " and (
                i + 1 == width or self._content(view, i + 1, row) == " "
            ):
                return i
        return width

    def _put(self, view: PaneView, col: int, row: int, text: str, typed: bool, now: float) -> None:
        old = self._cells.pop((col, row), None)
        truth = view.cell(col, row)
        if not typed and old is None and text == truth:
            return
        stale: frozenset[str] | None = frozenset((truth,))
        if old is not None:
            stale = old.stale | {truth, old.text} if old.stale is not None else None
            stale = stale if stale is not None and len(stale) <= _MAX_STALE else None
        # a blank is too easy to match to count as an echo
        credit = typed and text != " " and stale is not None and text not in stale
        due = now + self.echo_wait
        self._cells[(col, row)] = _Cell(text, typed, self._epoch, now, due, stale, credit)

    def _move(self, col: int, row: int, now: float) -> None:
        self._cur = (col, row)
        due = now + self.echo_wait
        last = self._cursors[-1] if self._cursors else None
        if last is not None and last.check and last.epoch == self._epoch:
            last.col, last.row, last.due = col, row, due
            return
        if last is not None:
            last.check = False
        self._cursors.append(_Cursor(col, row, self._epoch, due, True))
        del self._cursors[:-_MAX_CURSORS]

    def _type(self, ch: str, view: PaneView, now: float, quiet: bool) -> None:
        """A printable character: inserted at the cursor, the rest of the line shifts right."""
        cur = self._start(view, quiet)
        if cur is None:
            self._typed_blind(ch, view)
            return
        col, row = cur
        width, w = view.width, _width(ch)
        last = col + w == width
        if col + w > width or (last and row + 1 == view.height):
            self._lose()  # a wide character that does not fit, or the screen would scroll
            return
        end = self._line_end(view, col, row)
        new = [ch, *[""] * (w - 1), *(self._content(view, i, row) for i in range(col, end))]
        del new[width - col :]
        if len(self._cells) + len(new) > MAX_CELLS:
            self._lose()
            return
        if col + len(new) == width and _wide(new[-1]):
            new[-1] = " "  # its right half was pushed off the row
        if last:
            self._epoch += 1  # the last column: shells and editors wrap differently
        for i, text in enumerate(new):
            self._put(view, col + i, row, text, i == 0, now)
        if last:
            self._epoch += 1
            self._move(0, row + 1, now)
        else:
            self._move(col + w, row, now)

    def _edit(self, key: int, view: PaneView, now: float, quiet: bool) -> None:
        """Backspace, left or right within the line; at its edges the effect is unknown."""
        cur = self._start(view, quiet)
        if cur is None:
            self._blind = None  # an edit typed blind: its echo cannot be told apart
            return
        col, row = cur
        if key == _RIGHT:
            step = 2 if col + 1 < view.width and self._content(view, col + 1, row) == "" else 1
            if col >= self._line_end(view, col, row) or col + step >= view.width:
                self._lose()
            else:
                self._move(col + step, row, now)
            return
        step = 2 if col >= 2 and self._content(view, col - 1, row) == "" else 1
        if col == 0 or (row, col - step) < self._home[::-1]:
            self._lose()  # a wrapped line goes up a row; a prompt is not for deleting
            return
        if key == _BACKSPACE:
            end = self._line_end(view, col, row)
            new = [*(self._content(view, i, row) for i in range(col, end)), *[" "] * step]
            if len(self._cells) + len(new) > MAX_CELLS:
                self._lose()
                return
            for i, text in enumerate(new):
                self._put(view, col - step + i, row, text, False, now)
        self._move(col - step, row, now)
