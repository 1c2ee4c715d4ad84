"""The link's state on the host's status line (``@tether_status``), mosh-style."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable

from tether.core.control import quote
from tether.transport.tmux import TmuxControl, TmuxError

QUIET_AFTER = 2.5
"""Seconds without a word from the relay before the status line says so."""
BACK_SHOWN = 10.0
"""Seconds the status line tells how the last outage ended."""
_OWN = re.compile(r"\[tether[^\]\n]*\] ")


def without_own(status_right: str) -> str:
    """The host's rendered status-right less the link state ``show`` put at
    its left: that state is the host's link, not the mates', and its RTT figure
    would otherwise be a replicated status change at every ping."""
    m = _OWN.match(status_right)
    return status_right[m.end():] if m else status_right


class StatusLine:
    """Says what the link does; keeps the shown RTT steady (see ``text``)."""

    def __init__(self) -> None:
        self._shown_rtt: float | None = None

    def text(
        self,
        kind: str | None,
        last_contact: float,
        rtt: float | None,
        back: tuple[float, str, float] | None = None,
        unanswered: float | None = None,
    ) -> str:
        """``kind``: the link's (``ssh``/``quic``), None while there is none;
        ``back``: the last outage's length, how it ended, and when;
        ``unanswered``: since when the relay has not answered a ping (an idle
        host pings seldom, so the last contact alone may be long ago)."""
        now = time.monotonic()
        if kind is not None:
            quiet = now - last_contact
            if unanswered is not None and now - unanswered > QUIET_AFTER:
                return f"[tether {kind}: last contact {quiet:.0f}s ago]"
            if back is not None and now - back[2] < BACK_SHOWN:
                return f"[tether {kind}: back after {back[0]:.0f}s, {back[1]}]"
            if rtt is None:
                return f"[tether {kind}]"
            ms = rtt * 1000
            # hysteresis: the status line is replicated to every mate, so a figure
            # that flickers between 1 and 2 ms would cost each session an update a
            # second; it changes once the RTT moved by a quarter (or 5 ms)
            old = self._shown_rtt
            if old is None or abs(ms - old) > max(5.0, old / 4):
                self._shown_rtt = old = ms
            shown = f"{old:.0f}" if old < 10 else f"{round(old, -len(str(int(old))) + 2):.0f}"
            return f"[tether {kind} {shown}ms]"
        if not last_contact:
            return "[tether: connecting]"
        return f"[tether: reconnecting, last contact {now - last_contact:.0f}s ago]"

    async def show(
        self,
        tmux: Callable[[], TmuxControl],
        session: str,
        state: Callable[[], str],
        changed: asyncio.Event,
    ) -> None:
        """Keep ``@tether_status`` (shown at the left of status-right) current:
        on every ``changed`` and at least once a second (the "ago" counts)."""
        with contextlib.suppress(TmuxError):
            right = await tmux().run("show -gv status-right")
            value = "#{?@tether_status,#{@tether_status} ,}" + (right[0] if right else "")
            await tmux().run(f"set -t {quote(session)} status-right {quote(value)}")
        shown = ""
        while True:
            text = state()
            if text != shown:
                shown = text
                tmux().send(f"set -g @tether_status {quote(text)}")
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1)
