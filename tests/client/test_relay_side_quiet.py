"""A quiet link (``LinkQuiet``): ``RelaySide`` races other paths beside it and
keeps whichever speaks first, the old link (``LinkBack``) or a new one.

The endpoint runs on real time with small constants (``QUIET_AFTER`` and the
ping intervals of ``tether.core.liveness``); the links are memory links the
test speaks for the relay on, and the connector's ``race`` is a future the test
settles (``Connector.race`` itself: tests/transport/test_reconnect.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_relay_side import WELCOME, MemoryLink, Recorder

from tether.client.relay_side import RelaySide
from tether.client.status import StatusLine
from tether.core import liveness
from tether.core.errors import AuthError
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import Hello, Ping, Pong, Welcome
from tether.transport.reconnect import QuicInfo

QUIET = 0.3
BACK = re.compile(r"the relay is back after (\d+\.\d)s, (.+)")


@pytest.fixture(autouse=True)
def fast_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Quiet after 0.3 s, checked by pings every 0.05 s."""
    monkeypatch.setattr(liveness, "QUIET_AFTER", QUIET)
    for name in ("PING_EVERY", "PING_START", "PING_IDLE", "PING_QUIET", "PING_RETRY"):
        monkeypatch.setattr(liveness, name, 0.05)
    yield


class Link(MemoryLink):
    def __init__(self, kind: str = "ssh") -> None:
        super().__init__()
        self.kind = kind
        self.description = f"{kind} memory"


@dataclass
class RacingConnector:
    """``connect`` hands out ``links``; each ``race`` waits on a future the test settles."""

    links: list[Link] = field(default_factory=list)
    quic: Any = None
    cert_error: str = ""
    quic_failed_at: float | None = None
    learned: list[Welcome] = field(default_factory=list)
    races: list[asyncio.Future[Link]] = field(default_factory=list)
    before_return: Callable[[], None] | None = None
    """Runs as a race returns its link (the relay heard at that very moment)."""

    def learn(self, welcome: Welcome) -> None:
        self.learned.append(welcome)

    def quic_preferred(self) -> bool:
        return False

    async def connect(self) -> Link:
        if self.links:
            return self.links.pop(0)
        await asyncio.Event().wait()  # no more links: wait to be cancelled
        raise AssertionError("unreachable")

    async def race(self) -> Link:
        fut: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        self.races.append(fut)
        new = await fut
        if self.before_return is not None:
            self.before_return()
        return new


def make(connector: RacingConnector) -> tuple[RelaySide, list[tuple[str, bool]]]:
    said: list[tuple[str, bool]] = []
    relay = RelaySide(
        HostEndpoint(),
        connector,  # type: ignore[arg-type]
        Recorder(),  # type: ignore[arg-type]
        lambda text, show: said.append((text, show)),
        asyncio.Event(),
    )
    return relay, said


async def until(cond: Callable[[], Any], what: str, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return got


def said_back(said: list[tuple[str, bool]]) -> tuple[float, str, bool] | None:
    """The last "the relay is back" message: (seconds, how, shown on the clients)."""
    for text, show in reversed(said):
        if m := BACK.fullmatch(text):
            return float(m[1]), m[2], show
    return None


async def welcomed(relay: RelaySide, link: Link) -> None:
    """Play the relay's Welcome on ``link`` once the host said Hello."""
    await until(lambda: any(isinstance(m, Hello) for m in link.sent), "Hello")
    link.to_host.put_nowait(WELCOME)
    await until(lambda: relay.link is link, "the Welcome")


async def quiet(relay: RelaySide, connector: RacingConnector, races: int = 1) -> None:
    """The relay says nothing: the link goes quiet and a race starts beside it."""
    await until(lambda: len(connector.races) == races, "a race to start")
    assert relay.ep.quiet and relay.outage_since == relay.ep.last_contact, "since last heard"
    assert time.monotonic() - relay.outage_since >= QUIET, "quiet only after QUIET_AFTER"
    assert relay.link is not None and not relay.link.closed, "the quiet link is kept"


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_quiet_starts_a_race_and_link_back_cancels_it() -> None:
    old = Link("ssh")
    connector = RacingConnector([old])
    relay, said = make(connector)
    run = asyncio.create_task(relay.connect_loop())
    try:
        await welcomed(relay, old)
        await quiet(relay, connector)
        assert any(t.startswith("no word from the relay") and not show for t, show in said)
        assert said_back(said) is None
        old.to_host.put_nowait(Ping(42))  # the relay is heard again on the old link
        race = connector.races[0]
        await until(race.cancelled, "the race to be cancelled")
        got = await until(lambda: said_back(said), "the relay is back")
        seconds, how, shown = got
        assert how == "on the same SSH connection"
        assert QUIET <= seconds < 3 and not shown, "a short outage is only logged"
        assert relay.back is not None and relay.back[1] == "same connection"
        assert f"{relay.back[0]:.1f}" == f"{seconds:.1f}", "the status line's figure is the same"
        assert relay.outage_since is None and not relay.ep.quiet
        assert relay.link is old and not old.closed and relay._next_link is None
        await until(lambda: Pong(42) in old.sent, "the session to go on on the old link")
        assert "back after" in StatusLine().text("ssh", relay.ep.last_contact, None, relay.back)
        # silent again: a new race, cancelled in turn when the relay speaks
        await quiet(relay, connector, races=2)
        old.to_host.put_nowait(Ping(43))
        await until(connector.races[1].cancelled, "the second race to be cancelled")
        assert not old.closed and len(connector.races) == 2
    finally:
        await stop(run)


@pytest.mark.parametrize(
    ("kind", "how", "short"),
    [
        ("quic", "over a new QUIC connection", "new connection"),
        ("ssh", "over the SSH channel (UDP does not get through)", "SSH fallback"),
    ],
)
async def test_a_race_won_while_still_quiet_moves_to_the_new_link(
    kind: str, how: str, short: str
) -> None:
    old = Link("quic")
    connector = RacingConnector([old], quic=QuicInfo([("127.0.0.1", 1)], "SHA256:x"))
    relay, said = make(connector)
    run = asyncio.create_task(relay.connect_loop())
    try:
        await welcomed(relay, old)
        await quiet(relay, connector)
        new = Link(kind)
        connector.races[0].set_result(new)
        await until(lambda: old.closed, "the quiet link to be closed")
        hello = await until(lambda: [m for m in new.sent if isinstance(m, Hello)], "Hello")
        assert hello[0].session == "s1" and hello[0].rw_token == "rw", "it resumes the session"
        assert said_back(said) is None, "not back until the relay welcomed us"
        new.to_host.put_nowait(WELCOME)
        seconds, said_how, shown = await until(lambda: said_back(said), "the relay is back")
        assert said_how == how and seconds >= QUIET and not shown
        assert relay.back is not None and relay.back[1] == short
        assert relay.link is new and relay.transport == new.description
        assert relay.outage_since is None
        assert not any("lost" in t or "cannot reach" in t for t, _ in said), "no error shown"
        new.to_host.put_nowait(Ping(9))
        await until(lambda: Pong(9) in new.sent, "the session to run on the new link")
        assert Pong(9) not in old.sent
        assert len(connector.races) == 1 and not new.closed
    finally:
        await stop(run)
        relay.close()


async def test_a_race_won_after_the_link_came_back_closes_the_new_link() -> None:
    old = Link("ssh")
    connector = RacingConnector([old])
    relay, said = make(connector)
    run = asyncio.create_task(relay.connect_loop())
    try:
        await welcomed(relay, old)
        await quiet(relay, connector)
        new = Link("quic")
        # the relay's Ping is queued first: the old link speaks just before the race returns
        old.to_host.put_nowait(Ping(77))
        connector.races[0].set_result(new)
        await until(lambda: new.closed, "the new link to be closed")
        seconds, how, _ = await until(lambda: said_back(said), "the relay is back")
        assert how == "on the same SSH connection" and seconds >= QUIET
        assert not old.closed and relay.link is old and relay._next_link is None
        await until(lambda: Pong(77) in old.sent, "the session to go on on the old link")
        assert new.sent == [], "nothing went on the new link"
    finally:
        await stop(run)


async def test_the_relay_heard_as_the_race_returns_keeps_the_old_link() -> None:
    """QUIC hears the relay below the messages (``note_activity``) at the very moment
    the race returns: the old link is back, the new one is closed."""
    old = Link("quic")
    connector = RacingConnector([old])
    relay, said = make(connector)
    connector.before_return = lambda: relay.ep.note_activity(time.monotonic())
    run = asyncio.create_task(relay.connect_loop())
    try:
        await welcomed(relay, old)
        await quiet(relay, connector)
        new = Link("ssh")
        connector.races[0].set_result(new)
        await until(lambda: new.closed, "the new link to be closed")
        _, how, _ = await until(lambda: said_back(said), "the relay is back")
        assert how == "on the same QUIC connection"
        assert not old.closed and relay.link is old
    finally:
        await stop(run)


async def test_a_refused_race_is_reported_and_the_quiet_link_is_kept() -> None:
    old = Link("quic")
    connector = RacingConnector([old])
    relay, said = make(connector)
    run = asyncio.create_task(relay.connect_loop())
    try:
        await welcomed(relay, old)
        await quiet(relay, connector)
        connector.races[0].set_exception(AuthError("relay x:22 refused our key"))
        await until(lambda: ("relay x:22 refused our key", True) in said, "the refusal shown")
        assert not old.closed and relay.link is old and relay.ep.quiet
        old.to_host.put_nowait(Ping(5))
        _, how, _ = await until(lambda: said_back(said), "the relay is back")
        assert how == "on the same QUIC connection"
        assert len(connector.races) == 1
    finally:
        await stop(run)
