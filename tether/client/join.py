"""The join client's link: the host's log in, the mate's keys out, over any path.

A mate's ``tether join`` logs in to the relay with its token (the system's
OpenSSH client, the relay's key pinned or checked against known_hosts), asks
for its place in the session (``Join``), and from then on resumes that place
with the secret of its ``Joined`` over whatever link gets through: QUIC when
UDP works (the connection rides out address changes), the SSH channel when it
does not. As the host's agent does (``relay_side``), it never gives a quiet
link up: once its pings go unanswered (``core.liveness``) it races new links beside it
(``Connector.race``), and keeps whichever gets through first. Events go to
a local tmux server (``local_replica``); keys come back numbered, and reach
the host exactly once across every reconnect. Over QUIC both directions are
also repeated as datagrams, so a lost packet costs no loss recovery: the
client's unacked keys (``InputRepeat``) and the relay's small unacked events
(``EventRepeat``), each taken only when it is the next in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from tether.core.errors import AuthError, RemoteProtocolError, TetherError
from tether.core.inputs import InputSender
from tether.core.join_endpoint import (
    MAX_REPEATED,
    REPEAT_RTT,
    check_event_repeat,
    first_repeat,
    repeat_after,
)
from tether.core.liveness import Pinger
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Binding,
    End,
    Error,
    Event,
    EventBody,
    EventRepeat,
    Input,
    InputAck,
    InputRepeat,
    Join,
    Joined,
    Message,
    Notice,
    Ping,
    Pong,
    Resize,
)
from tether.core.replog import LogReceiver
from tether.core.session import (
    ACK_EVERY,
    BACK_TEXT,
    PING_QUIET,
    QUIET_AFTER,
    Channel,
    Outgoing,
)
from tether.transport.alarm import Alarm
from tether.transport.link import Link, LinkClosed, send_out
from tether.transport.reconnect import Connector

log = logging.getLogger("tether.join")

REPEAT_BYTES = 900
"""Most key bytes one ``InputRepeat`` datagram carries (a QUIC datagram is ~1200)."""
REPEAT_OVERHEAD = 24
MAX_PINGS_OUT = 16
"""Pings remembered for their pongs (lost ones are forgotten oldest first)."""
"""A ping a second keeps the relay's view of us fresh and tells us of silence."""
JOIN_TIMEOUT = 20.0
"""How long a link may take to answer ``Join``."""
UPGRADE_EVERY = 10.0
"""On the SSH channel: how often to try QUIC again."""
LEAVE_WITHIN = 1.0
"""Longest wait for the relay to take our goodbye before exiting anyway."""
BACKOFF_MAX = 1.0
TOKEN_PATIENCE = 3600.0
"""Once joined, how long a refused token is taken for a relay that restarted and
waits for the host to re-create the session (the host's away timeout)."""
ENDED_TEXT = "tether: the host ended the session"


class Replica(Protocol):
    """Where the host's session is shown: the mate's local tmux (``LocalReplica``)."""

    async def apply(self, body: EventBody) -> None: ...

    async def presence(self, present: bool, text: str) -> None: ...


class JoinRefused(TetherError):
    """The relay will not have us (wrong token, full session, ...): stop, and say why."""


class JoinEnded(JoinRefused):
    """The host ended the session: the join is over (not an error)."""


class JoinClient:
    """A mate's place in a session, kept across links for as long as it runs."""

    def __init__(
        self,
        connector: Connector,
        replica: Replica,
        cols: int = 80,
        rows: int = 24,
        notify: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.connector = connector
        self.replica = replica
        self.notify = notify
        self.size = (cols, rows)
        self.receiver = LogReceiver()
        self.inputs = InputSender(1 + secrets.randbelow(2**30))
        self.joined: Joined | None = None
        self.link: Link | None = None
        self.last_heard = 0.0
        self.quiet_since: float | None = None
        self._pinger: Pinger | None = None
        """The current link's ping schedule (``core.liveness``: fast while busy,
        every ``PING_IDLE`` once idle, quiet after ``QUIET_MISSES`` unanswered)."""
        self._busy_at: float | None = None
        self._next: Link | None = None
        self._ack: int | None = None
        self._poke = Alarm()
        """Wakes the timer loop: an ack is owed."""
        self.ready = asyncio.Event()
        """Set once the first screen is applied."""
        self.refused: str | None = None
        self.first_joined: float | None = None
        self.ended: str | None = None
        self._leaving = False
        self._left = asyncio.Event()
        """Set when a link ends after ``leave`` said goodbye on it."""
        """Why the host ended the session (the relay said so): the join ends too."""
        self.srtt: float | None = None
        """The link's smoothed round trip, from pings (for local echo)."""
        self._pinged: dict[int, float] = {}
        self._ping_token = 0
        self._repeat_timer: asyncio.TimerHandle | None = None
        self._behind: int | None = None
        """A local pane whose bytes were dropped (tmux fell behind): start over."""
        self.repeats_taken = 0
        """Events taken from the relay's ``EventRepeat`` datagrams (before the stream's copy)."""

    # --- what the mate does ------------------------------------------------------

    def type(self, pane: int, keys: bytes, binding: Binding | None = None) -> None:
        """Keys for a host pane: numbered, sent now, and again after a reconnect
        until the relay acknowledges them."""
        if self.joined is not None and self.joined.readonly:
            return  # the relay would refuse them; the local replica shows as much
        msg = self.inputs.push(pane, keys, binding)
        self._busy()
        self._send(msg)
        link = self.link
        if self._ack is not None and link is not None:
            # the ack of what the relay sent rides with the key, not alone later
            with contextlib.suppress(LinkClosed):
                link.send_ack(Ack(self._ack))
                self._ack = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        srtt = self.srtt if self.srtt is not None else REPEAT_RTT
        first = first_repeat(now, getattr(link, "lost_at", None), srtt)
        if first - now < repeat_after(srtt):
            # a lossy link: a packet of its own at once (sent in this turn it
            # would share the key's packet, and a loss would take both)
            loop.call_later(first - now, self._repeat)
        if self._repeat_timer is not None:
            self._repeat_timer.cancel()
        self._repeat_timer = loop.call_later(repeat_after(srtt), self._repeat)

    def _repeat(self) -> None:
        """The unacked input again, oldest first, as one datagram (QUIC only: on the
        SSH channel nothing is lost to repeat). A lost packet then costs a key no
        round trip when this repeat just after it, the next key's, or the one a
        little over an RTT later gets through."""
        link = self.link
        if link is None or getattr(link, "send_datagram", None) is None:
            return
        pick: list[Input] = []
        size = 0
        for m in self.inputs.unacked()[:MAX_REPEATED]:
            size += len(m.keys) + REPEAT_OVERHEAD
            if size > REPEAT_BYTES:
                break
            pick.append(m)
        if pick:
            with contextlib.suppress(LinkClosed):
                link.send_datagram(InputRepeat(tuple(pick)))  # type: ignore[attr-defined]

    def fell_behind(self, pane: int) -> None:
        """The local tmux did not take a pane's bytes and they were dropped: the
        pane is wrong until redrawn, so the join starts over from a snapshot."""
        self._behind = pane

    def resize(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)
        self._send(Resize(cols, rows))

    def _send(self, msg: Message) -> None:
        link = self.link
        if link is not None:
            with contextlib.suppress(LinkClosed):
                link.send_nowait(msg)

    async def leave(self, reason: str = "the mate left", within: float = LEAVE_WITHIN) -> None:
        """Say goodbye (``End``) on the current link and wait, at most ``within``,
        for the relay to close it: the host's list of mates then drops us at
        once, where a link that merely ended keeps our place (and our line in
        the list) until the relay forgets it. A dead link does not hold the exit."""
        link = self.link
        if link is None or self.joined is None:
            return
        self._leaving = True
        with contextlib.suppress(LinkClosed, ConnectionError, OSError, TimeoutError):
            link.send_nowait(End(reason))
            await asyncio.wait_for(self._left.wait(), within)

    # --- links, one after another ---------------------------------------------------

    async def run(self) -> None:
        """Join, then keep the place until the relay refuses us (``JoinRefused``)."""
        delay = 0.2
        while True:
            try:
                link = self._next or await self.connector.race()
            except AuthError as exc:
                raise JoinRefused(str(exc)) from None
            self._next = None
            start = time.monotonic()
            try:
                await self._session(link)
            except JoinRefused:
                raise
            except (LinkClosed, TimeoutError, ConnectionError, OSError) as exc:
                if self.ended is not None:
                    raise JoinEnded(self.ended) from None
                if self._next is None:
                    self.notify(f"link to the relay lost: {exc}")
            except RemoteProtocolError as exc:
                self.notify(f"relay: {exc}")
            finally:
                link.close()
                self.link = None
                if self._leaving:
                    self._left.set()
            if self._leaving:
                return
            if self._next is not None:
                continue
            if time.monotonic() - start > 10:
                delay = 0.2
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self, link: Link) -> None:
        """Join on ``link``, then apply the log until the link ends."""
        resume = self.joined.resume if self.joined is not None else None
        link.send_nowait(Join(PROTOCOL_VERSION, "tether-join", resume,
                              self.receiver.next_seq if resume else None, *self.size))
        first = await asyncio.wait_for(link.recv(), JOIN_TIMEOUT)
        if isinstance(first, Error):
            self._refused(first.message, link)
        if not isinstance(first, Joined):
            raise RemoteProtocolError(f"expected Joined, got {type(first).__name__}")
        if self.joined is not None and first.mate != self.joined.mate:
            # a new place (the relay restarted): a new input stream, from a snapshot
            self.inputs = InputSender(1 + secrets.randbelow(2**30))
            self.receiver = LogReceiver()
        was_quiet = self.quiet_since
        if self.first_joined is None:
            self.first_joined = time.monotonic()
        self.joined = first
        self.connector.learn(first)
        # an ack owed on the old link is not this one's: the relay may have moved
        # us back to a snapshot, and an ack past what it sent here closes the link
        self._ack = None
        self.link = link
        self.last_heard = time.monotonic()
        self.quiet_since = None
        if was_quiet is not None:
            await self._back(time.monotonic() - was_quiet, f"over {link.description}")
        for msg in self.inputs.unacked():
            link.send_nowait(msg)
        tasks = [asyncio.create_task(self._timers(link))]
        if link.kind != "quic":
            tasks.append(asyncio.create_task(self._upgrade(link)))
        try:
            while True:
                msg = await link.recv()
                await self._receive(msg)
        finally:
            for t in tasks:
                t.cancel()
            if self.quiet_since is None:
                self.quiet_since = self.last_heard

    def _refused(self, text: str, link: Link | None) -> None:
        if "unknown join" in text:
            # the relay forgot our place (it restarted): start over with the token
            self.joined = None
            self.connector.quic_failed_at = time.monotonic()
            raise LinkClosed(text)
        if self.ended is not None:
            raise JoinRefused(self.ended)
        if self.first_joined is not None and "token" in text:
            # we were in: a restarted relay knows the token again once the host
            # is back (it re-creates the session with the same tokens)
            if time.monotonic() - self.first_joined < TOKEN_PATIENCE:
                raise LinkClosed(text)
        if self.first_joined is None or "token" in text:
            self.refused = text
            raise JoinRefused(text)
        raise LinkClosed(text)

    async def _receive(self, msg: Message) -> None:
        now = time.monotonic()
        self.last_heard = now
        if self.quiet_since is not None:
            since, self.quiet_since = self.quiet_since, None
            await self._back(now - since, "on the same connection")
        if isinstance(msg, Event):
            await self._event(msg)
        elif isinstance(msg, EventRepeat):
            check_event_repeat(msg)
            for ev in msg.events:
                # only the next one: never ahead of the ordered stream; the
                # stream's own copy of it comes later and is dropped as old
                if self.receiver.is_next(ev):
                    self.repeats_taken += 1
                    await self._event(ev)
        elif isinstance(msg, InputAck):
            if msg.stream == self.inputs.stream:
                self.inputs.on_ack(msg.seq)
        elif isinstance(msg, Notice):
            if msg.text.startswith(ENDED_TEXT):
                self.ended = msg.text
            await self.replica.presence(msg.text == BACK_TEXT, msg.text)
        elif isinstance(msg, Error):
            self._refused(msg.message, self.link)  # type: ignore[arg-type]
        elif isinstance(msg, Pong):
            self._rtt_sample(msg.token, now)
        elif not isinstance(msg, Ping):
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the relay")

    def _busy(self) -> None:
        """Typing or the host's output: pings go fast (a path that dies now must
        show within a couple of seconds, not at the next idle ping)."""
        now = time.monotonic()
        self._busy_at = now
        if self._pinger is not None:
            before = self._pinger.next_at
            self._pinger.busy(now)
            if self._pinger.next_at < before:
                self._poke.set()

    async def _event(self, msg: Event) -> None:
        """One event of the log, from the stream or a repeat alike: applied once,
        in order, and acked."""
        if not self.receiver.receive(msg):
            return  # a duplicate: its repeat got here first
        self._busy()
        try:
            await self.replica.apply(msg.body)
        except ValueError as exc:
            # refused (a structure the mirror cannot build): start over
            # from a snapshot on a new link rather than drift
            log.warning("event %d refused: %s; resyncing", msg.seq, exc)
            self.receiver.forget()
            raise LinkClosed(f"event refused: {exc}") from None
        if self._behind is not None:
            pane, self._behind = self._behind, None
            log.warning("the local tmux fell behind on pane %d; resyncing", pane)
            self.receiver.forget()
            raise LinkClosed("the local tmux fell behind; resyncing")
        self._ack = msg.seq
        self._poke.set()
        if not self.ready.is_set():
            self.ready.set()

    def _ping(self, link: Link, now: float) -> None:
        self._ping_token += 1
        self._pinged[self._ping_token] = now
        if len(self._pinged) > MAX_PINGS_OUT:  # lost ones: keep the newest
            del self._pinged[min(self._pinged)]
        send_out(link, Outgoing(Ping(self._ping_token), Channel.DATAGRAM))

    def _rtt_sample(self, token: int, now: float) -> None:
        """A pong: one round trip measured (RFC 6298's smoothing), told to the replica."""
        sent = self._pinged.pop(token, None)
        if sent is None:
            return
        if self._pinger is not None:
            self._pinger.pong()
        sample = now - sent
        self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        quic = getattr(self.link, "rtt", None)
        if quic:
            self.srtt = quic  # QUIC's own estimate: every ack, not two pings a second
        rtt = getattr(self.replica, "rtt", None)
        if rtt is not None:
            rtt(self.srtt)

    async def _back(self, quiet: float, how: str) -> None:
        if quiet >= QUIET_AFTER:
            self.notify(f"the relay is back after {quiet:.1f}s, {how}")
            await self.replica.presence(True, "")

    async def _timers(self, link: Link) -> None:
        """Acks (coalesced), pings (``core.liveness``), and the quiet-link race."""
        pinger = self._pinger = Pinger(time.monotonic(), self._busy_at)
        racing: asyncio.Task[None] | None = None
        race_after = 0.0
        try:
            while True:
                # asleep until something is due: an ack (poked), a ping, a race
                now = time.monotonic()
                due = pinger.next_at
                if pinger.quiet and racing is None and self._next is None:
                    due = min(due, max(race_after, now))
                self._poke.clear()
                await self._poke.wait(max(due - now, 0.0) + 0.001)
                if self._ack is not None:
                    await asyncio.sleep(ACK_EVERY)  # coalesce the acks of a burst
                now = time.monotonic()
                if self._ack is not None:
                    link.send_ack(Ack(self._ack))
                    self._ack = None
                heard = max(self.last_heard, getattr(link, "last_activity", 0.0))
                if now >= pinger.next_at and pinger.timer(now, heard, self.srtt):
                    self._ping(link, now)
                if pinger.quiet and self.quiet_since is None:  # heard again (_receive)
                    pinger.back(now)
                    if racing is not None:
                        racing.cancel()
                        racing = None
                if racing is not None and racing.done():
                    racing = None  # over: the old link won, or it was refused
                    race_after = now + BACKOFF_MAX
                if not pinger.quiet and pinger.went_quiet(now):
                    pinger.quiet = True
                    pinger.next_at = min(pinger.next_at, now + PING_QUIET)
                    self.quiet_since = heard
                    text = f"tether: last contact {now - heard:.0f}s ago, reconnecting"
                    self.notify(text)
                    await self.replica.presence(False, text)
                if (pinger.quiet and racing is None and self._next is None
                        and now >= race_after):
                    racing = asyncio.create_task(self._race(link))
        finally:
            if racing is not None:
                racing.cancel()

    async def _race(self, link: Link) -> None:
        with contextlib.suppress(AuthError):
            new = await self.connector.race()
            now = time.monotonic()
            if now - max(self.last_heard, getattr(link, "last_activity", 0.0)) <= QUIET_AFTER:
                new.close()  # the link came back first
                return
            self._next = new
            link.close()

    async def _upgrade(self, link: Link) -> None:
        """On the SSH channel: move to QUIC as soon as it gets through."""
        while True:
            if self.connector.quic is not None and self.connector.quic_preferred():
                quic = await self.connector.try_quic()
                if quic is not None:
                    self._next = quic
                    link.close()
                    return
            await asyncio.sleep(UPGRADE_EVERY)
