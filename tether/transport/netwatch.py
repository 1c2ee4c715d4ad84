"""Changes of this machine's addresses and routes, heard from the kernel.

An idle host pings its relay only every ``PING_IDLE``; a move from Wi-Fi to a
mobile link would then go unnoticed until the next ping, and a mate's key
typed meanwhile would wait for it. rtnetlink tells us at once: any address or
route added or removed (a new lease, a lost link) calls ``on_change``, which
pings now, so QUIC moves the connection to the new path first.

Messages are not parsed: any of them is a reason to ping, and pinging is
cheap. Bursts (a new lease brings several) are coalesced into one call, and
calls are spaced by ``SETTLE`` at least. Link messages (``RTMGRP_LINK``) are
left out: wireless drivers send them for signal changes, many a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("tether.host")

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

SETTLE = 0.1
"""Seconds a burst of changes is gathered into one call."""
READS_PER_WAKE = 64
"""Datagrams read per readiness: a flood of changes cannot hold the loop."""


class NetWatch:
    """Calls ``on_change`` (on the loop) after the machine's addresses or routes change."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self._sock: socket.socket | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.changes = 0
        """Calls made so far (tests and logs)."""

    def start(self) -> bool:
        """Subscribe; False where rtnetlink is not available (not Linux, or a
        sandbox without it): the host then relies on its pings alone."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.NETLINK_ROUTE)
        except (OSError, AttributeError) as exc:
            log.info("not watching network changes: %s", exc)
            return False
        try:
            sock.bind((0, GROUPS))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except OSError as exc:
            sock.close()
            log.info("not watching network changes: %s", exc)
            return False
        self._sock = sock
        return True

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(READS_PER_WAKE):
            try:
                sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: changes were dropped; still a change
                break
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(SETTLE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.changes += 1
        self.on_change()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
