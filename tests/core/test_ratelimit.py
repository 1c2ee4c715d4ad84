"""Failure back-off per address and the per-mate input bucket, with a hand-driven clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.ratelimit import FailureBackoff, TokenBucket


def test_free_failures_then_doubling_waits() -> None:
    b = FailureBackoff(free=3, base=1.0, cap=8.0)
    now = 100.0
    assert [b.failure("a", now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.wait("a", now) == 0.0
    assert b.failure("a", now) == 1.0
    assert b.failure("a", now) == 2.0
    assert b.failure("a", now) == 4.0
    assert b.failure("a", now) == 8.0
    assert b.failure("a", now) == 8.0  # capped
    assert b.wait("a", now + 3) == 5.0
    assert b.wait("b", now) == 0.0  # other addresses are untouched


def test_failures_are_forgotten_after_a_quiet_while() -> None:
    b = FailureBackoff(free=1, base=1.0, forget_after=60)
    b.failure("a", 0)
    assert b.failure("a", 0) == 1.0
    assert b.wait("a", 100) == 0.0
    assert b.failure("a", 100) == 0.0


def test_the_table_is_bounded() -> None:
    b = FailureBackoff(free=0, max_keys=10)
    for i in range(100):
        b.failure(f"10.0.0.{i}", 0)
    assert len(b._records) == 10
    assert b.wait("10.0.0.99", 0) > 0 and b.wait("10.0.0.0", 0) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 5000)), max_size=60))
def test_bucket_never_lets_more_than_rate_times_time_plus_burst(
    steps: list[tuple[float, int]],
) -> None:
    rate, burst = 1000.0, 4000.0
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    served = 0
    for gap, amount in steps:
        now += gap
        wait = bucket.take(amount, now)
        now += wait  # the caller honours the wait before acting
        served += amount
        assert served <= rate * now + burst + 1e-6


def test_the_wait_never_overflows_however_many_failures() -> None:
    """2 ** (over - 1) overflowed a float after ~1030 failures from one address,
    and from then on wrong tokens got no wait at all."""
    b = FailureBackoff(free=5, base=1.0, cap=300.0)
    waits = [b.failure("a", 0.0) for _ in range(5000)]
    assert waits[-1] == 300.0 and min(waits[20:]) == 300.0
    assert b.wait("a", 1.0) == 299.0


def test_allow_drops_without_debt() -> None:
    bucket = TokenBucket(1.0, 3.0, 0.0)
    assert [bucket.allow(1, 0.0) for _ in range(5)] == [True, True, True, False, False]
    # a flood while empty does not push the next allowed line further away
    assert not any(bucket.allow(1, 0.5) for _ in range(1000))
    assert bucket.allow(1, 1.0)
