"""Carrying a plan out on an asyncio tmux client (the host agent, the join client)."""

from __future__ import annotations

import contextlib

from tether.transport.tmux import TmuxControl, TmuxError

from .plan import DONE, RUN, SEND, ClosePane, Command, OpenPane, PaneOwner, Plan, Result


async def run_plan(plan: Plan, tmux: TmuxControl, owner: PaneOwner) -> None:
    """Run ``plan`` to its end; a failing RUN command raises ``TmuxError`` and ends it."""
    result: Result | None = None
    try:
        while True:
            try:
                effect = plan.send(result) if result is not None else next(plan)
            except StopIteration:
                return
            if isinstance(effect, OpenPane):
                owner.open_pane(effect.host, effect.replica, effect.tty)
                result = DONE
            elif isinstance(effect, ClosePane):
                owner.close_pane(effect.host)
                result = DONE
            else:
                result = await _command(effect, tmux)
    finally:
        plan.close()


async def _command(cmd: Command, tmux: TmuxControl) -> Result:
    if cmd.mode == SEND:
        with contextlib.suppress(TmuxError):
            tmux.send(cmd.line)
        return DONE
    if cmd.mode == RUN:
        return Result(True, tuple(await tmux.run(cmd.line)))
    try:
        return Result(True, tuple(await tmux.run(cmd.line)))
    except TmuxError as exc:
        return Result(False, (str(exc),))
