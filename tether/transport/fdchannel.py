"""Small messages, each with at most one descriptor, between the relay's processes.

An AF_UNIX ``SOCK_SEQPACKET`` socket keeps message boundaries and carries a
descriptor (``SCM_RIGHTS``) with the message it belongs to, so neither side
frames bytes or matches descriptors to messages. Both ends are the relay's
own processes; the bounds are there so that a bug on one side ends the
channel instead of the other process.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import msgpack

log = logging.getLogger("tether.relay")

MAX_MESSAGE = 64 * 1024
"""Largest message either side sends: control messages, and a mate's few lines
of text (refusals and notices)."""
MAX_QUEUED = 16384
"""Messages queued while the peer's socket is full, past which the channel
is closed: the peer process has stopped reading. Above what the relay sends
a front when it is merely busy: a connection each (4096 at most at once),
a mate's attach, its few lines of text."""

Handler = Callable[[list[Any], int | None], None]
"""(message, descriptor or None): the receiver owns the descriptor."""


def pair() -> tuple[socket.socket, socket.socket]:
    """Two connected ends; the second is meant for a child process (inheritable)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.set_inheritable(True)
    return a, b


class FdChannel:
    """One end, on the running loop: ``on_message`` for each message in order,
    ``on_close`` once when the peer is gone (or broke the channel's rules)."""

    def __init__(self, sock: socket.socket, on_message: Handler,
                 on_close: Callable[[], None]) -> None:
        self._sock = sock
        sock.setblocking(False)
        self._on_message = on_message
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def backlog(self) -> int:
        """Messages waiting for the peer to read (it is busy, or stuck)."""
        return len(self._queue)

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        """Queue ``msg`` (and a copy of ``fd``: the caller keeps its own)."""
        if self.closed:
            return
        data = msgpack.packb(msg, use_bin_type=True)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
        if not self._queue and self._send(data, fd):
            return
        if len(self._queue) >= MAX_QUEUED:
            log.warning("fd channel: the peer process has not read %d messages; closing",
                        MAX_QUEUED)
            self.close()
            return
        self._queue.append((data, os.dup(fd) if fd is not None else None))
        if len(self._queue) == 1:
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _send(self, data: bytes, fd: int | None) -> bool:
        """True once sent (or the channel closed); False: the socket is full."""
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
               if fd is not None else [])
        try:
            self._sock.sendmsg([data], anc)
        except BlockingIOError:
            return False
        except OSError:
            self.close()
        return True

    def _writable(self) -> None:
        while self._queue and not self.closed:
            data, fd = self._queue[0]
            if not self._send(data, fd):
                return
            if self.closed:  # the send failed: close() let the queue go
                return
            self._queue.popleft()
            if fd is not None:
                os.close(fd)
        if not self.closed:
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        for _ in range(64):  # a turn's worth; the rest on the next
            if self.closed:
                return
            try:
                data, anc, flags, _ = self._sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(array.array("i").itemsize))
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            fds = _descriptors(anc)
            if not data and not fds:
                self.close()
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
                    raise ValueError("a message past the channel's bounds")
                msg = msgpack.unpackb(data, raw=False)
                if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
                    raise ValueError("not a message")
            except (ValueError, msgpack.UnpackException) as exc:
                for fd in fds:
                    os.close(fd)
                log.error("fd channel: %s; closing", exc)
                self.close()
                return
            self._on_message(msg, fds[0] if fds else None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        for _, fd in self._queue:
            if fd is not None:
                os.close(fd)
        self._queue.clear()
        self._sock.close()
        self._on_close()


def _descriptors(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds
