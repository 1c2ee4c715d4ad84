"""The small interface replication runs over, so SSH or QUIC can carry it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, Protocol

from tether.core.errors import TetherError
from tether.core.messages import Message, MessageDecoder
from tether.core.session import Channel, Outgoing

log = logging.getLogger("tether.transport")

MAX_UNSENT = 8 * 1024 * 1024
"""Bytes queued for a peer and not yet taken by it, past which its link is closed.

Twice the largest frame (``MAX_FRAME``): a sender that drains after each batch
(the host's log, at most a frame past its 256 KiB batch) never comes near it,
and the relay's own messages to a host are small control messages. What passes
it is a peer that makes the relay answer (Pings) but never reads: without the
bound every answer would be kept, for ever."""


def send_out(link: Link, out: Outgoing) -> None:
    """Send by the channel an endpoint chose: acks and datagrams may be lost over
    QUIC; where a link has no datagrams (SSH) they go in order on the stream."""
    if out.channel is Channel.ACK:
        link.send_ack(out.message)
        return
    datagram = getattr(link, "send_datagram", None)
    if out.channel is Channel.DATAGRAM and datagram is not None:
        datagram(out.message)
    else:
        link.send_nowait(out.message)


class LinkClosed(TetherError):
    """The link is gone; ``reason`` says why when the peer told us."""


class Link(Protocol):
    """An ordered, reliable, message-framed duplex channel."""

    async def send(self, msg: Message) -> None:
        """Queue ``msg`` and wait until the transport can take more."""

    def send_nowait(self, msg: Message) -> None:
        """Queue ``msg`` without waiting (small control messages)."""

    def send_ack(self, msg: Message) -> None:
        """Send a cumulative ack: any later one supersedes it, so a lost one costs
        nothing. QUIC sends it as a datagram, outside the ordered stream."""

    async def drain(self) -> None:
        """Wait until the transport can take more."""

    async def recv(self) -> Message:
        """The next message, or raise ``LinkClosed``."""

    def close(self) -> None: ...

    @property
    def description(self) -> str: ...

    @property
    def kind(self) -> str:
        """``ssh`` or ``quic``: what the status line calls it."""
        ...


class Pushback:
    """A link whose first message was already read (to tell what it is for):
    ``recv`` gives that message back first; everything else is the link's."""

    def __init__(self, link: Any, first: Message) -> None:
        self._link = link
        self._first: Message | None = first

    async def recv(self) -> Message:
        first, self._first = self._first, None
        if first is not None:
            return first
        msg: Message = await self._link.recv()
        return msg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)


class StreamLink:
    """Messages as length-prefixed frames over a byte stream: the relay's side of an
    SSH channel, or the host's ``ssh`` process. Subclasses say how the stream
    closes (``_closing``, ``_close``), which errors mean it is gone (``ERRORS``)
    and why it ended (``_eof_reason``)."""

    kind = "ssh"
    ERRORS: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, reader: Any, writer: Any, description: str) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = MessageDecoder()
        self._inbox: collections.deque[Message] = collections.deque()
        self._desc = description
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.max_unsent = MAX_UNSENT
        # what waits for the writer to drain, in one buffer: a flood of small
        # messages then costs its bytes, not a buffer object per message
        self._backlog = bytearray()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def description(self) -> str:
        return self._desc

    def _closing(self) -> bool:
        return bool(self._writer.is_closing())

    def _close(self) -> None: ...

    def _abort(self) -> None:
        """Drop what is queued and end the stream now: a peer that does not read
        would hold a graceful close's queue for ever."""
        self._close()

    def _unsent(self) -> int:
        """Bytes the writer holds that the peer has not taken yet."""
        transport = getattr(self._writer, "transport", None)
        return transport.get_write_buffer_size() if transport is not None else 0

    async def _eof_reason(self) -> str:
        return "connection closed by peer"

    def send_nowait(self, msg: Message) -> None:
        if self.closed or self._closing():
            raise LinkClosed("connection closed")
        data = msg.encode()
        unsent = self._unsent()
        if unsent + len(self._backlog) + len(data) > self.max_unsent:
            self._overflow(unsent + len(self._backlog))
        self.bytes_sent += len(data)
        if self._backlog or unsent:
            self._backlog += data
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        else:
            self._writer.write(data)

    def _overflow(self, queued: int) -> None:
        log.warning(
            "%s: the peer has not taken %d bytes sent to it (bound %d); closing its link",
            self._desc,
            queued,
            self.max_unsent,
        )
        self.closed = True
        self._backlog.clear()
        self._abort()
        raise LinkClosed(f"the peer did not read what was sent to it ({queued} bytes queued)")

    async def _flush(self) -> None:
        """Hand the backlog to the writer each time it has drained."""
        try:
            while self._backlog and not self.closed:
                await self._writer.drain()
                if self.closed:
                    break
                data = bytes(self._backlog)
                self._backlog.clear()
                self._writer.write(data)
        except self.ERRORS:
            self._backlog.clear()
            self.close()
        finally:
            self._flusher = None

    def send_ack(self, msg: Message) -> None:
        self.send_nowait(msg)

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)
        await self.drain()

    async def drain(self) -> None:
        try:
            while self._flusher is not None and not self.closed:
                await asyncio.wait([self._flusher])
            await self._writer.drain()
        except self.ERRORS as exc:
            raise LinkClosed(str(exc) or "connection closed") from None
        if self.closed:
            raise LinkClosed("connection closed")

    async def recv(self) -> Message:
        while not self._inbox:
            if self.closed:
                raise LinkClosed("connection closed")
            try:
                data = await self._reader.read(256 * 1024)
            except self.ERRORS as exc:
                raise LinkClosed(str(exc)) from None
            if not data:
                raise LinkClosed(await self._eof_reason())
            self.bytes_received += len(data)
            self._inbox.extend(self._decoder.feed(data))  # RemoteProtocolError propagates
        return self._inbox.popleft()

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if not self.closed:
            self.closed = True
            if self._backlog:  # a last word (an Error) leaves before the close, as before
                with contextlib.suppress(*self.ERRORS):
                    self._writer.write(bytes(self._backlog))
                self._backlog.clear()
            self._close()
