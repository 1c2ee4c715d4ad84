"""The host's bootstrap connection, through the system's OpenSSH client.

mosh's way: ``ssh`` authenticates the relay (pinned fingerprints, or
known_hosts) and the host (the user's keys or ssh-agent), and its subsystem
channel then carries replication as length-prefixed frames. The host never
imports an SSH library, which keeps ~170 ms of imports off every cold start,
and the user's agent and hardware-backed keys work as they do for ``ssh``.

``ssh`` runs with ``-F none`` and every option tether relies on spelled out,
so neither ~/.ssh/config nor /etc/ssh/ssh_config can weaken the check of the
relay's key. Paths are taken from ``$HOME`` (OpenSSH itself uses the passwd
entry), so tether's ``~`` means the same everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tether.core.errors import AuthError
from tether.core.protocol import HOST_USER, SUBSYSTEM
from tether.core.pubkeys import FINGERPRINT, check_public_key_lines

from .children import Piped, Started, attach, reap, spawn, start
from .link import LinkClosed, StreamLink

if TYPE_CHECKING:
    from collections.abc import Sequence

HOST_KEY_ALGORITHMS = "ssh-ed25519,rsa-sha2-512,rsa-sha2-256"
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
AUTHENTICATED = "Authenticated to "
RECEIVED = "tether: relay host key "
STDERR_LINES = 12
MAX_STDERR_LINE = 4096


@dataclass
class RelayAddress:
    host: str
    port: int = 22
    fingerprints: Sequence[str] = ()
    """Pinned ``SHA256:...`` fingerprints; empty means use known_hosts."""
    identities: Sequence[str] = ()
    """Private key files; empty means the user's default keys (and ssh-agent)."""
    known_hosts: str | None = None
    """known_hosts file when nothing is pinned (default ~/.ssh/known_hosts)."""
    fallback_identity: str | None = None
    """A key of tether's own (made if missing), offered after the user's keys."""
    user: str = HOST_USER
    """The login name: ``HOST_USER`` for a host, the session token for a join client."""


def load_public_keys(path: str) -> list[str]:
    """The key lines of an authorized_keys file, checked to hold only public keys.

    The one loader for host and relay: it checks the shape without a crypto
    library, so the host's start-up stays free of asyncssh; the relay parses the
    keys for real when it starts (``ssh.parse_public_keys``)."""
    with open(os.path.expanduser(path)) as f:
        return check_public_key_lines(f.readlines())


def make_identity(path: Path) -> Path:
    """tether's own key for a host without one (the relay only needs *a* key),
    made with ``ssh-keygen`` the first time."""
    if path.exists():
        return path
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tether-host", "-f", str(tmp)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    try:
        # two agents starting at once: the first link wins, and only the winner
        # writes the .pub, so the pair on disk always matches
        os.link(tmp, path)
    except FileExistsError:
        pass
    else:
        os.replace(f"{tmp}.pub", f"{path}.pub")
    finally:
        for leftover in (tmp, Path(f"{tmp}.pub")):
            leftover.unlink(missing_ok=True)
    return path


def _identities(addr: RelayAddress) -> list[str]:
    if addr.identities:
        paths = [os.path.expanduser(p) for p in addr.identities]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise AuthError(f"tether-identity {missing[0]}: no such file")
        return paths
    ssh_dir = Path.home() / ".ssh"
    found = [str(ssh_dir / n) for n in DEFAULT_KEYS if (ssh_dir / n).exists()]
    if addr.fallback_identity:
        # last: after the agent's keys and the user's, one of which a relay that
        # lists its hosts' keys may want; also what a key behind a passphrase
        # (which ssh cannot ask for here) falls back to
        found.append(str(make_identity(Path(addr.fallback_identity))))
    return found


def _pin_command(pins: Sequence[str]) -> str:
    """A KnownHostsCommand that vouches for the relay's key only if it is pinned.

    OpenSSH splits the command into words before it expands ``%f`` and friends,
    so a key's text cannot become shell code; the pins are checked to be
    fingerprints before they are put in.
    """
    for pin in pins:
        if not FINGERPRINT.fullmatch(pin):
            raise AuthError(f"not a SHA256 fingerprint: {pin!r}")
    pattern = "|".join(pins)
    script = (
        f'case "$0" in {pattern}) echo "* $1 $2";; '
        f'SHA256:*) echo "{RECEIVED}$0" >&2;; esac'
    )
    return f"/bin/sh -c '{script}' %f %t %K"


def ssh_command(addr: RelayAddress, timeout: float) -> list[str]:
    """The ``ssh`` command line that opens the relay's tether subsystem."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise LinkClosed("tether needs the OpenSSH client (`ssh`): install openssh-client")
    argv = [
        ssh, "-F", "none", "-T", "-x", "-a", "-s",
        "-p", str(addr.port), "-l", addr.user,
        "-o", "BatchMode=yes",
        "-o", "LogLevel=VERBOSE",
        "-o", f"ConnectTimeout={max(1, round(timeout))}",
        "-o", "ServerAliveInterval=10",
        "-o", "ServerAliveCountMax=3",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "ControlPath=none",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
    ]  # fmt: skip
    if addr.fingerprints:
        argv += [
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"HostKeyAlgorithms={HOST_KEY_ALGORITHMS}",
            "-o", f"KnownHostsCommand={_pin_command(addr.fingerprints)}",
        ]  # fmt: skip
    else:
        known = addr.known_hosts or str(Path.home() / ".ssh" / "known_hosts")
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(known)}"]
    if addr.identities:
        argv += ["-o", "IdentitiesOnly=yes"]
    for path in _identities(addr):
        argv += ["-i", path]
    return [*argv, "--", addr.host, SUBSYSTEM]


class _Stderr:
    """The last lines ``ssh`` printed, and whether it got as far as logging in."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.received: str | None = None
        self.authenticated = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # a line over the reader's limit: it is dropped
                    continue
                if not raw:
                    return
                line = raw[:MAX_STDERR_LINE].decode(errors="replace").strip()
                if line.startswith(RECEIVED):
                    self.received = line[len(RECEIVED) :]
                elif line.startswith(AUTHENTICATED):
                    self.authenticated.set()
                elif line:
                    self.lines.append(line)

    async def finished(self) -> None:
        """Until ssh's last words are in (bounded: they come as it exits)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), 1)

    def reason(self) -> str:
        """ssh's last complaint, without its routine chatter."""
        for line in reversed(self.lines):
            if not line.startswith(("Transferred:", "Bytes per second", "Warning:")):
                return line
        return "ssh exited"


def _failure(addr: RelayAddress, err: _Stderr) -> Exception:
    where = f"relay {addr.host}:{addr.port}"
    text = "\n".join(err.lines)
    if "Host key verification failed" in text:
        if addr.fingerprints:
            return AuthError(
                f"{where} host key fingerprint mismatch: expected "
                f"{' or '.join(sorted(addr.fingerprints))}, received {err.received or '?'}"
            )
        return AuthError(
            f"{where} host key is not in known_hosts (or has changed); pin it with "
            "`set -g tether-server-ed25519-fingerprint SHA256:...` in ~/.tether.conf"
        )
    if "Permission denied" in text:
        return AuthError(f"{where} refused our key ({err.reason()})")
    return LinkClosed(f"ssh: {err.reason()}")


class PipeLink(StreamLink):
    """Messages over an ``ssh`` process's standard input and output."""

    def __init__(self, ssh: Piped, err: _Stderr, description: str) -> None:
        super().__init__(ssh.stdout, ssh.stdin, description)
        self._ssh = ssh
        self._err = err

    async def _eof_reason(self) -> str:
        await self._err.finished()
        return f"connection closed by peer ({self._err.reason()})"

    def _close(self) -> None:
        _stop(self._ssh)


def _stop(ssh: Piped) -> None:
    """End ``ssh`` and reap it in the background."""
    ssh.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        ssh.proc.terminate()
    reap(ssh.proc)


def prestart_host(addr: RelayAddress, timeout: float = 6.0) -> Started | None:
    """Start ``ssh`` to the relay before any event loop runs, for ``connect_host``
    to take: the handshake is the longest part of a warm start, and goes on
    while the agent sets up. None if it cannot start (``connect_host`` says why)."""
    try:
        return start(ssh_command(addr, timeout))
    except Exception:  # e.g. no ssh, or ssh-keygen failing: connect_host reports it
        return None


async def connect_host(addr: RelayAddress, timeout: float = 6.0,
                       started: Started | None = None) -> PipeLink:
    """Run ``ssh`` to the relay's tether subsystem (or take ``started``, from
    ``prestart_host``); returns once ssh has logged in.

    Raises ``AuthError`` when either side's key is refused, ``LinkClosed`` when
    the relay cannot be reached (with ssh's own words).
    """
    argv = ssh_command(addr, timeout)
    try:
        if started is not None and started.argv == argv:
            ssh = await attach(started)
        else:
            if started is not None:
                started.discard()
            ssh = await spawn(argv)
    except OSError as exc:
        raise LinkClosed(f"cannot run ssh: {exc}") from None
    assert ssh.stderr is not None
    err = _Stderr(ssh.stderr)
    exited = asyncio.ensure_future(ssh.proc.wait())
    logged_in = asyncio.ensure_future(err.authenticated.wait())
    try:
        done, _ = await asyncio.wait(
            [exited, logged_in], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        exited.cancel()
        _stop(ssh)
        raise
    finally:
        logged_in.cancel()
    if logged_in in done or err.authenticated.is_set():
        exited.cancel()
        return PipeLink(ssh, err, f"ssh {addr.host}:{addr.port}")
    if exited not in done:
        exited.cancel()
        _stop(ssh)
        raise LinkClosed(f"ssh: relay {addr.host}:{addr.port} did not answer within {timeout:g} s")
    await err.finished()
    raise _failure(addr, err)
