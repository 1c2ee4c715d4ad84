"""Carrying a plan out on a blocking tmux client (the jailed replica worker).

No asyncio here: the worker runs once per session and pays for every module.
"""

from __future__ import annotations

import contextlib

from tether.transport.tmuxsync import BlockingTmuxControl, TmuxError

from .plan import (
    DONE,
    RUN,
    SEND,
    ClosePane,
    Command,
    Effect,
    OpenPane,
    PaneOwner,
    Plan,
    Result,
)


def run_plan(plan: Plan, tmux: BlockingTmuxControl, owner: PaneOwner) -> None:
    """Run ``plan`` to its end; a failing RUN command raises ``TmuxError`` and ends it."""
    result: Result | None = None
    try:
        while True:
            effect = plan.send(result) if result is not None else next(plan)
            result = _carry_out(effect, tmux, owner)
    except StopIteration:
        return
    finally:
        plan.close()


def _carry_out(effect: Effect, tmux: BlockingTmuxControl, owner: PaneOwner) -> Result:
    if isinstance(effect, OpenPane):
        owner.open_pane(effect.host, effect.replica, effect.tty)
        return DONE
    if isinstance(effect, ClosePane):
        owner.close_pane(effect.host)
        return DONE
    assert isinstance(effect, Command)
    if effect.mode == SEND:
        with contextlib.suppress(TmuxError):
            tmux.send(effect.line)
        return DONE
    if effect.mode == RUN:
        return Result(True, tuple(tmux.run(effect.line)))
    try:
        return Result(True, tuple(tmux.run(effect.line)))
    except TmuxError as exc:
        return Result(False, (str(exc),))
