"""The relay's pump between a mate's SSH session and its replica tmux client."""

from __future__ import annotations

import asyncio
import os

from tether.relay.mates import Pump
from tether.relay.session import Mate


class StalledTerminal:
    """A mate's side whose output never drains until told to, then leaves."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.drained = asyncio.Event()
        self.leave = asyncio.Event()

    async def read(self) -> bytes:
        await self.leave.wait()
        return b""

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        await self.drained.wait()

    def backlog(self) -> int:
        return 0 if self.drained.is_set() else sum(map(len, self.written))


async def test_a_mate_leaving_mid_drain_watches_no_fd_again() -> None:
    """A mate who left while its output waited for SSH flow control made the relay
    watch its descriptor again once the drain ended: EBADF, or, with the number
    reused, another pty's output sent to the departed mate."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    term = StalledTerminal()
    mate = Mate(1, True, 80, 24, master)
    pump = asyncio.create_task(Pump(term, mate, 256 * 1024, lambda: None).run())  # type: ignore[arg-type]
    os.write(slave, b"first screen")
    for _ in range(200):  # the output is read and sent; the drain now waits
        if term.written:
            break
        await asyncio.sleep(0.01)
    assert term.written == [b"first screen"]
    term.leave.set()
    await asyncio.wait_for(pump, 5)
    os.close(master)  # as handle_mate does once the pump returns
    os.close(slave)
    other_master, other_slave = os.openpty()  # likely the same numbers again
    try:
        term.drained.set()
        for _ in range(5):
            await asyncio.sleep(0)
        os.write(other_slave, b"another mate's screen")
        await asyncio.sleep(0.2)  # nothing may happen: no condition to wait on
        assert term.written == [b"first screen"]
    finally:
        os.close(other_master)
        os.close(other_slave)
