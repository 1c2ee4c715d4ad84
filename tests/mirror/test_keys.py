"""Reading a replica pane's tty back: keys and binding markers, however the reads split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tether.mirror.apply import MAGIC, MAGIC_END
from tether.mirror.keys import MAX_MARK, Mark, PaneKeys

KEYS = st.binary(min_size=1, max_size=40).filter(lambda b: b"\x1b" not in b)
MARKS = st.from_regex(rb"\A[0-9a-z]{1,8}\Z", fullmatch=True)


def normalise(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    """Adjacent keys joined (reads may split them anywhere), marks kept apart and
    told from keys (a ``Mark`` equals its bytes)."""
    out: list[tuple[str, bytes]] = []
    for p in pieces:
        if isinstance(p, Mark):
            out.append(("mark", bytes(p)))
        elif out and out[-1][0] == "keys":
            out[-1] = ("keys", out[-1][1] + p)
        elif p:
            out.append(("keys", p))
    return out


@given(st.lists(st.one_of(KEYS, MARKS.map(Mark)), max_size=12), st.data())
def test_keys_and_marks_come_back_in_order_whatever_the_reads(
    items: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(MAGIC + i + MAGIC_END if isinstance(i, Mark) else i for i in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pk = PaneKeys()
    got: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += pk.feed(stream[a:b])
    assert pk.carry == b""
    assert normalise(got) == normalise(items)


def test_a_marker_split_inside_magic_waits_for_the_rest() -> None:
    pk = PaneKeys()
    assert pk.feed(b"ab" + MAGIC[:3]) == [b"ab"]
    assert pk.feed(MAGIC[3:] + b"7") == []
    assert pk.feed(MAGIC_END + b"c") == [Mark(b"7"), b"c"]


def test_an_unfinished_marker_is_given_up_and_its_bytes_are_keys() -> None:
    """A mate typing ESC _ tether: by hand and more: the carry stays bounded."""
    pk = PaneKeys()
    got = pk.feed(MAGIC + b"x" * (MAX_MARK + 1))
    assert not any(isinstance(g, Mark) for g in got)
    assert b"".join(got) + pk.carry == MAGIC + b"x" * (MAX_MARK + 1)
    assert len(pk.carry) < len(MAGIC)
