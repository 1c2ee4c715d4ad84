"""An asyncio connection to a tmux server in control mode.

Used by the host agent on its user's tmux (the relay's replica worker has a
blocking twin, ``tmuxsync``). Replies are matched to commands in order, and an optional
callback runs *synchronously* when a reply arrives, before any later line is
parsed: that is how a snapshot is placed at the exact point of the output
stream that the capture saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence

from tether.core.control import ControlParser, Notification, PaneOutput, Reply

from .children import Child, run, spawn
from .tmuxsync import TmuxError

EventHandler = Callable[[PaneOutput | Notification], None]
ReplyCallback = Callable[[Reply], None]

__all__ = ["TmuxControl", "TmuxError", "tmux_cmd"]


class TmuxControl:
    def __init__(
        self,
        socket: str,
        on_event: EventHandler,
        tmux: str = "tmux",
        muted: set[int] | None = None,
    ) -> None:
        self.socket = socket
        self.tmux = tmux
        self._on_event = on_event
        self._parser = ControlParser(muted)
        self._pending: deque[tuple[asyncio.Future[Reply], ReplyCallback | None]] = deque()
        self._proc: Child | None = None
        self._stdout: asyncio.StreamReader | None = None
        self._stdin: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[None] | None = None
        self.budget: Callable[[int], bool] | None = None
        """Called with each line's length before it is parsed; False stops
        reading (the relay's budget for a replica tmux it does not trust)."""

    async def start(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        """Start ``tmux -S SOCKET -C ARGS`` (e.g. ``attach -t NAME``)."""
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        # not asyncio's subprocess: see ``children.Child``
        child = await spawn([self.tmux, "-S", self.socket, "-C", *args],
                            env=env or os.environ.copy(), limit=4 * 1024 * 1024, stderr=False)
        self._proc = child.proc
        await self._attached(child.stdout, child.stdin)

    @property
    def owns_stream(self) -> bool:
        """Whether its streams wrap the socket now (``close`` closes it then)."""
        return self._stdin is not None

    async def start_on(self, sock: socket.socket, replies: int = 1) -> None:
        """Speak to a control client already started elsewhere (in a jail) with
        ``sock``'s peer as its stdin and stdout, whose first command (a list of
        ``replies`` commands) attaches it."""
        self.closed = asyncio.get_running_loop().create_future()
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=4 * 1024 * 1024)
        await self._attached(reader, writer, replies)

    async def _attached(self, stdout: asyncio.StreamReader, stdin: asyncio.StreamWriter,
                        replies: int = 1) -> None:
        loop = asyncio.get_running_loop()
        self._stdout, self._stdin = stdout, stdin
        # tmux answers the attach itself with the first %begin/%end blocks (one a
        # command); until then this client is not attached and commands fail with
        # "no current client"
        attached: list[asyncio.Future[Reply]] = [loop.create_future() for _ in range(replies)]
        self._pending.extend((f, None) for f in attached)
        self._reader_task = asyncio.create_task(self._read())
        for reply in await asyncio.wait_for(asyncio.gather(*attached), 10):
            if not reply.ok:
                raise TmuxError(b"; ".join(reply.lines).decode(errors="replace")
                                or "attach failed")

    async def _read(self) -> None:
        assert self._stdout is not None
        stdout = self._stdout
        try:
            while True:
                try:
                    raw = await stdout.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    # a line longer than our buffer: tmux never sends one this long
                    # in practice; skip it rather than die
                    skipped = await stdout.read(4 * 1024 * 1024)
                    if self.budget is not None and not self.budget(len(skipped)):
                        break
                    continue
                if self.budget is not None and not self.budget(len(raw)):
                    break
                item = self._parser.line(raw[:-1])
                if item is None:
                    continue
                if isinstance(item, Reply):
                    self._reply(item)
                else:
                    self._on_event(item)
        finally:
            err = TmuxError("tmux control connection closed")
            while self._pending:
                fut, _ = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(err)
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(None)

    def _reply(self, reply: Reply) -> None:
        if not self._pending:
            return  # a stray block
        fut, callback = self._pending.popleft()
        if callback is not None:
            callback(reply)
        if not fut.done():
            fut.set_result(reply)

    def send(self, command: str, callback: ReplyCallback | None = None) -> asyncio.Future[Reply]:
        """Queue one command line; its reply resolves the future (and runs ``callback``)."""
        assert self._stdin is not None
        if "\n" in command:
            raise ValueError("a tmux command line cannot contain a newline")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        # fire-and-forget commands are fine: a failure nobody awaits is not an error
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self._stdin.is_closing():
            fut.set_exception(TmuxError("tmux control connection closed"))
            return fut
        self._pending.append((fut, callback))
        self._stdin.write(command.encode() + b"\n")
        return fut

    async def run(self, command: str) -> list[str]:
        """Run a command and return its output lines; raise ``TmuxError`` on failure."""
        reply = await self.send(command)
        lines = [line.decode("utf-8", "replace") for line in reply.lines]
        if not reply.ok:
            raise TmuxError("; ".join(lines) or f"tmux command failed: {command}")
        return lines

    async def close(self) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()
        if self._proc is None:
            if self._reader_task is not None:
                self._reader_task.cancel()
                await asyncio.gather(self._reader_task, return_exceptions=True)
            return
        try:
            await asyncio.wait_for(self._proc.wait(), 3)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)


async def tmux_cmd(socket: str, *args: str, tmux: str = "tmux", check: bool = True) -> str:
    """Run one plain tmux command against ``socket`` and return its stdout."""
    code, out, err = await run([tmux, "-S", socket, *args])
    if code != 0 and check:
        raise TmuxError(err.decode(errors="replace").strip() or f"tmux {args[0]} failed")
    return out.decode(errors="replace")
