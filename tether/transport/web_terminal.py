"""A browser mate's WebSocket as a ``relay.mates.Terminal``, and the protocol
the page speaks on it (``tether/relay/web/static/tether.js`` implements exactly
this). ``web`` serves the page and admits connections; this module is what one
connection says once it is upgraded.

WebSocket protocol (``GET /ws``; the page implements exactly this)
------------------------------------------------------------------
1. The client's first message is a text message, at most 1 KiB, sent within
   10 s of the upgrade: JSON ``{"token": "...", "cols": N, "rows": M}`` (N, M
   integers from 1 to 65535; the relay clamps them to its largest terminal,
   1000x500). Anything else closes with 4000.
2. Token known: the server sends text ``{"type": "hello", "readonly": bool,
   "session": "NAME"}`` (the session's name, for the page's title; absent if
   the relay gave none), then
   binary messages of terminal output (bytes for a terminal emulator,
   xterm-256color) until the end. Token unknown: after the same delay and
   back-off as SSH, ``{"type": "error", ...}`` and close 4001.
   Once attached, and again whenever a mate joins or leaves, the server sends
   text ``{"type": "mates", "mates": [{"id": N, "kind": "ssh"|"join"|"web",
   "readonly": bool, "you": bool, "address": "..."}, ...], "more": M}``: every
   mate of the session, this one included (``"you": true``). ``address`` is
   given to read-write mates only (a read-only link may be posted widely: its
   viewers do not learn each other's addresses); ``more`` (absent when 0) counts
   mates left out of a list cut at 1023 entries.
3. The client sends binary messages of typed bytes (a read-only mate's are
   dropped by its read-only tmux client), and text JSON
   ``{"type": "resize", "cols": N, "rows": M}`` when its terminal changes size
   (a read-only mate's size never reaches the host). Text messages of other
   types are ignored (room for later ones); at most ``REQUEST_BURST`` (256)
   text messages at once and ``REQUEST_RATE`` (32) a second after that, so a
   page debounces its resizes (one per ~100 ms while a window is dragged).
4. Before closing with a code other than 1000 the server sends text JSON
   ``{"type": "error", "message": "..."}``, a sentence for the user.

Close codes (server to client):

- 1000: normal end: the host ended the session, or the mate detached.
- 4000: protocol error: no first message within 10 s, a first message too long
  or not the JSON above, text that is not JSON, a resize without sizes,
  control messages too fast.
- 4001: invalid or expired token (also when the address is backing off: the
  message says how long to wait).
- 4003: refused: the session has too many mates, admits only mates with an SSH
  key, or the replica could not attach a client.
- 4004: the host disconnected this mate (``tether kick-mate``); its link still
  works, but the page does not reconnect by itself.
- 1009 (message over 64 KiB), 1007 (text not UTF-8): closed by aiohttp itself,
  without an error message.
- 1006 (no close frame): the client did not answer pings (``HEARTBEAT``) or took
  no output for ``STALL_TIMEOUT``; the connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiohttp import WSMsgType, web

from tether.core import tokens
from tether.core.errors import RemoteProtocolError
from tether.core.ratelimit import TokenBucket

from .ssh_bounds import REQUEST_BURST, REQUEST_RATE

log = logging.getLogger("tether.transport")

TERM = "xterm-256color"
"""What a browser terminal (xterm.js) emulates: the mate's tmux client draws for it."""

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 4000
CLOSE_INVALID_TOKEN = 4001
CLOSE_REFUSED = 4003
CLOSE_KICKED = 4004
EXIT_KICKED = 4
EXIT_AGAIN = 75
"""The exit status of a mate whose session's relay process ended (EX_TEMPFAIL):
its host starts the session again, so the page reconnects (``CLOSE_AGAIN``);
``relay.owners`` uses it."""
CLOSE_AGAIN = 1012
"""The mate handler's exit status for a mate the host disconnected
(``relay.mates.EXIT_KICKED``): closed with ``CLOSE_KICKED``."""
KICKED_TEXT = "the host disconnected you"
MORE = "more"
"""The kind of a mate list's last entry when it was cut (``relay.session.MORE``)."""

MAX_MESSAGE = 64 * 1024
"""Largest WebSocket message a client may send (aiohttp closes with 1009 past it):
a paste of 64 KiB is one message; the mate's input rate applies after."""
FIRST_MESSAGE_MAX = 1024
FIRST_MESSAGE_TIMEOUT = 10.0
"""The first message (token and size) is small and comes at once, or never."""
STALL_TIMEOUT = 60.0
"""A client that takes no output for this long while output waits is dropped
(SSH's keepalives drop a mate who reads nothing after ~60 s too)."""
MAX_UNSENT = 1024 * 1024
"""Output queued for a client and not yet taken by its socket, past which it is
dropped. The mate pump reads the next screen update only once the last one is
taken, so an honest slow client holds one update (<= 64 KiB) here."""
CLOSE_TIMEOUT = 5.0
"""Time given to the last output, the error message and the closing handshake."""


class ProtocolError(RemoteProtocolError):
    """What a client sent is not this module's protocol (close 4000)."""


def parse_first(text: str) -> tuple[str, int, int]:
    """The first message's token and terminal size; ``ProtocolError`` if malformed."""
    if len(text.encode()) > FIRST_MESSAGE_MAX:
        raise ProtocolError(f"the first message is longer than {FIRST_MESSAGE_MAX} bytes")
    obj = _json(text)
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError("the first message has no token")
    return token, *_size(obj)


def parse_control(text: str) -> tuple[int, int] | None:
    """A control message: a resize's ``(cols, rows)``, or None (ignored)."""
    obj = _json(text)
    if obj.get("type") == "resize":
        return _size(obj)
    return None


def _json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        raise ProtocolError("a text message is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a text message is not a JSON object")
    return obj


def _size(obj: dict[str, Any]) -> tuple[int, int]:
    cols, rows = obj.get("cols"), obj.get("rows")
    for v in (cols, rows):
        if type(v) is not int or not 1 <= v <= 65535:
            raise ProtocolError("cols and rows must be integers from 1 to 65535")
    return cols, rows  # type: ignore[return-value]


# --- a browser mate's terminal -------------------------------------------------------


class WebTerminal:
    """A browser mate's WebSocket as a ``relay.mates.Terminal``.

    Output is queued here and sent by one task, in order with the control
    messages; ``drain`` waits until the queue is sent, so the mate pump's flow
    control reaches the browser. Typed bytes are read only when the pump asks
    (aiohttp stops reading the socket meanwhile), so the input rate limit
    slows the browser down rather than queueing here.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        username: str,
        peer: str,
        cols: int,
        rows: int,
        *,
        max_unsent: int = MAX_UNSENT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.ws = ws
        self.username = username
        self.peer = peer
        self.kind = "web"
        self.fingerprint = ""
        self.readonly = False
        self.term = TERM
        self.cols = cols
        self.rows = rows
        self.accepted = False
        """The token was known: output goes to the browser (before: only the refusal)."""
        self.max_unsent = max_unsent
        self.stall_timeout = stall_timeout
        self.status: int | None = None
        """What the mate handler's ``exit`` said (None: it did not)."""
        self.closing: tuple[int, str] | None = None
        """(code, message) decided here (a protocol error, a dropped client)."""
        self.gone = False
        """The connection is dropped: nothing more is sent."""
        self._transport = transport
        self._out: deque[bytearray | str] = deque()
        self._queued = 0
        self._sender: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._last = b""
        self._controls = TokenBucket(REQUEST_RATE, REQUEST_BURST, time.monotonic())

    # --- Terminal ----------------------------------------------------------------

    async def read(self) -> bytes | tuple[int, int]:
        """Typed bytes, a new ``(cols, rows)`` on resize, or b'' at the end."""
        while not self.gone and self.closing is None:
            try:
                msg = await self.ws.receive()
            except (TimeoutError, RuntimeError, ConnectionError):
                return b""
            if msg.type is WSMsgType.BINARY:
                if msg.data:
                    return bytes(msg.data)
                continue
            if msg.type is not WSMsgType.TEXT:
                return b""  # closed, closing, or an error aiohttp already closed on
            if self._controls.take(1, time.monotonic()):
                self._fail(f"control messages faster than {REQUEST_RATE:g}/s after a burst "
                           f"of {REQUEST_BURST}")
                return b""
            try:
                size = parse_control(msg.data)
            except ProtocolError as exc:
                self._fail(str(exc))
                return b""
            if size is not None:
                self.cols, self.rows = size
                return size
        return b""

    def write(self, data: bytes) -> None:
        """Queue output; a client that lets ``MAX_UNSENT`` pile up is dropped."""
        self._last = data
        if not self.accepted or self.gone or not data:
            return  # before acceptance only the refusal is written: it goes as the error
        unsent = self._queued + self._backlog()
        if unsent + len(data) > self.max_unsent:
            log.warning("web mate %s: has not taken %d bytes sent to it; disconnected",
                        self.peer, unsent)
            self._drop("took no output")
            return
        self._queue(data)

    async def drain(self) -> None:
        """Until what was written is handed to the socket (or the client is gone)."""
        await self._idle.wait()

    def backlog(self) -> int:
        return 0 if self._idle.is_set() else max(self._queued, 1)

    def exit(self, status: int = 0) -> None:
        if self.status is None:
            self.status = status

    # --- the front's side ------------------------------------------------------------

    def accept(self, readonly: bool, session: str = "") -> None:
        """The token is known: say hello; output flows from now on."""
        self.accepted = True
        self.readonly = readonly
        hello: dict[str, Any] = {"type": "hello", "readonly": readonly}
        if session:
            hello["session"] = session
        self._queue(json.dumps(hello))

    def show_mates(self, me: int, mates: Sequence[Any]) -> None:
        """The session's mates (``MateInfo``s; ``me`` is this one's id) for the
        page's list. Addresses go to read-write mates only: a read-only link may
        be posted widely, and its viewers need not learn each other's."""
        if not self.accepted or self.gone:
            return
        listed: list[dict[str, Any]] = []
        more = 0
        for m in mates:
            if m.kind == MORE and m.id == 0:  # "N more not listed"
                head = str(m.address).split(" ", 1)[0]
                more = int(head) if head.isdigit() else 1
                continue
            entry: dict[str, Any] = {"id": m.id, "kind": m.kind, "readonly": m.readonly,
                                     "you": m.id == me}
            if not self.readonly:
                entry["address"] = m.address
            listed.append(entry)
        msg: dict[str, Any] = {"type": "mates", "mates": listed}
        if more:
            msg["more"] = more
        self._queue(json.dumps(msg))

    def verdict(self) -> tuple[int, str]:
        """The close code and the error message (empty for a normal end)."""
        if self.closing is not None:
            return self.closing
        if not self.status:
            return CLOSE_NORMAL, ""
        said = self._said()
        if self.status == EXIT_KICKED:
            return CLOSE_KICKED, said or KICKED_TEXT
        if self.status == EXIT_AGAIN:
            return CLOSE_AGAIN, said or "the session is starting again"
        if not self.accepted:
            return CLOSE_INVALID_TOKEN, said or "Invalid or expired session token."
        return CLOSE_REFUSED, said or "refused"

    async def finish(self) -> None:
        """The end: last output, then the error message if any, then the close."""
        code, message = self.verdict()
        if not self.ws.closed:  # else aiohttp gave up on it (no pong, bad frame)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), CLOSE_TIMEOUT)
        if self._sender is not None:
            self._sender.cancel()
        if not self.gone:
            with contextlib.suppress(Exception):
                if message:
                    await asyncio.wait_for(
                        self.ws.send_str(json.dumps({"type": "error", "message": message})),
                        CLOSE_TIMEOUT,
                    )
                await asyncio.wait_for(
                    self.ws.close(code=code, message=_reason(code)), CLOSE_TIMEOUT
                )
        t = self._transport
        if t is not None and (not self.ws.closed or self._backlog_of(t)):
            t.abort()  # no closing handshake, or a client that reads nothing more

    # --- inside ---------------------------------------------------------------------

    def _said(self) -> str:
        """The last line the mate handler wrote: its refusal, for the error message."""
        text = tokens.redact_all(self._last[-500:].decode("utf-8", "replace"))
        lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
        return lines[-1] if lines else ""

    def _fail(self, why: str) -> None:
        log.info("web mate %s: %s; disconnected", self.peer, why)
        if self.closing is None:
            self.closing = (CLOSE_PROTOCOL, why)

    def _drop(self, why: str) -> None:
        self.gone = True
        self.closing = self.closing or (1006, why)
        self._out.clear()
        self._queued = 0
        self._idle.set()
        if self._transport is not None:
            self._transport.abort()

    def _backlog(self) -> int:
        return self._backlog_of(self._transport) if self._transport is not None else 0

    @staticmethod
    def _backlog_of(t: asyncio.Transport) -> int:
        """What the socket has not taken yet (also once closing: it may never)."""
        with contextlib.suppress(Exception):
            return int(t.get_write_buffer_size())
        return 0

    def _queue(self, item: bytes | str) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(item, bytes) and isinstance(last, bytearray) and len(last) < MAX_MESSAGE:
            last += item  # one message per drain, not one per write
        else:
            self._out.append(bytearray(item) if isinstance(item, bytes) else item)
        self._queued += len(item)
        self._idle.clear()
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        try:
            while self._out and not self.gone:
                item = self._out.popleft()
                self._queued -= len(item)
                if isinstance(item, str):
                    sending = self.ws.send_str(item)
                else:
                    sending = self.ws.send_bytes(bytes(item))
                await asyncio.wait_for(sending, self.stall_timeout)
        except TimeoutError:
            log.warning("web mate %s: took no output for %.0f s; disconnected",
                        self.peer, self.stall_timeout)
            self._drop(f"took no output for {self.stall_timeout:.0f} s")
        except (ConnectionError, RuntimeError, OSError):
            self._drop("connection lost")
        finally:
            self._sender = None
            if not self._out or self.gone:
                self._out.clear()
                self._queued = 0
                self._idle.set()


def _reason(code: int) -> bytes:
    """A close frame's short reason (the sentence for people is the error message)."""
    return {
        CLOSE_NORMAL: b"session over",
        CLOSE_PROTOCOL: b"protocol error",
        CLOSE_INVALID_TOKEN: b"invalid token",
        CLOSE_REFUSED: b"refused",
        CLOSE_KICKED: b"disconnected by the host",
    }.get(code, b"")
