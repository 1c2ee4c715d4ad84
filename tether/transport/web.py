"""The relay's HTTP/WebSocket front, on aiohttp: browser mates.

A browser mate opens ``/t/TOKEN``: the page (``tether/relay/web/index.html``,
its scripts and styles under ``static/``) runs a terminal and talks to ``/ws``.
What comes in over that WebSocket is one more ``relay.mates.Terminal``
(``WebTerminal``), handed to the same mate handler as an SSH mate's terminal:
the same token check and per-address back-off, mate limit, input rate and
window-size rule, and read-only mates attached read-only. This module only
serves files, speaks WebSocket and bounds what one peer may make it hold.

The page is served for any well-formed token, known or not: the token is
checked on the WebSocket only, behind the same back-off as SSH, so the page
is no oracle. Nothing logs a request's path (there is no access log).

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

HTTP (anything else is 404; methods other than GET/HEAD are 405):

- ``GET /t/TOKEN`` and ``/t/TOKEN/``: the page, ``Cache-Control: no-store``.
- ``GET /static/NAME``: a file under ``static/`` with a known extension; no
  listing, no dot-files, no ``..``, no symbolic links.
- every response: a Content-Security-Policy that allows only this origin's
  scripts, styles, fonts, images and WebSocket (``style-src`` also allows
  inline styles: terminal emulators set them), no framing, ``nosniff``,
  ``Referrer-Policy: no-referrer`` (the token is in the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from tether.core import tokens
from tether.core.errors import RemoteProtocolError, TetherError
from tether.core.ratelimit import TokenBucket

from .ssh_bounds import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_BURST,
    REQUEST_RATE,
    Admission,
    address_key,
)

log = logging.getLogger("tether.transport")

TERM = "xterm-256color"
"""What a browser terminal (xterm.js) emulates: the mate's tmux client draws for it."""

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 4000
CLOSE_INVALID_TOKEN = 4001
CLOSE_REFUSED = 4003
CLOSE_KICKED = 4004
EXIT_KICKED = 4
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
HEARTBEAT = 20.0
"""A client silent this long is pinged; one that does not answer within half
as long again is dropped (a browser tab answers pings by itself)."""
STALL_TIMEOUT = 60.0
"""A client that takes no output for this long while output waits is dropped
(SSH's keepalives drop a mate who reads nothing after ~60 s too)."""
MAX_UNSENT = 1024 * 1024
"""Output queued for a client and not yet taken by its socket, past which it is
dropped. The mate pump reads the next screen update only once the last one is
taken, so an honest slow client holds one update (<= 64 KiB) here."""
HTTP_TIMEOUT = 15.0
"""An HTTP connection without a whole request this long after it opened, or idle
that long between requests, is closed (slow or idle peers hold no descriptor)."""
TLS_HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
"""Time given to the last output, the error message and the closing handshake."""

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".wasm": "application/wasm",
}
"""What ``/static/`` serves, by extension; other files are not served."""

_PAGE = re.compile(r"/t/([^/]{1,100})/?")
_PART = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}"
_STATIC_NAME = re.compile(rf"{_PART}(/{_PART}){{0,7}}")
"""A file under ``static/``: no part starts with a dot (no ``..``, no dot-files)."""
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


@dataclass(frozen=True)
class Access:
    """What a known token gets from the browser front."""

    readonly: bool
    refused: str = ""
    """Non-empty: the token is known but browsers may not join; why (close 4003)."""
    session: str = ""
    """The session's name, which the page shows in its title."""


Lookup = Callable[[str], Access | None]
"""token -> its access, or None for a token that is no session's (the mate
handler then refuses it, held back by the back-off)."""
MateHandler = Callable[["WebTerminal"], Awaitable[None]]


class ProtocolError(RemoteProtocolError):
    """What a client sent is not this module's protocol (close 4000)."""


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context from a certificate chain and its key (PEM files)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


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


# --- the front -------------------------------------------------------------------------


class _Handler(web.RequestHandler):
    """aiohttp's HTTP protocol, admitted per address and in all when a TCP
    connection opens (before a byte of its request is read), and closed if its
    first request does not come within ``first_request`` seconds (aiohttp's
    keep-alive timer covers the time between requests, and, only since late
    3.x releases, before the first)."""

    __slots__ = ("_admission", "_admitted", "_first_request", "_trust_proxy", "_waiting")

    def __init__(self, manager: web.Server, admission: Admission, trust_proxy: bool,
                 first_request: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._admission = admission
        self._trust_proxy = trust_proxy
        self._first_request = first_request
        self._admitted: str | None = None
        self._waiting: asyncio.TimerHandle | None = None

    def request_came(self) -> None:
        """A whole request arrived: from now on aiohttp's timers apply."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    def _too_slow(self) -> None:
        self._waiting = None
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        # behind a proxy every connection is the proxy's: per address, the
        # WebSocket counts by the forwarded address instead
        key = "proxy" if self._trust_proxy else address_key(str(peer[0]) if peer else "?")
        why = self._admission.admit(key)
        if why is not None:
            body = (why + "\n").encode()
            with contextlib.suppress(Exception):
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"  # type: ignore[attr-defined]
                                b"Content-Type: text/plain; charset=utf-8\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self._admitted = key
        super().connection_made(transport)
        self._waiting = asyncio.get_running_loop().call_later(self._first_request,
                                                              self._too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_came()
        if self._admitted is not None:
            self._admission.release(self._admitted)
            self._admitted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted is not None:
            super().data_received(data)


class WebFront:
    """Serves the page and its files, and hands each WebSocket's terminal to
    ``on_mate`` once its first message named a token.

    ``lookup`` says what a token gets (``Access``), or None for an unknown one;
    ``trust_proxy`` takes a client's address from the last ``X-Forwarded-For``
    entry (the one the proxy in front added). The keyword arguments are the
    bounds (module constants), small in tests.
    """

    def __init__(
        self,
        on_mate: MateHandler,
        lookup: Lookup,
        page_dir: Path,
        *,
        trust_proxy: bool = False,
        max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        max_connections: int = MAX_CONNECTIONS,
        first_timeout: float = FIRST_MESSAGE_TIMEOUT,
        heartbeat: float = HEARTBEAT,
        stall_timeout: float = STALL_TIMEOUT,
        max_unsent: int = MAX_UNSENT,
        http_timeout: float = HTTP_TIMEOUT,
    ) -> None:
        self.on_mate = on_mate
        self.lookup = lookup
        self.page = page_dir / "index.html"
        self.static = page_dir / "static"
        self.trust_proxy = trust_proxy
        self.first_timeout = first_timeout
        self.heartbeat = heartbeat
        self.stall_timeout = stall_timeout
        self.max_unsent = max_unsent
        self.http_timeout = http_timeout
        self.connections = Admission(max_connections if trust_proxy else max_per_address,
                                     max_connections)
        """TCP connections, by the peer's address (all one key behind a proxy)."""
        self.sockets = Admission(max_per_address, max_connections)
        """WebSockets, by the client's address (forwarded, behind a proxy)."""
        self.port = 0
        self.terminals: set[WebTerminal] = set()
        self._server: web.Server | None = None
        self._listener: asyncio.Server | None = None

    async def start(self, bind: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {
            "access_log": None,  # a request's path holds its token
            "keepalive_timeout": self.http_timeout,
            "max_line_size": 8190,
            "max_field_size": 8190,
        }
        server = web.Server(self._handle, **kwargs)
        self._server = server
        admission, trust, first = self.connections, self.trust_proxy, self.http_timeout
        self._listener = await loop.create_server(
            lambda: _Handler(server, admission, trust, first, loop=loop, **kwargs),
            bind or None,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if ssl_context else None,
            reuse_address=True,
        )
        self.port = self._listener.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for term in list(self.terminals):
            term.closing = term.closing or (1001, "the relay is shutting down")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(term.ws.close(code=1001, message=b"relay stopping"), 1)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.shutdown(1.0), 3)

    # --- HTTP ----------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if isinstance(request.protocol, _Handler):
            request.protocol.request_came()
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "method not allowed", request)
        path = request.path
        if path == "/ws":
            return await self._websocket(request)
        page = _PAGE.fullmatch(path)
        if page is not None:
            if not tokens.is_well_formed(page.group(1)) or not self.page.is_file():
                return _plain(404, "not found", request)
            resp = web.FileResponse(self.page, headers={
                "Content-Type": CONTENT_TYPES[".html"], "Cache-Control": "no-store"})
            return _secured(resp, request)
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):], request)
        return _plain(404, "not found", request)

    def _static(self, name: str, request: web.BaseRequest) -> web.StreamResponse:
        """An allowed file under ``static/``, itself (not through a symbolic link)."""
        kind = CONTENT_TYPES.get(Path(name).suffix.lower())
        if kind is None or _STATIC_NAME.fullmatch(name) is None:
            return _plain(404, "not found", request)
        root = self.static.resolve()
        path = root / name
        try:
            if path.resolve(strict=True) != path or not path.is_file():
                return _plain(404, "not found", request)
        except OSError:
            return _plain(404, "not found", request)
        resp = web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "no-cache"})
        return _secured(resp, request)

    # --- WebSocket --------------------------------------------------------------------

    def client(self, request: web.BaseRequest) -> tuple[str, int]:
        """The client's address and port: the socket's peer, or behind a trusted
        proxy the last ``X-Forwarded-For`` entry (port 0)."""
        t = request.transport
        peer = t.get_extra_info("peername") if t is not None else None
        host, port = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        if self.trust_proxy:
            forwarded = request.headers.getall("X-Forwarded-For", [])
            if forwarded:
                last = forwarded[-1].split(",")[-1].strip().strip("[]")
                with contextlib.suppress(ValueError):
                    return str(ipaddress.ip_address(last)), 0
        return host, port

    async def _websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        host, port = self.client(request)
        key = address_key(host)
        why = self.sockets.admit(key)
        if why is not None:
            return _plain(503, why, request)
        try:
            ws = web.WebSocketResponse(
                max_msg_size=MAX_MESSAGE, heartbeat=self.heartbeat, compress=False,
                timeout=CLOSE_TIMEOUT,
            )
            if not ws.can_prepare(request).ok:
                return _plain(400, "expected a WebSocket upgrade", request)
            await ws.prepare(request)
            _reset_on_close(request.transport)
            await self._mate(ws, request, f"{host}:{port}")
            return ws
        finally:
            self.sockets.release(key)

    async def _mate(self, ws: web.WebSocketResponse, request: web.BaseRequest, peer: str) -> None:
        """One browser mate, from its first message to the close."""
        transport = request.transport
        try:
            token, cols, rows = await self._first(ws)
        except ProtocolError as exc:
            log.info("web mate %s: %s; disconnected", peer, exc)
            term = WebTerminal(ws, transport, "", peer, 80, 24)
            term.closing = (CLOSE_PROTOCOL, str(exc))
            await term.finish()
            return
        except _Closed:
            return
        term = WebTerminal(ws, transport, token, peer, cols, rows,
                           max_unsent=self.max_unsent, stall_timeout=self.stall_timeout)
        access = self.lookup(token)
        if access is not None and access.refused:
            log.info("web mate %s refused: %s", peer, access.refused)
            term.closing = (CLOSE_REFUSED, access.refused)
        else:
            if access is not None:
                term.accept(access.readonly, access.session)
            self.terminals.add(term)
            try:
                await self.on_mate(term)
            except Exception:
                log.exception("web mate %s", peer)
                term.closing = term.closing or (1011, "the relay failed")
            finally:
                self.terminals.discard(term)
        await term.finish()

    async def _first(self, ws: web.WebSocketResponse) -> tuple[str, int, int]:
        try:
            msg = await ws.receive(timeout=self.first_timeout)
        except TimeoutError:
            raise ProtocolError(
                f"no first message within {self.first_timeout:g} s") from None
        except (RuntimeError, ConnectionError):
            raise _Closed() from None
        if msg.type is WSMsgType.BINARY:
            raise ProtocolError("the first message must be JSON text")
        if msg.type is not WSMsgType.TEXT:
            raise _Closed()
        return parse_first(msg.data)


def _reset_on_close(transport: asyncio.BaseTransport | None) -> None:
    """Close a WebSocket's TCP connection with a reset, not a FIN behind what it
    still holds: a client that reads nothing would otherwise keep the relay's
    unsent output (megabytes of kernel buffer) for minutes after it is dropped.
    An orderly end loses nothing: the close handshake means the client read all."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Closed(TetherError):
    """The client left (or aiohttp closed it) before its first message."""


def _csp(request: web.BaseRequest) -> str:
    connect = "'self'"
    host = request.headers.get("Host", "")
    if _HOST.fullmatch(host):
        # CSP 3 lets 'self' cover ws: and wss: of the page's host; older browsers
        # need them named
        connect += f" ws://{host} wss://{host}"
    return (
        f"default-src 'self'; connect-src {connect}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _secured(resp: web.StreamResponse, request: web.BaseRequest) -> web.StreamResponse:
    h = resp.headers
    h["Content-Security-Policy"] = _csp(request)
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h["X-Frame-Options"] = "DENY"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h["Cross-Origin-Resource-Policy"] = "same-origin"
    h.setdefault("Cache-Control", "no-store")
    h["Server"] = "tether"  # not aiohttp's and Python's versions
    return resp


def _plain(status: int, text: str, request: web.BaseRequest) -> web.StreamResponse:
    return _secured(web.Response(status=status, text=text + "\n"), request)


async def start_web_server(
    bind: str, port: int, on_mate: MateHandler, lookup: Lookup, page_dir: Path,
    ssl_context: ssl.SSLContext | None = None, **bounds: Any,
) -> WebFront:
    """Listen for browsers; returns the front (``port``, ``close()``)."""
    front = WebFront(on_mate, lookup, page_dir, **bounds)
    await front.start(bind, port, ssl_context)
    return front
