"""The timer loops' alarm: asyncio.Event's meaning, with a deadline, in one loop turn."""

from __future__ import annotations

import asyncio
import time

from tether.transport.alarm import Alarm


async def test_set_wakes_every_sleeper_in_one_loop_turn() -> None:
    alarm = Alarm()
    sleepers = [asyncio.create_task(alarm.wait(30)) for _ in range(3)]
    await asyncio.sleep(0)  # all asleep
    assert not any(s.done() for s in sleepers)
    alarm.set()
    await asyncio.sleep(0)  # the turn their wake-ups run in
    assert all(s.done() and s.result() is True for s in sleepers)


async def test_a_deadline_ends_the_wait_unset() -> None:
    alarm = Alarm()
    t0 = time.monotonic()
    assert await alarm.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    assert not alarm._waiters  # nothing left behind for a later set()


async def test_set_stays_set_until_cleared() -> None:
    alarm = Alarm()
    alarm.set()
    assert await alarm.wait(30) is True  # at once: no sleeping
    alarm.clear()
    assert not alarm.is_set()
    assert await alarm.wait(0) is False


async def test_a_cancelled_sleeper_is_forgotten() -> None:
    alarm = Alarm()
    sleeper = asyncio.create_task(alarm.wait(None))
    await asyncio.sleep(0)
    sleeper.cancel()
    await asyncio.gather(sleeper, return_exceptions=True)
    assert sleeper.cancelled()
    assert not alarm._waiters
    alarm.set()  # wakes nobody, raises nothing
