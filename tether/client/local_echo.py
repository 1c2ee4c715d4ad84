"""Local echo in a join mate's pane: the predictor's guesses drawn over the host's screen.

``tether.core.predict.Predictor`` decides what to show; this module keeps what
it needs to judge (a model of the pane as the host drew it) and turns its
overlay into bytes for the local pane's tty, interleaved with the host's bytes
so that the local tmux ends up showing exactly the host's screen.

The model is a pyte ``Screen`` fed the host's bytes for the pane, engaged
from a capture of the local pane when the mate first types into it (the
local tmux is the truth then) and dropped when it could go wrong: the
alternate screen, a flood of output (pyte parses a few hundred KB/s), a
pane redrawn or resized. pyte only has to be right about the cursor's line:
the host's bytes always reach tmux unchanged, so tmux's rendering stays the
reference, and pyte's cells are written back only where a prediction was.

Drawing: ``ESC 7`` saves the host's cursor exactly (position, attributes,
charset), the predicted cells are written (underlined while the engine says
so) and the cursor is left where the prediction puts it. Before the next
host bytes, or a new overlay, it is undone: each drawn cell is written back
as the model has it, then ``ESC 8`` restores the host's cursor, so the host's
bytes land where they would have. Nothing is drawn when that cannot be done
faithfully: insert or origin mode, a pending wrap at the line's end, a
non-ASCII charset, or a cursor the host saved itself (``ESC 7`` is one slot).
"""

from __future__ import annotations

import unicodedata

import pyte
from pyte import graphics, modes

from tether.core.predict import Overlay, Predictor

__all__ = ["FLOOD_BYTES", "HostPane", "LocalEcho"]

FLOOD_BYTES = 64 * 1024
"""Host bytes a second past which the model is dropped (a flood, not an echo)."""
ALTERNATE = frozenset(m << 5 for m in (47, 1047, 1049))
_FG = {name: code for code, name in {**graphics.FG_ANSI, **graphics.FG_AIXTERM}.items()}
_BG = {name: code for code, name in {**graphics.BG_ANSI, **graphics.BG_AIXTERM}.items()}


class HostPane:
    """The pane as the host drew it, for the predictor (``PaneView``) and for undoing."""

    def __init__(self, width: int, height: int) -> None:
        self.screen = pyte.Screen(max(1, width), max(1, height))
        self.stream = pyte.ByteStream(self.screen)

    @property
    def width(self) -> int:
        return int(self.screen.columns)

    @property
    def height(self) -> int:
        return int(self.screen.lines)

    @property
    def cursor(self) -> tuple[int, int]:
        c = self.screen.cursor
        return min(c.x, self.width - 1), c.y

    @property
    def alternate(self) -> bool:
        return bool(self.screen.mode & ALTERNATE)

    def cell(self, col: int, row: int) -> str:
        if not (0 <= col < self.width and 0 <= row < self.height):
            return " "
        return str(self.screen.buffer[row][col].data)

    def feed(self, data: bytes) -> None:
        self.stream.feed(data)

    def drawable(self) -> bool:
        """Whether an overlay can be drawn and undone exactly (see the module's notes)."""
        s = self.screen
        return (
            not self.alternate
            and s.cursor.x < self.width
            and modes.IRM not in s.mode
            and modes.DECOM not in s.mode
            and not s.savepoints
            and s.charset == 0
            and s.g0_charset is pyte.charsets.LAT1_MAP
        )

    def render(self, col: int, row: int) -> bytes:
        """The cell as the host drew it: position, attributes, text (a wide
        character from its left half)."""
        buf = self.screen.buffer[row]
        if col > 0 and buf[col].data == "" and buf[col - 1].data:
            col -= 1
        ch = buf[col]
        sgr = ["0"]
        for flag, code in (("bold", "1"), ("italics", "3"), ("underscore", "4"),
                           ("blink", "5"), ("reverse", "7"), ("strikethrough", "9")):
            if getattr(ch, flag):
                sgr.append(code)
        sgr += _colour(ch.fg, _FG, 38) + _colour(ch.bg, _BG, 48)
        text = ch.data or " "
        return _cup(col, row) + ("\x1b[" + ";".join(sgr) + "m" + text).encode()


def _colour(name: str, table: dict[str, int], extended: int) -> list[str]:
    if name == "default":
        return []
    if name in table:
        return [str(table[name])]
    if len(name) == 6:
        try:
            r, g, b = (int(name[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            return []
        return [f"{extended};2;{r};{g};{b}"]
    return []


def _cup(col: int, row: int) -> bytes:
    return b"\x1b[%d;%dH" % (row + 1, col + 1)


class LocalEcho:
    """One pane's local echo: its model, its predictor, what is drawn now."""

    def __init__(self, mode: str = "adaptive") -> None:
        self.predictor = Predictor(mode)
        self.mode = mode
        self.model: HostPane | None = None
        self._drawn: list[tuple[int, int]] = []
        self._saved = False
        """``ESC 7`` was written: the host's cursor waits for ``ESC 8``."""
        self._window_start = 0.0
        self._window_bytes = 0
        self.flooded_at: float | None = None

    @property
    def engaged(self) -> bool:
        return self.model is not None

    def wanted(self, now: float) -> bool:
        """Whether to engage (capture the pane) now: predicting, and not in a flood."""
        if self.mode == "never" or self.model is not None:
            return False
        return self.flooded_at is None or now - self.flooded_at >= 1.0

    def engage(self, width: int, height: int, image: bytes) -> None:
        """Start from ``image``, bytes that redraw the pane as tmux shows it now."""
        model = HostPane(width, height)
        try:
            model.feed(image)
        except Exception:  # pyte gave up on it: no prediction rather than a wrong one
            return
        self.model = model
        self.predictor.reset()
        self._drawn, self._saved = [], False

    def disengage(self) -> bytes:
        """Drop the model (and the overlay: the bytes that undo it)."""
        out = self._undo()
        self.model = None
        self.predictor.reset()
        return out

    def rtt(self, srtt: float, now: float) -> None:
        self.predictor.rtt(srtt, now)

    # --- bytes to the pane's tty ----------------------------------------------------

    def host_output(self, data: bytes, now: float) -> bytes:
        """The host's bytes for the pane, with the overlay undone before them and
        redrawn after: write the result to the tty in their place."""
        if self.model is None:
            return data
        if now - self._window_start >= 1.0:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += len(data)
        if self._window_bytes > FLOOD_BYTES:
            self.flooded_at = now
            return self.disengage() + data
        out = self._undo()
        try:
            self.model.feed(data)
        except Exception:  # pyte gave up: no prediction rather than a wrong one
            self.disengage()  # nothing left to undo: ``out`` did
            return out + data
        self.predictor.observe(self.model, now)
        return out + data + self._draw()

    def typed(self, keys: bytes, now: float) -> bytes:
        """Keys the mate typed into the pane (before they are sent): what to draw now."""
        if self.model is None:
            return b""
        if not self.model.drawable():
            self.predictor.reset()
            return self._undo()
        self.predictor.key(keys, self.model, now)
        return self._undo() + self._draw()

    def next_timer(self) -> float | None:
        return self.predictor.next_timer() if self.model is not None else None

    def timer(self, now: float) -> bytes:
        """The predictor's timer fired (a glitch shows, a prediction expires): redraw."""
        if self.model is None:
            return b""
        self.predictor.handle_timer(now)
        return self._undo() + self._draw()

    def _undo(self) -> bytes:
        if not self._saved:
            return b""
        out = b"".join(self.model.render(c, r) for c, r in self._drawn) if self.model else b""
        self._drawn = []
        self._saved = False
        return out + b"\x1b8"

    def _draw(self) -> bytes:
        model = self.model
        if model is None or not model.drawable():
            return b""
        ov: Overlay = self.predictor.overlay()
        if not ov:
            return b""
        out = [b"\x1b7"]
        drawn: list[tuple[int, int]] = []
        for cell in ov.cells:
            if not (0 <= cell.row < model.height and 0 <= cell.col < model.width):
                continue
            if not cell.text.isprintable():
                continue
            text = cell.text.encode()
            out.append(_cup(cell.col, cell.row))
            out.append(b"\x1b[4m" + text + b"\x1b[24m" if cell.underlined else text)
            drawn.append((cell.col, cell.row))
            if len(cell.text) == 1 and _wide(cell.text) and cell.col + 1 < model.width:
                drawn.append((cell.col + 1, cell.row))
        col, row = ov.cursor if ov.cursor is not None else model.cursor
        out.append(_cup(min(max(col, 0), model.width - 1), min(max(row, 0), model.height - 1)))
        self._drawn = drawn
        self._saved = True
        return b"".join(out)


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")
