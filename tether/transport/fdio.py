"""Non-blocking file descriptors (ptys, ttys) driven by the asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import os


class FdWriter:
    """Buffers writes to a non-blocking fd; ``drain`` waits until the buffer is small."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
