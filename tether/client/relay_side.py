"""The host agent's relay side: links to the relay, moved by ``HostEndpoint``.

The protocol (handshake, log replay, exactly-once input and its acks, pings,
RTT, the dead-link check) lives in the sans-I/O ``HostEndpoint``; this adapter
only finds links (the connect loop, the move to QUIC), feeds the endpoint what
arrives, sends what it returns, runs its timer, and turns its events into tmux
actions (``TmuxSide``) and messages for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tether.core.control import quote
from tether.core.errors import AuthError, RemoteProtocolError
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import Input, Welcome
from tether.core.session import (
    PING_EVERY,
    QUIET_AFTER,
    InputReceived,
    LinkBack,
    LinkDead,
    LinkQuiet,
    MatesChanged,
    PeerClosed,
    ProtocolFailed,
    ResizeRequested,
    SessionEvent,
    SnapshotNeeded,
    State,
    Welcomed,
)
from tether.transport.alarm import Alarm
from tether.transport.link import Link, LinkClosed, send_out
from tether.transport.reconnect import Connector
from tether.transport.tmux import TmuxError

from .presence import Presence
from .tmux_side import TmuxSide

log = logging.getLogger("tether.host")

Publish = Callable[[str, bool], None]
"""(text, show): log a message; ``show`` also displays it on the host's clients."""
UPGRADE_EVERY = PING_EVERY * 20
"""On SSH, how often to try QUIC again."""
ERROR_OPTION = "@tether_error"
"""Why the relay refused the session, for `tether wait tether-ready` (cli.py)."""
SHOW_OUTAGE = 5.0
"""Outages at least this long are also displayed on the host's clients when they
end (all are logged, in ``show-messages``)."""
BACKOFF_MAX = 1.0
"""Longest pause between two connection attempts: once the network is back, a
link is found within about a second (each attempt races every path)."""


def discard_link(task: asyncio.Task[Link]) -> None:
    """Cancel a connection attempt, closing its link if it already made one."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


class RelaySide:
    """Connections to the relay, one at a time, for as long as the agent runs."""

    def __init__(
        self,
        endpoint: HostEndpoint,
        connector: Connector,
        tmux: TmuxSide,
        publish: Publish,
        exited: asyncio.Event,
    ) -> None:
        self.ep = endpoint
        self.connector = connector
        self.side = tmux
        self.publish = publish
        self.exited = exited
        self.presence = Presence(publish)
        """Who is connected, as the relay last said (``tether list-mates``)."""
        self.link: Link | None = None
        """The link while welcomed on it (the status line shows it)."""
        self._next_link: Link | None = None
        self.early: asyncio.Task[Link] | None = None
        """A first connection started before the agent knew its session (the
        SSH handshake then overlaps tmux starting)."""
        self.wake = asyncio.Event()  # the log grew: the sender sends
        self._poke = Alarm()  # the endpoint may have events or a new timer
        self._armed: float | None = None
        """What the timer loop sleeps until."""
        self.ready = asyncio.Event()
        self.state_changed = asyncio.Event()
        self.transport = "connecting"
        self.last_error = ""
        self._failure: BaseException | None = None
        self._welcomed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._racing: asyncio.Task[None] | None = None
        self._applying: asyncio.Future[None] | None = None
        self._ending: str | None = None
        """Why the session ended, once it has: End goes on the next welcomed link."""
        self._end_asked = asyncio.Event()
        self._end_link: Link | None = None
        self.end_sent = asyncio.Event()
        """End is on its way (or there is no session at the relay to end)."""
        self.ended = asyncio.Event()
        """The relay closed the link End went on: it has ended the session."""
        self.outage_since: float | None = None
        """When the relay was last heard, while it is not (quiet link, or none)."""
        self.back: tuple[float, str, float] | None = None
        """The last outage: its length, how it ended (``same connection``, ``new
        connection``, ``SSH fallback``) and when; the status line says so a while."""

    def changed(self) -> None:
        """The tmux side logged something: the sender sends. Only a snapshot owed
        can have made an event (``SnapshotNeeded``): then the timer loop looks,
        not on every pane output."""
        self.wake.set()
        if self.ep.need_snapshot or self._timer_moved():
            self._poke.set()

    def _timer_moved(self) -> bool:
        """The endpoint's next timer is now earlier than the one slept on (an
        idle host's slow ping, pulled in by output)."""
        due = self.ep.next_timer()
        return due is not None and (self._armed is None or due < self._armed)

    def network_changed(self) -> None:
        """The host's addresses or routes changed (``netwatch``): ping now."""
        self.ep.network_changed(time.monotonic())
        self._poke.set()

    # --- one connection ----------------------------------------------------------

    async def _session(self, link: Link) -> None:
        """Handshake and replicate until the link ends; raise why it did."""
        self._failure = None
        self._welcomed = False
        self.ep.connect(time.monotonic())
        tasks = self._tasks = [self._guarded(link, self._timers(link))]
        try:
            self._flush(link)  # Hello
            await link.drain()
            while True:
                try:
                    msg = await link.recv()
                except LinkClosed:
                    await self._settle(tasks)
                    if self._failure is not None:
                        raise self._failure from None
                    raise
                self.ep.receive(msg, time.monotonic())
                self._flush(link)
                self._poke.set()
        finally:
            await self._settle(tasks)
            self.link = None
            self.state_changed.set()
            if self._welcomed and self.outage_since is None and self._next_link is None:
                self.outage_since = self.ep.last_contact or time.monotonic()
            self.ep.connection_lost(time.monotonic())

    async def _settle(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop the link's tasks, then act on the events they left: input is typed
        (the endpoint took it, a resend will be dropped), the connection strings
        published, and why the peer closed kept; the rest belonged to the link."""
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        applying, self._applying = self._applying, None
        if applying is not None:
            with contextlib.suppress(Exception):  # a failure was the link's to report
                await applying
        while (event := self.ep.next_event()) is not None:
            if isinstance(event, InputReceived):
                with contextlib.suppress(TmuxError):
                    await self.side.apply_input(event.input)
            elif isinstance(event, ResizeRequested):
                self.side.apply_resize(event.cols, event.rows)
            elif isinstance(event, Welcomed):
                self.connector.learn(event.welcome)
                self._announce(event.welcome, event.announce)
            elif isinstance(event, MatesChanged):
                self._mates_changed(event)
            elif isinstance(event, PeerClosed) and self._failure is None:
                self._failure = LinkClosed(event.reason)
            elif isinstance(event, ProtocolFailed) and self._failure is None:
                self._failure = RemoteProtocolError(event.text)

    def _guarded(self, link: Link, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of this link: what goes wrong in it ends the link (and is
        raised by ``_session``), never silently the task alone."""

        async def run() -> None:
            try:
                await coro
            except LinkClosed:
                link.close()  # the receive loop raises its own LinkClosed
            except Exception as exc:
                if self._failure is None:
                    self._failure = exc
                link.close()

        return asyncio.create_task(run())

    def _flush(self, link: Link) -> None:
        """Send the control messages now (pongs, acks, pings), not after a drain."""
        for out in self.ep.messages_to_send(time.monotonic(), events=False):
            send_out(link, out)

    async def _timers(self, link: Link) -> None:
        """The endpoint's clock and events: act on events, sleep until ``next_timer``."""
        while True:
            self._poke.clear()
            while (event := self.ep.next_event()) is not None:
                await self._on_event(link, event)
            if self._ending is not None and self._end_due():
                await self._send_end(link, self._ending)
            now = time.monotonic()
            due = self.ep.next_timer()
            if due is not None and due <= now:
                activity = getattr(link, "last_activity", None)
                if activity is not None:  # QUIC hears the relay below the messages
                    self.ep.note_activity(activity)
                self.ep.handle_timer(now)
                self._flush(link)
                continue
            self._armed = due
            await self._poke.wait(None if due is None else due - now)

    async def _on_event(self, link: Link, event: SessionEvent) -> None:
        if isinstance(event, Welcomed):
            self._on_welcome(link, event)
        elif isinstance(event, SnapshotNeeded):
            self.side.request_snapshot()
        elif isinstance(event, InputReceived):
            await self._apply_input(event.input)
        elif isinstance(event, ResizeRequested):
            self.side.apply_resize(event.cols, event.rows)
        elif isinstance(event, MatesChanged):
            self._mates_changed(event)
        elif isinstance(event, LinkQuiet):
            self.outage_since = event.since
            self.state_changed.set()
            self.publish(f"no word from the relay for {QUIET_AFTER:.0f}s; keeping the link "
                         "and trying other paths beside it", False)
            self._racing = self._guarded(link, self._race(link))
            self._tasks.append(self._racing)
        elif isinstance(event, LinkBack):
            self._stop_race()
            self._came_back(f"on the same {link.kind.upper()} connection", event.quiet,
                            "same connection")
            self.wake.set()  # the log waited while the link was quiet
        elif isinstance(event, LinkDead):  # no Welcome in time
            self._failure = TimeoutError()
            link.close()
        elif isinstance(event, PeerClosed):
            self._failure = LinkClosed(event.reason)
            link.close()
        elif isinstance(event, ProtocolFailed):
            with contextlib.suppress(LinkClosed):
                self._flush(link)
            self._failure = RemoteProtocolError(event.text)
            link.close()

    async def _race(self, link: Link) -> None:
        """The link is quiet: find another beside it. If one gets through while
        the link still says nothing, move to it (``_next_link``)."""
        try:
            new = await self.connector.race()
        except AuthError as exc:
            self.report(str(exc))
            return
        if self.connector.cert_error:
            self.report(self.connector.cert_error)
        if not self.ep.quiet or self._end_link is link:
            new.close()  # the link came back first: keep it
            return
        self._next_link = new
        link.close()  # the session loop ends; the connect loop takes the new link

    def _stop_race(self) -> None:
        racing, self._racing = self._racing, None
        if racing is not None:
            racing.cancel()

    def _came_back(self, how: str, quiet: float, short: str) -> None:
        """Say how long the relay was out of reach and how the link came back."""
        self.outage_since = None
        text = f"the relay is back after {quiet:.1f}s, {how}"
        self.back = (quiet, short, time.monotonic())
        self.state_changed.set()
        self.publish(text, quiet >= SHOW_OUTAGE)

    async def _apply_input(self, msg: Input) -> None:
        """Type mate input. The endpoint has taken (and will ack) it, so the link
        ending meanwhile must not cut a host binding short: it runs in a task of
        its own that ``_settle`` waits for."""
        if msg.binding is None:
            await self.side.apply_input(msg)  # keys: queued at once, nothing to cut
            return
        self._applying = asyncio.ensure_future(self.side.apply_input(msg))
        await asyncio.shield(self._applying)

    def _mates_changed(self, event: MatesChanged) -> None:
        """Say who joined and left; ``@tether_mates`` counts who is connected."""
        self.presence.update(event.mates)
        self.side.tmux.send(f"set -g @tether_mates {len(self.presence.mates)}")

    def kick(self, mate: int) -> bool:
        """Ask the relay to disconnect a mate (``tether kick-mate``); False while
        there is no link to ask on."""
        link = self.link
        if link is None or not self.ep.kick(mate):
            return False
        with contextlib.suppress(LinkClosed):
            self._flush(link)
        return True

    def _on_welcome(self, link: Link, event: Welcomed) -> None:
        self._welcomed = True
        lazy = getattr(link, "enable_lazy_acks", None)
        if lazy is not None:  # QUIC: the relay acks lazily too (protocol 6)
            lazy()
        self.connector.learn(event.welcome)
        self.link = link
        self.state_changed.set()
        self.transport = link.description
        self._announce(event.welcome, event.announce)
        self.publish(f"connected to the relay over {link.description}", False)
        if self.outage_since is not None:
            if link.kind == "quic":
                how, short = "over a new QUIC connection", "new connection"
            elif self.connector.quic is not None:
                how, short = "over the SSH channel (UDP does not get through)", "SSH fallback"
            else:
                how, short = "over SSH", "new connection"
            self._came_back(how, time.monotonic() - self.outage_since, short)
        self.wake.set()
        self._tasks.append(self._guarded(link, self._send_loop(link)))
        if link.kind != "quic" and self.connector.quic is not None and self._ending is None:
            self._tasks.append(self._guarded(link, self._upgrade(link)))

    def _announce(self, welcome: Welcome, announce: bool) -> None:
        """Publish the connection strings (``#{tether_ssh}``); say them when new."""
        t = self.side.tmux
        for name, value in (
            ("@tether_ssh", welcome.ssh_rw),
            ("@tether_ssh_ro", welcome.ssh_ro),
            ("@tether_join", welcome.join_rw),
            ("@tether_join_ro", welcome.join_ro),
            ("@tether_web", welcome.web_rw),
            ("@tether_web_ro", welcome.web_ro),
            ("@tether_session", welcome.session),
        ):
            t.send(f"set -g {name} {quote(value)}")
        t.send(f"set -gu {ERROR_OPTION}")
        if announce:
            if welcome.web_ro:
                self.publish(f"web session read only: {welcome.web_ro}", False)
                self.publish(f"web session: {welcome.web_rw}", False)
            if welcome.join_ro:
                self.publish(f"join session read only: {welcome.join_ro}", False)
                self.publish(f"join session: {welcome.join_rw}", False)
            self.publish(f"ssh session read only: {welcome.ssh_ro}", True)
            self.publish(f"ssh session: {welcome.ssh_rw}", True)
            t.send("wait-for -S tether-ready")
            self.ready.set()

    async def _send_loop(self, link: Link) -> None:
        """The log, a batch at a time, waiting for the link to drain between."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while out := self.ep.messages_to_send(time.monotonic()):
                for o in out:
                    send_out(link, o)
                await link.drain()

    async def _upgrade(self, link: Link) -> None:
        """On the SSH channel: move to QUIC as soon as it gets through."""
        first = True
        while True:
            if not first:
                await asyncio.sleep(UPGRADE_EVERY)
            first = False
            if not self.connector.quic_preferred():
                continue
            quic = await self.connector.try_quic()
            if self.connector.cert_error:
                self.report(self.connector.cert_error)
            if quic is not None and self._ending is not None:
                quic.close()  # End is going out on this link: moving now would lose it
                return
            if quic is not None:
                self._next_link = quic
                link.close()  # the session loop ends; the connect loop takes the QUIC link
                return

    async def end(self, reason: str) -> None:
        """The tmux session ended: have the relay end it now, not an hour later.

        The link may be mid-handshake or mid-move to QUIC, with none welcomed:
        End then goes on the next welcomed link (the connect loop goes on).
        Returns once End is on its way; ``ended`` tells when the relay has it."""
        self._ending = reason
        self._end_asked.set()
        self._poke.set()
        await self.end_sent.wait()

    async def _send_end(self, link: Link, reason: str) -> None:
        """End after the rest of the log; the relay closes the link once it ended
        the session, so the link is left open for it to do so."""
        self.ep.end(reason, time.monotonic())
        self._end_link = link
        for o in self.ep.messages_to_send(time.monotonic(), limit_bytes=None):
            send_out(link, o)
        self.end_sent.set()
        await link.drain()

    def _end_due(self) -> bool:
        """End can go now: welcomed, and not on a link our move to QUIC is closing
        (the End would be lost with it; it goes on the QUIC link instead)."""
        return self.ep.state is State.CONNECTED and self._next_link is None

    def _nothing_to_end(self) -> bool:
        """Ending with no session the relay gave us: nothing is left to end."""
        if self._ending is None or self.ep.shared is not None:
            return False
        self.end_sent.set()
        self.ended.set()
        return True

    def close(self) -> None:
        """The agent stops: drop every link and connection attempt."""
        if self.early is not None:
            discard_link(self.early)
        for link in (self.link, self._next_link):
            if link is not None:
                link.close()

    # --- connections, one after another -------------------------------------------

    async def _next(self) -> Link:
        if self.early is not None:
            early, self.early = self.early, None
            return await early
        return self._next_link or await self.connector.connect()

    async def connect_loop(self) -> None:
        """Connect, replicate, and reconnect with backoff until the relay has
        ended the session (``end``) or there is none to end."""
        delay = 0.2
        while not self.ended.is_set():
            try:
                link = await self._next()
                self._next_link = None
                if self.connector.cert_error:
                    self.report(self.connector.cert_error)
            except AuthError as exc:
                self.report(str(exc))
                self._refused(str(exc))
                delay = 30.0
            except Exception as exc:
                self.report(f"cannot reach the relay: {str(exc) or type(exc).__name__}")
            else:
                if self._nothing_to_end():  # no Hello yet: no session at the relay
                    link.close()
                    return
                start = time.monotonic()
                await self._run_link(link)
                if self._end_link is link:  # closed after End: by the relay, done
                    self.ended.set()
                    return
                if time.monotonic() - start > 10 or self._next_link is not None:
                    delay = 0.2
            if self._nothing_to_end():
                return
            if self._next_link is not None:
                continue
            self.transport = "reconnecting"
            await self._pause(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _pause(self, seconds: float) -> None:
        """Back off between attempts, but not once the session ended: the End is due."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._end_asked.wait(), seconds)
        if self._end_asked.is_set():
            await asyncio.sleep(min(seconds, 0.1))

    async def _run_link(self, link: Link) -> None:
        """One link's session, and what its end is reported as."""
        try:
            await self._session(link)
        except (LinkClosed, TimeoutError, ConnectionError, OSError) as exc:
            if self._next_link is None and self._end_link is not link:  # not our own doing
                self.report(f"connection to the relay lost: {exc}")
        except RemoteProtocolError as exc:
            self.report(str(exc))
            self._refused(str(exc))
            if link.kind == "quic":
                # e.g. a restarted relay that no longer knows us: bootstrap over
                # SSH, where it can re-create the session with the same tokens
                self.connector.quic_failed_at = time.monotonic()
        except Exception as exc:  # a bug must cost a reconnect, never the session
            log.exception("replication failed")
            self.report(f"replication failed ({type(exc).__name__}: {exc}); reconnecting")
        finally:
            link.close()

    def _refused(self, reason: str) -> None:
        """Not shared yet and refused: wake `tether wait tether-ready` to fail with
        ``reason`` (it reads ``ERROR_OPTION``) rather than wait for ever."""
        if self.ready.is_set():
            return
        t = self.side.tmux
        t.send(f"set -g {ERROR_OPTION} {quote(reason)}")
        t.send("wait-for -S tether-ready")

    def report(self, text: str) -> None:
        """Log and show an error once (not again while it repeats)."""
        if text != self.last_error:
            self.last_error = text
            log.warning("%s", text)
            self.publish(text, True)
