"""The SSH front's bounds on what one peer may make the relay hold.

Anyone may connect and log in as a mate (the token is checked once the session
starts), so every resource a connection can take is bounded before that:
connections per address and in all, channels per connection, ``env`` and other
channel requests, and the time a logged-in connection may run no session.
``tether.transport.ssh`` adds authentication and the sessions themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from tether.core.ratelimit import TokenBucket

from .sshlib import asyncssh

log = logging.getLogger("tether.transport")

# Anyone may connect and log in as a mate (any user name: the token is checked
# once the session starts), so nothing a connection can pile up may wait for a token.

MAX_CONNECTIONS_PER_ADDRESS = 32
"""Concurrent connections from one IPv4 address (or IPv6 /64). The host's agent
holds one or two, a mate one per terminal: a classroom behind one NAT fits, one
machine cannot hold the relay's memory or descriptors with thousands."""
MAX_CONNECTIONS = 4096
"""Concurrent connections in all. A full relay (``max_sessions`` 1000, each with
its host and a mate or two) stays under it; a swarm of addresses hits it before
the process's descriptors or memory run out."""
SESSION_IDLE_TIMEOUT = 30.0
"""Seconds a logged-in connection may go without a running session (its host
subsystem or mate terminal) before it is disconnected: OpenSSH starts its session
within a round trip of logging in, so only an idle or hostile client waits longer.
``login_timeout`` covers the time before login."""
MAX_CHANNELS = 8
"""Channels open at once on one connection: OpenSSH opens one per session (a few
with connection sharing); each costs the relay its buffers."""
MAX_ENV_REQUESTS = 64
"""``env`` requests one connection may send. tether passes no environment on (the
terminal type comes with the pty request), so every one is refused and none is
stored; past this many the client is flooding and is disconnected. OpenSSH sends
one per ``SendEnv`` match (Debian's default: LANG and LC_*)."""
REQUEST_BURST = 256
REQUEST_RATE = 32.0
"""Window-change, signal and break requests a channel may send in a burst, and per
second after it. asyncssh queues each one for the session's reader, also before
the session starts (nobody reads then): unbounded, a client could queue millions.
Dragging a terminal's corner sends tens a second, for a moment."""


def quick_acks(conn: asyncssh.SSHServerConnection, on: bool) -> None:
    """ACK a client's every packet at once until it has logged in.

    OpenSSH leaves Nagle on until its session starts and sends handshake
    messages in pairs (KEXINIT then ECDH_INIT, NEWKEYS then SERVICE_REQUEST):
    the second waits for our ACK of the first, which Linux delays by 40 ms.
    TCP_QUICKACK does not stick, so it is re-armed after every read. Saves
    each host's connect ~80 ms.
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    sock = conn.get_extra_info("socket")
    if quickack is None or sock is None:
        return
    if not on:
        conn.__dict__.pop("data_received", None)
        return
    received = conn.data_received

    def data_received(data: bytes, datatype: int | None = None) -> None:
        received(data, datatype)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
    conn.data_received = data_received  # type: ignore[method-assign]


_IGNORE = 2  # SSH_MSG_IGNORE
_EMPTY = b"\0\0\0\0"  # an SSH string of no bytes


def no_ignore_packets(conn: asyncssh.SSHServerConnection) -> None:
    """Send no empty ``SSH_MSG_IGNORE`` before every packet, as asyncssh does.

    That is RFC 4251's counter to a chosen-plaintext attack on CBC ciphers,
    whose next IV an attacker can predict; the relay offers none (AES-GCM and
    AES-CTR with SHA-2 MACs only, ``tether.transport.ssh.CIPHERS``), and an
    empty packet of a fixed size hides nothing from traffic analysis. Without
    it every echo a mate gets is one SSH packet, one ``send`` and one TCP
    segment, not two of each.
    """
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _IGNORE and args == (_EMPTY,):
            return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet  # type: ignore[method-assign]


def address_key(address: str) -> str:
    """What per-address limits count by: an IPv4 address (also when IPv4-mapped),
    or an IPv6 address's /64, which one subscriber usually has whole."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Admission:
    """Counts the SSH front's open connections, per address and in all."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self.count = 0
        self.by_address: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """Count a new connection from ``key``; or say why it is refused."""
        if self.by_address.get(key, 0) >= self.per_address:
            return f"too many connections from your address (at most {self.per_address})"
        if self.count >= self.total:
            return f"this relay has too many connections (at most {self.total})"
        self.count += 1
        self.by_address[key] = self.by_address.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        self.count -= 1
        left = self.by_address.pop(key, 1) - 1
        if left > 0:
            self.by_address[key] = left


HOOKED_REQUESTS = ("window_change", "signal", "break")


def check_asyncssh() -> None:
    """The request bounds hook asyncssh's per-request handlers (it has no public
    hook); refuse to serve, rather than serve unbounded, if a release renamed them."""
    for name in ("env", *HOOKED_REQUESTS):
        if not hasattr(asyncssh.SSHServerChannel, f"_process_{name}_request"):
            raise RuntimeError(f"asyncssh {asyncssh.__version__} has no {name} request "
                               "handler to bound; tether needs a compatible asyncssh")


class BoundedServer(asyncssh.SSHServer):
    """An SSH server connection with the front's per-peer bounds: admission by
    address and in all, at most ``MAX_CHANNELS`` channels, ``env`` and channel
    requests counted, and a timer for a logged-in connection that runs no session.

    Subclasses add authentication; the process factory calls ``session_began``
    and ``session_ended`` around each session.
    """

    def __init__(self, admission: Admission, idle_timeout: float) -> None:
        self._admission = admission
        self._idle_timeout = idle_timeout
        self.conn: asyncssh.SSHServerConnection | None = None
        self._counted: str | None = None
        self._peer = "?"
        self._channels = 0
        self._sessions = 0
        self._idle: asyncio.TimerHandle | None = None
        self._env_requests = 0
        self._leaving = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self._peer = f"{peer[0]}:{peer[1]}"
        key = address_key(str(peer[0]))
        refusal = self._admission.admit(key)
        if refusal is not None:
            log.warning("ssh %s: refused: %s", self._peer, refusal)
            # after asyncssh has sent its version line, so the client can read why
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, refusal
            )
            return
        self._counted = key
        self._hook_channels(conn)
        quick_acks(conn, True)
        no_ignore_packets(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._counted is not None:
            self._admission.release(self._counted)
            self._counted = None

    def auth_completed(self) -> None:
        if self.conn is not None:
            quick_acks(self.conn, False)
            self._arm_idle()

    # --- sessions, channels and their requests ------------------------------------

    def session_began(self) -> None:
        self._sessions += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def session_ended(self) -> None:
        self._sessions -= 1
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self._sessions == 0 and self._idle is None and not self._leaving:
            self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._idled)

    def _idled(self) -> None:
        self._idle = None
        if self._sessions == 0:
            self._disconnect(f"no session started within {self._idle_timeout:g} s")

    def _disconnect(self, why: str) -> None:
        if self._counted is None or self._leaving:
            return  # refused, or already on its way out
        self._leaving = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        log.warning("ssh %s: %s; disconnected", self._peer, why)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, why)

    def _hook_channels(self, conn: asyncssh.SSHServerConnection) -> None:
        """Bound the channels of ``conn`` and the requests each may queue."""
        create, add, remove = conn.create_server_channel, conn.add_channel, conn.remove_channel

        def create_channel(*args: Any, **kwargs: Any) -> asyncssh.SSHServerChannel[Any]:
            if self._channels >= MAX_CHANNELS:
                log.warning("ssh %s: more than %d channels refused", self._peer, MAX_CHANNELS)
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_RESOURCE_SHORTAGE, f"at most {MAX_CHANNELS} channels"
                )
            chan = create(*args, **kwargs)
            chan._process_env_request = self._env_request  # type: ignore[method-assign]
            bucket = TokenBucket(REQUEST_RATE, REQUEST_BURST, time.monotonic())
            for name in HOOKED_REQUESTS:
                attr = f"_process_{name}_request"
                setattr(chan, attr, self._rate_limited(getattr(chan, attr), bucket))
            return chan

        def add_channel(chan: Any) -> int:
            number = add(chan)
            self._channels += 1
            return number

        def remove_channel(number: int) -> None:
            self._channels -= 1
            remove(number)

        conn.create_server_channel = create_channel  # type: ignore[method-assign]
        conn.add_channel = add_channel  # type: ignore[method-assign]
        conn.remove_channel = remove_channel  # type: ignore[method-assign]

    def _env_request(self, packet: object) -> bool:
        self._env_requests += 1
        if self._env_requests == MAX_ENV_REQUESTS + 1:
            self._disconnect(f"more than {MAX_ENV_REQUESTS} env requests")
        return False  # refused, and nothing stored

    def _rate_limited(
        self, handler: Callable[[Any], bool], bucket: TokenBucket
    ) -> Callable[[Any], bool]:
        def bounded(packet: Any) -> bool:
            if bucket.take(1, time.monotonic()):
                self._disconnect("channel requests faster than "
                                 f"{REQUEST_RATE:g}/s after a burst of {REQUEST_BURST}")
                return False
            return handler(packet)

        return bounded
