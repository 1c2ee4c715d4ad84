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
goes wrong before it answers, the CLI falls back to a cold start.

A forked agent does the whole of `tether new-session`: it checks the config
and starts tmux (``tether.client.newsession``) while its SSH connection to the
relay is being made, and tells the CLI the session id on the request's socket.
The CLI so imports nothing but this module: it returns as soon as tmux has
the session.

Wire format of a request (one ``SOCK_SEQPACKET`` message, NUL-separated
UTF-8 fields): ``tether-zygote-2``, cwd, umask, the number of agent
arguments, the arguments (the agent's, ``--``, then tmux's), then
``KEY=VALUE`` environment entries; with it, one file descriptor: the agent's
log. The reply, from the forked agent: ``ok``, NUL, the session id; or
``error``, NUL, why (the CLI says it and fails). From the zygote itself:
``busy`` (too many agents: the CLI starts cold). Nothing (EOF) means the
agent died before it answered.
"""

from __future__ import annotations

import os
import sys

# The CLI's side uses the C socket module alone: ``socket`` imports enum and
# selectors, ~4 ms of the CLI's start. The zygote's side imports what it needs.
from _socket import (
    AF_UNIX,
    SCM_RIGHTS,
    SO_PEERCRED,
    SOCK_SEQPACKET,
    SOL_SOCKET,
)
from _socket import socket as _csocket

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from pathlib import Path
    from typing import Any

MAGIC = "tether-zygote-2"
MAX_REQUEST = 256 * 1024
"""Largest request: the agent's arguments and environment."""
MAX_AGENTS = 256
"""Agents one zygote keeps track of; beyond, the CLI starts its own."""
CONNECT_TIMEOUT = 2.0
ANSWER_TIMEOUT = 30.0
"""Seconds the CLI waits for the agent to say how tmux's start went."""
MAX_ANSWER = 64 * 1024
BUSY = b"busy"

def address(state: str | Path) -> bytes:
    """The zygote's abstract socket name for this user, state directory and install."""
    import tether

    key = "\0".join((os.path.realpath(state), sys.executable, os.path.dirname(tether.__file__),
                     tether.__version__))
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


def _peer_uid(sock: _csocket) -> int:
    creds = sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(creds[4:8], sys.byteorder, signed=True)


# --- the CLI's side ----------------------------------------------------------------


def request_session(
    state: str | Path, argv: list[str], env: dict[str, str], log_fd: int
) -> tuple[str | None, str] | None:
    """Ask a running zygote for an agent that starts the session: ``(session id,
    "")``, ``(None, why not)``, or None when no zygote serves (start cold)."""
    fields = [MAGIC, os.getcwd(), str(_umask()), str(len(argv)), *argv]
    fields += [f"{k}={v}" for k, v in env.items() if "\0" not in k + v and "=" not in k]
    payload = "\0".join(fields).encode("utf-8", "surrogateescape")
    if len(payload) > MAX_REQUEST:
        return None
    s = _csocket(AF_UNIX, SOCK_SEQPACKET)
    try:
        try:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(address(state))
            if _peer_uid(s) != os.getuid():
                return None  # someone else holds the name: never hand them our fds
            s.sendmsg([payload], [(SOL_SOCKET, SCM_RIGHTS, log_fd.to_bytes(4, sys.byteorder))])
        except OSError:
            return None  # not sent: nothing started
        try:
            s.settimeout(ANSWER_TIMEOUT)
            reply = s.recv(MAX_ANSWER)
        except OSError as exc:
            return None, f"the tether agent did not answer: {exc}"
    finally:
        s.close()
    if reply == BUSY:
        return None
    kind, _, text = reply.decode("utf-8", "replace").partition("\0")
    if kind == "ok" and text:
        return text, ""
    if kind == "error":
        return None, text
    return None, "the tether agent died before tmux started; see its log"


def answer(conn: socket.socket, session: str | None, problem: str) -> None:
    """The forked agent's reply to the CLI (``request_session``)."""
    reply = f"ok\0{session}" if session else f"error\0{problem}"
    try:
        conn.send(reply.encode("utf-8", "replace")[:MAX_ANSWER])
    except OSError:
        pass  # the CLI is gone (interrupted): the session goes on
    finally:
        conn.close()


def _umask() -> int:
    mask = os.umask(0o77)
    os.umask(mask)
    return mask


# --- the zygote ---------------------------------------------------------------------


class _Request:
    def __init__(self, data: bytes, fds: list[int]) -> None:
        fields = data.decode("utf-8", "surrogateescape").split("\0")
        if len(fds) != 1 or len(fields) < 4 or fields[0] != MAGIC:
            raise ValueError("not a tether zygote request")
        self.cwd = fields[1]
        self.umask = int(fields[2], 10) & 0o777
        n = int(fields[3], 10)
        if not 0 <= n <= len(fields) - 4:
            raise ValueError("bad argument count")
        self.argv = fields[4 : 4 + n]
        self.env = dict(f.split("=", 1) for f in fields[4 + n :] if "=" in f)
        (self.log_fd,) = fds


def _receive(conn: socket.socket) -> _Request:
    import array
    import socket

    fd_size = array.array("i").itemsize
    data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(2 * fd_size))
    # room for two: a request with more than one is refused, not cut (MSG_CTRUNC)
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


def _become_agent(req: _Request, keep: list[int], conn: socket.socket) -> None:
    """In the forked child: take the request's log, cwd and env, run the agent
    (which answers the CLI on ``conn``), exit."""
    code = 1
    try:
        for fd in keep:
            os.close(fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(req.log_fd, 1)
        os.dup2(req.log_fd, 2)
        os.close(req.log_fd)
        os.umask(req.umask)
        os.chdir(req.cwd)
        os.environ.clear()
        os.environ.update(req.env)
        from tether.agent import main

        code = main(req.argv, forked=True, reply=lambda sid, why: answer(conn, sid, why))
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


def serve(state: str | Path, watch: int | None) -> int:
    """Listen until no agent of ours is alive; 0 also when another zygote already runs."""
    import gc
    import select
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(address(state))
    except OSError:
        listener.close()
        return 0  # one zygote per user and install is enough
    # a CLI that comes while we import waits in the backlog rather than start cold
    listener.listen(16)
    # preload what a forked agent needs; sessions that use an embedded relay too
    import concurrent.futures.thread  # noqa: F401  (asyncio.to_thread's, on first use)

    import tether.agent
    import tether.client.newsession
    import tether.relay.server
    import tether.transport.quic

    tether.agent._parser()  # built once, not in every fork

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
    import contextlib

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
                conn.send(BUSY)
                return
            pid = os.fork()
            if pid == 0:
                _become_agent(req, [listener.fileno(), *alive], conn)
            fd = _pidfd(pid)
            if fd is not None:
                alive[fd] = pid
        except OSError as exc:
            print(f"tether zygote: cannot start an agent: {exc}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                conn.send(BUSY)  # nothing started: the CLI starts cold
        finally:
            os.close(req.log_fd)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tether _zygote")
    p.add_argument("--watch", type=int, help="live at least as long as this process")
    a = p.parse_args(argv)
    from tether.client.paths import state_path

    return serve(state_path(), a.watch)
