"""Browser mates through a real relay's web front (`tether relay --web-port`).

A real relay and real hosts; the browser is aiohttp's WebSocket client (or a raw
socket where a browser would misbehave) speaking the protocol of
``tether.transport.web``; what it is shown is rendered with pyte, as a terminal
would. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path

import aiohttp
import asyncssh
import pyte
import pytest

from tether.core import tokens
from tether.testing.relay import KeyCache

from .helpers import Host, RelayProcess, free_port, wait_for

PER_ADDRESS = 12
"""The relay's --max-connections-per-address here (the web front counts its own)."""
MiB = 1024 * 1024
KEYS = KeyCache()
"""Host keys for the relays a test starts of its own (RSA generation takes seconds)."""


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    r = RelayProcess(tmp_path_factory.mktemp("relay"), None, "--web-port", str(free_port()),
                     "--max-connections-per-address", str(PER_ADDRESS))
    assert r.web_base.startswith("http://127.0.0.1:"), r.banner
    yield r
    r.close()


class WebMate:
    """A browser mate: what it is sent, rendered on a pyte screen of its size."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, cols: int, rows: int) -> None:
        self.ws = ws
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.texts: list[dict[str, object]] = []
        self.raw = bytearray()
        self.hello = asyncio.Event()
        self.done = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, base: str, token: str, cols: int = 100,
                   rows: int = 30, first: str | None = None) -> WebMate:
        ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws", autoping=True)
        await ws.send_str(first if first is not None
                          else json.dumps({"token": token, "cols": cols, "rows": rows}))
        return cls(ws, cols, rows)

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self.raw += msg.data
                    self.stream.feed(msg.data)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    obj = json.loads(msg.data)
                    self.texts.append(obj)
                    if obj.get("type") == "hello":
                        self.hello.set()
        finally:
            self.done.set()

    @property
    def readonly(self) -> bool | None:
        return next((bool(t["readonly"]) for t in self.texts if t.get("type") == "hello"), None)

    @property
    def error(self) -> str:
        return next((str(t["message"]) for t in self.texts if t.get("type") == "error"), "")

    def text(self) -> str:
        return "\n".join(self.screen.display)

    async def wait_text(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.text():
                return self.text()
            if self.done.is_set():
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text!r} not on the web mate's screen:\n{self.text()}")

    async def wait_closed(self, timeout: float = 20) -> int | None:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.ws.close_code

    async def type(self, text: str) -> None:
        await self.ws.send_bytes(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(rows, cols)
        await self.ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()


def token_of(link: str) -> str:
    return link.rsplit("/t/", 1)[1]


async def poll(fn, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """``fn()`` (a quick blocking check, e.g. the host's screen) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(fn):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def rss(relay: RelayProcess) -> int:
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def window(host: Host) -> str:
    return host.display("#{window_width}x#{window_height}")


# --- links, read-write, read-only ------------------------------------------------------


def test_web_link_serves_the_page_and_a_read_write_mate_types(
    relay: RelayProcess, host: Host, tmp_path: Path
) -> None:
    link, link_ro = host.display("#{tether_web}"), host.display("#{tether_web_ro}")
    assert link.startswith(relay.web_base + "/t/") and link_ro.startswith(relay.web_base + "/t/")
    assert token_of(link) != token_of(link_ro)
    assert tokens.is_well_formed(token_of(link))
    assert f"web session: {link}" in host.messages()
    planted = tmp_path / "from-web.txt"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(link) as r:
                assert r.status == 200
                assert r.headers["Cache-Control"] == "no-store"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Referrer-Policy"] == "no-referrer"
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                page = await r.text()
                assert "<html" in page
            # every file the page names is served, with its type
            for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
                async with http.get(relay.web_base + path) as r:
                    assert r.status == 200, path
                    assert r.headers["Content-Type"].split(";")[0] in (
                        "text/javascript", "text/css"), (path, r.headers["Content-Type"])
            mate = await WebMate.open(http, relay.web_base, token_of(link), 90, 25)
            try:
                await asyncio.wait_for(mate.hello.wait(), 10)
                assert mate.readonly is False
                # the window follows its only read-write mate, as for ssh mates
                await poll(lambda: window(host) == "90x24", 15, "the window to follow the mate")
                await asyncio.to_thread(host.type, "echo web-marker-$((6*7))")
                await mate.wait_text("web-marker-42")
                await mate.type(f"echo typed-by-web-$((6*7)) > {planted}\r")
                await poll(lambda: planted.exists()
                           and planted.read_text() == "typed-by-web-42\n", 15,
                           "the web mate's command to run on the host")
            finally:
                await mate.close()

    asyncio.run(scenario())


def test_readonly_web_mate_cannot_type_or_resize(
    relay: RelayProcess, host: Host, tmp_path: Path
) -> None:
    link, link_ro = host.display("#{tether_web}"), host.display("#{tether_web_ro}")
    planted = tmp_path / "ro-was-here"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            rw = await WebMate.open(http, relay.web_base, token_of(link), 100, 30)
            ro = await WebMate.open(http, relay.web_base, token_of(link_ro), 60, 15)
            try:
                await asyncio.wait_for(ro.hello.wait(), 10)
                assert ro.readonly is True
                await poll(lambda: window(host) == "100x29", 15, "the window to follow rw")
                await ro.wait_text("0:")
                await ro.type(f"touch {planted}\r")
                await ro.type("\x03\x04")
                await ro.resize(40, 10)
                # a read-write marker typed afterwards proves the input path was flushed
                await rw.type("echo rw-marker-$((2+3))\r")
                await poll(lambda: "rw-marker-5" in host.screen(), 15, "the rw mate's marker")
                await ro.wait_text("rw-marker-5")
                assert not planted.exists()
                assert "touch" not in await asyncio.to_thread(host.screen)
                assert await asyncio.to_thread(window, host) == "100x29"
                assert not ro.done.is_set()
            finally:
                await ro.close()
                await rw.close()

    asyncio.run(scenario())


def test_key_restricted_session_refuses_browsers(relay: RelayProcess, tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "mates.pub").write_bytes(key.export_public_key())
    h = Host(tmp_path / "host",
             relay.conf() + f"set -g tether-authorized-keys {tmp_path / 'mates.pub'}\n")

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            mate = await WebMate.open(http, relay.web_base, token_of(h.display("#{tether_web}")))
            assert await mate.wait_closed() == 4003
            assert "only mates with an SSH key" in mate.error
            assert mate.readonly is None and not mate.raw

    try:
        asyncio.run(scenario())
    finally:
        h.close()


def test_mate_limit_detach_and_session_end(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path / "relay", None, "--web-port", str(free_port()),
                     "--max-mates", "1", keys=KEYS)
    h = Host(tmp_path / "host", r.conf())
    token = token_of(h.display("#{tether_web}"))

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            first = await WebMate.open(http, r.web_base, token)
            await first.wait_text("0:")
            second = await WebMate.open(http, r.web_base, token)
            assert await second.wait_closed() == 4003
            assert second.error == "This session has too many mates connected."
            await first.type("\x02d")  # C-b d: the mate detaches
            assert await first.wait_closed() == 1000 and not first.error
            third = await WebMate.open(http, r.web_base, token)
            await third.wait_text("0:")
            await asyncio.to_thread(h.tmux, "kill-server")
            assert await third.wait_closed() == 1000
            assert b"the host ended the session" in third.raw

    try:
        asyncio.run(scenario())
    finally:
        h.close()
        r.close()


# --- tokens: the same delay and back-off as ssh -------------------------------------


def test_unknown_token_waits_backs_off_and_shares_the_count_with_ssh(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path / "relay", None, "--web-port", str(free_port()),
                     "--failed-tokens-free", "2", keys=KEYS)
    wrong = tokens.new_token()

    async def attempt(http: aiohttp.ClientSession) -> tuple[int | None, str, float]:
        t0 = time.monotonic()
        mate = await WebMate.open(http, r.web_base, wrong)
        code = await mate.wait_closed()
        return code, mate.error, time.monotonic() - t0

    async def ssh_attempt() -> str:
        async with asyncssh.connect("127.0.0.1", r.port, username=wrong, known_hosts=None,
                                    agent_path=None, client_keys=None) as conn:
            proc = await conn.create_process(term_type="xterm", encoding=None)
            out = await asyncio.wait_for(proc.stdout.read(), 20)
            return out.decode()

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{r.web_base}/t/{wrong}") as resp:
                assert resp.status == 200  # the page is no token oracle
            async with http.get(f"{r.web_base}/t/not-a-token") as resp:
                assert resp.status == 404
            for _ in range(2):
                code, error, took = await attempt(http)
                assert code == 4001 and error == "Invalid or expired session token."
                assert took >= 0.05
            code, error, took = await attempt(http)
            assert code == 4001 and error.startswith("Too many failed attempts"), error
            assert took >= 1.0
        # the count is the address's, whichever front it guessed through
        assert "Too many failed attempts" in await ssh_attempt()

    try:
        asyncio.run(scenario())
    finally:
        r.close()


# --- hostile browsers ------------------------------------------------------------------


def test_malformed_messages_close_only_that_client(relay: RelayProcess, host: Host) -> None:
    token = token_of(host.display("#{tether_web}"))

    async def closes(first: str | bytes, then: bytes | str | None = None) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(relay.web_base.replace("http", "ws", 1) + "/ws")
            if isinstance(first, bytes):
                await ws.send_bytes(first)
            else:
                await ws.send_str(first)
            if then is not None:
                await ws.receive(timeout=10)  # hello
                if isinstance(then, bytes):
                    await ws.send_bytes(then)
                else:
                    await ws.send_str(then)
            error = ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=20)
                if msg.type is aiohttp.WSMsgType.TEXT and '"error"' in msg.data:
                    error = json.loads(msg.data)["message"]
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    break
            await ws.close()
            assert ws.close_code is not None
            return ws.close_code, error

    async def silent() -> tuple[int | None, float]:
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(relay.web_base.replace("http", "ws", 1) + "/ws")
            async for _ in ws:
                pass
            return ws.close_code, time.monotonic() - t0

    hello = json.dumps({"token": token, "cols": 80, "rows": 24})

    async def scenario() -> None:
        waiting = asyncio.ensure_future(silent())  # the 10 s deadline runs meanwhile
        assert (await closes("{not json"))[0] == 4000
        assert await closes(b"\x00binary first") == (4000, "the first message must be JSON text")
        code, error = await closes(json.dumps({"token": token, "pad": "x" * 2000,
                                               "cols": 80, "rows": 24}))
        assert code == 4000 and "longer than 1024" in error
        assert (await closes(json.dumps({"token": token, "cols": -1, "rows": 24})))[0] == 4000
        assert (await closes(hello, b"x" * (100 * 1024)))[0] == 1009  # over 64 KiB
        assert (await closes(hello, "[1, 2]"))[0] == 4000
        assert (await closes(hello, '{"type": "resize", "cols": "wide"}'))[0] == 4000
        code, took = await asyncio.wait_for(waiting, 30)
        assert code == 4000 and 9 <= took <= 20, (code, took)
        # the relay, the session and the next browser carry on
        async with aiohttp.ClientSession() as http:
            mate = await WebMate.open(http, relay.web_base, token)
            await asyncio.wait_for(mate.hello.wait(), 10)
            await asyncio.to_thread(host.type, "echo after-garbage-$((40+2))")
            await mate.wait_text("after-garbage-42")
            await mate.close()

    asyncio.run(scenario())


def test_connection_flood_from_one_address_is_refused_and_slow_ones_timed_out(
    relay: RelayProcess, host: Host
) -> None:
    port = int(relay.web_base.rsplit(":", 1)[1])
    slow = []
    try:
        for _ in range(PER_ADDRESS):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /t/")  # and never the rest of the request
            slow.append(s)

        def one_more() -> bytes:
            """Its answer once the relay has counted the slow ones (it accepts
            them in its own time); b'' before, when it served this one."""
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = extra.recv(4096)
            return answer if answer.startswith(b"HTTP/1.1 503") else b""

        answer = wait_for(one_more, 10, "a connection past the bound to be refused")
        assert b"too many connections" in answer, answer
        # slow requests are closed (HTTP_TIMEOUT, 15 s), which frees the address's places
        t0 = time.monotonic()
        for s in slow:
            s.settimeout(max(1.0, 30 - (time.monotonic() - t0)))
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
        assert time.monotonic() - t0 < 30
    finally:
        for s in slow:
            s.close()
    token = token_of(host.display("#{tether_web}"))

    async def joins() -> None:
        async with aiohttp.ClientSession() as http:
            mate = await WebMate.open(http, relay.web_base, token)
            await asyncio.wait_for(mate.hello.wait(), 10)
            await asyncio.to_thread(host.type, "echo after-flood-$((40+2))")
            await mate.wait_text("after-flood-42")
            await mate.close()

    asyncio.run(joins())


def _raw_websocket(port: int, first: str) -> socket.socket:
    """A WebSocket client that says its first message, then never reads again."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = first.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return s


def test_mate_that_never_reads_is_dropped_and_relay_memory_stays_bounded(
    relay: RelayProcess, host: Host, tmp_path: Path
) -> None:
    other = Host(tmp_path / "other", relay.conf())
    port = int(relay.web_base.rsplit(":", 1)[1])
    token = token_of(host.display("#{tether_web}"))
    sock = _raw_websocket(port, json.dumps({"token": token, "cols": 200, "rows": 60}))
    try:
        before = rss(relay)
        host.type("yes tether-web-flood-$((1+1))-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                  " | head -c 40000000")
        peak = before
        t0 = time.monotonic()
        closed = False
        # ping after HEARTBEAT (20 s) without a pong within 10 s: dropped
        while time.monotonic() - t0 < 60 and not closed:
            time.sleep(1)
            peak = max(peak, rss(relay))
            closed = _dropped(sock)
        print(f"non-reading web mate: relay RSS {before / MiB:.1f} -> peak {peak / MiB:.1f} MiB,"
              f" dropped after {time.monotonic() - t0:.0f} s")
        assert peak - before < 24 * MiB, f"the relay grew by {(peak - before) / MiB:.1f} MiB"
        assert closed, "the relay kept a WebSocket that reads nothing"
        assert relay.proc.poll() is None
        host.tmux("send-keys", "C-c")

        async def others_carry_on() -> None:
            async with aiohttp.ClientSession() as http:
                mate = await WebMate.open(http, relay.web_base,
                                          token_of(other.display("#{tether_web}")))
                await asyncio.to_thread(other.type, "echo other-session-$((40+2))")
                await mate.wait_text("other-session-42")
                await mate.close()

        asyncio.run(others_carry_on())
        host.type("clear; echo host-after-flood-$((40+2))")
        wait_for(lambda: "host-after-flood-42" in host.screen(), 30, "the host's own screen")
    finally:
        sock.close()
        other.close()


def _dropped(sock: socket.socket) -> bool:
    """Whether the relay closed ``sock``, read from its TCP state (reading the
    socket would make it a reader)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state != 1  # TCP_ESTABLISHED


def test_status_lines_mention_web_links(relay: RelayProcess, host: Host) -> None:
    messages = host.messages()
    ro = host.display("#{tether_web_ro}")
    assert re.search(r"web session read only: http://127\.0\.0\.1:\d+/t/", messages)
    assert ro in messages
