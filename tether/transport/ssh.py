"""The relay's SSH front, on asyncssh.

Hosts reach it with the system's OpenSSH client (``tether.transport.openssh``)
and replicate over a ``tether`` subsystem channel as length-prefixed frames
(``SSHLink``).

The relay side refuses by default (asyncssh's habit): hosts must present a
public key as user ``tether-host``; everyone else is a mate whose user name is
a session token, needs no key, and is handed to the relay's mate callback.
What one peer may make the front hold is bounded in ``ssh_bounds`` (its
constants are importable from here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tether.core.protocol import HOST_USER, SUBSYSTEM

from .link import MAX_UNSENT, LinkClosed, StreamLink
from .ssh_bounds import MAX_CHANNELS as MAX_CHANNELS
from .ssh_bounds import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    SESSION_IDLE_TIMEOUT,
    Admission,
    BoundedServer,
    check_asyncssh,
)
from .ssh_bounds import MAX_ENV_REQUESTS as MAX_ENV_REQUESTS
from .ssh_bounds import REQUEST_BURST as REQUEST_BURST
from .ssh_bounds import REQUEST_RATE as REQUEST_RATE
from .ssh_bounds import address_key as address_key
from .sshlib import asyncssh

log = logging.getLogger("tether.transport")

KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr",
           "aes256-ctr")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256",
        "hmac-sha2-512")
"""What the relay offers: AES (GCM, or CTR with SHA-2 MACs), which every SSH
client has. An SSH client takes the first cipher of its own list that the
server offers, and OpenSSH lists chacha20-poly1305 first: asyncssh computes
that in Python-level steps, 12-13 us a packet each way against 2-3 us for AES
here, and every keystroke and screen update is a packet. umac (4-5 us) is left
out for the same reason, SHA-1 and CBC because they are weak."""

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


def key_digest(public_data: bytes) -> bytes:
    """A public key blob's SHA-256: how a front process learns a session's mate
    keys (256 RSA keys as blobs would not fit one of its messages)."""
    return hashlib.sha256(public_data).digest()


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
        fingerprint: str = "",
    ) -> None:
        super().__init__(reader, writer, description)
        self._on_close = on_close
        self.fingerprint = fingerprint
        """A join client's key (``SHA256:...``), if the session asked for one."""

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
    fingerprint: str = ""
    """``SHA256:...`` of the key the mate authenticated with (none: no key asked)."""
    kind: str = "ssh"

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

    def backlog(self) -> int:
        try:
            return int(self.process.channel.get_write_buffer_size())
        except Exception:
            return 0

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


HostHandler = Callable[[SSHLink, str, str], Awaitable[None]]
"""(link, host key fingerprint, peer address)"""
MateHandler = Callable[[MateTerminal], Awaitable[None]]
JoinHandler = Callable[[SSHLink, str, str], Awaitable[None]]
"""(link, token, peer address): a join client's ``tether`` subsystem"""
KeyCheck = Callable[[asyncssh.SSHKey], bool]
MateKeys = Callable[[str], set[bytes] | None]
"""token -> the public keys its session requires of mates (None: no key needed)."""
FetchMateKeys = Callable[[str], Awaitable[set[bytes] | None]]
"""The same as digests (``key_digest``), asked of the relay's process by an SSH
front process; an empty set: keys required and none known (fails closed)."""


class _RelaySSHServer(BoundedServer):
    """Authentication: hosts by key as ``HOST_USER``; mates by the token in their
    user name, and by key only if the host listed mates' keys."""

    def __init__(
        self,
        key_check: KeyCheck | None,
        mate_keys: MateKeys | None,
        admission: Admission,
        idle_timeout: float,
        fetch_mate_keys: FetchMateKeys | None = None,
    ) -> None:
        super().__init__(admission, idle_timeout)
        self._key_check = key_check
        self._mate_keys = mate_keys
        self._fetch = fetch_mate_keys
        self._fetched: tuple[str, set[bytes] | None] = ("", None)

    def begin_auth(self, username: str) -> bool | Awaitable[bool]:
        # Mates need no key unless the host listed some: the token is the credential.
        if username == HOST_USER:
            return True
        if self._fetch is not None:  # asyncssh awaits it
            return self._fetch_keys(username)
        return bool(self._mate_keys and self._mate_keys(username))

    async def _fetch_keys(self, username: str) -> bool:
        """Ask the relay's own process what the session of ``username`` requires
        (a front process holds no sessions): the keys' digests, kept for
        ``validate_public_key``. An empty set (no answer in time) requires a
        key that none can be: the login fails closed."""
        assert self._fetch is not None
        keys = await self._fetch(username)
        self._fetched = (username, keys)
        return keys is not None

    def _allowed(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self._fetch is not None:
            name, digests = self._fetched
            return name == username and bool(digests) and (
                key_digest(key.public_data) in digests)  # type: ignore[operator]
        allowed = self._mate_keys(username) if self._mate_keys else None
        return bool(allowed) and key.public_data in allowed  # type: ignore[operator]

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if username != HOST_USER:
            ok = self._allowed(username, key)
            if ok and self.conn is not None:
                # asyncssh validates the key again just before checking its
                # signature: the last one set is the key the mate proved
                self.conn.set_extra_info(tether_mate_key=fingerprint(key))
            return ok
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
    on_join: JoinHandler | None = None,
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
    check_asyncssh()
    admission = Admission(max_per_address, max_connections)
    return await asyncssh.create_server(
        lambda: _RelaySSHServer(key_check, mate_keys, admission, idle_timeout),
        bind or None,
        port,
        **_options(host_keys, on_host, on_mate, on_join, login_timeout),
        reuse_address=True,
    )


def _options(
    host_keys: Sequence[asyncssh.SSHKey],
    on_host: HostHandler,
    on_mate: MateHandler,
    on_join: JoinHandler | None,
    login_timeout: float,
) -> dict[str, object]:
    """The server's options: what it serves and the SSH features it refuses."""

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        await _session(process, on_host, on_mate, on_join)

    return {
        "server_host_keys": list(host_keys),
        "encryption_algs": list(CIPHERS),
        "mac_algs": list(MACS),
        "process_factory": handle,
        "encoding": None,
        "line_editor": False,
        "allow_scp": False,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_pty": True,
        "keepalive_interval": 15,
        "keepalive_count_max": 4,
        "login_timeout": login_timeout,
    }


async def serve_connection(
    sock: socket.socket,
    host_keys: Sequence[asyncssh.SSHKey],
    on_host: HostHandler,
    on_mate: MateHandler,
    admission: Admission,
    key_check: KeyCheck | None = None,
    fetch_mate_keys: FetchMateKeys | None = None,
    on_join: JoinHandler | None = None,
    *,
    idle_timeout: float = SESSION_IDLE_TIMEOUT,
    login_timeout: float = 30.0,
) -> None:
    """Serve one connection another process accepted (and counted: ``admission``
    admits or refuses it as that process decided). Returns once it logged in;
    raises if it did not."""
    check_asyncssh()
    await asyncssh.run_server(
        sock,
        server_factory=lambda: _RelaySSHServer(
            key_check, None, admission, idle_timeout, fetch_mate_keys),
        **_options(host_keys, on_host, on_mate, on_join, login_timeout),
    )


SPLICE_STALL = 60.0
"""How long a spliced channel's peer may leave its window shut with bytes
waiting: past it the connection is dropped (its reader is gone, and the
relay's end would otherwise wait on it for ever)."""


async def splice(link: SSHLink, sock: socket.socket) -> None:
    """Bytes both ways between an SSH channel and a local stream socket, until
    the socket's far end closes (the SSH side's end is passed on as EOF).

    An SSH front process hands a host's or a join client's channel to the
    relay's own process like this: the frames are read and bounded there."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)

    async def up() -> None:
        with contextlib.suppress(*SSHLink.ERRORS):
            while data := await link._reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    upward = asyncio.create_task(up())
    try:
        with contextlib.suppress(*SSHLink.ERRORS):
            while data := await reader.read(65536):
                if link._unsent() + len(data) > MAX_UNSENT:
                    log.warning("%s: has not taken %d bytes sent to it; disconnected",
                                link.description, link._unsent())
                    link._abort()
                    return
                link._writer.write(data)
                try:  # paced by the peer's window, as the relay's own link was
                    await asyncio.wait_for(link._writer.drain(), SPLICE_STALL)
                except TimeoutError:
                    log.warning("%s: took nothing sent to it for %g s; disconnected",
                                link.description, SPLICE_STALL)
                    link._abort()
                    return
    finally:
        upward.cancel()
        writer.close()


async def _session(
    process: asyncssh.SSHServerProcess[bytes],
    on_host: HostHandler,
    on_mate: MateHandler,
    on_join: JoinHandler | None = None,
) -> None:
    """One SSH session, counted by its connection's idle timer while it runs."""
    owner = process.channel.get_connection().get_owner()
    server = owner if isinstance(owner, BoundedServer) else None
    if server is not None:
        server.session_began()
    try:
        await _serve(process, on_host, on_mate, on_join)
    finally:
        if server is not None:
            server.session_ended()


async def _serve(
    process: asyncssh.SSHServerProcess[bytes],
    on_host: HostHandler,
    on_mate: MateHandler,
    on_join: JoinHandler | None = None,
) -> None:
    """Hand a host's ``tether`` subsystem to ``on_host``, a join client's (its
    login name a token) to ``on_join``, a mate's terminal to ``on_mate``."""
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
        mate_key = process.get_extra_info("tether_mate_key") or ""
        if process.subsystem == SUBSYSTEM and on_join is not None:
            link = SSHLink(process.stdin, process.stdout, f"ssh {peer_s}",
                           fingerprint=mate_key)
            await on_join(link, user, peer_s)
            link.close()
            process.exit(0)
            return
        if process.subsystem is not None:
            process.stderr.write(b"unknown subsystem\r\n")
            process.exit(1)
            return
        term = process.get_terminal_type()
        cols, rows, _, _ = process.get_terminal_size()
        mate = MateTerminal(user, peer_s, term or "", cols, rows, process, mate_key)
        await on_mate(mate)
    except (asyncssh.Error, OSError, LinkClosed):
        pass
    finally:
        with contextlib.suppress(Exception):
            process.exit(0)


async def wait_closed(acceptor: asyncssh.SSHAcceptor) -> None:
    acceptor.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(acceptor.wait_closed(), 5)
