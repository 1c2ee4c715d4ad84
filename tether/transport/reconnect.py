"""How the host reaches the relay: SSH bootstrap, QUIC when it can, SSH when it must.

The first connection is always SSH: it authenticates the relay (pinned host
key) and the host (its SSH key), and the relay's Welcome names its QUIC
endpoints and certificate fingerprint. From then on the host prefers QUIC.

When a link is needed (none yet, or the current one has gone quiet and is
kept beside), ``Connector.race`` tries every path at once and keeps trying,
each on its own clock, until one gets through: a QUIC handshake to every
endpoint address every ``PROBE_EVERY`` seconds, and the SSH channel, at once
where UDP is known to fail and after ``SSH_AFTER`` seconds of QUIC trying
otherwise. No attempt waits for another, so when the network returns the
next attempt (within a second) finds it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.core.errors import AuthError
from tether.core.messages import Joined, Welcome

from .link import Link, LinkClosed
from .openssh import RelayAddress, connect_host

if TYPE_CHECKING:  # QUIC (aioquic, x509) loads only once the SSH bootstrap has worked
    from .children import Started
    from .quic import QuicLink

log = logging.getLogger("tether.reconnect")

QUIC_TIMEOUT = 3.0
"""How long one QUIC handshake may take; attempts overlap (``PROBE_EVERY``)."""
PROBE_EVERY = 1.0
"""While racing, a new QUIC attempt to every endpoint address this often."""
SSH_AFTER = 3.0
"""Racing: seconds of QUIC attempts before the SSH channel is tried as well."""
SSH_EVERY = 2.0
"""Racing: a new SSH attempt this often (at most ``SSH_AT_ONCE`` in flight)."""
SSH_AT_ONCE = 3
UPGRADE_AFTER = 10.0
"""After QUIC failed (the SSH channel won), how long until QUIC is preferred again."""


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
    prestarted: Started | None = None
    """An ``ssh`` already started (``openssh.prestart_host``): the first SSH attempt's."""
    _probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def learn(self, welcome: Welcome | Joined) -> None:
        """Take the QUIC endpoints and fingerprint the relay announced over SSH
        (to a host in ``Welcome``, to a join client in ``Joined``)."""
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
        return self.quic_failed_at is None or time.monotonic() - self.quic_failed_at > UPGRADE_AFTER

    async def connect(self) -> Link:
        """The first path to get through (``race``)."""
        return await self.race()

    async def race(self) -> Link:
        """Try every path, each on its own clock, until one gets through.

        Runs until it returns a link (or raises ``AuthError`` where the relay
        refused us over SSH); the caller cancels it when it no longer needs one
        (its quiet link came back). Attempts still running are then cancelled
        and any link they made is closed."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        quic_ok = self.quic_preferred()
        ssh_at = start + (SSH_AFTER if quic_ok else 0.0)
        next_quic = start
        quic: set[asyncio.Task[Link]] = set()
        ssh: set[asyncio.Task[Link]] = set()
        winner: Link | None = None
        try:
            while winner is None:
                now = loop.time()
                if now >= next_quic:
                    next_quic = now + PROBE_EVERY  # QUIC may be preferred again by then
                    if self.quic is not None and self.quic_preferred():
                        quic.add(asyncio.create_task(self._quic_attempt()))
                if now >= ssh_at and len(ssh) < SSH_AT_ONCE:
                    if self.prestarted is not None:  # the first attempt takes it
                        attempt = connect_host(self.addr, started=self.prestarted)
                        self.prestarted = None
                    else:
                        attempt = connect_host(self.addr)
                    ssh.add(asyncio.create_task(attempt))
                    ssh_at = now + SSH_EVERY
                wake = next_quic if len(ssh) >= SSH_AT_ONCE else min(ssh_at, next_quic)
                timeout = max(wake - loop.time(), 0.0)
                if not quic and not ssh:  # every attempt failed: wait for the next
                    await asyncio.sleep(timeout)
                    continue
                done, _ = await asyncio.wait(
                    quic | ssh, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for t in done:
                    over_ssh = t in ssh
                    quic.discard(t)
                    ssh.discard(t)
                    try:
                        link = t.result()
                    except AuthError as exc:
                        if over_ssh:
                            raise  # the relay refused us (or its key changed)
                        self.last_error = self.cert_error = str(exc)
                    except (LinkClosed, OSError) as exc:
                        self.last_error = str(exc) or type(exc).__name__
                    else:
                        if winner is None:
                            winner = link
                        else:
                            link.close()
        finally:
            for t in quic | ssh:
                _discard(t)
        if winner.kind == "quic":
            self.quic_failed_at = None
        elif self.quic is not None:
            self.quic_failed_at = time.monotonic()
            log.info("QUIC unavailable (%s); using the SSH channel", self.last_error)
        return winner

    async def _quic_attempt(self) -> QuicLink:
        """One handshake to every endpoint address at once; the first wins."""
        link = await self._try_quic_once()
        if link is None:
            raise LinkClosed(self.last_error or "QUIC failed")
        return link

    async def try_quic(self) -> QuicLink | None:
        """On the SSH channel: one QUIC attempt (every address at once), to move."""
        async with self._probe_lock:
            winner = await self._try_quic_once()
            if winner is None:
                self.quic_failed_at = time.monotonic()
                log.info("QUIC unavailable (%s); using the SSH channel", self.last_error)
            else:
                self.quic_failed_at = None
            return winner

    async def _try_quic_once(self) -> QuicLink | None:
        """Every address of every endpoint at once; the first handshake wins."""
        assert self.quic is not None
        from .quic import connect_quic

        quic = self.quic
        targets: list[tuple[str, int]] = []
        loop = asyncio.get_running_loop()
        for host, port in quic.endpoints:
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
            return None
        attempts = [
            asyncio.create_task(connect_quic(h, p, quic.fingerprint, QUIC_TIMEOUT))
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
            # not awaited: a cancelled race must not wait here (nor swallow its
            # cancellation); each loser closes its link when it ends
            for t in attempts:
                if not t.done() or winner is None or t.cancelled() or t.exception() is not None:
                    _discard(t)
                elif t.result() is not winner:
                    t.result().close()
        return winner


def _discard(task: asyncio.Task[Any]) -> None:
    """Cancel an attempt, or close the link it made, whenever it makes one."""
    if task.done():
        _close_result(task)
    else:
        task.cancel()
        task.add_done_callback(_close_result)


def _close_result(task: asyncio.Task[Any]) -> None:
    """A finished attempt: close its link; its error, if any, is seen (no warning)."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()
