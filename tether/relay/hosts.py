"""The host role: a host's Hello, its session (new, resumed or re-created), and
its replication stream until it leaves, goes silent or ends the session.

An asyncio adapter over ``core.relay_endpoint``: ``HelloGate`` judges the
Hello, ``RelayHostEndpoint`` (held by the ``Session``) the rest; this module
moves messages, sleeps until the endpoint's next timer and does the I/O its
events call for (logging, ending a session). Fronts hand over an authenticated
link; nothing here knows SSH from QUIC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tether.core.errors import RemoteProtocolError
from tether.core.messages import Error, Hello
from tether.core.relay_endpoint import HelloGate, RelayHostEndpoint
from tether.core.session import (
    AWAY_TEXT,
    BACK_TEXT,
    HOST_SILENCE,
    PING_BURST,
    PING_RATE,
    HostEnded,
    ProtocolFailed,
    SessionExpired,
)
from tether.transport import quic, ssh
from tether.transport.link import Link, LinkClosed

from .config import RelayConfig
from .registry import Registry
from .replica import ReplicaError
from .session import Session

__all__ = ["AWAY", "BACK", "HOST_SILENCE", "PING_BURST", "PING_RATE", "Endpoints", "Hosts"]

log = logging.getLogger("tether.relay")

AWAY = AWAY_TEXT
BACK = BACK_TEXT


class Endpoints(Protocol):
    """Where this relay can be reached: known only once its fronts listen."""

    quic_port: int | None
    quic_fingerprint: str

    def ssh_string(self, token: str) -> str: ...

    def join_string(self, token: str) -> str: ...

    def web_string(self, token: str) -> str:
        """A browser link for ``token``; empty without a web front."""
        ...


class Hosts:
    def __init__(self, registry: Registry, config: RelayConfig, endpoints: Endpoints) -> None:
        self.registry = registry
        self.config = config
        self.endpoints = endpoints

    def new_endpoint(self, sid: str, secret: bytes, rw: str, ro: str) -> RelayHostEndpoint:
        """A session's protocol end, waiting ``host_away_timeout`` for an away host."""
        ep = RelayHostEndpoint(sid, secret, rw, ro, host_away_timeout=self.config.host_away_timeout)
        self._address(ep)
        return ep

    def _address(self, ep: RelayHostEndpoint) -> None:
        """The addresses a Welcome gives out, as they are now (QUIC listens last)."""
        ends, w = self.endpoints, ep.welcome
        ep.set_addresses(
            ends.ssh_string(w.rw_token), ends.ssh_string(w.ro_token),
            (f"{self.config.public_host}:{ends.quic_port}",) if ends.quic_port else (),
            ends.quic_fingerprint,
            ends.join_string(w.rw_token), ends.join_string(w.ro_token),
            ends.web_string(w.rw_token), ends.web_string(w.ro_token),
        )

    async def handle_quic(self, link: quic.QuicLink) -> None:
        """A host resuming over QUIC: it must name its session and prove the secret."""
        await self.handle(link, "", link.peer, resume_only=True)

    async def handle(
        self, link: Link, host_key: str, peer: str, refusal: str = "",
        decided: Callable[[], None] | None = None, *, resume_only: bool = False,
    ) -> None:
        """One host connection, from its Hello to its last message. With session
        processes, the relay's process counted the sessions: ``refusal`` says why
        no new one may start, and ``decided`` tells it that this host's session
        exists (or will not) and so counts among the reported ones."""
        session: Session | None = None
        try:
            try:
                gate = HelloGate(time.monotonic(), self.config.hello_timeout)
                hello = await self._hello(gate, link)
                if hello is not None:
                    session = await self._session_for(gate, hello, host_key, resume_only,
                                                      refusal)
            finally:
                if decided is not None:
                    decided()
            if hello is None or session is None:
                self._refused(gate, link, peer)
                return
            self._address(session.ep)
            conn = session.attach(link, hello, time.monotonic())
            lazy = getattr(link, "enable_lazy_acks", None)
            if lazy is not None:  # QUIC: the host acks lazily too (protocol 6)
                lazy()
            log.info("host %s attached to session %s via %s", peer, session.id,
                     link.description)
            await self._loop(session, link, conn, peer)
        except RemoteProtocolError as exc:  # a frame the decoder refused
            log.warning("host %s: protocol error: %s", peer, exc)
            with contextlib.suppress(Exception):
                await link.send(Error(str(exc)))
        except (LinkClosed, TimeoutError, ConnectionError):
            pass
        except (ValueError, TypeError) as exc:
            # a hostile host's message that slipped past the schema: its problem
            log.warning("host %s: bad message: %s", peer, exc)
            with contextlib.suppress(Exception):
                await link.send(Error(f"bad message: {exc}"))
        except ReplicaError as exc:
            log.warning("host %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                await link.send(Error(f"session replica failed: {exc}"))
        finally:
            link.close()
            if session is not None and session.detach(link, time.monotonic()):
                log.info("host left session %s", session.id)

    async def _hello(self, gate: HelloGate, link: Link) -> Hello | None:
        """The link's first message, as the gate judges it (None: refused, or late)."""
        deadline = gate.next_timer() or time.monotonic()
        try:
            msg = await asyncio.wait_for(link.recv(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            gate.handle_timer(max(time.monotonic(), deadline))
            return None
        return gate.receive(msg, time.monotonic())

    def _refused(self, gate: HelloGate, link: Link, peer: str) -> None:
        """Send the gate's Error, if it has one (a late Hello gets none); the caller closes."""
        ev = gate.next_event()
        out = gate.messages_to_send(time.monotonic())
        if out and isinstance(ev, ProtocolFailed):
            log.warning("host %s: protocol error: %s", peer, ev.text)
        with contextlib.suppress(LinkClosed):
            for o in out:
                link.send_nowait(o.message)

    async def _session_for(
        self, gate: HelloGate, hello: Hello, host_key: str, resume_only: bool,
        refusal: str = "",
    ) -> Session | None:
        """The session a host resumes by id and secret, or a new one (which the
        secret may re-create with its old id and tokens); None: the gate refused."""
        try:
            keys = ssh.parse_public_keys(hello.mate_keys)
        except ValueError as exc:
            gate.refuse(f"bad mate key list: {exc}")
            return None
        session = self.registry.resumable(hello)
        if session is None and resume_only:
            gate.refuse("unknown session or wrong secret: start over the SSH bootstrap")
            return None
        if session is None and refusal:
            gate.refuse(refusal)
            return None
        if session is None:
            try:
                session = await self.registry.create(host_key, hello, self.new_endpoint)
            except RemoteProtocolError as exc:  # full, or too many for this key
                gate.refuse(str(exc))
                return None
        if hello.mate_keys or session.mate_keys:
            session.mate_keys = keys
            self.registry.changed(session)
        return session

    async def _loop(self, s: Session, link: Link, conn: int, peer: str) -> None:
        """Read the host until it ends the session, breaks the protocol or goes;
        each event it sends waits for the subscribers before the next is read."""
        timers = asyncio.create_task(self._timers(s, link, conn))
        try:
            while True:
                msg = await link.recv()
                for ev in s.receive(msg, time.monotonic(), conn):
                    if isinstance(ev, ProtocolFailed):  # its Error is sent: close
                        log.warning("host %s: protocol error: %s", peer, ev.text)
                        return
                    if isinstance(ev, HostEnded):
                        log.info("host ended session %s: %s", s.id, ev.reason)
                        await self.registry.end(s)
                        return
                await s.drain()
        finally:
            timers.cancel()

    async def _timers(self, s: Session, link: Link, conn: int) -> None:
        """The link's timer loop: sleep until the endpoint's next timer (coalesced
        acks, the host's silence), or until it moved earlier, and fire it."""
        while s.conn == conn and not s.ended:
            s.wake.clear()
            when = s.ep.next_timer()
            delay = None if when is None else max(when - time.monotonic(), 0.0)
            await s.wake.wait(delay)
            if s.conn != conn or s.ended:
                return
            # over QUIC the host's pings are datagrams answered in the link: they
            # count through its last_activity without reaching recv()
            events = s.tick(time.monotonic(), getattr(link, "last_activity", None))
            if any(isinstance(ev, SessionExpired) for ev in events):
                log.info("session %s ended (host silent for %g s)", s.id,
                         self.config.host_away_timeout)
                # shielded: ending closes the link, whose loop then cancels us
                await asyncio.shield(self.registry.end(s))
                return
