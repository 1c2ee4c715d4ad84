"""When to ping, and when a link has gone quiet: one schedule for every end that
pings its relay (the host agent's ``HostEndpoint``, the join client).

Busy (typing or output in the last ``IDLE_AFTER``): a ping every
``PING_EVERY``. Idle: every ``PING_START`` until ``PROVEN_PONGS`` pongs proved
the link, then every ``PING_IDLE``, which costs an idle session a few bytes a
second and the relay one ping in ten seconds. A ping not heard back (anything
from the relay counts) is retried within about two round trips, so at 30% loss
each way a lost pong costs a retry, not a quiet link; ``QUIET_MISSES``
unanswered in a row, over ``QUIET_AFTER`` at least, make the link quiet, and
while quiet a probe goes every ``PING_QUIET``. Sans-I/O: the caller sends the
ping and says what it heard.
"""

from __future__ import annotations

from .session import (
    IDLE_AFTER,
    PING_EVERY,
    PING_IDLE,
    PING_QUIET,
    PING_RETRY,
    PING_START,
    PROVEN_PONGS,
    QUIET_AFTER,
    QUIET_MISSES,
)


class Pinger:
    """One link's ping schedule and its quiet check."""

    def __init__(self, now: float, busy: float | None = None) -> None:
        self.last_busy = busy
        self.pinged = now
        """When the last ping went out (the link's start before any)."""
        self.awaiting = False
        """A ping is out and nothing was heard since it went."""
        self.misses = 0
        """Pings in a row after which nothing was heard before the next."""
        self.first_miss = 0.0
        """When the first of those went out."""
        self.pongs = 0
        self.quiet = False
        """Set by the caller while it counts the link quiet (probes go faster)."""
        self._now = False
        self.next_at = now + self.interval(now)
        """When ``timer`` must next run."""

    def interval(self, now: float) -> float:
        """Between two pings answered: fast while busy, slow once idle."""
        if self.quiet:
            return PING_QUIET
        if self.last_busy is not None and now - self.last_busy <= IDLE_AFTER:
            return PING_EVERY
        return PING_IDLE if self.pongs >= PROVEN_PONGS else PING_START

    def busy(self, now: float) -> None:
        """Typing or output: the next ping comes within ``PING_EVERY`` (an idle
        link's may be ``PING_IDLE`` away, and a path that died meanwhile must
        show soon)."""
        self.last_busy = now
        if self.next_at > now + PING_EVERY:
            self.next_at = now + PING_EVERY

    def ping_now(self, now: float) -> None:
        """Ping at once whatever the interval (the machine's addresses changed)."""
        self.busy(now)
        self._now = True
        self.next_at = now

    def pong(self) -> None:
        self.pongs += 1

    def timer(self, now: float, heard: float, rtt: float | None) -> bool:
        """At ``next_at``: True if a ping goes now. ``heard``: when anything last
        came from the relay. Rearms ``next_at`` either way."""
        if self.awaiting:
            if heard >= self.pinged:
                self.awaiting = False
                self.misses = 0
            else:
                if self.misses == 0:
                    self.first_miss = self.pinged
                self.misses += 1
        if not self.awaiting and not self._now:
            due = self.pinged + self.interval(now)
            if due > now:
                self.next_at = due
                return False
        self._now = False
        self.pinged = now
        self.awaiting = True
        if self.quiet:
            wait = PING_QUIET
        else:
            retry = min(max(PING_RETRY, 2 * (rtt or 0.0)), PING_EVERY)
            wait = min(retry, self.interval(now))
        self.next_at = now + wait
        return True

    def went_quiet(self, now: float) -> bool:
        """Enough pings unanswered, for long enough, to call the link quiet."""
        return self.misses >= QUIET_MISSES and now - self.first_miss >= QUIET_AFTER

    def answered(self, heard: float) -> bool:
        """Something came from the relay since the last ping went."""
        return not self.awaiting or heard >= self.pinged

    def unanswered_since(self, heard: float) -> float | None:
        """When the oldest ping not heard back went out (None: none is)."""
        if self.answered(heard):
            return None
        return self.first_miss if self.misses else self.pinged

    def back(self, now: float) -> None:
        """The relay was heard again after a quiet spell."""
        self.quiet = False
        self.awaiting = False
        self.misses = 0
        self.next_at = now + self.interval(now)
