"""What a planner yields and what it is given back: the sans-I/O contract of ``apply``.

A plan is a generator: it yields an effect, the runner carries it out and sends
back a ``Result`` (tmux's reply lines, or whether a ``TRY`` command worked),
and the plan decides the next effect from it, as h11 or aioquic take bytes and
hand back events. New panes' ids and ttys come back this way, so the decision
never waits on tmux itself and a test can answer for tmux.
"""

from __future__ import annotations

from collections.abc import Generator

from tether.core.records import Record

RUN = "run"
"""Wait for the reply; a failure aborts the plan (the event is refused)."""
TRY = "try"
"""Wait for the reply; a failure is reported to the plan, which carries on."""
SEND = "send"
"""Do not wait; a failure is nobody's concern (a kill of a pane already gone)."""


class Command(Record):
    """One tmux command line; never more than one line (tmux would run the rest)."""

    line: str
    mode: str = RUN

    def __new__(cls, line: str, mode: str = RUN) -> Command:
        if "\n" in line:
            raise ValueError("a tmux command line cannot contain a newline")
        return super().__new__(cls)


class OpenPane(Record):
    """A replica pane exists now: its owner opens ``tty`` to write the host's bytes."""

    host: int
    replica: str
    tty: str


class ClosePane(Record):
    """A replica pane is being dropped: its owner closes its tty."""

    host: int


class Result(Record):
    """A command's outcome: ``ok`` and tmux's output (or error) lines."""

    ok: bool
    lines: tuple[str, ...] = ()


class PaneOwner:
    """Who holds the replica panes' ttys: a runner tells it when panes come and go."""

    def open_pane(self, host: int, replica: str, tty: str) -> None:
        raise NotImplementedError

    def close_pane(self, host: int) -> None:
        raise NotImplementedError


DONE = Result(True)
"""What a runner sends back for an effect with no reply (a SEND, a pane effect)."""

Effect = Command | OpenPane | ClosePane
Plan = Generator[Effect, Result, None]
