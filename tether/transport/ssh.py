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
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .link import LinkClosed, StreamLink
from .openssh import HOST_USER, SUBSYSTEM


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

    ERRORS = (asyncssh.Error, OSError)

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
        try:
            return await self.process.stdin.read(65536)
        except asyncssh.TerminalSizeChanged as exc:
            self.cols, self.rows = exc.width, exc.height
            return (exc.width, exc.height)
        except (asyncssh.Error, OSError):
            return b""

    def write(self, data: bytes) -> None:
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


class _RelaySSHServer(asyncssh.SSHServer):
    def __init__(self, key_check: KeyCheck | None, mate_keys: MateKeys | None) -> None:
        self._key_check = key_check
        self._mate_keys = mate_keys
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        _quick_acks(conn, True)

    def auth_completed(self) -> None:
        if self.conn is not None:
            _quick_acks(self.conn, False)

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
) -> asyncssh.SSHAcceptor:
    """Listen for hosts and mates; returns the acceptor (``get_port()``, ``close()``)."""

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
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
        lambda: _RelaySSHServer(key_check, mate_keys),
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
        login_timeout=30,
        reuse_address=True,
    )


async def wait_closed(acceptor: asyncssh.SSHAcceptor) -> None:
    acceptor.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(acceptor.wait_closed(), 5)
