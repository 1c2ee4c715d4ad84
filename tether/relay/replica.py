"""The relay's handle on one session's replica worker process.

The worker is a separate process with a narrow interface: one socket of
framed messages, one socket that passes back mates' pty masters, and a private
directory. That is all a jail has to let through (``tether.relay.jail``): its
stdin, stdout and stderr are /dev/null, and a jailed replica is ended by its
processes, never through anything in its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable

from tether.core.errors import TetherError
from tether.core.messages import HostPresence, MateAttach, Message, MessageDecoder
from tether.transport.children import Child

from .jail import Jail, jail_command, jail_directory

log = logging.getLogger("tether.relay")

OnMessage = Callable[[Message], None]


class ReplicaError(TetherError):
    pass


WORKER_MAIN = (
    # no ssl module: asyncio would load OpenSSL into every worker for nothing
    # (1.2 MiB private memory per session)
    "import sys; sys.modules['ssl'] = None; "
    "from tether.relay.worker import main; sys.exit(main(sys.argv[1:]))"
)


def _kill_named(directory: str) -> None:
    """SIGKILL every process of ours whose command line names ``directory``."""
    needle = (directory.rstrip("/") + "/").encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
            os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue


class ReplicaHandle:
    """One session's worker process.

    ``jail``: True runs the worker in ``tether.relay.jail`` (raising ``JailError``
    when that cannot work here); a list is a command prefix used as given; None
    or False runs it unjailed.
    """

    AS_PID_1 = False
    """Whether the jailed command is its jail's PID 1 (``bwrap.command``)."""

    def __init__(
        self, name: str, on_message: OnMessage, jail: bool | list[str] | None = None
    ) -> None:
        self.name = name
        self._on_message = on_message
        self._jail: Jail | None = None
        self._jailed = jail is True
        if jail is True:
            # made for the jail: owned by the uid the jail really runs as
            self.dir = jail_directory()
            try:
                self._jail = jail_command(self.dir, as_pid_1=self.AS_PID_1)
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            self._prefix = self._jail.argv
        else:
            self.dir = tempfile.mkdtemp(prefix="tether-replica-")
            os.chmod(self.dir, 0o700)
            self._prefix = list(jail or [])
        self.proc: asyncio.subprocess.Process | Child | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._fdsock: socket.socket | None = None
        self._attach_waiters: dict[int, asyncio.Future[int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        msg_parent, msg_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # worker sockets are inherited as fds 3 and 4 whatever their numbers here
        cmd = [
            *self._prefix,
            sys.executable,
            "-P",
            "-c",
            WORKER_MAIN,
            str(msg_child.fileno()),
            str(fd_child.fileno()),
            self.dir,
        ]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "LANG": "C.UTF-8",
        }
        try:
            # nothing of the relay's but the two sockets: not even its log on stderr
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                pass_fds=(
                    msg_child.fileno(),
                    fd_child.fileno(),
                    *(self._jail.pass_fds if self._jail else ()),
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            if self._jail is not None:
                # off the event loop: the first move of a process into a new memory
                # cgroup waits on the kernel for 5-15 ms (cgroup v1 here), and other
                # sessions' traffic must not wait with it
                await asyncio.to_thread(self._jail.started, self.proc.pid)
        except BaseException:
            msg_parent.close()
            fd_parent.close()
            if self._jail is not None:
                await self._end_jail(self._jail)
            raise
        finally:
            msg_child.close()
            fd_child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=msg_parent, limit=1 << 22)
        fd_parent.setblocking(False)
        self._fdsock = fd_parent
        loop.add_reader(fd_parent.fileno(), self._on_fd)
        self._tasks.append(asyncio.create_task(self._read(reader)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = MessageDecoder()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                for msg in decoder.feed(data):
                    self._on_message(msg)
        except Exception as exc:  # a broken worker must not take the relay down
            log.warning("replica %s: %s", self.name, exc)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)
            for fut in self._attach_waiters.values():
                if not fut.done():
                    fut.set_exception(ReplicaError("replica worker is gone"))

    def _on_fd(self) -> None:
        assert self._fdsock is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._fdsock, 64, 4)
        except BlockingIOError:
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(self._fdsock.fileno())
            return
        if len(data) != 8 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        (mate,) = struct.unpack(">Q", data)
        fut = self._attach_waiters.pop(mate, None)
        if fut is None or fut.done():
            os.close(fds[0])
        else:
            fut.set_result(fds[0])

    def send(self, msg: Message) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ReplicaError("replica worker is gone")
        self._writer.write(msg.encode())

    async def drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    async def attach(
        self, mate: int, readonly: bool, cols: int, rows: int, term: str, timeout: float = 10
    ) -> int:
        """A pty master connected to a new tmux client of the replica."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._attach_waiters[mate] = fut
        self.send(MateAttach(mate, readonly, cols, rows, term))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._attach_waiters.pop(mate, None)

    def resized(self, mate: int) -> None:
        """A mate's pty changed size (its tmux client learns it from SIGWINCH)."""

    def detached(self, mate: int) -> None:
        """A mate left and its pty master is closed (its tmux client sees EOF)."""

    def presence(self, present: bool, text: str) -> None:
        with contextlib.suppress(ReplicaError):
            self.send(HostPresence(present, text))

    async def _end_jail(self, jail: Jail, timeout: float = 5) -> None:
        """Kill the jail's processes and wait (bounded) until they are gone."""
        jail.kill()
        deadline = asyncio.get_running_loop().time() + timeout
        while not jail.gone() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if not jail.gone():
            log.warning("replica %s: jailed processes outlived SIGKILL for %ss", self.name, timeout)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 1)
        jail.close()
        self._jail = None

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._fdsock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fdsock.fileno())
            self._fdsock.close()
        if self._writer is not None:
            self._writer.close()
        if self._jailed:
            # nothing in the directory is trusted: no tmux -S, no path at all
            # until its processes are gone, then rmtree (which follows no symlink)
            if self._jail is not None:
                await self._end_jail(self._jail)
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        # the replica tmux server may outlive its worker briefly
        sock = os.path.join(self.dir, "tmux.sock")
        if os.path.exists(sock):
            with contextlib.suppress(Exception):
                p = await asyncio.create_subprocess_exec(
                    "tmux",
                    "-S",
                    sock,
                    "kill-server",
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await p.wait()
        # a tmux server that missed both (busy shutting 40 panes down while its
        # control client lingers) would outlive its directory, out of reach of
        # any socket; unjailed it is found by the directory its command line names
        if not self._prefix:
            _kill_named(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
