"""Local echo's bytes: predictions drawn over the host's pane and undone, checked on a
terminal (pyte, which keeps ``ESC 7``/``ESC 8`` as tmux does) that gets everything
written to the pane's tty, against one that gets only the host's bytes."""

from __future__ import annotations

import pyte
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.client.local_echo import FLOOD_BYTES, HostPane, LocalEcho

W, H = 40, 6
PROMPT = b"\x1b[32m$\x1b[0m "
SLOW = 0.2  # seconds of SRTT: predictions on and underlined


class Pane:
    """The local pane (tmux, played by pyte) fed what the join client writes, beside
    the truth: a terminal fed only the host's bytes."""

    def __init__(self, mode: str = "always") -> None:
        self.shown = pyte.Screen(W, H)
        self.truth = pyte.Screen(W, H)
        self._shown = pyte.ByteStream(self.shown)
        self._truth = pyte.ByteStream(self.truth)
        self.echo = LocalEcho(mode)
        self.now = 100.0
        self.host(PROMPT)
        self.echo.engage(W, H, b"\x1bc" + PROMPT)
        self.echo.rtt(SLOW, self.now)

    def host(self, data: bytes) -> None:
        self._truth.feed(data)
        self._shown.feed(self.echo.host_output(data, self.now))

    def type(self, keys: bytes) -> None:
        self._shown.feed(self.echo.typed(keys, self.now))

    def later(self, seconds: float) -> None:
        self.now += seconds
        self._shown.feed(self.echo.timer(self.now))

    def line(self, screen: pyte.Screen | None = None, row: int = 0) -> str:
        return "".join((screen or self.shown).buffer[row][x].data for x in range(W)).rstrip()

    def underlined(self, col: int, row: int = 0) -> bool:
        return bool(self.shown.buffer[row][col].underscore)

    def converged(self) -> bool:
        same = all(self.line(self.shown, r) == self.line(self.truth, r) for r in range(H))
        cursor = (self.shown.cursor.x, self.shown.cursor.y) == (
            self.truth.cursor.x, self.truth.cursor.y)  # fmt: skip
        attrs = self.shown.cursor.attrs == self.truth.cursor.attrs
        return same and cursor and attrs


def confirmed_epoch(p: Pane) -> None:
    """Type a key and echo it at once: the epoch is confirmed, prediction shows."""
    p.type(b"l")
    p.host(b"l")
    assert p.line() == "$ l" and p.converged()


def test_a_key_shows_at_once_underlined_then_as_the_host_echoes_it() -> None:
    p = Pane()
    confirmed_epoch(p)
    p.type(b"s")
    assert p.line() == "$ ls"  # before any echo
    assert p.underlined(3)
    assert (p.shown.cursor.x, p.shown.cursor.y) == (4, 0)
    p.later(0.05)
    p.host(b"s")
    assert p.line() == "$ ls" and not p.underlined(3)
    assert p.converged()


def test_the_first_key_of_an_epoch_is_not_shown_until_echoed() -> None:
    p = Pane()
    p.type(b"e")
    assert p.line() == "$"  # tentative
    assert p.converged()


def test_a_wrong_prediction_is_erased_and_the_host_screen_shown() -> None:
    p = Pane()
    confirmed_epoch(p)
    p.type(b"xyz")
    assert p.line() == "$ lxyz"
    p.later(5.0)
    p.host(b"Q")  # the host drew something else where x was predicted
    assert p.line() == "$ lQ"
    assert p.converged()


def test_a_password_prompt_never_shows_a_predicted_character() -> None:
    p = Pane()
    confirmed_epoch(p)
    p.type(b"\r")
    p.host(b"\r\nPassword: ")
    for ch in b"hunter2":
        p.later(0.15)
        p.type(bytes([ch]))
        assert "hunter" not in p.line(row=1) and "h" not in p.line(row=1)[10:]
    p.later(5.0)
    p.host(b"")
    assert p.line(row=1) == "Password:"
    assert p.converged()


def test_the_host_colour_carries_on_after_an_overlay() -> None:
    """ESC 7 / ESC 8 keep the host's attributes exactly, ones pyte's cells cannot hold too."""
    p = Pane()
    p.host(b"\x1b[1;31m")
    confirmed_epoch(p)
    p.type(b"s")
    p.host(b"s")
    assert p.shown.buffer[0][3].fg == "red" and p.shown.buffer[0][3].bold
    assert p.converged()


def test_no_overlay_in_the_alternate_screen_or_insert_mode() -> None:
    p = Pane()
    confirmed_epoch(p)
    p.host(b"\x1b[4h")  # insert mode: drawing would shift the line
    p.type(b"q")
    assert p.line() == "$ l"
    p.host(b"\x1b[4l\x1b[?1049h")  # (pyte keeps one screen: the line stays)
    p.type(b"q")
    assert "q" not in p.line()
    assert p.converged()


def test_a_flood_drops_the_model_and_writes_the_host_bytes_unchanged() -> None:
    p = Pane()
    confirmed_epoch(p)
    p.type(b"s")
    chunk = b"y\r\n" * (FLOOD_BYTES // 3 + 1)
    out = p.echo.host_output(chunk, p.now)
    assert out.endswith(chunk) and not p.echo.engaged
    assert p.echo.host_output(b"z", p.now) == b"z"
    assert not p.echo.wanted(p.now) and p.echo.wanted(p.now + 1.0)


def test_render_writes_a_wide_character_from_its_left_half() -> None:
    m = HostPane(10, 2)
    m.feed("a\u4e2db".encode())
    assert m.render(2, 0) == m.render(1, 0)
    assert m.render(1, 0).endswith("\u4e2d".encode())


KEYS = st.sampled_from([b"a", b"b", b" ", b"\x7f", b"\x1b[D", b"\x1b[C", b"\r", b"\t"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(KEYS, st.sampled_from(["echo", "late", "other", "none"])),
                max_size=25))
def test_whatever_is_typed_and_drawn_the_screen_converges_to_the_host(
    steps: list[tuple[bytes, str]],
) -> None:
    """A shell-ish host: echoes printable keys (sometimes late), erases on backspace,
    or answers something else; once the link is quiet the pane equals the host's."""
    p = Pane()
    late: list[bytes] = []
    for key, what in steps:
        p.type(key)
        p.later(0.03)
        if what == "echo" or what == "late":
            echo = key if key[:1].isalnum() or key == b" " else b""
            if key == b"\x7f":
                echo = b"\x08 \x08"
            elif key == b"\r":
                echo = b"\r\n" + PROMPT
            (late.append if what == "late" else p.host)(echo)
        elif what == "other":
            p.host(b"!")
    for echo in late:
        p.host(echo)
    p.later(10.0)
    p.host(b"")  # the link is quiet: the last output judged everything
    assert p.converged(), (p.line(), p.line(p.truth))
