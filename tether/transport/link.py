"""The small interface replication runs over, so SSH or QUIC can carry it."""

from __future__ import annotations

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
