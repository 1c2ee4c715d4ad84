"""The host's status line says the link is quiet only when pings go unanswered:
an idle host pings every ``PING_IDLE``, so its last contact is often seconds old."""

from __future__ import annotations

import time

from tether.client.status import QUIET_AFTER, StatusLine, without_own


def test_an_idle_link_with_its_last_ping_answered_is_not_quiet() -> None:
    now = time.monotonic()
    text = StatusLine().text("quic", now - 8.0, 0.012, None, None)
    assert text == "[tether quic 12ms]"


def test_unanswered_pings_show_the_last_contact() -> None:
    now = time.monotonic()
    text = StatusLine().text("quic", now - 9.0, 0.012, None, now - QUIET_AFTER - 0.5)
    assert text == "[tether quic: last contact 9s ago]"
    fresh = StatusLine().text("quic", now - 9.0, 0.012, None, now - 0.5)
    assert fresh == "[tether quic 12ms]", "one ping late is not an outage"


def test_the_link_state_is_not_replicated_to_mates() -> None:
    assert without_own("[tether quic 12ms] host 12:00") == "host 12:00"
    assert without_own("[tether: reconnecting, last contact 3s ago] x") == "x"
    assert without_own("plain [tether quic 1ms] ") == "plain [tether quic 1ms] "
    assert without_own("") == ""
