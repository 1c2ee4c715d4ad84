"""What a timer loop sleeps on: an ``asyncio.Event`` with a deadline.

``await asyncio.wait_for(event.wait(), delay)`` makes a task, a timeout handle
and two futures per wait, and a ``set()`` reaches the sleeper after three loop
turns. The timer loops of a link (the agent's, the relay's per host and per
join client, the join client's) wait once per keystroke or echo, so that was
work on every key. An ``Alarm`` wakes its sleeper in one turn, with one future.
"""

from __future__ import annotations

import asyncio


class Alarm:
    """``set()`` wakes every ``wait()``; a set alarm stays set until ``clear()``."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float | None = None) -> bool:
        """Until set (True) or ``timeout`` seconds passed (False)."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(max(timeout, 0.0), _expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:  # timed out or cancelled: set() did not take it
                self._waiters.remove(waiter)
        return self._set


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
