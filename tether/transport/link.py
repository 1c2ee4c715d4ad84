"""The small interface replication runs over, so SSH or QUIC can carry it."""

from __future__ import annotations

import collections
from typing import Any, Protocol

from tether.core.messages import Message, MessageDecoder


class LinkClosed(Exception):
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

    @property
    def description(self) -> str:
        return self._desc

    def _closing(self) -> bool:
        return bool(self._writer.is_closing())

    def _close(self) -> None: ...

    async def _eof_reason(self) -> str:
        return "connection closed by peer"

    def send_nowait(self, msg: Message) -> None:
        if self.closed or self._closing():
            raise LinkClosed("connection closed")
        data = msg.encode()
        self.bytes_sent += len(data)
        self._writer.write(data)

    def send_ack(self, msg: Message) -> None:
        self.send_nowait(msg)

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)
        await self.drain()

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except self.ERRORS as exc:
            raise LinkClosed(str(exc) or "connection closed") from None

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
        if not self.closed:
            self.closed = True
            self._close()
