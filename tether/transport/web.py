"""The relay's HTTP/WebSocket front, on aiohttp: browser mates.

A browser mate opens ``/t/TOKEN``: the page (``tether/relay/web/index.html``,
its scripts and styles under ``static/``) runs a terminal and talks to ``/ws``.
What comes in over that WebSocket is one more ``relay.mates.Terminal``
(``WebTerminal``), handed to the same mate handler as an SSH mate's terminal:
the same token check and per-address back-off, mate limit, input rate and
window-size rule, and read-only mates attached read-only.

The page is served for any well-formed token, known or not: the token is
checked on the WebSocket only, behind the same back-off as SSH, so the page
is no oracle. Nothing logs a request's path (there is no access log).

The WebSocket protocol is ``web_terminal``'s (``WebTerminal``, the parsers
of its messages); this module serves the page and its files, admits and bounds
connections, and hands each WebSocket to the mate handler.

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
import logging
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from tether.core import tokens
from tether.core.errors import TetherError

from .ssh_bounds import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    Admission,
    address_key,
)
from .web_terminal import (
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    CLOSE_TIMEOUT,
    FIRST_MESSAGE_TIMEOUT,
    MAX_MESSAGE,
    MAX_UNSENT,
    STALL_TIMEOUT,
    ProtocolError,
    WebTerminal,
    parse_first,
)

log = logging.getLogger("tether.transport")

HEARTBEAT = 20.0
"""A client silent this long is pinged; one that does not answer within half
as long again is dropped (a browser tab answers pings by itself)."""
HTTP_TIMEOUT = 15.0
"""An HTTP connection without a whole request this long after it opened, or idle
that long between requests, is closed (slow or idle peers hold no descriptor)."""
TLS_HANDSHAKE_TIMEOUT = 10.0
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


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context from a certificate chain and its key (PEM files)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


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
