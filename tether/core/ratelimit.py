"""Rate limits without a clock of their own: callers pass ``now``.

``FailureBackoff`` slows down token guessing: each source address gets a few
free failures, then every further failure doubles the wait before that address
is served again. ``TokenBucket`` bounds how fast one mate may type (or paste).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: int
    last: float
    blocked_until: float


class FailureBackoff:
    def __init__(
        self,
        free: int = 5,
        base: float = 1.0,
        cap: float = 300.0,
        forget_after: float = 900.0,
        max_keys: int = 65536,
    ) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.max_keys = max_keys
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def wait(self, key: str, now: float) -> float:
        """Seconds ``key`` must still wait before it is served (0: go ahead)."""
        rec = self._records.get(key)
        if rec is None:
            return 0.0
        if now - rec.last > self.forget_after:
            del self._records[key]
            return 0.0
        return max(0.0, rec.blocked_until - now)

    def failure(self, key: str, now: float) -> float:
        """Count a failure; returns the wait now imposed on ``key``."""
        rec = self._records.get(key)
        if rec is None or now - rec.last > self.forget_after:
            rec = _Record(0, now, now)
        rec.failures += 1
        rec.last = now
        over = rec.failures - self.free
        if over > 0:
            # the exponent is capped: 2 ** 1030 overflows a float, and the wait
            # must never wrap around to nothing however long an address keeps on
            doubling = min(over - 1, 64)
            rec.blocked_until = now + min(self.cap, self.base * 2.0**doubling)
        self._records[key] = rec
        self._records.move_to_end(key)
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)
        return max(0.0, rec.blocked_until - now)


class TokenBucket:
    """``rate`` units per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._at = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount``; returns how long to wait before acting on it (0: now)."""
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        self._level -= amount
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def allow(self, amount: float, now: float) -> bool:
        """Take ``amount`` only if it is there (no debt): for dropping, not delaying."""
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < amount:
            return False
        self._level -= amount
        return True
