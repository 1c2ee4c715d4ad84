"""Terminal queries are removed from pane output; every other byte passes unchanged.

Unit cases per query kind and per look-alike, hypothesis properties (chunking
never matters, harmless streams are untouched, interleaved queries vanish,
the carry stays bounded), and a check against a real tmux that the queries
it answers are gone after filtering.
"""

from __future__ import annotations

import itertools
import shlex
import sys
import time
from pathlib import Path

import pytest
from core_tmux import Tmux, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.queries import MAX_CARRY, QueryFilter

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True)

QUERIES = [
    b"\x1b[c",  # primary DA
    b"\x1b[0c",
    b"\x1b[>c",  # secondary DA
    b"\x1b[>0c",
    b"\x1b[=c",  # tertiary DA
    b"\x1b[5n",  # DSR status
    b"\x1b[6n",  # cursor position report
    b"\x1b[?6n",
    b"\x1b[?996n",  # colour scheme
    b"\x1b[>q",  # XTVERSION
    b"\x1b[>0q",
    b"\x1b[?2004$p",  # DECRQM private
    b"\x1b[4$p",  # DECRQM ANSI
    b"\x1b[?u",  # kitty keyboard flags
    b"\x1b[11t",
    b"\x1b[13t",
    b"\x1b[14t",
    b"\x1b[14;2t",
    b"\x1b[15t",
    b"\x1b[16t",
    b"\x1b[18t",
    b"\x1b[19t",
    b"\x1b[20t",
    b"\x1b[21t",
    b"\x1b[x",  # DECREQTPARM
    b"\x1b[1x",
    b"\x1b[?4m",  # XTQMODKEYS
    b"\x1b[?1;1;0S",  # XTSMGRAPHICS read
    b"\x1b[1$w",  # DECRQPSR
    b"\x1b[1$u",  # DECRQTSR
    b"\x1b[1;1;1;1;1;1*y",  # DECRQCRA
    b"\x1b[&u",  # DECRQUPSS
    b"\x1bP$qm\x1b\\",  # DECRQSS
    b"\x1bP$q q\x1b\\",
    b'\x1bP$q"p\x1b\\',
    b"\x1bP+q544e\x1b\\",  # XTGETTCAP
    b"\x1bP+q544e;524742\x1b\\",
    b"\x1b]10;?\x07",  # OSC colours
    b"\x1b]11;?\x07",
    b"\x1b]12;?\x07",
    b"\x1b]10;?\x1b\\",
    b"\x1b]11;?\x1b\\",
    b"\x1b]10;?;?\x07",
    b"\x1b]4;1;?\x07",
    b"\x1b]4;1;?;200;?\x1b\\",
    b"\x1b]52;c;?\x07",  # clipboard
]

HARMLESS = [
    b"\x1b[31m",
    b"\x1b[01;34m",
    b"\x1b[38;5;208m",
    b"\x1b[38:2::1:2:3m",
    b"\x1b[0m",
    b"\x1b[m",
    b"\x1b[5;10H",
    b"\x1b[6;1H",  # not DSR
    b"\x1b[6A",
    b"\x1b[2J",
    b"\x1b[K",
    b"\x1b[?1049h",
    b"\x1b[?25l",
    b"\x1b[?2004h",
    b"\x1b[8;24;80t",  # resize, not a report
    b"\x1b[22;0t",  # push title
    b"\x1b[u",  # restore cursor, not the kitty query
    b"\x1b[>1u",  # kitty push flags
    b"\x1b[2 q",  # DECSCUSR
    b"\x1b[!p",  # DECSTR
    b"\x1b[>4;1m",  # modifyOtherKeys
    b"\x1b[>4n",
    b"\x1b[1;24r",
    b"\x1b7",
    b"\x1b8",
    b"\x1b=",
    b"\x1b>",
    b"\x1bM",
    b"\x1b(B",
    b"\x1b(0",
    b"\x1b\\",
    b"\x1b]0;a title\x07",
    b"\x1b]2;\xc3\xa9t\xc3\xa9 \xe2\x9c\x93\x1b\\",
    b"\x1b]8;;https://example.com/?q=6n\x1b\\",
    b"\x1b]8;;\x1b\\",
    b"\x1b]10;rgb:ff/ff/ff\x07",  # sets, not queries
    b"\x1b]4;1;rgb:ff/00/00\x07",
    b"\x1b]52;c;aGVsbG8=\x07",
    b"\x1b]133;A\x07",
    b"\x1b]1;10;?\x07",
    b"\x1bPtmux;\x1b\x1b[6n\x1b\x1b]11;?\x07\x1b\\",  # passthrough: not for this tmux
    b"\x1bPtmux;\x1b\x1bP$qm\x1b\x1b\\\x1b\\",
    b"\x1bP+p544e=31\x1b\\",  # XTSETTCAP
    b"\x1bPq#0;2;0;0;0#0~~@@vv@@~~$-\x1b\\",  # sixel
    b"\x1b_Gi=1;AAAA\x1b\\",  # APC
]

TEXT = [
    b"hello",
    b" ",
    b"\r\n",
    b"\t",
    b"6n",
    b"[c",
    b"]11;?",
    b"\\",
    b"\x07",
    b"\x08",
    b"\xc3\xa9",
    b"\xe2\x94\x80",
    b"\x9b6n",  # 8-bit CSI is text to tmux
]


def run(chunks: list[bytes]) -> tuple[bytes, QueryFilter]:
    f = QueryFilter()
    out = b"".join(f.feed(c) for c in chunks)
    return out, f


def filtered(data: bytes) -> bytes:
    return run([data])[0]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- single sequences -------------------------------------------------------------


@pytest.mark.parametrize("query", QUERIES)
def test_query_is_removed(query: bytes) -> None:
    out, f = run([b"before", query, b"after"])
    assert out == b"beforeafter"
    assert f.carried == 0


@pytest.mark.parametrize("query", QUERIES)
def test_query_is_removed_bytewise(query: bytes) -> None:
    out, f = run([bytes([b]) for b in b"<" + query + b">"])
    assert out == b"<>"
    assert f.carried == 0


@pytest.mark.parametrize("seq", HARMLESS + TEXT)
def test_ordinary_sequence_passes(seq: bytes) -> None:
    assert filtered(b"a" + seq + b"b") == b"a" + seq + b"b"
    assert run([bytes([b]) for b in seq])[0] == seq


def test_plain_chunk_is_returned_as_is() -> None:
    f = QueryFilter()
    chunk = b"x" * 1000
    assert f.feed(chunk) is chunk
    colourful = b"\x1b[31mred\x1b[0m plain"
    assert f.feed(colourful) is colourful


def test_osc_query_ended_by_another_sequence() -> None:
    # tmux ends an OSC at any ESC, CAN or SUB and still answers it.
    assert filtered(b"\x1b]11;?\x1b[31mx") == b"\x1b[31mx"
    assert filtered(b"\x1b]11;?\x18x") == b"\x18x"


def test_query_that_ends_an_unfinished_sequence_stays() -> None:
    # Removing it would turn "ESC [ 1" + "m" into bold, or let the title swallow text.
    for data in (
        b"\x1b[1\x1b[6nm",
        b"\x1b]0;title\x1b[6nhello",
        b"\x1b_apc\x1b[c",
        b"\x1b\x1b[c",
        b"\x1bP1:x\x1b[c",
    ):
        assert filtered(data) == data
        assert run([bytes([b]) for b in data])[0] == data


def test_query_inside_dcs_body_stays() -> None:
    data = b"\x1bPzz\x1b[6n\x1b\x1b[c\x1b]11;?\x07\x1b\\"
    assert filtered(data) == data
    assert filtered(data + b"\x1b[6n") == data


def test_dcs_aborted_before_its_body_does_not_hide_queries() -> None:
    # An ESC before the DCS final byte aborts it (tmux's dcs_enter has ESC anywhere).
    assert filtered(b"\x1bP1;2\x1b\\\x1b[6nx") == b"\x1bP1;2\x1b\\x"


def test_near_misses_pass() -> None:
    for data in (
        b"\x1b[6;1n",  # CPR with a parameter still a DSR: removed
        b"\x1b]11;?x\x07",
        b"\x1b]11;??\x07",
        b"\x1b]4;1;?;2;red\x07",  # mixed set and query: the set must survive
        b"\x1b[14;2;3t",
        b"\x1b[6\nn",  # control byte inside: tmux executes it
        b"\x1bP$qm\x07x\x1b\\",
    ):
        expect = b"" if data == b"\x1b[6;1n" else data
        assert filtered(data) == expect


def test_text_after_long_unfinished_sequence_is_not_lost() -> None:
    f = QueryFilter()
    long_csi = b"\x1b[" + b"1;" * 400
    out = f.feed(long_csi[:100]) + f.feed(long_csi[100:]) + f.feed(b"mtext\x1b[6n more")
    assert out == long_csi + b"mtext more"
    assert f.carried == 0

    f = QueryFilter()
    title = b"\x1b]2;" + b"t" * 5000
    out = f.feed(title)
    assert out == title  # not a possible query: passed on at once
    assert f.feed(b"\x07after\x1b[c") == b"\x07after"

    f = QueryFilter()
    tcap = b"\x1bP+q" + b"54" * 300
    out = b"".join(f.feed(tcap[i : i + 7]) for i in range(0, len(tcap), 7))
    assert f.carried <= MAX_CARRY
    out += f.feed(b"\x1b\\tail")
    assert out == tcap + b"\x1b\\tail"


def test_overlong_query_is_left_alone_however_split() -> None:
    # Only queries shorter than MAX_CARRY can always be held back whole, so only
    # those are recognised: the result must not depend on where chunks end.
    for n in (MAX_CARRY - 4, MAX_CARRY - 3, MAX_CARRY - 2, MAX_CARRY, MAX_CARRY + 40):
        for data in (b"\x1b[" + b"0" * n + b"n", b"\x1bP+q" + b"4" * n + b"\x1b\\"):
            whole = filtered(data)
            assert whole in (b"", data)
            assert whole == (b"" if len(data) < MAX_CARRY else data)
            for cut in range(len(data) + 1):
                assert run([data[:cut], data[cut:]])[0] == whole


def test_unfinished_sequence_is_held_until_it_can_be_decided() -> None:
    f = QueryFilter()
    assert f.feed(b"abc\x1b[") == b"abc"
    assert f.carried == 2
    assert f.feed(b"31") == b""
    assert f.feed(b"mx") == b"\x1b[31mx"
    assert f.feed(b"\x1b]11;?") == b""
    assert f.feed(b"\x1b") == b""
    assert f.feed(b"\\y") == b"y"
    assert f.feed(b"\x1b") == b""
    assert f.flush() == b"\x1b"
    assert f.carried == 0


def test_unfinished_non_query_is_not_held() -> None:
    f = QueryFilter()
    assert f.feed(b"\x1b]0;tit") == b"\x1b]0;tit"
    assert f.feed(b"le\x1b[6n") == b"le\x1b[6n"  # the ESC ends the title: not ground
    assert f.feed(b"\x1bPq#0") == b"\x1bPq#0"
    assert f.feed(b"~~\x1b") == b"~~\x1b"
    assert f.feed(b"\x1b[6n") == b"\x1b[6n"  # still inside the sixel body
    assert f.feed(b"\x1b\\\x1b[6n!") == b"\x1b\\!"


# --- properties -------------------------------------------------------------------

text = st.sampled_from(TEXT) | st.binary(max_size=6).filter(lambda b: b"\x1b" not in b)
harmless = st.sampled_from(HARMLESS) | text
query = st.sampled_from(QUERIES)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
fragments = st.sampled_from(
    [*HARMLESS, *QUERIES, *TEXT, b"\x1b", b"\x1b[", b"\x1b]", b"\x1bP", b"\x1b\\", b"\x07", b"\x18"]
)
noise = st.lists(fragments | st.binary(max_size=5), max_size=30).map(b"".join)


@SETTINGS
@given(data=noise, cuts=cuts)
def test_chunking_never_changes_the_output(data: bytes, cuts: list[int]) -> None:
    whole, f = run([data])
    pieces = split(data, cuts)
    g = QueryFilter()
    parts = []
    for piece in pieces:
        parts.append(g.feed(piece))
        assert g.carried <= MAX_CARRY
    assert b"".join(parts) + g.flush() == whole + f.flush()


@SETTINGS
@given(data=st.binary(max_size=300), cuts=cuts)
def test_chunking_never_changes_the_output_of_random_bytes(data: bytes, cuts: list[int]) -> None:
    whole, f = run([data])
    g = QueryFilter()
    assert b"".join(g.feed(p) for p in split(data, cuts)) + g.flush() == whole + f.flush()


@SETTINGS
@given(parts=st.lists(harmless, max_size=40), cuts=cuts)
def test_harmless_output_is_unchanged(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    out, f = run(split(data, cuts))
    assert out + f.flush() == data
    assert filtered(data) == data


@SETTINGS
@given(
    items=st.lists(harmless | query, max_size=40),
    cuts=cuts,
)
def test_interleaved_queries_vanish(items: list[bytes], cuts: list[int]) -> None:
    data = b"".join(items)
    expect = b"".join(p for p in items if p not in QUERIES)
    out, f = run(split(data, cuts))
    assert out == expect
    assert f.carried == 0


@SETTINGS
@given(data=st.lists(fragments | st.binary(max_size=40), max_size=80).map(b"".join))
def test_carry_is_bounded_bytewise(data: bytes) -> None:
    f = QueryFilter()
    for b in data:
        f.feed(bytes([b]))
        assert f.carried <= MAX_CARRY


@settings(max_examples=50, deadline=None, derandomize=True)
@given(fill=st.binary(min_size=MAX_CARRY, max_size=3 * MAX_CARRY))
def test_carry_is_bounded_for_long_sequences(fill: bytes) -> None:
    for head in (b"\x1b[", b"\x1bP$q", b"\x1bP+q", b"\x1b]10;", b"\x1b]4;1"):
        f = QueryFilter()
        f.feed(head)
        for b in fill.replace(b"\x1b", b""):
            f.feed(bytes([b]))
            assert f.carried <= MAX_CARRY
        f.flush()


# --- against a real tmux ----------------------------------------------------------

PROBE = """
import os, sys, termios, time, tty
tty.setraw(0)
os.write(1, open(sys.argv[1], "rb").read())
got, end = b"", time.monotonic() + 1.0
import select
while time.monotonic() < end:
    if select.select([0], [], [], 0.05)[0]:
        got += os.read(0, 4096)
open(sys.argv[2], "wb").write(got)
"""


def replies(tmux: Tmux, tmp: Path, name: str, payload: bytes) -> bytes:
    """What a real tmux pane types back after printing ``payload``."""
    (tmp / f"{name}.in").write_bytes(payload)
    (tmp / "probe.py").write_text(PROBE)
    result = tmp / f"{name}.out"
    cmd = shlex.join([sys.executable, str(tmp / "probe.py"), str(tmp / f"{name}.in"), str(result)])
    tmux.run("new-window", "-d", "-t", "base", cmd)
    wait_for(lambda: result.exists(), bool, timeout=10)
    time.sleep(0.1)
    return result.read_bytes()


def test_real_tmux_answers_nothing_after_filtering(tmux: Tmux, tmp_path: Path) -> None:
    queries = b"".join(QUERIES)
    assert replies(tmux, tmp_path, "raw", queries), "tmux answers at least some queries"
    assert replies(tmux, tmp_path, "filtered", b"x" + filtered(queries) + b"y") == b""
    assert replies(tmux, tmp_path, "harmless", b"".join(HARMLESS) + b"\x1b[0m\x1bc") == b""
