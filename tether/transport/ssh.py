"""The relay's SSH front, on asyncssh.

Hosts reach it with the system's OpenSSH client (``tether.transport.openssh``)
and replicate over a ``tether`` subsystem channel as length-prefixed frames
(``SSHLink``).

The relay side refuses by default (asyncssh's habit): hosts must present a
public key as user ``tether-host``; everyone else is a mate whose user name is
a session token, needs no key, and is handed to the relay's mate callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.core.ratelimit import TokenBucket

from .link import MAX_UNSENT, LinkClosed, StreamLink
from .openssh import HOST_USER, SUBSYSTEM

log = logging.getLogger("tether.transport")


def _import_asyncssh() -> None:
    """Import asyncssh without its liboqs probe.

    At import, asyncssh looks for liboqs (for the sntrup761 key exchange) with
    ``ctypes.util.find_library``, which runs ``ldconfig`` and costs every tether
    process ~30 ms of start-up. tether's peers agree on mlkem768x25519 or
    curve25519 (from ``cryptography``), so the probe is skipped.
    """
    import ctypes.util

    real = ctypes.util.find_library
    ctypes.util.find_library = lambda name: None if name in ("oqs", "liboqs") else real(name)
    # X.509 certificates in SSH are unused by tether; asyncssh's support for them
    # imports cryptography.x509 and pyOpenSSL (~35 ms), and goes without them
    blocked = "asyncssh.crypto.x509"
    had = blocked in sys.modules
    if not had:
        sys.modules[blocked] = None  # type: ignore[assignment]
    try:
        import asyncssh  # noqa: F401
    finally:
        ctypes.util.find_library = real
        if not had and sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]


_import_asyncssh()
import asyncssh  # noqa: E402

KEY_TYPES = ("ssh-ed25519", "ssh-rsa")

# --- bounds on what a peer may make the SSH front hold --------------------------
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


# --- keys -----------------------------------------------------------------------


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint."""
    return key.get_fingerprint("sha256")


def load_or_create_host_keys(keys_dir: Path) -> list[asyncssh.SSHKey]:
    """The relay's host keys, created on first start (ed25519 and rsa)."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = []
    for alg, name in (("ssh-ed25519", "ssh_host_ed25519_key"), ("ssh-rsa", "ssh_host_rsa_key")):
        path = keys_dir / name
        if path.exists():
            key = asyncssh.read_private_key(str(path))
        else:
            key = (
                asyncssh.generate_private_key(alg, key_size=3072)
                if alg == "ssh-rsa"
                else (asyncssh.generate_private_key(alg))
            )
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
            os.replace(tmp, path)
            (keys_dir / (name + ".pub")).write_bytes(key.export_public_key())
        keys.append(key)
    return keys


def key_option_name(key: asyncssh.SSHKey) -> str:
    """The ``~/.tether.conf`` option that pins this kind of key."""
    alg = key.get_algorithm()
    short = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(alg, alg.replace("ssh-", ""))
    return f"tether-server-{short}-fingerprint"


# --- framed link over an SSH channel ---------------------------------------------


class SSHLink(StreamLink):
    """Messages over an SSH channel's byte stream."""

    # a break, signal or resize on a host's channel is not tether's protocol
    ERRORS = (asyncssh.Error, OSError, asyncssh.BreakReceived, asyncssh.SignalReceived,
              asyncssh.TerminalSizeChanged)

    def __init__(
        self,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        description: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(reader, writer, description)
        self._on_close = on_close

    def _closing(self) -> bool:
        return bool(self._writer.channel.is_closing())

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.channel.close()
        if self._on_close is not None:
            self._on_close()

    def _unsent(self) -> int:
        # the channel's own buffer (the peer's window is full), then the socket's:
        # asyncssh never pauses for the latter, so a peer that opens a huge window
        # and stops reading TCP would otherwise grow it without end
        chan = self._writer.channel
        return int(chan.get_write_buffer_size()) + _socket_backlog(chan.get_connection())

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.channel.get_connection().abort()
        if self._on_close is not None:
            self._on_close()


def _socket_backlog(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> int:
    """Bytes an SSH connection has written that its socket has not sent yet."""
    transport = getattr(conn, "_transport", None)  # asyncssh keeps it private
    return int(transport.get_write_buffer_size()) if transport is not None else 0


# --- relay side: the SSH front ------------------------------------------------------


@dataclass
class MateTerminal:
    """What the relay needs of a mate's SSH session, independent of asyncssh."""

    username: str
    peer: str
    term: str
    cols: int
    rows: int
    process: asyncssh.SSHServerProcess[bytes]

    async def read(self) -> bytes | tuple[int, int]:
        """Typed bytes, a new ``(cols, rows)`` on resize, or b'' at the end."""
        while True:
            try:
                return await self.process.stdin.read(65536)
            except asyncssh.TerminalSizeChanged as exc:
                self.cols, self.rows = exc.width, exc.height
                return (exc.width, exc.height)
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue  # nothing to do with them; they must not end the reader
            except (asyncssh.Error, OSError):
                return b""

    def write(self, data: bytes) -> None:
        chan = self.process.channel
        conn = chan.get_connection()
        unsent = chan.get_write_buffer_size() + _socket_backlog(conn)
        if unsent + len(data) > MAX_UNSENT:
            # drain() waits only for the SSH window: a client that grants a huge
            # one and stops reading TCP is cut off here
            log.warning("mate %s: has not taken %d bytes sent to it; disconnected",
                        self.peer, unsent)
            conn.abort()
            return
        with contextlib.suppress(OSError, asyncssh.Error):  # the mate is gone
            self.process.stdout.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(Exception):
            await self.process.stdout.drain()

    def exit(self, status: int = 0) -> None:
        with contextlib.suppress(Exception):
            self.process.exit(status)


def parse_public_keys(lines: Sequence[str], limit: int = 256) -> set[bytes]:
    """Public key blobs from authorized_keys-style lines (options are not supported)."""
    keys: set[bytes] = set()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(keys) >= limit:
            raise ValueError(f"more than {limit} keys")
        try:
            keys.add(asyncssh.import_public_key(line).public_data)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"not a public key: {line[:40]}... ({exc})") from None
    return keys


def load_public_keys(path: str) -> list[str]:
    """Lines of an authorized_keys file, checked to hold only public keys."""
    with open(os.path.expanduser(path)) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    parse_public_keys(lines)
    return lines


HostHandler = Callable[[SSHLink, str, str], Awaitable[None]]
"""(link, host key fingerprint, peer address)"""
MateHandler = Callable[[MateTerminal], Awaitable[None]]
KeyCheck = Callable[[asyncssh.SSHKey], bool]
MateKeys = Callable[[str], set[bytes] | None]
"""token -> the public keys its session requires of mates (None: no key needed)."""


def _quick_acks(conn: asyncssh.SSHServerConnection, on: bool) -> None:
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


class _Admission:
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


_HOOKED_REQUESTS = ("window_change", "signal", "break")


def _check_asyncssh() -> None:
    """The request bounds hook asyncssh's per-request handlers (it has no public
    hook); refuse to serve, rather than serve unbounded, if a release renamed them."""
    for name in ("env", *_HOOKED_REQUESTS):
        if not hasattr(asyncssh.SSHServerChannel, f"_process_{name}_request"):
            raise RuntimeError(f"asyncssh {asyncssh.__version__} has no {name} request "
                               "handler to bound; tether needs a compatible asyncssh")


class _RelaySSHServer(asyncssh.SSHServer):
    def __init__(
        self,
        key_check: KeyCheck | None,
        mate_keys: MateKeys | None,
        admission: _Admission,
        idle_timeout: float,
    ) -> None:
        self._key_check = key_check
        self._mate_keys = mate_keys
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
        _quick_acks(conn, True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._counted is not None:
            self._admission.release(self._counted)
            self._counted = None

    def auth_completed(self) -> None:
        if self.conn is not None:
            _quick_acks(self.conn, False)
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
            for name in _HOOKED_REQUESTS:
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

    def begin_auth(self, username: str) -> bool:
        # Mates need no key unless the host listed some: the token is the credential.
        if username == HOST_USER:
            return True
        return bool(self._mate_keys and self._mate_keys(username))

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if username != HOST_USER:
            allowed = self._mate_keys(username) if self._mate_keys else None
            return bool(allowed) and key.public_data in allowed  # type: ignore[operator]
        if self._key_check is not None and not self._key_check(key):
            return False
        if self.conn is not None:
            self.conn.set_extra_info(tether_host_key=fingerprint(key))
        return True

    def password_auth_supported(self) -> bool:
        return False


async def start_ssh_server(
    bind: str,
    port: int,
    host_keys: Sequence[asyncssh.SSHKey],
    on_host: HostHandler,
    on_mate: MateHandler,
    key_check: KeyCheck | None = None,
    mate_keys: MateKeys | None = None,
    *,
    max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = SESSION_IDLE_TIMEOUT,
    login_timeout: float = 30.0,
) -> asyncssh.SSHAcceptor:
    """Listen for hosts and mates; returns the acceptor (``get_port()``, ``close()``).

    ``max_per_address`` (``MAX_CONNECTIONS_PER_ADDRESS``) and ``max_connections``
    (``MAX_CONNECTIONS``) bound concurrent connections; ``idle_timeout``
    (``SESSION_IDLE_TIMEOUT``) disconnects a logged-in connection that runs no
    session, ``login_timeout`` one that does not log in.
    """
    _check_asyncssh()
    admission = _Admission(max_per_address, max_connections)

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        owner = process.channel.get_connection().get_owner()
        server = owner if isinstance(owner, _RelaySSHServer) else None
        if server is not None:
            server.session_began()
        try:
            await _serve(process)
        finally:
            if server is not None:
                server.session_ended()

    async def _serve(process: asyncssh.SSHServerProcess[bytes]) -> None:
        user = process.get_extra_info("username") or ""
        peer = process.get_extra_info("peername") or ("?", 0)
        peer_s = f"{peer[0]}:{peer[1]}"
        try:
            if user == HOST_USER:
                if process.subsystem != SUBSYSTEM:
                    process.stderr.write(b"this account only speaks the tether protocol\r\n")
                    process.exit(1)
                    return
                link = SSHLink(process.stdin, process.stdout, f"ssh {peer_s}")
                await on_host(link, process.get_extra_info("tether_host_key") or "", peer_s)
                link.close()
                process.exit(0)
                return
            term = process.get_terminal_type()
            cols, rows, _, _ = process.get_terminal_size()
            mate = MateTerminal(user, peer_s, term or "", cols, rows, process)
            await on_mate(mate)
        except (asyncssh.Error, OSError, LinkClosed):
            pass
        finally:
            with contextlib.suppress(Exception):
                process.exit(0)

    return await asyncssh.create_server(
        lambda: _RelaySSHServer(key_check, mate_keys, admission, idle_timeout),
        bind or None,
        port,
        server_host_keys=list(host_keys),
        process_factory=handle,
        encoding=None,
        line_editor=False,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_pty=True,
        keepalive_interval=15,
        keepalive_count_max=4,
        login_timeout=login_timeout,
        reuse_address=True,
    )


async def wait_closed(acceptor: asyncssh.SSHAcceptor) -> None:
    acceptor.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(acceptor.wait_closed(), 5)
