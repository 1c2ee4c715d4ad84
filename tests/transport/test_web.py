"""The HTTP/WebSocket front in-process (``tether.transport.web``), against aiohttp's
client and raw sockets, with a stand-in mate handler and its bounds made small.

What the relay's ``Mates`` does with a terminal (tokens, back-off, tmux) is
tested end to end in tests/e2e/test_web_front.py; here: the files it serves, the
protocol's messages and close codes, and what one client may make it hold.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tether.core import tokens
from tether.relay import cli as relay_cli
from tether.transport import web_terminal
from tether.transport.web import Access, WebFront, tls_context
from tether.transport.web_terminal import (
    CLOSE_INVALID_TOKEN,
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    MAX_MESSAGE,
    ProtocolError,
    WebTerminal,
    parse_control,
    parse_first,
)

RW = tokens.new_token()
RO = tokens.new_token()
KEYS = tokens.new_token()


def lookup(token: str) -> Access | None:
    return {RW: Access(False), RO: Access(True), KEYS: Access(False, "keys only")}.get(token)


Handler = Callable[[WebTerminal], Awaitable[None]]


async def echo(term: WebTerminal) -> None:
    """A mate handler that shows what it reads, as the relay's ``Mates`` would
    refuse an unknown token: a line, then exit(1)."""
    if lookup(term.username) is None:
        await asyncio.sleep(0.05)
        term.write(b"Invalid or expired session token.\r\n")
        await term.drain()
        term.exit(1)
        return
    term.write(b"screen\r\n")
    while item := await term.read():
        term.write(b"got " + (item if isinstance(item, bytes) else repr(item).encode()))
        await term.drain()
    term.exit(0)


@pytest.fixture
def page_dir(tmp_path: Path) -> Path:
    d = tmp_path / "web"
    (d / "static" / "sub").mkdir(parents=True)
    (d / "index.html").write_text("<!doctype html><html>the page</html>")
    (d / "static" / "app.js").write_text("console.log('app')")
    (d / "static" / "sub" / "style.css").write_text("body{}")
    (d / "static" / ".hidden.js").write_text("secret")
    (d / "static" / "notes.conf").write_text("not served")
    (tmp_path / "outside.js").write_text("outside")
    (d / "static" / "link.js").symlink_to(tmp_path / "outside.js")
    return d


class Running:
    def __init__(self, front: WebFront) -> None:
        self.front = front
        self.base = f"http://127.0.0.1:{front.port}"
        self.ws_url = f"ws://127.0.0.1:{front.port}/ws"


@pytest.fixture
async def serve(page_dir: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    fronts: list[WebFront] = []

    async def start(handler: Handler = echo, **bounds: object) -> Running:
        front = WebFront(handler, lookup, page_dir, **bounds)  # type: ignore[arg-type]
        await front.start("127.0.0.1", 0)
        fronts.append(front)
        return Running(front)

    yield start
    for f in fronts:
        await f.close()


async def session_closes(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[object], int | None]:
    """Everything a WebSocket is sent until it closes: bytes, JSON objects; its code."""
    got: list[object] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = await ws.receive(timeout=20)
        if msg.type is aiohttp.WSMsgType.BINARY:
            got.append(msg.data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            got.append(json.loads(msg.data))
        else:
            break
    return got, ws.close_code


def first(token: str, cols: int = 80, rows: int = 24) -> str:
    return json.dumps({"token": token, "cols": cols, "rows": rows})


# --- the messages ------------------------------------------------------------------------


def test_parse_first_and_control() -> None:
    assert parse_first(first(RW, 100, 40)) == (RW, 100, 40)
    for bad in ("", "[]", "{}", '{"token": 5, "cols": 1, "rows": 1}',
                '{"token": "t", "cols": 0, "rows": 1}', '{"token": "t", "cols": 1}',
                '{"token": "t", "cols": true, "rows": 1}',
                '{"token": "t", "cols": 70000, "rows": 1}',
                '{"token": "t", "cols": 1.5, "rows": 1}', "x" * 2000):
        with pytest.raises(ProtocolError):
            parse_first(bad)
    assert parse_control('{"type": "resize", "cols": 90, "rows": 20}') == (90, 20)
    assert parse_control('{"type": "later-kind"}') is None
    for bad in ("nope", "[1]", '{"type": "resize", "cols": "a", "rows": 2}'):
        with pytest.raises(ProtocolError):
            parse_control(bad)


# --- HTTP --------------------------------------------------------------------------------


async def test_page_for_any_well_formed_token_static_files_only_allowed_ones(
    serve: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await serve()
    unknown = tokens.new_token()
    async with aiohttp.ClientSession() as http:
        for path in (f"/t/{unknown}", f"/t/{unknown}/", f"/t/{RW}"):
            async with http.get(r.base + path) as resp:
                assert resp.status == 200
                assert await resp.text() == "<!doctype html><html>the page</html>"
                h = resp.headers
                assert h["Content-Type"].startswith("text/html")
                assert h["Cache-Control"] == "no-store"
                assert h["X-Content-Type-Options"] == "nosniff"
                assert h["Referrer-Policy"] == "no-referrer"
                csp = h["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert f"connect-src 'self' ws://127.0.0.1:{r.front.port}" in csp
                assert "aiohttp" not in h.get("Server", "")
        async with http.head(f"{r.base}/t/{unknown}") as resp:
            assert resp.status == 200
        async with http.get(f"{r.base}/static/app.js") as resp:
            assert resp.status == 200 and await resp.text() == "console.log('app')"
            assert resp.headers["Content-Type"].startswith("text/javascript")
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(f"{r.base}/static/sub/style.css") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/css")
        for path in ("/t/short", "/t/" + "A" * 32, f"/t/{unknown}/x", "/", "/static/",
                     "/static/sub", "/static/sub/", "/static/.hidden.js",
                     "/static/notes.conf", "/static/link.js", "/static/missing.js",
                     "/static/../index.html", "/static/%2e%2e/index.html",
                     "/static/sub/..%2fapp.js", "/static//app.js", "/index.html"):
            async with http.get(r.base + path) as resp:
                assert resp.status == 404, path
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.post(f"{r.base}/t/{unknown}", data=b"x") as resp:
            assert resp.status == 405
        async with http.get(f"{r.base}/ws") as resp:
            assert resp.status == 400  # not an upgrade
    # raw: no client-side normalising of the path
    reader, writer = await asyncio.open_connection("127.0.0.1", r.front.port)
    writer.write(b"GET /static/../../outside.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 404"), answer[:40]
    # no access log: a page's path holds its token
    assert not [rec for rec in caplog.records if unknown in rec.getMessage()]


# --- the WebSocket protocol ----------------------------------------------------------------


async def test_read_write_mate_hello_output_input_resize(
    serve: Callable[..., Awaitable[Running]],
) -> None:
    seen: list[WebTerminal] = []

    async def handler(term: WebTerminal) -> None:
        seen.append(term)
        await echo(term)

    r = await serve(handler)
    async with aiohttp.ClientSession() as http, http.ws_connect(r.ws_url) as ws:
        await ws.send_str(first(RW, 120, 40))
        assert json.loads((await ws.receive(timeout=10)).data) == {"type": "hello",
                                                                   "readonly": False}
        assert (await ws.receive(timeout=10)).data == b"screen\r\n"
        await ws.send_bytes(b"ls\r")
        assert (await ws.receive(timeout=10)).data == b"got ls\r"
        await ws.send_str('{"type": "resize", "cols": 90, "rows": 20}')
        assert (await ws.receive(timeout=10)).data == b"got (90, 20)"
        await ws.send_str('{"type": "something-later"}')  # ignored
        await ws.send_bytes(b"")  # nothing
        await ws.send_bytes(b"x")
        assert (await ws.receive(timeout=10)).data == b"got x"
    term = seen[0]
    assert (term.username, term.term, term.cols, term.rows) == (RW, "xterm-256color", 90, 20)
    assert term.peer.startswith("127.0.0.1:")


async def test_read_only_hello(serve: Callable[..., Awaitable[Running]]) -> None:
    r = await serve()
    async with aiohttp.ClientSession() as http, http.ws_connect(r.ws_url) as ws:
        await ws.send_str(first(RO))
        assert json.loads((await ws.receive(timeout=10)).data) == {"type": "hello",
                                                                   "readonly": True}


async def test_close_codes(serve: Callable[..., Awaitable[Running]]) -> None:
    async def full(term: WebTerminal) -> None:  # as Mates says a session is full
        term.write(b"This session has too many mates connected.\r\n")
        term.exit(1)

    async def ends(term: WebTerminal) -> None:
        term.write(b"\r\ntether: the host ended the session.\r\n")
        await term.drain()
        term.exit(0)

    async def run(handler: Handler, token: str) -> tuple[list[object], int | None]:
        r = await serve(handler)
        async with aiohttp.ClientSession() as http, http.ws_connect(r.ws_url) as ws:
            await ws.send_str(first(token))
            return await session_closes(ws)

    got, code = await run(echo, tokens.new_token())
    assert code == CLOSE_INVALID_TOKEN
    assert got == [{"type": "error", "message": "Invalid or expired session token."}]
    got, code = await run(echo, KEYS)
    assert code == CLOSE_REFUSED and got == [{"type": "error", "message": "keys only"}]
    got, code = await run(full, RW)
    assert code == CLOSE_REFUSED
    assert got[-1] == {"type": "error", "message": "This session has too many mates connected."}
    got, code = await run(ends, RW)
    assert code == 1000
    assert got == [{"type": "hello", "readonly": False},
                   b"\r\ntether: the host ended the session.\r\n"]


async def test_bad_first_messages_and_deadline(serve: Callable[..., Awaitable[Running]]) -> None:
    r = await serve(first_timeout=0.5)

    async def closes(send: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]],
                     ) -> tuple[list[object], int | None]:
        async with aiohttp.ClientSession() as http, http.ws_connect(r.ws_url) as ws:
            await send(ws)
            return await session_closes(ws)

    async def nothing(ws: aiohttp.ClientWebSocketResponse) -> None:
        pass

    t0 = time.monotonic()
    got, code = await closes(nothing)
    assert code == CLOSE_PROTOCOL and 0.4 < time.monotonic() - t0 < 5
    assert got == [{"type": "error", "message": "no first message within 0.5 s"}]
    for send in (lambda ws: ws.send_bytes(b"\x00\x01"), lambda ws: ws.send_str("{"),
                 lambda ws: ws.send_str(json.dumps({"token": RW, "cols": 80, "rows": 24,
                                                    "x": "y" * 1100})),
                 lambda ws: ws.send_str(json.dumps({"token": RW}))):
        got, code = await closes(send)
        assert code == CLOSE_PROTOCOL and len(got) == 1 and got[0]["type"] == "error"  # type: ignore[index]


async def test_oversized_garbage_and_flooding_messages_close_only_that_client(
    serve: Callable[..., Awaitable[Running]],
) -> None:
    r = await serve()
    async with aiohttp.ClientSession() as http:
        async def after_hello(send: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]],
                              ) -> tuple[list[object], int | None]:
            async with http.ws_connect(r.ws_url) as ws:
                await ws.send_str(first(RW))
                await ws.receive(timeout=10)
                await send(ws)
                return await session_closes(ws)

        _, code = await after_hello(lambda ws: ws.send_bytes(b"x" * (MAX_MESSAGE + 1)))
        assert code == 1009

        async def not_utf8(ws: aiohttp.ClientWebSocketResponse) -> None:
            await ws._writer.send_frame(b"\xff\xfe", aiohttp.WSMsgType.TEXT)  # type: ignore[union-attr]

        _, code = await after_hello(not_utf8)
        assert code == 1007
        got, code = await after_hello(lambda ws: ws.send_str("not json"))
        assert code == CLOSE_PROTOCOL and got[-1] == {"type": "error",
                                                      "message": "a text message is not JSON"}

        async def flood(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(web_terminal.REQUEST_BURST + 50):
                await ws.send_str('{"type": "resize", "cols": 80, "rows": 24}')

        got, code = await after_hello(flood)
        assert code == CLOSE_PROTOCOL
        assert "control messages faster" in got[-1]["message"]  # type: ignore[index]
        # another client is untouched
        async with http.ws_connect(r.ws_url) as ws:
            await ws.send_str(first(RW))
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello"


# --- bounds on one peer ----------------------------------------------------------------------


async def test_connections_per_address(serve: Callable[..., Awaitable[Running]]) -> None:
    r = await serve(max_per_address=2, http_timeout=1.0)
    held = [await asyncio.open_connection("127.0.0.1", r.front.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.front.port)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    # idle ones are closed after http_timeout, which frees their places
    for rd, _ in held:
        assert await asyncio.wait_for(rd.read(), 10) == b""
    for _, w in held:
        w.close()
    async with aiohttp.ClientSession() as http, http.get(f"{r.base}/static/app.js") as resp:
        assert resp.status == 200
    assert r.front.connections.count <= 1


async def test_client_that_reads_nothing_is_dropped_and_holds_little(
    serve: Callable[..., Awaitable[Running]],
) -> None:
    """Output the pump's way (write, then drain) to a client that never reads:
    what waits in the relay stays under a screen update and the socket's buffer,
    and the client is dropped once it took nothing for ``stall_timeout``."""
    held: list[int] = []
    ended = asyncio.Event()
    terms: list[WebTerminal] = []

    async def flood(term: WebTerminal) -> None:
        terms.append(term)
        try:
            while not term.gone:
                term.write(b"y" * 65536)
                held.append(term._queued + term._backlog())
                await term.drain()
        finally:
            term.exit(0)
            ended.set()

    r = await serve(flood, stall_timeout=1.0, heartbeat=60.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", r.front.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101")
    payload = first(RW).encode()
    writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # zero mask
    writer.transport.pause_reading()  # and never again
    await asyncio.wait_for(ended.wait(), 20)
    assert terms[0].gone and terms[0].closing is not None
    assert terms[0].closing[1] == "took no output for 1 s"
    assert max(held) <= 2 * 65536 + 256 * 1024, max(held)
    writer.close()


async def test_unsent_output_past_the_bound_drops_the_client(
    serve: Callable[..., Awaitable[Running]],
) -> None:
    """A writer that does not wait for drain (none in the relay does) still
    cannot queue more than ``max_unsent`` for a client that reads nothing."""
    done = asyncio.Event()
    terms: list[WebTerminal] = []

    async def careless(term: WebTerminal) -> None:
        terms.append(term)
        for _ in range(200):
            term.write(b"z" * 65536)
            await asyncio.sleep(0)
            if term.gone:
                break
        term.exit(0)
        done.set()

    r = await serve(careless, max_unsent=512 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.front.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    payload = first(RW).encode()
    writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
    writer.transport.pause_reading()
    await asyncio.wait_for(done.wait(), 20)
    assert terms[0].gone and terms[0].closing == (1006, "took no output")
    writer.close()


async def test_forwarded_address_only_behind_a_trusted_proxy(
    serve: Callable[..., Awaitable[Running]],
) -> None:
    peers: list[str] = []

    async def record(term: WebTerminal) -> None:
        peers.append(term.peer)
        term.exit(0)

    for trust in (False, True):
        r = await serve(record, trust_proxy=trust, max_per_address=1)
        async with aiohttp.ClientSession() as http:
            headers = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
            async with http.ws_connect(r.ws_url, headers=headers) as ws:
                await ws.send_str(first(RW))
                await session_closes(ws)
    assert peers[0].startswith("127.0.0.1:") and peers[1] == "203.0.113.9:0"


async def test_tls(page_dir: Path, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    front = WebFront(echo, lookup, page_dir)
    await front.start("127.0.0.1", 0, tls_context(tmp_path / "cert.pem", tmp_path / "key.pem"))
    try:
        client = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://localhost:{front.port}/t/{RW}", ssl=client) as resp:
                assert resp.status == 200
            async with http.ws_connect(f"wss://localhost:{front.port}/ws", ssl=client) as ws:
                await ws.send_str(first(RW))
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello"
    finally:
        await front.close()


# --- the relay's command line ---------------------------------------------------------------


@pytest.mark.parametrize(("argv", "problem"), [
    ([], ""),
    (["--web-port", "8080"], ""),
    (["--web-port", "0", "--web-url", "https://tether.example.org"], ""),
    (["--web-cert", "c.pem"], "--web-cert needs --web-port"),
    (["--web-url", "https://x"], "--web-url needs --web-port"),
    (["--web-port", "8080", "--web-cert", "c.pem"], "--web-cert and --web-key go together"),
    (["--web-port", "8080", "--web-url", "tether.example.org"], "expected a URL"),
    (["--web-port", "8080", "--web-url", "https://x/ y"], "expected a URL"),
    (["--web-port", "70000"], "not a port"),
])
def test_relay_web_options(argv: list[str], problem: str) -> None:
    a = relay_cli._parser().parse_args(argv)
    found = relay_cli._web_problem(a)
    assert (problem in found) if problem else found == ""


def test_relay_help_explains_the_web_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        relay_cli._parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--web-port", "--web-bind", "--web-cert", "--web-key", "--web-url",
                 "--web-trust-proxy"):
        assert flag in out
    assert "Off unless --web-port" in out
