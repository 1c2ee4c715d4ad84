"""A front's questions about sessions, answered where the sessions are.

An SSH front process (``relay.front``) asks about mates (which keys a token's
session requires; attach one, with its pty's master passed back:
``RemoteTerminal``) and passes sockets spliced to hosts' and join clients'
channels (``SplicedLink``). ``FrontRequests`` answers one front's questions
with the roles' handlers (``Handlers``): in the relay's own process
(``relay.fronts``), or, with ``--session-procs``, in the session process the
relay routed them to (``relay.owner``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tether.core.messages import MateInfo
from tether.transport.link import StreamLink
from tether.transport.ssh import key_digest

from .mates import MatePump, clamp_size
from .session import MORE, Mate

MAX_WRITE = 32 * 1024
"""A mate's text from the relay goes to its front in pieces of this size."""
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

    def backlog(self) -> int:
        return 0

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
