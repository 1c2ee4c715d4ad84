"""The join role: a join client (``tether join``) fed the host's log.

An asyncio adapter over ``core.join_endpoint``: the token (as a login name
over SSH) or a ``resume`` secret (over any link, QUIC included) finds the
client's place in a session; ``RelayJoinEndpoint`` decides the rest. This
module moves messages: the host's log out (from the session's snapshot cache,
woken by the session's fan-out), the client's keys to the host, acks both ways.
A join client counts as a mate: the session's mate limit, and the smallest
read-write size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from tether.core.errors import RemoteProtocolError
from tether.core.join_endpoint import (
    JoinFailed,
    MateLeft,
    MateResized,
    MateTyped,
    RelayJoinEndpoint,
    ResyncNeeded,
    check_join,
)
from tether.core.messages import Error, Join, Message, Notice
from tether.core.ratelimit import FailureBackoff, TokenBucket
from tether.transport.alarm import Alarm
from tether.transport.link import Link, LinkClosed, send_out

from .config import RelayConfig
from .mates import MAX_HOLD, clamp_size, display_address, proved
from .registry import Registry
from .session import Mate, Session

log = logging.getLogger("tether.relay")

INPUT_RATE = 4000.0
INPUT_BURST = 64 * 1024.0
"""Bytes of keys a join client may send a second, and in a burst (a paste)."""
MAX_RESUMES = 4096
"""Join places the relay remembers across all sessions (each ends with its session)."""
KICKED_JOIN_TEXT = "tether: the host ended the session for you (the host disconnected you)"
"""What a join client the host disconnected is told: the client ends (and does not
resume) on a notice that starts as the one of an ended session."""
KICK_GRACE = 1.0
"""How long the notice to a disconnected join client gets before its link is
closed (QUIC's drain says only that it left the send buffer)."""
_KICKS: set[asyncio.Task[None]] = set()


async def _bye(link: Link) -> None:
    """Tell a disconnected join client why, then close its link."""
    with contextlib.suppress(LinkClosed, TimeoutError, ConnectionError):
        link.send_nowait(Notice(KICKED_JOIN_TEXT))
        await asyncio.wait_for(link.drain(), KICK_GRACE)
        await asyncio.sleep(KICK_GRACE / 2)
    link.close()


def _key(resume: bytes) -> bytes:
    """Resume secrets are looked up by hash: the table never holds the secret."""
    return hashlib.sha256(resume).digest()


class JoinFeed:
    """A join client as a session subscriber: each new event wakes its sender.
    It never holds the host back: a slow client falls behind and jumps."""

    def __init__(self, ep: RelayJoinEndpoint) -> None:
        self.ep = ep
        self.wake = Alarm()
        self.link: Link | None = None

    def send(self, msg: Message) -> None:
        self.ep.log_advanced()
        self.wake.set()

    async def drain(self) -> None:
        return

    def presence(self, present: bool, text: str) -> None:
        link = self.link
        if link is not None:
            with contextlib.suppress(LinkClosed):
                link.send_nowait(Notice(text))

    async def close(self) -> None:
        if self.link is not None:
            self.link.close()


class Place:
    """A join client's place in a session, kept across its links."""

    def __init__(self, session: Session, ep: RelayJoinEndpoint, mate: Mate) -> None:
        self.session = session
        self.ep = ep
        self.mate = mate
        self.feed = JoinFeed(ep)
        self.link: Link | None = None
        self.input = TokenBucket(INPUT_RATE, INPUT_BURST, time.monotonic())
        self.left_at: float | None = None
        """When its last link ended (None: connected)."""


class Joins:
    def __init__(
        self, registry: Registry, config: RelayConfig, backoff: FailureBackoff | None = None
    ) -> None:
        self.registry = registry
        self.config = config
        self._ids = itertools.count(1_000_000)  # apart from ssh mates' ids
        self._places: dict[bytes, Place] = {}
        self._backoff = backoff or FailureBackoff(free=config.failed_tokens_free)
        """Shared with ssh mates: a guesser gains nothing by taking turns."""
        self.quic: tuple[str, ...] = ()
        self.quic_fingerprint = ""

    # --- fronts ------------------------------------------------------------------------

    async def handle_ssh(self, link: Link, token: str, peer: str) -> None:
        """A join client over the SSH bootstrap: its login name is the token."""
        await self._guarded(link, peer, self._by_token(link, token, peer))

    async def handle_resume(self, link: Link, join: Join, peer: str) -> None:
        """A join client coming back over QUIC (first message already read)."""
        await self._guarded(link, peer, self._by_resume(link, join, peer))

    async def _by_token(self, link: Link, token: str, peer: str) -> None:
        found = self.registry.lookup(token)
        if found is None:
            await self._refuse_token(link, peer)
            return
        join = await self._first(link)
        session, readonly = found
        if session.mate_keys and not proved(getattr(link, "fingerprint", ""),
                                             session.mate_keys):
            # as for ssh mates (``mates.Mates.handle``): the login's key check met
            # what the session required then
            log.warning("join client %s: no key the session requires; refused", peer)
            link.send_nowait(Error("this session admits only mates with a key its host listed"))
            return
        place = self._resumed(join, session) or self._new_place(
            session, readonly, peer, getattr(link, "fingerprint", ""))
        if place is None:
            link.send_nowait(Error("this session has too many mates connected"))
            return
        await self._serve(place, link, join, peer)

    async def _by_resume(self, link: Link, join: Join, peer: str) -> None:
        place = self._resumed(check_join(join), None)
        if place is None:
            link.send_nowait(Error("unknown join: start over with the token over SSH"))
            return
        await self._serve(place, link, join, peer)

    @staticmethod
    async def _guarded(link: Link, peer: str, serve: Coroutine[Any, Any, None]) -> None:
        """One join link, whatever front brought it: a peer's bad message gets
        an Error, a lost link nothing; the link is closed at the end."""
        try:
            await serve
        except (RemoteProtocolError, ValueError, TypeError) as exc:
            log.warning("join %s: protocol error: %s", peer, exc)
            with contextlib.suppress(LinkClosed):
                link.send_nowait(Error(str(exc)))
        except (LinkClosed, TimeoutError, ConnectionError):
            pass
        finally:
            link.close()

    async def _first(self, link: Link) -> Join:
        msg = await asyncio.wait_for(link.recv(), self.config.hello_timeout)
        return check_join(msg)

    async def _refuse_token(self, link: Link, peer: str) -> None:
        """As for ssh mates (``mates.Mates._refuse_token``): held back, then refused."""
        address = peer.rpartition(":")[0]
        wait = self._backoff.failure(address, time.monotonic())
        await asyncio.sleep(0.05 + secrets.randbelow(150) / 1000 + min(wait, MAX_HOLD))
        text = "invalid or expired session token"
        if wait:
            text = f"too many failed attempts from your address; try again in {wait:.0f} s"
        with contextlib.suppress(LinkClosed):
            link.send_nowait(Error(text))
            await link.drain()

    # --- places -------------------------------------------------------------------------

    def _resumed(self, join: Join, session: Session | None) -> Place | None:
        """The place ``join.resume`` names (in ``session``, when the token said which)."""
        if join.resume is None:
            return None
        place = self._places.get(_key(join.resume))
        if place is None or place.session.ended:
            return None
        if session is not None and place.session is not session:
            return None
        if not secrets.compare_digest(place.ep.resume, join.resume):
            return None
        return place

    def _new_place(
        self, session: Session, readonly: bool, peer: str = "", fingerprint: str = ""
    ) -> Place | None:
        self._forget_gone(session)
        if len(session.mates) + session.joining >= self.config.max_mates:
            return None
        if len(self._places) >= MAX_RESUMES:
            self._forget_ended()
            if len(self._places) >= MAX_RESUMES:
                return None
        mate = Mate(next(self._ids), readonly, 80, 24, kind="join",
                    address=display_address(peer), fingerprint=fingerprint)
        resume = secrets.token_bytes(32)
        ep = RelayJoinEndpoint(session.id, mate.id, readonly, resume, session.cache,
                               self.quic, self.quic_fingerprint)
        place = Place(session, ep, mate)
        self._places[_key(resume)] = place
        mate.kick = lambda: self._kick(place)
        session.joins += 1
        session.subscribe(place.feed)
        # listed while its place is held, links or not (``Mate.away`` marks a
        # link that is down): the same mate, coming back, is no newcomer
        session.add_mate(mate)
        return place

    def _forget_gone(self, session: Session) -> None:
        """Places of ``session`` whose client stayed away as long as a session
        waits for its host: they no longer count as mates."""
        now = time.monotonic()
        for place in list(self._places.values()):
            if (place.session is session and place.left_at is not None
                    and now - place.left_at > self.config.host_away_timeout):
                self.leave(place)

    def _forget_ended(self) -> None:
        for key, place in list(self._places.items()):
            if place.session.ended:
                del self._places[key]

    def leave(self, place: Place) -> None:
        """The client is gone for good (its session ended)."""
        session = place.session
        session.unsubscribe(place.feed)
        if session.remove_mate(place.mate.id) is not None:
            session.joins -= 1
            session.resize()
        self._places.pop(_key(place.ep.resume), None)

    def _kick(self, place: Place) -> None:
        """The host disconnects this client: its place ends (a resume finds none)
        and the client is told the session is over for it, so it does not come
        back; the token stays valid."""
        link = place.link
        place.ep.connection_lost()  # nothing more it sends is taken, not a key
        place.link = place.feed.link = None
        self.leave(place)
        if link is not None:
            task = asyncio.ensure_future(_bye(link))
            _KICKS.add(task)
            task.add_done_callback(_KICKS.discard)

    # --- one link ------------------------------------------------------------------------

    async def _serve(self, place: Place, link: Link, join: Join, peer: str) -> None:
        session, ep = place.session, place.ep
        if place.link is not None and place.link is not link:
            place.link.close()  # superseded: the client came back another way
        place.link = place.feed.link = link
        place.left_at = None
        mate = place.mate
        address = display_address(peer)
        if mate.away or mate.address != address:  # back, or moved: the list says so
            mate.away, mate.address = False, address
            session.mates_changed()
        conn = ep.attach(join, time.monotonic(),
                         datagrams=getattr(link, "send_datagram", None) is not None)
        log.info("join mate %d (%s) on session %s from %s via %s", ep.mate,
                 "read-only" if ep.readonly else "read-write", session.id, peer,
                 link.description)
        self._events(place)
        sender = asyncio.create_task(self._send_loop(place, link))
        try:
            while not session.ended:
                msg = await link.recv()
                ep.receive(msg, time.monotonic(), conn)
                if not self._events(place):
                    for o in ep.messages_to_send(time.monotonic(), limit_bytes=0):
                        if isinstance(o.message, Error):  # why, before closing
                            link.send_nowait(o.message)
                    await link.drain()
                    return
                place.feed.wake.set()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            ep.connection_lost(conn)
            if place.link is link:
                place.link = place.feed.link = None
                place.left_at = time.monotonic()
                if place.mate.id in session.mates and not session.ended:
                    place.mate.away = True
                    session.mates_changed()
            if session.ended:
                self.leave(place)

    def _events(self, place: Place) -> bool:
        """Act on the endpoint's events; False: the link must close."""
        session, ep = place.session, place.ep
        now = time.monotonic()
        ok = True
        while (ev := ep.next_event()) is not None:
            if isinstance(ev, MateTyped):
                if not place.input.allow(len(ev.keys) + 1, now):
                    continue  # over its rate: dropped, as for ssh mates
                session.send_input(ev.pane, ev.keys, ev.binding, now)
            elif isinstance(ev, MateResized):
                place.mate.cols, place.mate.rows = clamp_size(ev.cols, ev.rows)
                session.resize()
            elif isinstance(ev, ResyncNeeded):
                session.ep.request_snapshot()
                session.flush(now)
            elif isinstance(ev, JoinFailed):
                log.warning("join mate %d: %s", ep.mate, ev.text)
                ok = False
            elif isinstance(ev, MateLeft):
                log.info("join mate %d on session %s left", ep.mate, session.id)
                self.leave(place)
                ok = False
        return ok

    async def _send_loop(self, place: Place, link: Link) -> None:
        """The log out to the client, a batch at a time; acks on their timer."""
        ep, feed = place.ep, place.feed
        with contextlib.suppress(LinkClosed):
            while True:
                ep.rtt = getattr(link, "rtt", None)  # QUIC's: times the event repeats
                ep.lost_at = getattr(link, "lost_at", None)  # and whether at once
                while out := ep.messages_to_send(time.monotonic()):
                    for o in out:
                        send_out(link, o)
                    await link.drain()
                feed.wake.clear()
                due = ep.next_timer()
                delay = None if due is None else max(due - time.monotonic(), 0.0)
                await feed.wake.wait(delay)
                ep.handle_timer(time.monotonic())
