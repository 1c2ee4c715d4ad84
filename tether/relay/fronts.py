"""SSH front processes (``tether relay --ssh-procs N``), seen from the relay.

The relay's process listens, accepts and counts each SSH connection (the
per-address and total bounds stay exact), then hands it to the front process
with the fewest. A front (``relay.front``) speaks SSH on it and asks back:
which keys a token's session requires of mates; a mate's tmux client (the
relay attaches it and passes the pty's master, ``RemoteTerminal``); or it
passes the relay a socket spliced to a host's or a join client's channel,
read here as a link like any other. Tokens, sessions, limits and back-off
stay in this process; a mate's keystrokes and screen, and every SSH packet's
cryptography, leave it.

A front that dies takes its connections with it (their mates leave, as on a
lost connection) and is started again; sessions are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from tether.core.messages import MateInfo
from tether.transport import fdchannel
from tether.transport.children import Child, reap
from tether.transport.link import StreamLink
from tether.transport.ssh import key_digest
from tether.transport.ssh_bounds import MAX_CONNECTIONS, Admission, address_key

from .config import RelayConfig
from .mates import MatePump, clamp_size
from .session import MORE, Mate

log = logging.getLogger("tether.relay")

RESTART_FIRST = 0.5
RESTART_MOST = 30.0
"""A front that died is started again after half a second, doubling while
they keep dying young, up to this."""
YOUNG = 10.0
"""A front that lived less than this counts as dying young."""
START_WAIT = 30.0
"""How long the relay's start waits for its fronts to serve (a loaded machine
starts an interpreter with asyncssh in well under a second)."""
MAX_WRITE = 32 * 1024
"""A mate's text from the relay goes to its front in pieces of this size."""
MAX_PIECE = 48 * 1024
"""Bytes of hosts' allowed keys (``-a``) in one message to a front."""
MAX_HELLOS = 4096
MAX_HELLO_BYTES = 1024 * 1024 + 4
MAX_HELD = 16 * 1024 * 1024
"""Hosts' first bytes held for their channel: one frame of at most 1 MiB a host
(past it the sender is at fault), at most this many hosts and bytes in all
(past them the oldest go: their channel did not come)."""
MAX_LISTED = 200
"""Mates a browser's list shows, the last entry then saying how many more: a
list fits one channel message."""

LinkHandler = Callable[[StreamLink, str, str], Awaitable[None]]
HostHandler = Callable[[StreamLink, str, str, str, Callable[[], None] | None],
                       Awaitable[None]]
"""(link, host key fingerprint, peer, why it may not start a session: empty if it
may, what to call once its session is decided)"""
MateHandler = Callable[[Any], Awaitable[None]]


class SplicedLink(StreamLink):
    """A host's or a join client's SSH channel, read through the front that holds
    its connection: the same frames, over a local socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 description: str, fingerprint: str = "") -> None:
        super().__init__(reader, writer, description)
        self.fingerprint = fingerprint

    @classmethod
    async def open(cls, sock: socket.socket, description: str, fingerprint: str = "",
                   prefix: bytes = b"") -> SplicedLink:
        """The link over ``sock``, whose first bytes (``prefix``) the relay's
        process read already, to route a host by its Hello."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16)
        if prefix:
            reader.feed_data(prefix)  # before the transport can add what follows
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_unix_connection(lambda: protocol, sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return cls(reader, writer, description, fingerprint)

    def _close(self) -> None:
        self._writer.close()

    def _abort(self) -> None:
        """Drop what the front has not taken (it stopped reading) and close now."""
        transport = self._writer.transport
        if transport is not None:
            transport.abort()


class RemotePump:
    """A mate's pump that runs in its front: here only its start, end and sizes."""

    def __init__(self, term: RemoteTerminal, mate: Mate, on_resize: Callable[[], None]) -> None:
        self.term = term
        self.mate = mate
        self.on_resize = on_resize
        self.kicked = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        m = self.mate
        if self.term.front.closed:  # its front died meanwhile: the mate is gone
            return
        self.term.send(["attached", self.term.req, m.id, m.readonly, m.cols, m.rows], m.fd)
        await self.done

    def kick(self) -> None:
        self.kicked = True
        self.term.send(["kick", self.term.req])
        self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def resized(self, cols: int, rows: int) -> None:
        self.mate.cols, self.mate.rows = clamp_size(cols, rows)
        self.on_resize()


class RemoteTerminal:
    """A mate's terminal in a front process, as ``mates.Mates`` sees a terminal."""

    def __init__(self, front: FrontRequests, req: int, username: str, term: str,
                 cols: int, rows: int, peer: str, fingerprint: str, kind: str = "ssh") -> None:
        self.front = front
        """The front the mate came by, as it was then: a restarted front numbers
        its mates afresh, so nothing for this one may reach its successor."""
        self.req = req
        self.username = username
        self.term = term
        self.cols = cols
        self.rows = rows
        self.peer = peer
        self.fingerprint = fingerprint
        self.kind = "web" if kind == "web" else "ssh"
        self._pump: RemotePump | None = None
        if self.kind == "web":  # a browser's page lists the mates
            self.show_mates = self._show_mates

    def _show_mates(self, me: int, mates: Sequence[MateInfo]) -> None:
        listed = [[m.id, m.kind, m.readonly, m.address, m.fingerprint]
                  for m in mates[:MAX_LISTED]]
        if len(mates) > MAX_LISTED:
            listed[-1] = [0, MORE, True, f"{len(mates) - MAX_LISTED + 1} more not listed", ""]
        self.send(["mates", self.req, me, listed])

    async def read(self) -> bytes | tuple[int, int]:
        return b""  # the front reads it: the pump runs there

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        self.front.send(msg, fd)

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_WRITE):
            self.send(["write", self.req, data[i:i + MAX_WRITE]])

    async def drain(self) -> None:
        """The front drains before it ends the connection (``exit``)."""

    def exit(self, status: int = 0) -> None:
        self.send(["exit", self.req, status])
        if self.front.terminals.get(self.req) is self:
            del self.front.terminals[self.req]

    def pump(self, mate: Mate, on_resize: Callable[[], None]) -> MatePump:
        self._pump = RemotePump(self, mate, on_resize)
        return self._pump

    def left(self) -> None:
        if self._pump is not None:
            self._pump.finish()

    def resized(self, cols: int, rows: int) -> None:
        if self._pump is not None:
            self._pump.resized(cols, rows)


class Handlers:
    """What answers a front's questions: the process that holds the sessions."""

    def __init__(self, on_host: HostHandler, on_mate: MateHandler, on_join: LinkHandler,
                 mate_keys: Callable[[str], set[bytes] | None],
                 decided: Callable[[int], None] | None = None) -> None:
        self.on_host = on_host
        self.on_mate = on_mate
        self.on_join = on_join
        self.mate_keys = mate_keys
        self.decided = decided
        """A session process tells the relay's process that a host it routed
        (by that number) has its session, or will not."""


class FrontRequests:
    """One front's questions about sessions, answered where the sessions are: the
    relay's process, or (``--session-procs``) a session process, to which the
    relay routes them. One per front process started: a restarted front gets a
    new one, so nothing meant for its predecessor's mates reaches it."""

    def __init__(self, label: str, send: Callable[[list[Any], int | None], None],
                 handlers: Handlers) -> None:
        self.label = label
        self._send = send
        self.handlers = handlers
        self.closed = False
        self.terminals: dict[int, RemoteTerminal] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._parts: dict[int, bytearray] = {}
        """Hosts' first bytes, by number, until their channel comes."""
        self._held = 0


    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if not self.closed:
            self._send(msg, fd)

    def close(self) -> None:
        """The front is gone: its mates have left."""
        self.closed = True
        self._parts.clear()
        self._held = 0
        for term in list(self.terminals.values()):
            term.left()
        self.terminals.clear()

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def handle(self, kind: str, args: list[Any], fd: int | None) -> None:
        """One question; raises (IndexError, TypeError, ValueError, KeyError) on a
        malformed one, whose sender is then restarted. Owns ``fd``."""
        if kind in ("host", "join", "hello"):
            if fd is None:
                raise ValueError("no socket")
            sock = socket.socket(fileno=fd)
            if kind == "hello":  # a host routed by the relay, which read its Hello
                ref, refusal, *rest = args
                prefix = self._parts.pop(int(ref), bytearray())
                self._held -= len(prefix)
                self._spawn(self._link("host", rest, sock, str(refusal), int(ref),
                                       bytes(prefix)))
            else:
                self._spawn(self._link(kind, args, sock))
            return
        if fd is not None:
            os.close(fd)
        if kind == "hello_part":  # the bytes the relay read of a host's channel
            ref, data = int(args[0]), bytes(args[1])
            part = self._parts.setdefault(ref, bytearray())
            if len(part) + len(data) > MAX_HELLO_BYTES:
                raise ValueError("more of a host's first bytes than the relay reads")
            part += data
            self._held += len(data)
            while len(self._parts) > MAX_HELLOS or self._held > MAX_HELD:
                # channels that never came (the relay could not send them): the oldest
                self._held -= len(self._parts.pop(min(self._parts)))
        elif kind == "mate_keys":
            # digests: a host may list 256 keys, past one message as blobs
            keys = self.handlers.mate_keys(str(args[1])) or ()
            self.send(["keys", int(args[0]), sorted(key_digest(k) for k in keys)])
        elif kind == "mate":
            req, token, term, cols, rows, peer, fingerprint, *kind = args
            t = RemoteTerminal(self, int(req), str(token), str(term), int(cols),
                               int(rows), str(peer), str(fingerprint), *map(str, kind[:1]))
            self.terminals[t.req] = t
            self._spawn(self._mate(t))
        elif kind == "left":
            t = self.terminals.get(int(args[0]))
            if t is not None:
                t.left()
        elif kind == "resized":
            t = self.terminals.get(int(args[0]))
            if t is not None:
                t.resized(int(args[1]), int(args[2]))
        else:
            raise ValueError(f"unknown message {kind!r}")

    async def _mate(self, t: RemoteTerminal) -> None:
        try:
            await self.handlers.on_mate(t)
        finally:
            if self.terminals.get(t.req) is t:  # it never got its exit
                t.exit(0)

    async def _link(self, kind: str, args: list[Any], sock: socket.socket,
                    refusal: str = "", ref: int | None = None, prefix: bytes = b"") -> None:
        # a host: its key's fingerprint, peer, description; a join client: its
        # token, peer, description and the fingerprint of the key it proved
        told = False

        def decided() -> None:
            """The relay's process counts a host it routed (by number) until its
            session is decided: say so, once."""
            nonlocal told
            if not told and ref is not None and self.handlers.decided is not None:
                told = True
                self.handlers.decided(ref)

        try:
            who, peer, description, *proved = (str(a) for a in args)
            link = await SplicedLink.open(sock, description, *proved[:1], prefix=prefix)
            try:
                if kind == "join":
                    await self.handlers.on_join(link, who, peer)
                else:
                    await self.handlers.on_host(link, who, peer, refusal, decided)
            finally:
                link.close()
        finally:
            sock.close()
            decided()


class FrontProcess:
    """One front: its process, the channel to it, and what it holds."""

    def __init__(self, pool: FrontPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.gen = 0
        """How often it was started: the session processes tell its lives apart."""
        self.local = False
        """A front in the relay's own process (browser mates, with session
        processes): no process to start again, but ``restart``."""
        self.restart: Callable[[], None] | None = None
        self.chan: fdchannel.FdChannel | None = None
        self.proc: Child | None = None
        self.started = 0.0
        self.conns: dict[int, str] = {}
        """Connections it serves: their number and address key (for admission)."""
        self.requests: FrontRequests | None = None
        """Its questions answered here (no session processes)."""
        self.ready: asyncio.Future[None] | None = None
        """Done once the front has loaded the host keys and serves."""

    @property
    def alive(self) -> bool:
        return self.chan is not None and not self.chan.closed

    def start(self) -> None:
        here, popen = spawn("tether.relay.front", self.pool.log_config())
        self.proc = Child(popen)
        self.pool.children.add(self.proc)
        reap(self.proc, self.pool.children.discard)
        self.listen(here)
        for piece in self.pool.allowed_pieces():
            self.send(["allow", piece])
        self.send(["config", self.pool.front_config()])
        log.info("ssh front %d started (pid %d)", self.index, popen.pid)

    def listen(self, sock: socket.socket) -> None:
        """Serve a new life of the front, at the other end of ``sock``."""
        self.gen += 1
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.chan = chan = fdchannel.FdChannel(sock, self._on_message, self._closed)
        if self.pool.handlers is not None:
            self.requests = FrontRequests(f"ssh front {self.index}", chan.send,
                                          self.pool.handlers)

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if self.chan is not None:
            self.chan.send(msg, fd)

    def stop(self) -> None:
        if self.chan is not None:
            self.chan.close()

    def _closed(self) -> None:
        """The front is gone (or is being stopped): what it served is gone with it."""
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"ssh front {self.index} ended at start"))
            self.ready.exception()  # retrieved: only the relay's start awaits it
        for key in self.conns.values():
            self.pool.admission.release(key)
        self.conns.clear()
        if self.requests is not None:
            self.requests.close()
        if self.pool.router is not None:
            self.pool.router.front_gone(self)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            self.proc = None
        self.pool.front_closed(self)

    # --- what the front asks ---------------------------------------------------------

    def _on_message(self, msg: list[Any], fd: int | None) -> None:
        try:
            self._handle(msg, fd)
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            log.error("ssh front %d: bad message %r: %s; restarting it", self.index,
                      msg[0] if msg else msg, exc)
            self.stop()

    def _handle(self, msg: list[Any], fd: int | None) -> None:
        kind, args = str(msg[0]), msg[1:]
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "closed":
            key = self.conns.pop(int(args[0]), None)
            if key is not None:
                self.pool.admission.release(key)
        elif self.requests is not None:
            self.requests.handle(kind, args, fd)
            return
        elif self.pool.router is not None:
            self.pool.router.route(self, kind, args, fd)
            return
        if fd is not None:
            os.close(fd)


def spawn(module: str, log_config: dict[str, Any]) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A child process of the relay running ``module``, and this end of its channel."""
    here, there = fdchannel.pair()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", module, str(there.fileno()), json.dumps(log_config)],
            pass_fds=[there.fileno()], stdin=subprocess.DEVNULL,
        )
    except OSError:
        here.close()
        raise
    finally:
        there.close()
    return here, popen


class Router(Protocol):
    """Where a front's questions go when session processes hold the sessions."""

    def route(self, front: FrontProcess, kind: str, args: list[Any], fd: int | None) -> None:
        """Forward one question (owning ``fd``); raises on a malformed one."""

    def front_gone(self, front: FrontProcess) -> None:
        """The front ended: its mates have left."""


class FrontPool:
    """Listens for SSH, and hands each connection to a front process."""

    def __init__(self, config: RelayConfig, count: int, handlers: Handlers | None,
                 router: Router | None = None) -> None:
        self.config = config
        self.handlers = handlers
        """Answers the fronts' questions here; None: ``router`` sends them on."""
        self.router = router
        self.admission = Admission(config.max_connections_per_address, MAX_CONNECTIONS)
        self.fronts = [FrontProcess(self, i) for i in range(count)]
        self._listeners: list[socket.socket] = []
        self._conn_ids = 0
        self._closing = False
        self.restarts = Restarts()
        self.children: set[Child] = set()
        """Front processes not yet reaped (``close`` waits for them)."""
        self.port = 0

    def front_config(self) -> dict[str, Any]:
        """The front's settings; the hosts' keys it may admit go before, in
        pieces (``allowed_pieces``): a long list does not fit one message."""
        c = self.config
        return {"keys_dir": str(c.keys_dir),
                "authorized_keys": "sent" if c.authorized_keys is not None else None,
                "mate_input_rate": c.mate_input_rate}

    def allowed_pieces(self) -> list[list[str]]:
        pieces: list[list[str]] = []
        size = MAX_PIECE
        for line in self.config.authorized_keys or ():
            n = len(line.encode()) + 8
            if n > MAX_PIECE:  # no key is this long: a comment is
                raise ValueError(f"an authorized_keys line of {n} bytes")
            if size + n > MAX_PIECE:
                pieces.append([])
                size = 0
            pieces[-1].append(line)
            size += n
        return pieces

    @staticmethod
    def log_config() -> dict[str, Any]:
        root = logging.getLogger()
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        level = logging.getLogger("tether.relay").getEffectiveLevel()
        return {"log_file": files[0].baseFilename if files else "", "log_level": level}

    async def start(self) -> int:
        """Listen on the configured address (its port, when 0, chosen now) and
        start the fronts; returns the port."""
        c = self.config
        infos = socket.getaddrinfo(c.bind or None, c.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        port = c.port
        loop = asyncio.get_running_loop()
        try:
            for family, kind, proto, _, addr in infos:
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                port = sock.getsockname()[1]
                sock.listen(128)
                sock.setblocking(False)
        except OSError:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        for front in self.fronts:
            front.start()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(f.ready for f in self.fronts if f.ready is not None)),
                START_WAIT)
        except (RuntimeError, TimeoutError):
            await self.close()
            raise RuntimeError("the SSH front processes (--ssh-procs) did not start; "
                               "their errors are in the log") from None
        self.port = port
        return port

    async def close(self) -> None:
        self._closing = True
        loop = asyncio.get_running_loop()
        listeners, self._listeners = self._listeners, []
        for sock in listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.restarts.cancel()
        for front in self.fronts:
            front.stop()  # the front ends when its channel closes
            if front.requests is not None:
                front.requests.cancel()
        for proc in list(self.children):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next turn may do
                log.warning("ssh: cannot accept a connection: %s", exc)
                return
            with conn:
                self._hand_over(conn, str(addr[0]))

    def _hand_over(self, conn: socket.socket, address: str) -> None:
        alive = [f for f in self.fronts if f.alive]
        if not alive:
            log.warning("ssh: no front process to serve %s; connection closed", address)
            return
        key = address_key(address)
        refusal = self.admission.admit(key) or ""
        front = min(alive, key=lambda f: len(f.conns))
        if refusal:
            log.warning("ssh %s: refused: %s", address, refusal)
            if front.chan is None or front.chan.backlog:
                return  # a flood: closed unanswered, not queued for a busy front

        self._conn_ids += 1
        try:
            front.send(["conn", self._conn_ids, refusal], conn.fileno())
        except OSError as exc:  # out of descriptors to queue it with
            log.warning("ssh %s: cannot hand the connection over: %s", address, exc)
            if not refusal:
                self.admission.release(key)
            return
        if not refusal:
            front.conns[self._conn_ids] = key

    def front_closed(self, front: FrontProcess) -> None:
        if front.local:
            if not self._closing and front.restart is not None:
                asyncio.get_running_loop().call_soon(front.restart)
            return
        if not self._closing:
            self.restarts.died(front.index, f"ssh front {front.index}", front.started,
                               front.start)


class Restarts:
    """Child processes of the relay that died, started again: after half a
    second, doubling while they keep dying young."""

    def __init__(self) -> None:
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._wait: dict[int, float] = {}

    def died(self, index: int, name: str, started: float, start: Callable[[], None]) -> None:
        lived = time.monotonic() - started
        wait = self._wait.get(index, RESTART_FIRST)
        wait = min(wait * 2, RESTART_MOST) if lived < YOUNG else RESTART_FIRST
        self._wait[index] = wait
        log.error("%s ended after %.1f s; starting it again in %.1f s", name, lived, wait)
        self._timers[index] = asyncio.get_running_loop().call_later(
            wait, self._restart, index, name, started, start)

    def _restart(self, index: int, name: str, started: float,
                 start: Callable[[], None]) -> None:
        self._timers.pop(index, None)
        try:
            start()
        except (OSError, ValueError) as exc:
            log.error("%s: cannot start: %s", name, exc)
            self.died(index, name, time.monotonic(), start)

    @property
    def pending(self) -> int:
        """Processes waiting to be started again."""
        return len(self._timers)

    def cancel(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
