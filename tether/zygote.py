"""A warm start for host agents: a per-user process that forks them ready-made.

Importing an agent (asyncio, asyncssh, cryptography, aioquic) costs a Python
process ~0.35 s of CPU, which is most of what `tether new-session` waits for.
After a first session is shared, its agent starts this *zygote*: a process
that imports everything once and then forks one agent per later
`tether new-session`, so a second session starts without any imports. Forked
agents also share the imported code's memory with the zygote (copy on write).

The zygote listens on an abstract unix socket named after the user, the state
directory and this tether install; both ends check with ``SO_PEERCRED`` that
the other is the same user, so nobody else can start or impersonate it. It
holds no session state and leaves as soon as no agent of it (nor the agent
that started it) is alive, so an idle user runs no tether process. Whatever
goes wrong, the CLI falls back to starting the agent as a new process.

Wire format of a request (one ``SOCK_SEQPACKET`` message, NUL-separated
UTF-8 fields): ``tether-zygote-1``, cwd, umask, the number of agent
arguments, the arguments, then ``KEY=VALUE`` environment entries; with it, two
file descriptors: the agent's stdin and its log. The reply is the agent's pid
in ASCII, or nothing if it could not be started.
"""

from __future__ import annotations

import array
import gc
import os
import select
import socket
import struct
import sys
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAGIC = "tether-zygote-1"
MAX_REQUEST = 256 * 1024
"""Largest request: the agent's arguments and environment."""
MAX_AGENTS = 256
"""Agents one zygote keeps track of; beyond, the CLI starts its own."""
CONNECT_TIMEOUT = 2.0

def address(state: Path) -> bytes:
    """The zygote's abstract socket name for this user, state directory and install."""
    import tether

    key = "\0".join(
        (str(state.resolve()), sys.executable, os.path.dirname(tether.__file__), tether.__version__)
    )
    digest = _sha256(key.encode()).hexdigest()[:24]
    return f"\0tether-zygote-{os.getuid()}-{digest}".encode()


def _sha256(data: bytes) -> Any:
    """SHA-256 without hashlib, whose OpenSSL loading costs the CLI ~5 ms."""
    try:
        from _sha256 import sha256  # CPython 3.11 (3.12+: _sha2)
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[no-redef]
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# --- the CLI's side ----------------------------------------------------------------


def request_agent(
    state: Path, argv: list[str], env: dict[str, str], stdin_fd: int, log_fd: int
) -> int | None:
    """Ask a running zygote to fork an agent; its pid, or None (start one yourself)."""
    fields = [MAGIC, os.getcwd(), str(_umask()), str(len(argv)), *argv]
    fields += [f"{k}={v}" for k, v in env.items() if "\0" not in k + v and "=" not in k]
    payload = "\0".join(fields).encode("utf-8", "surrogateescape")
    if len(payload) > MAX_REQUEST:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(address(state))
            if _peer_uid(s) != os.getuid():
                return None  # someone else holds the name: never hand them our fds
            fds = array.array("i", [stdin_fd, log_fd])
            s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            reply = s.recv(32)
    except OSError:
        return None
    return int(reply) if reply.isdigit() else None


def _umask() -> int:
    mask = os.umask(0o77)
    os.umask(mask)
    return mask


# --- the zygote ---------------------------------------------------------------------


class _Request:
    def __init__(self, data: bytes, fds: list[int]) -> None:
        fields = data.decode("utf-8", "surrogateescape").split("\0")
        if len(fds) != 2 or len(fields) < 4 or fields[0] != MAGIC:
            raise ValueError("not a tether zygote request")
        self.cwd = fields[1]
        self.umask = int(fields[2], 10) & 0o777
        n = int(fields[3], 10)
        if not 0 <= n <= len(fields) - 4:
            raise ValueError("bad argument count")
        self.argv = fields[4 : 4 + n]
        self.env = dict(f.split("=", 1) for f in fields[4 + n :] if "=" in f)
        self.stdin_fd, self.log_fd = fds


def _receive(conn: socket.socket) -> _Request:
    fd_size = array.array("i").itemsize
    data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(2 * fd_size))
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % fd_size])
            fds += list(arr)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_REQUEST:
            raise ValueError("request too large")
        return _Request(data, fds)
    except (ValueError, UnicodeDecodeError):
        for fd in fds:
            os.close(fd)
        raise


def _become_agent(req: _Request, keep: list[int]) -> None:
    """In the forked child: take the request's stdio, cwd and env, run the agent, exit."""
    code = 1
    try:
        for fd in keep:
            os.close(fd)
        os.setsid()
        os.dup2(req.stdin_fd, 0)
        os.dup2(req.log_fd, 1)
        os.dup2(req.log_fd, 2)
        os.close(req.stdin_fd)
        os.close(req.log_fd)
        os.umask(req.umask)
        os.chdir(req.cwd)
        os.environ.clear()
        os.environ.update(req.env)
        from tether.agent import main

        code = main(req.argv, forked=True)
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def serve(state: Path, watch: int | None) -> int:
    """Listen until no agent of ours is alive; 0 also when another zygote already runs."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(address(state))
    except OSError:
        listener.close()
        return 0  # one zygote per user and install is enough
    # a CLI that comes while we import waits in the backlog rather than start cold
    listener.listen(16)
    # preload what a forked agent needs; sessions that use an embedded relay too
    import tether.agent
    import tether.relay.server
    import tether.transport.quic  # noqa: F401

    # what is imported stays: out of the collector's reach, a forked agent's
    # collections neither walk it nor copy the pages it is on
    gc.collect()
    gc.freeze()

    alive: dict[int, int] = {}  # pidfd -> pid
    if watch is not None and (fd := _pidfd(watch)) is not None:
        alive[fd] = -watch  # not our child: nothing to reap
    try:
        while alive:
            ready, _, _ = select.select([listener, *alive], [], [])
            for fd in ready:
                if fd is listener:
                    _accept(listener, alive)
                elif fd in alive:
                    pid = alive.pop(fd)
                    os.close(fd)
                    if pid > 0:
                        try:
                            os.waitpid(pid, 0)
                        except ChildProcessError:
                            pass
    finally:
        listener.close()
    return 0


def _accept(listener: socket.socket, alive: dict[int, int]) -> None:
    conn, _ = listener.accept()
    with conn:
        try:
            if _peer_uid(conn) != os.getuid():
                return
            conn.settimeout(CONNECT_TIMEOUT)
            req = _receive(conn)
        except (OSError, ValueError) as exc:
            print(f"tether zygote: refused a request: {exc}", file=sys.stderr, flush=True)
            return
        try:
            if len(alive) >= MAX_AGENTS:
                return
            pid = os.fork()
            if pid == 0:
                _become_agent(req, [listener.fileno(), conn.fileno(), *alive])
            fd = _pidfd(pid)
            if fd is not None:
                alive[fd] = pid
            conn.send(str(pid).encode())
        except OSError as exc:
            print(f"tether zygote: cannot start an agent: {exc}", file=sys.stderr, flush=True)
        finally:
            os.close(req.stdin_fd)
            os.close(req.log_fd)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tether _zygote")
    p.add_argument("--watch", type=int, help="live at least as long as this process")
    a = p.parse_args(argv)
    from tether.client.paths import state_dir

    return serve(state_dir(), a.watch)
