"""The small interface replication runs over, so SSH, QUIC or memory can carry it."""

from __future__ import annotations

import asyncio
from typing import Protocol

from tether.core.messages import Message


class LinkClosed(Exception):
    """The link is gone; ``reason`` says why when the peer told us."""


class Link(Protocol):
    """An ordered, reliable, message-framed duplex channel."""

    async def send(self, msg: Message) -> None:
        """Queue ``msg`` and wait until the transport can take more."""

    def send_nowait(self, msg: Message) -> None:
        """Queue ``msg`` without waiting (small control messages)."""

    async def drain(self) -> None:
        """Wait until the transport can take more."""

    async def recv(self) -> Message:
        """The next message, or raise ``LinkClosed``."""

    def close(self) -> None: ...

    @property
    def description(self) -> str: ...

    @property
    def kind(self) -> str:
        """``ssh``, ``quic`` or ``memory``: what the status line calls it."""
        ...


class MemoryLink:
    """One end of an in-process link pair (tests, the embedded relay)."""

    def __init__(self, name: str = "memory") -> None:
        self._q: asyncio.Queue[Message | None] = asyncio.Queue()
        self.peer: MemoryLink | None = None
        self.closed = False
        self._name = name

    @classmethod
    def pair(cls) -> tuple[MemoryLink, MemoryLink]:
        a, b = cls("memory-a"), cls("memory-b")
        a.peer, b.peer = b, a
        return a, b

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)
        await asyncio.sleep(0)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def send_nowait(self, msg: Message) -> None:
        if self.closed or self.peer is None or self.peer.closed:
            raise LinkClosed("link closed")
        self.peer._q.put_nowait(msg)

    async def recv(self) -> Message:
        if self.closed:
            raise LinkClosed("link closed")
        msg = await self._q.get()
        if msg is None:
            raise LinkClosed("peer closed the link")
        return msg

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._q.put_nowait(None)
            if self.peer is not None and not self.peer.closed:
                self.peer._q.put_nowait(None)

    @property
    def description(self) -> str:
        return self._name

    kind = "memory"
