"""The relay's channel to its SSH front processes: messages keep their bounds and
order, a descriptor arrives with its message, and a broken peer closes it."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from tether.transport import fdchannel
from tether.transport.fdchannel import FdChannel


class Ends:
    def __init__(self) -> None:
        a, b = fdchannel.pair()
        self.got: list[tuple[list[Any], int | None]] = []
        self.closed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.a = FdChannel(a, lambda m, fd: None, lambda: None)
        self.raw = b

    def listen(self) -> FdChannel:
        def on(msg: list[Any], fd: int | None) -> None:
            self.got.append((msg, fd))
            self.arrived.set()

        return FdChannel(self.raw, on, self.closed.set)


async def until(cond: Any, what: str) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), 5)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_a_descriptor_arrives_with_its_message_and_works() -> None:
    ends = Ends()
    b = ends.listen()
    r, w = os.pipe()
    ends.a.send(["pipe", 1, b"bytes", "text"], w)
    os.close(w)  # the channel sent its own copy
    ends.a.send(["plain", 2])
    await until(lambda: len(ends.got) == 2, "two messages")
    (first, fd), (second, none) = ends.got
    assert first == ["pipe", 1, b"bytes", "text"] and fd is not None
    assert second == ["plain", 2] and none is None
    os.write(fd, b"through")
    os.close(fd)
    assert os.read(r, 100) == b"through"
    os.close(r)
    b.close()
    ends.a.close()


async def test_a_full_socket_queues_in_order_without_losing_descriptors() -> None:
    ends = Ends()
    ends.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    r, w = os.pipe()
    for i in range(1500):  # far past what the socket holds: the rest waits in order
        ends.a.send(["n", i, b"x" * 500], w if i % 100 == 0 else None)
    os.close(w)
    assert ends.a._queue, "the socket never filled: the test tests nothing"
    b = ends.listen()
    await until(lambda: len(ends.got) == 1500, "every message")
    assert [m[1] for m, _ in ends.got] == list(range(1500))
    fds = [fd for _, fd in ends.got if fd is not None]
    assert len(fds) == 15
    for fd in fds:
        os.close(fd)
    os.close(r)
    b.close()
    ends.a.close()


async def test_a_message_past_the_bound_is_refused_before_it_leaves() -> None:
    ends = Ends()
    with pytest.raises(ValueError, match="at most"):
        ends.a.send(["big", b"x" * (fdchannel.MAX_MESSAGE + 1)])
    assert not ends.a.closed
    ends.a.close()
    ends.raw.close()


@pytest.mark.parametrize("junk", [b"\xc1 not msgpack", b"\x92\x01\x02", b"\xa3str"])
async def test_garbage_from_the_peer_closes_the_channel(junk: bytes) -> None:
    ends = Ends()
    b = ends.listen()
    ends.a._sock.send(junk)
    await until(ends.closed.is_set, "the channel to close")
    assert b.closed and ends.got == []
    ends.a.close()


async def test_the_peer_going_away_closes_the_channel_once() -> None:
    ends = Ends()
    calls: list[int] = []
    b = FdChannel(ends.raw, lambda m, fd: None, lambda: calls.append(1))
    ends.a.close()
    await until(lambda: b.closed, "the channel to close")
    b.close()
    assert calls == [1]
    b.send(["after"])  # a message for a closed channel is dropped, not raised
