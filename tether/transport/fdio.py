"""Non-blocking file descriptors (ptys, ttys) driven by the asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger("tether.transport")

MAX_PENDING = 1024 * 1024
"""Bytes an ``FdWriter`` holds for its fd. The relay drains after each write of a
mate's input (at most 64 KiB read at a time), so a pty that stops reading holds
one read back; the bound only stops a caller that forgot to drain from growing
the buffer with whatever its peer sends."""


class FdWriter:
    """Buffers writes to a non-blocking fd; ``drain`` waits until the buffer is small.

    Past ``max_pending`` bytes unwritten (``MAX_PENDING``) the writer closes: the fd's
    reader has stopped, and what is written to it would otherwise pile up here."""

    def __init__(self, fd: int, max_pending: int = MAX_PENDING) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._waiters: list[asyncio.Future[None]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._buf:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return
            if n == len(data):
                return
            data = data[n:]
            self._loop.add_writer(self.fd, self._flush)
        elif len(self._buf) + len(data) > self.max_pending:
            log.warning("fd %d: %d bytes not taken by its reader; writer closed",
                        self.fd, len(self._buf) + len(data))
            self.close()
            return
        self._buf += data

    def _flush(self) -> None:
        try:
            n = os.write(self.fd, self._buf)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self._buf[:n]
        if not self._buf:
            self._loop.remove_writer(self.fd)
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)

    async def drain(self) -> None:
        if self._buf and not self.closed:
            fut = self._loop.create_future()
            self._waiters.append(fut)
            await fut

    def discard(self) -> None:
        """Drop what is queued (it was superseded); later writes go through as usual."""
        self._buf.clear()
        with contextlib.suppress(Exception):
            self._loop.remove_writer(self.fd)
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.discard()
