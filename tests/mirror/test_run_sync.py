"""The runners: RUN failures end the plan, TRY failures are told to it."""

from __future__ import annotations

import pytest

from tether.mirror.plan import (
    DONE,
    RUN,
    SEND,
    TRY,
    ClosePane,
    Command,
    OpenPane,
    PaneOwner,
    Plan,
    Result,
)
from tether.mirror.run_sync import run_plan
from tether.transport.tmuxsync import TmuxError


class Tmux:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, line: str) -> list[str]:
        self.ran.append(line)
        if line.startswith("bad"):
            raise TmuxError("unknown command")
        return [f"reply to {line}"]

    def send(self, line: str) -> None:
        self.ran.append(line)
        raise TmuxError("tmux control connection closed")


class Owner(PaneOwner):
    def __init__(self) -> None:
        self.log: list[str] = []

    def open_pane(self, host: int, replica: str, tty: str) -> None:
        self.log.append(f"open {host} {replica} {tty}")

    def close_pane(self, host: int) -> None:
        self.log.append(f"close {host}")


def test_replies_feed_the_plan_and_failures_of_try_and_send_are_not_fatal() -> None:
    seen: list[Result] = []

    def plan() -> Plan:
        seen.append((yield Command("first", RUN)))
        seen.append((yield Command("bad try", TRY)))
        seen.append((yield Command("kill-pane -t %1", SEND)))
        seen.append((yield OpenPane(5, "%1", "/dev/pts/1")))
        seen.append((yield ClosePane(5)))

    tmux, owner = Tmux(), Owner()
    run_plan(plan(), tmux, owner)  # type: ignore[arg-type]
    assert seen[0] == Result(True, ("reply to first",))
    assert seen[1] == Result(False, ("unknown command",))
    assert seen[2].ok and seen[3].ok and seen[4].ok
    assert owner.log == ["open 5 %1 /dev/pts/1", "close 5"]


def test_a_failed_run_ends_the_plan() -> None:
    after: list[str] = []

    def plan() -> Plan:
        yield Command("bad run")
        after.append("went on")

    with pytest.raises(TmuxError):
        run_plan(plan(), Tmux(), Owner())  # type: ignore[arg-type]
    assert after == []


class AsyncTmux(Tmux):
    async def run(self, line: str) -> list[str]:  # type: ignore[override]
        return Tmux.run(self, line)


async def test_the_asyncio_runner_carries_out_the_same_plan() -> None:
    from tether.mirror.run_async import run_plan as run_async

    seen: list[Result] = []

    def plan() -> Plan:
        seen.append((yield Command("first", RUN)))
        seen.append((yield Command("bad try", TRY)))
        seen.append((yield OpenPane(5, "%1", "/dev/pts/1")))
        yield Command("bad run")
        seen.append(Result(True, ("not reached",)))

    owner = Owner()
    with pytest.raises(TmuxError):
        await run_async(plan(), AsyncTmux(), owner)  # type: ignore[arg-type]
    assert seen == [Result(True, ("reply to first",)), Result(False, ("unknown command",)), DONE]
    assert owner.log == ["open 5 %1 /dev/pts/1"]
