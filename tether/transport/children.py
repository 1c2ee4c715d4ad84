"""asyncio's child processes without a thread each.

Python 3.11's default child watcher starts one thread per child process,
blocked in ``waitpid``: a relay with 1,000 sessions ran 1,000 threads, and a
container's pids limit (often 1,024) would turn the next ones into failed
sessions. A pidfd watcher waits in the event loop instead (Linux 5.3+);
Python 3.12 picks one by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


def use_pidfd_watcher() -> bool:
    """Install asyncio's pidfd child watcher where it helps; True if installed."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel without pidfds (or a seccomp filter refusing them)
        return False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    return True


class Child:
    """A child process, started without asyncio's subprocess transport and
    waited for through a pidfd (a thread where there are none).

    asyncio's transport (3.11) reports a process's exit only after a task of
    its own has set the process up, so a loop torn down (``asyncio.run``
    ending, which cancels every task) just after a child started waited for
    ever: an agent stopped while it reconnected did not exit. Here nothing is
    left to a task: the process starts at once, and each wait is its own."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def terminate(self) -> None:
        self._popen.send_signal(signal.SIGTERM)  # not once reaped: no stale pid

    def kill(self) -> None:
        self._popen.send_signal(signal.SIGKILL)

    def ended_within(self, timeout: float) -> bool:
        """Whether it ended within ``timeout``, blocking: only for a child just
        killed, whose end is a matter of milliseconds."""
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfds here
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def exited() -> None:
            if self._popen.poll() is not None and not done.done():
                done.set_result(self._popen.returncode)

        loop.add_reader(pidfd, exited)
        try:
            exited()  # it may have ended before the pidfd was open
            return await done
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)


class Piped:
    """A child process and the streams of its standard input, output and error
    (``stderr`` None when it was not asked for)."""

    def __init__(self, proc: Child, stdin: asyncio.StreamWriter,
                 stdout: asyncio.StreamReader, stderr: asyncio.StreamReader | None) -> None:
        self.proc = proc
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr


_reaping: set[asyncio.Task[int]] = set()


def reap(proc: Child, then: Callable[[Child], None] | None = None) -> None:
    """Wait for ``proc`` in the background (it was told to end, or will be);
    ``then(proc)`` once it has."""
    task = asyncio.get_running_loop().create_task(proc.wait())
    _reaping.add(task)
    task.add_done_callback(_reaping.discard)
    if then is not None:
        task.add_done_callback(lambda _: then(proc))


class Started:
    """A child started with pipes, before any event loop has taken them
    (``start``); ``attach`` makes it a ``Piped``."""

    def __init__(self, argv: Sequence[str], popen: subprocess.Popen[bytes],
                 stdin: int, stdout: int, stderr: int) -> None:
        self.argv = list(argv)
        self.proc = Child(popen)
        self.fds = (stdin, stdout, stderr)

    def discard(self) -> None:
        """End it unused (blocking for a moment, as a child just killed ends);
        nothing once ``attach`` took it, or it was discarded already."""
        if self.fds == (-1, -1, -1):
            return
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = (-1, -1, -1)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.ended_within(1.0)


def start(argv: Sequence[str], *, env: dict[str, str] | None = None,
          stderr: bool = True) -> Started:
    """Start ``argv`` with pipes to its standard input, output and (if
    ``stderr``; else /dev/null) error, no event loop needed. Raises OSError if
    it cannot start."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe() if stderr else (-1, -1)
    try:
        popen = subprocess.Popen(
            argv, stdin=in_r, stdout=out_w, stderr=err_w if stderr else subprocess.DEVNULL,
            env=env, close_fds=True)
    except BaseException:
        for fd in (in_w, out_r, err_r):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            if fd >= 0:
                os.close(fd)
    return Started(argv, popen, in_w, out_r, err_r)


async def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None,
                limit: int = 64 * 1024, stderr: bool = True) -> Piped:
    """Start ``argv`` with pipes to its standard input, output and (if
    ``stderr``; else /dev/null) error. Raises OSError if it cannot start."""
    return await attach(start(argv, env=env, stderr=stderr), limit)


async def attach(started: Started, limit: int = 64 * 1024) -> Piped:
    """The running loop's streams on a child ``start`` began (its pipes are
    theirs from here on)."""
    loop = asyncio.get_running_loop()
    in_w, out_r, err_r = started.fds
    started.fds = (-1, -1, -1)
    proc = started.proc
    # each file owns its descriptor; a connect_*_pipe call owns its file from the
    # call on (it closes it if cancelled), so none is closed twice
    files = {"in": open(in_w, "wb", buffering=0), "out": open(out_r, "rb", buffering=0)}
    if err_r >= 0:
        files["err"] = open(err_r, "rb", buffering=0)
    try:
        out = asyncio.StreamReader(limit)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(out), files.pop("out"))
        err = None
        if err_r >= 0:
            err = asyncio.StreamReader(limit)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(err),
                                         files.pop("err"))
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, files.pop("in"))
    except BaseException:
        for f in files.values():
            f.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # waited for here: a task reaping it could outlive a loop torn down
        # meanwhile (asyncio.run cancelling us), holding its pidfd for ever
        if not proc.ended_within(1.0):
            with contextlib.suppress(RuntimeError):  # the loop is closing: left to subprocess
                reap(proc)
        raise
    return Piped(proc, asyncio.StreamWriter(transport, protocol, None, loop), out, err)


async def run(argv: Sequence[str], *, env: dict[str, str] | None = None
              ) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to its end: its exit status, output and error output."""
    p = await spawn(argv, env=env)
    p.stdin.close()
    assert p.stderr is not None
    out, err = await asyncio.gather(p.stdout.read(), p.stderr.read())
    return await p.proc.wait(), out, err
