"""How the host reaches the relay: SSH bootstrap, QUIC when it can, SSH when it must.

The first connection is always SSH: it authenticates the relay (pinned host
key) and the host (its SSH key), and the relay's Welcome names its QUIC
endpoints and certificate fingerprint. From then on the host prefers QUIC,
trying every endpoint address at once and keeping the first to answer; where
UDP is blocked it falls back to the SSH channel, and probes QUIC now and then
to move back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether.core.errors import AuthError
from tether.core.messages import Welcome

from .link import Link, LinkClosed
from .openssh import RelayAddress, connect_host

if TYPE_CHECKING:  # QUIC (aioquic, x509) loads only once the SSH bootstrap has worked
    from .quic import QuicLink

log = logging.getLogger("tether.reconnect")

QUIC_TIMEOUT = 3.0
PROBE_EVERY = 10.0


@dataclass
class QuicInfo:
    endpoints: list[tuple[str, int]]
    fingerprint: str


@dataclass
class Connector:
    addr: RelayAddress
    use_quic: bool = True
    quic: QuicInfo | None = None
    quic_failed_at: float | None = None
    last_error: str = ""
    cert_error: str = ""
    """Set when a QUIC certificate did not match the pinned fingerprint."""
    _probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def learn(self, welcome: Welcome) -> None:
        """Take the QUIC endpoints and fingerprint the relay announced over SSH."""
        if not self.use_quic or not welcome.quic or not welcome.quic_fingerprint:
            return
        endpoints = []
        for ep in welcome.quic:
            host, _, port = ep.rpartition(":")
            if port.isdigit():
                endpoints.append((host.strip("[]") or self.addr.host, int(port)))
        if endpoints:
            self.quic = QuicInfo(endpoints, welcome.quic_fingerprint)

    def quic_preferred(self) -> bool:
        if self.quic is None:
            return False
        return self.quic_failed_at is None or time.monotonic() - self.quic_failed_at > PROBE_EVERY

    async def connect(self) -> Link:
        """QUIC if known and not failing, else the SSH channel."""
        if self.quic_preferred():
            link = await self.try_quic()
            if link is not None:
                return link
        return await connect_host(self.addr)

    async def try_quic(self) -> QuicLink | None:
        """Every address of every endpoint at once; the first handshake wins."""
        assert self.quic is not None
        from .quic import connect_quic

        async with self._probe_lock:
            targets: list[tuple[str, int]] = []
            loop = asyncio.get_running_loop()
            for host, port in self.quic.endpoints:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                except OSError as exc:
                    self.last_error = f"cannot resolve {host}: {exc}"
                    continue
                for info in infos:
                    target = (str(info[4][0]), port)
                    if target not in targets:
                        targets.append(target)
            if not targets:
                self.quic_failed_at = time.monotonic()
                return None
            attempts = [
                asyncio.create_task(connect_quic(h, p, self.quic.fingerprint, QUIC_TIMEOUT))
                for h, p in targets
            ]
            winner: QuicLink | None = None
            try:
                for fut in asyncio.as_completed(attempts):
                    try:
                        winner = await fut
                        break
                    except (LinkClosed, OSError) as exc:
                        self.last_error = str(exc)
                    except AuthError as exc:
                        self.last_error = self.cert_error = str(exc)
            finally:
                for t in attempts:
                    if not t.done():
                        t.cancel()
                    elif winner is not None and not t.cancelled() and t.exception() is None:
                        other = t.result()
                        if other is not winner:
                            other.close()
                for t in attempts:
                    with contextlib.suppress(BaseException):
                        await t
            if winner is None:
                self.quic_failed_at = time.monotonic()
                log.info("QUIC unavailable (%s); using the SSH channel", self.last_error)
            else:
                self.quic_failed_at = None
            return winner
