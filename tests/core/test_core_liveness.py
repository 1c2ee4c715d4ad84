"""The ping schedule both pinging ends share (``core.liveness.Pinger``)."""

from __future__ import annotations

from tether.core.liveness import Pinger
from tether.core.session import (
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


def answered_run(p: Pinger, until: float, rtt: float = 0.01) -> list[float]:
    """Drive ``p`` with every ping answered ``rtt`` later: the ping times."""
    sent: list[float] = []
    heard = 0.0
    while p.next_at <= until:
        now = p.next_at
        if p.timer(now, heard, rtt):
            sent.append(now)
            p.pong()
            heard = now + rtt
    return sent


def test_idle_pings_slow_down_once_the_link_is_proven() -> None:
    p = Pinger(0.0)
    sent = answered_run(p, 100.0)
    assert sent[:PROVEN_PONGS] == [PING_START * (i + 1) for i in range(PROVEN_PONGS)]
    gaps = {round(b - a, 6) for a, b in zip(sent[PROVEN_PONGS:], sent[PROVEN_PONGS + 1:],
                                            strict=False)}
    assert gaps == {PING_IDLE}


def test_busy_pings_fast_and_busy_pulls_an_idle_ping_in() -> None:
    p = Pinger(0.0)
    answered_run(p, 60.0)
    assert p.next_at - 60.0 > PING_EVERY
    p.busy(60.2)
    assert p.next_at <= 60.2 + PING_EVERY
    sent = answered_run(p, 60.2 + IDLE_AFTER)
    assert len(sent) >= IDLE_AFTER / PING_EVERY - 1


def test_ping_now_pings_at_once_whatever_was_answered() -> None:
    p = Pinger(0.0)
    answered_run(p, 30.0)
    p.ping_now(30.5)
    assert p.next_at == 30.5 and p.timer(30.5, 30.4, 0.01)


def test_an_unanswered_ping_is_retried_soon_and_quiet_takes_misses_and_time() -> None:
    p = Pinger(0.0)
    answered_run(p, 30.0)
    heard = p.pinged + 0.01
    now = p.next_at
    assert p.timer(now, heard, 0.05)  # this one goes unanswered
    first = now
    times = []
    while not p.went_quiet(p.next_at):
        now = p.next_at
        assert p.timer(now, heard, 0.05)
        times.append(now)
        assert len(times) < 50
    assert times[0] - first == PING_RETRY  # 2 RTT is less than PING_RETRY here
    assert p.misses >= QUIET_MISSES and p.next_at - first >= QUIET_AFTER
    assert p.unanswered_since(heard) == first
    p.quiet = True
    assert p.timer(p.next_at, heard, 0.05) and p.next_at - p.pinged == PING_QUIET
    p.back(p.pinged + 0.1)
    assert not p.quiet and p.misses == 0 and p.unanswered_since(p.pinged + 0.1) is None


def test_one_lost_pong_does_not_count_against_the_link() -> None:
    p = Pinger(0.0)
    answered_run(p, 30.0)
    heard = p.pinged + 0.01
    now = p.next_at
    p.timer(now, heard, 0.05)  # lost
    retry = p.next_at
    assert p.timer(retry, heard, 0.05)  # the retry, answered
    assert p.misses == 1
    assert not p.timer(p.next_at, retry + 0.05, 0.05)  # heard: back to the interval
    assert p.misses == 0 and p.next_at == retry + PING_IDLE
