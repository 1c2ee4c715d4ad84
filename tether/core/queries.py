"""Strip terminal queries from pane output before it reaches a replica pane, with no I/O.

The relay writes the host's pane output into a replica pane so the replica
tmux renders it. A query in that output (``ESC [ c``, ``ESC [ 6 n``,
``ESC ] 11 ; ? BEL``, ``ESC P $ q m ESC \\`` ...) makes the replica tmux type
a reply into the pane, which would reach the host as mate input although the
host's own tmux has already answered: the program would read every reply
twice. ``QueryFilter`` removes complete queries and passes every other byte
through unchanged and in order.

Parsing mirrors tmux's own input state machine (``input.c``) rather than a
textbook VT parser, because a replica tmux is the reader: ESC, CAN and SUB
end any sequence except a DCS body; an OSC ends at BEL or at any ESC; a DCS
body ends only at ``ESC \\`` (so the doubled ESCs of a ``tmux;`` passthrough
are not mistaken for queries). A query is removed only where tmux is in
ground state just before it (it is not the ESC that aborts an unfinished
sequence), so removing it cannot glue its neighbours into a different
sequence. Only pure queries are removed: sequences with no effect in tmux
other than a reply. Queries with control bytes or unusual parameters inside
pass through (at worst the host reads a reply twice, as before).

8-bit C1 controls (0x9b for CSI, 0x90 for DCS, ...) are left alone: pane
output is UTF-8 and tmux treats bytes >= 0x80 as text, never as C1 controls.
tmux returns to ground when a string sequence is unterminated for 5 seconds;
a filter without a clock cannot follow that, and only misses queries then.
"""

from __future__ import annotations

import re

MAX_CARRY = 256
"""Most bytes held back between calls: an unfinished escape sequence that may still
become a query. A query is recognised only if it is shorter than this, so the
result never depends on how the stream is split into chunks."""

_ESC = 0x1B

# Bytes that tmux executes or ignores inside ESC, CSI and DCS introducers
# without leaving the state: C0 except CAN, SUB and ESC; DEL and the top half.
_IGN = rb"[\x00-\x17\x19\x1c-\x1f\x7f-\xff]"

# Query bodies, after ``ESC [`` / ``ESC ]`` / ``ESC P``.
_Q_CSI = rb"""
    [>=]?[0-9;]*c                       # primary, secondary, tertiary DA
  | \??[0-9;]*n                         # DSR: status, cursor position, DEC private
  | >[0-9;]*q                           # XTVERSION
  | \??[0-9;]*\$p                       # DECRQM, ANSI and DEC private modes
  | \?u                                 # kitty keyboard flags
  | (?:1[13-689]|2[01])(?:;[0-9]*)?t    # XTWINOPS reports: 11 13-16 18-21
  | [01]?x                              # DECREQTPARM
  | \?[0-9;]*[mS]                       # XTQMODKEYS, XTSMGRAPHICS
  | [0-9;]*(?:\$[wu]|\*y|&u)            # DECRQPSR, DECRQTSR, DECRQCRA, DECRQUPSS
"""
_Q_OSC = rb"""
    1[0-9](?:;\?)+                      # dynamic colours: 10 fg, 11 bg, 12 cursor ...
  | [45](?:;[0-9]+;\?)+                 # palette and special colours, queries only
  | 52;[cpqs0-7]*;\?                    # clipboard
"""
_Q_DCS = rb"""
    \$q[\x20-\x7e]*                     # DECRQSS
  | \+q[0-9A-Fa-f;]*                    # XTGETTCAP
"""


def _pattern(template: bytes) -> re.Pattern[bytes]:
    """Compile a verbose pattern with the query bodies filled in for Q_CSI, Q_OSC, Q_DCS."""
    for name, body in ((b"Q_CSI", _Q_CSI), (b"Q_OSC", _Q_OSC), (b"Q_DCS", _Q_DCS)):
        template = template.replace(name, b"(?:" + body + b")")
    return re.compile(template, re.X)


_QUERY = _pattern(
    rb"""\x1b(?:
        \[ Q_CSI
      | \] Q_OSC (?:\x07|\x1b\\|(?=\x1b[^\\]|[\x18\x1a]))  # ST, BEL; ESC CAN SUB stay
      | P Q_DCS \x1b\\
    )"""
)
_QUERY_PREFIX = _pattern(
    rb"""\x1b(?:
        \[[?>=]?[0-9;]*[$*&]?
      | \](?:1(?:[0-9](?:;\?)*;?)?
            | [45](?:;[0-9]+;\?)*(?:;[0-9]*|;[0-9]+;)?
            | 52(?:;[cpqs0-7]*(?:;\??)?)?
            | Q_OSC \x1b)?
      | P(?:\$(?:q[\x20-\x7e]*\x1b?)?|\+(?:q[0-9A-Fa-f;]*\x1b?)?)?
    )?"""
)
"""Every proper prefix of a query, including one whose ST has only its ESC yet."""

# Runs that start and end in ground state and hold no query: plain text and the
# common complete sequences. Matched in C, so SGR-heavy output stays fast.
_BORING = _pattern(
    rb"""(?:
        [^\x1b]++
      | \x1b\[[0-9:;]*+[\x40-\x62\x64-\x6d\x6f-\x73\x75-\x77\x79-\x7e]  # not c n t x
      | (?!\x1b\[ Q_CSI)\x1b\[[\x20-\x3f]*+[\x40-\x7e]
      | (?!\x1b\] Q_OSC)\x1b\][^\x07\x18\x1a\x1b]*+(?:\x07|\x1b\\)
      | \x1b[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x6a\x6c-\x7e]
      | \x1b[\x20-\x2f]++[\x30-\x7e]
    )*+"""
)

_SKIP_IGN = re.compile(_IGN + rb"*+")
_DCS_INTRO = re.compile(
    _IGN + rb"*+(?:(?P<p>[0-9;<=>?])(?:" + _IGN + rb"|[0-9;])*+)?"
    rb"(?:(?P<i>[\x20-\x2f])(?:" + _IGN + rb"|[\x20-\x2f])*+)?"
)
# What ends each string-like state (an ESC ends them all as well).
_END_CSI = re.compile(rb"[\x18\x1a\x40-\x7e]")
_END_OSC = re.compile(rb"[\x07\x18\x1a]")
_END_STR = re.compile(rb"[\x18\x1a]")  # APC, SOS, PM, ESC k, ignored DCS
_END_ESCI = re.compile(rb"[\x18\x1a\x30-\x7e]")

# Shortest byte strings that put tmux's parser in a given unfinished state; a
# state left open at the end of a call is remembered as one and rescanned.
_AT_ESC = b"\x1b"
_AT_ESCI = b"\x1b "
_AT_CSI = b"\x1b["
_AT_OSC = b"\x1b]"
_AT_STR = b"\x1bX"
_AT_DCS = b"\x1bP"
_AT_DCS_PARAM = b"\x1bP0"
_AT_DCS_INTER = b"\x1bP$"
_AT_DCS_BODY = b"\x1bPq"
_AT_DCS_BODY_ESC = b"\x1bPq\x1b"

_DONE, _ABORTED, _OPEN = 0, 1, 2


def _until(buf: bytes, k: int, end: re.Pattern[bytes], state: bytes) -> tuple[int, int, bytes]:
    """Scan a string-like state from ``k`` to its terminator or the next ESC."""
    e = buf.find(b"\x1b", k)
    m = end.search(buf, k, e if e >= 0 else len(buf))
    if m:
        return _DONE, m.end(), b""
    if e >= 0:
        return _ABORTED, e, b""
    return _OPEN, len(buf), state


def _dcs_body(buf: bytes, k: int) -> tuple[int, int, bytes]:
    """A DCS body ends only at ``ESC \\``; any other ESC and its next byte are content."""
    n = len(buf)
    while True:
        e = buf.find(b"\x1b", k)
        if e < 0:
            return _OPEN, n, _AT_DCS_BODY
        if e + 1 == n:
            return _OPEN, n, _AT_DCS_BODY_ESC
        if buf[e + 1] == 0x5C:
            return _DONE, e + 2, b""
        k = e + 2


def _sequence(buf: bytes, pos: int) -> tuple[int, int, bytes]:
    """Follow tmux's parser from the ESC at ``pos``.

    Returns ``(_DONE, end, b"")`` when the sequence ends in ground state at ``end``,
    ``(_ABORTED, esc, b"")`` when the ESC at ``esc`` cuts it short, or
    ``(_OPEN, len(buf), state)`` when it is unfinished, with ``state`` a byte
    string that reproduces the parser state.
    """
    n = len(buf)
    j = _SKIP_IGN.match(buf, pos + 1).end()  # type: ignore[union-attr]
    if j >= n:
        return _OPEN, n, _AT_ESC
    b = buf[j]
    if b == _ESC:
        return _ABORTED, j, b""
    if b in (0x18, 0x1A):
        return _DONE, j + 1, b""
    if b == 0x5B:  # [
        return _until(buf, j + 1, _END_CSI, _AT_CSI)
    if b == 0x5D:  # ]
        return _until(buf, j + 1, _END_OSC, _AT_OSC)
    if b in (0x58, 0x5E, 0x5F, 0x6B):  # X ^ _ k
        return _until(buf, j + 1, _END_STR, _AT_STR)
    if b <= 0x2F:
        return _until(buf, j + 1, _END_ESCI, _AT_ESCI)
    if b != 0x50:  # P
        return _DONE, j + 1, b""
    m = _DCS_INTRO.match(buf, j + 1)
    assert m is not None
    k = m.end()
    if k >= n:
        if m.group("i"):
            return _OPEN, n, _AT_DCS_INTER
        return _OPEN, n, _AT_DCS_PARAM if m.group("p") else _AT_DCS
    c = buf[k]
    if c == _ESC:
        return _ABORTED, k, b""
    if c in (0x18, 0x1A):
        return _DONE, k + 1, b""
    if c >= 0x40:
        return _dcs_body(buf, k + 1)
    return _until(buf, k + 1, _END_STR, _AT_STR)  # a misplaced byte: tmux ignores the DCS


class QueryFilter:
    """Removes terminal queries from one pane's output stream, across chunk boundaries.

    ``feed`` returns the output with every complete query removed. Only an
    unfinished escape sequence that may still turn out to be a query is held
    back (at most ``MAX_CARRY`` bytes), and it is released or removed by the
    next call; an unfinished sequence that can no longer be a query is passed
    on at once. The result is the same however the stream is split.
    """

    __slots__ = ("_carry", "_state")

    def __init__(self) -> None:
        self._carry = b""
        """Held-back bytes: an unfinished possible query, begun in ground state."""
        self._state = b""
        """Already passed on, unfinished sequence, as an ``_AT_*`` string; b"" in ground."""

    @property
    def carried(self) -> int:
        """Bytes held back until the next ``feed``."""
        return len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """Filter the next chunk of output; may return ``data`` itself."""
        if self._carry:
            buf, start, ground = self._carry + data, 0, True
        elif self._state:
            buf, start, ground = self._state + data, len(self._state), False
        elif b"\x1b" not in data:
            return data
        else:
            buf, start, ground = data, 0, True
        self._carry = self._state = b""
        n = len(buf)
        out: list[bytes] = []
        emit = start  # buf[emit:] is not yet in ``out``
        pos = 0
        while True:
            if ground:
                pos = _BORING.match(buf, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
                q = _QUERY.match(buf, pos)
                if q is not None and q.end() - pos < MAX_CARRY:
                    out.append(buf[emit:pos])
                    pos = emit = q.end()
                    continue
                if n - pos <= MAX_CARRY and _QUERY_PREFIX.fullmatch(buf, pos):
                    out.append(buf[emit:pos])
                    self._carry = buf[pos:]
                    emit = n
                    break
            how, pos, state = _sequence(buf, pos)
            if how == _OPEN:
                self._state = state
                break
            ground = how == _DONE
        if not out:  # nothing removed or held back
            return data if start else buf
        out.append(buf[emit:])
        return b"".join(out)

    def flush(self) -> bytes:
        """End of stream: return the held-back bytes (an unfinished sequence) and reset."""
        carry = self._carry
        self._carry = self._state = b""
        return carry
