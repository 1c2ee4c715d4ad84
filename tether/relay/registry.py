"""Which sessions exist: creation under the limits, tokens, ending and reaping.

The only place that maps a token or an id to a session. Replica workers come
from a factory, so where a session's replica runs (a process of its own today,
a per-core process later) is decided by whoever builds the registry.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from tether.core import tokens
from tether.core.errors import RemoteProtocolError
from tether.core.messages import Hello, Message
from tether.core.relay_endpoint import RelayHostEndpoint, resumes
from tether.core.session import SessionExpired

from .config import RelayConfig
from .session import Replica, Session

log = logging.getLogger("tether.relay")

ReplicaFactory = Callable[[str, Callable[[Message], None]], Replica]
"""(session id, where its messages go) -> a replica worker, not yet started."""
EndpointFactory = Callable[[str, bytes, str, str], RelayHostEndpoint]
"""(session id, secret, rw token, ro token) -> the session's end of its host."""

REAP_EVERY = 5.0


class Registry:
    def __init__(self, config: RelayConfig, new_replica: ReplicaFactory) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._new_replica = new_replica
        self._by_token: dict[bytes, tuple[Session, bool]] = {}
        self._token_key = tokens.TokenKey()
        self.on_change: Callable[[Session, bool], None] | None = None
        """Told of each session created or changed (True) and ended (False): a
        session process tells the relay's directory."""

    def lookup(self, token: str) -> tuple[Session, bool] | None:
        """(session, read-only) for a token; keyed by HMAC so no secret is compared."""
        return self._by_token.get(self._token_key(token))

    def mate_keys_for(self, token: str) -> set[bytes] | None:
        """The keys a token's session requires of mates (None: none, or no such token)."""
        found = self.lookup(token)
        return found[0].mate_keys or None if found else None

    def resumable(self, hello: Hello) -> Session | None:
        """The live session ``hello`` resumes, if its secret is that session's own."""
        found = self.sessions.get(hello.session) if hello.session is not None else None
        if found is None or not resumes(hello, found.id, found.secret):
            return None
        return found

    async def create(
        self, host_key: str, again: Hello | None = None, endpoint: EndpointFactory | None = None
    ) -> Session:
        if len(self.sessions) >= self.config.max_sessions:
            raise RemoteProtocolError("this relay is full; try again later")
        if sum(1 for s in self.sessions.values() if s.host_key == host_key) >= (
            self.config.max_sessions_per_key
        ):
            raise RemoteProtocolError("too many sessions for this host key")
        secret = secrets.token_bytes(32)
        if again is not None and self._can_recreate(again):
            # a host whose session this relay forgot (it restarted, or the host was
            # away too long): its secret gives back the same id and tokens, and
            # nothing else does
            assert again.secret is not None
            secret = again.secret
        sid, rw, ro = tokens.derive_session(secret)
        session: Session | None = None

        def on_message(msg: Message) -> None:
            if session is not None:
                session.from_replica(msg)

        replica = self._new_replica(sid, on_message)
        session = Session(
            id=sid, rw_token=rw, ro_token=ro, secret=secret, host_key=host_key, replica=replica,
            endpoint=endpoint(sid, secret, rw, ro) if endpoint is not None else None,
        )
        await replica.start()
        self.sessions[sid] = session
        self._by_token[self._token_key(session.rw_token)] = (session, False)
        self._by_token[self._token_key(session.ro_token)] = (session, True)
        if self.on_change is not None:
            self.on_change(session, True)
        log.info(
            "session %s created (tokens %s, %s)",
            sid,
            tokens.redact(session.rw_token),
            tokens.redact(session.ro_token),
        )
        return session

    def changed(self, s: Session) -> None:
        """What the directory knows of a live session changed (the keys it
        requires of mates)."""
        if self.on_change is not None and not s.ended and s.id in self.sessions:
            self.on_change(s, True)

    def _can_recreate(self, h: Hello) -> bool:
        """A host's secret re-creates its session unless that session is live (the
        host then resumes it by id). The tokens a host sends are not trusted:
        they are derived from the secret again."""
        if h.secret is None or len(h.secret) != 32:
            return False
        return tokens.derive_session(h.secret)[0] not in self.sessions

    async def end(self, s: Session) -> None:
        """Forget a session, then let its host and replica go (once)."""
        if s.ended:
            return
        s.ended = True
        self.sessions.pop(s.id, None)
        self._by_token.pop(self._token_key(s.rw_token), None)
        self._by_token.pop(self._token_key(s.ro_token), None)
        if self.on_change is not None:
            self.on_change(s, False)
        await s.close()

    async def end_all(self) -> None:
        for s in list(self.sessions.values()):
            await self.end(s)

    async def reap(self) -> None:
        """Forever: end sessions whose worker died or whose host stayed away too long
        (the endpoint's expiry timer, driven here: an away host has no link loop)."""
        while True:
            await asyncio.sleep(REAP_EVERY)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                gone = s.replica.closed.done()
                expired = s.host is None and any(
                    isinstance(ev, SessionExpired) for ev in s.tick(now)
                )
                if gone or expired:
                    log.info("session %s ended (%s)", s.id, "worker gone" if gone else "host away")
                    await self.end(s)
