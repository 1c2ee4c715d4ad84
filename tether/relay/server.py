"""The relay: fronts wired to roles, one asyncio process.

Fronts (SSH, QUIC, and HTTP/WebSocket for browsers when ``web_port`` is set)
only listen and authenticate, then hand a connection to its role:
``hosts.Hosts`` for a host, ``mates.Mates`` for a mate (an SSH or a browser
terminal alike), ``joins.Joins`` for a join client.
Both find sessions in the ``registry.Registry``; a ``session.Session`` holds one
session's state and fans its host's stream out to subscribers (its replica
worker today). The replica outlives the host's disconnects, so mates stay
attached and the same tokens keep working when the host comes back with its
resume secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tether.core import tokens
from tether.core.messages import Join, Message
from tether.transport import quic, ssh
from tether.transport.link import LinkClosed, Pushback

from .cgroup import cgroup_warning
from .config import RelayConfig
from .hosts import HOST_SILENCE, Hosts
from .jail import jail_unavailable, jail_warning
from .joins import Joins
from .mates import INVALID_TOKEN, MATE_COLS, MATE_ROWS, MATE_WAIT_SCREEN, Mates, clamp_size
from .registry import Registry
from .replica import ReplicaHandle
from .replica_direct import DirectReplica
from .session import Mate, Session

__all__ = [
    "HOST_SILENCE",
    "INVALID_TOKEN",
    "MATE_COLS",
    "MATE_ROWS",
    "MATE_WAIT_SCREEN",
    "Mate",
    "RedactTokens",
    "Relay",
    "RelayConfig",
    "Session",
    "clamp_size",
]

if TYPE_CHECKING:
    from tether.transport import web

    from .front import Front
    from .fronts import FrontPool, FrontProcess
    from .owners import OwnerPool

log = logging.getLogger("tether.relay")

WEB_PAGE_DIR = Path(__file__).parent / "web"
"""The browser mates' page (``index.html``) and its files (``static/``)."""
KEYS_ONLY = "this session admits only mates with an SSH key; use ssh or tether join"
"""Why a browser may not join a session whose host listed mates' keys: a browser
has no SSH key to prove."""

RedactTokens = tokens.RedactTokens


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.port = config.port
        self.host_keys = ssh.load_or_create_host_keys(config.keys_dir)
        self._host_keys_allowed = (
            ssh.parse_public_keys(config.authorized_keys, limit=100000)
            if config.authorized_keys is not None
            else None
        )
        self._acceptor: object | None = None
        self._fronts: FrontPool | None = None
        self._owners: OwnerPool | None = None
        self._local_front: Front | None = None
        self._local_task: asyncio.Task[None] | None = None
        self._quic_server: object | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.quic_port: int | None = None
        self.quic_ports: list[int] = []
        """With session processes: each one's UDP port for QUIC."""
        self.quic_fingerprint = ""
        self._web: web.WebFront | None = None
        self.web_port: int | None = None
        self.registry = Registry(config, self._new_replica)
        self.hosts = Hosts(self.registry, config, self)
        self.mates = Mates(self.registry, config)
        self.joins = Joins(self.registry, config, self.mates.backoff)

    def _new_replica(self, sid: str, on_message: Callable[[Message], None]) -> ReplicaHandle:
        if self.config.replica == "worker":
            return ReplicaHandle(sid, on_message, self.config.jail)
        return DirectReplica(sid, on_message, self.config.jail)

    # --- what callers and tests look at -----------------------------------------

    @property
    def sessions(self) -> dict[str, Session]:
        return self.registry.sessions

    def lookup(self, token: str) -> tuple[Session, bool] | None:
        return self.registry.lookup(token)

    @property
    def fingerprints(self) -> list[tuple[str, str]]:
        """(config option name, SHA256 fingerprint) for each host key."""
        return [(ssh.key_option_name(k), ssh.fingerprint(k)) for k in self.host_keys]

    def _public(self) -> tuple[str, int]:
        host = self.config.public_host or self.config.bind
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.config.public_port or self.port

    def ssh_string(self, token: str) -> str:
        host, port = self._public()
        return f"ssh -p {port} {token}@{host}" if port != 22 else f"ssh {token}@{host}"

    def join_string(self, token: str) -> str:
        """A complete `tether join` line: the relay's key pinned, nothing to trust blindly."""
        host, port = self._public()
        pin = next((fp for name, fp in self.fingerprints if "ed25519" in name), "")
        if not pin and self.fingerprints:
            pin = self.fingerprints[0][1]
        where = f"[{host}]" if ":" in host else host
        return " ".join(["tether join", *(["-p", str(port)] if port != 22 else []),
                         *(["--pin", pin] if pin else []), f"{token}@{where}"])

    def web_base(self) -> str:
        """The web front's base URL (``--web-url``, or built from the public host);
        empty without a web front."""
        if self.web_port is None:
            return ""
        if self.config.web_url:
            return self.config.web_url.rstrip("/")
        host, _ = self._public()
        scheme = "https" if self.config.web_cert else "http"
        where = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        return f"{scheme}://{where}" + (f":{self.web_port}" if self.web_port != default else "")

    def web_string(self, token: str) -> str:
        """The browser link for ``token``; empty without a web front."""
        base = self.web_base()
        return f"{base}/t/{token}" if base else ""

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._check_jail()
        if self.config.session_procs > 0:
            await self._start_owners()
            return
        await self._start_ssh()
        if self.config.quic_port != -1:
            await self._start_quic()
        if self.config.web_port is not None:
            await self._start_web()
        self._reaper = asyncio.create_task(self.registry.reap())

    async def start_sessions(self) -> None:
        """A session process's start: QUIC and the reaper; the relay's process
        listens for SSH (and browsers: ``web_port`` and the base URL are its) and
        hands this one its share."""
        self.web_port = self.config.web_port
        if self.config.quic_port != -1:
            await self._start_quic()
        self._reaper = asyncio.create_task(self.registry.reap())

    async def _start_owners(self) -> None:
        """Session processes hold the sessions; this process accepts SSH, hands
        each connection to a front, and routes what the fronts ask."""
        from .fronts import FrontPool
        from .owners import OwnerPool

        c = self.config
        if c.quic_port != -1:  # made here once, not raced for by every process
            self.quic_fingerprint = quic.load_or_create_certificate(c.keys_dir)[2]
        owners = self._owners = OwnerPool(c, c.session_procs)
        fronts = self._fronts = FrontPool(c, c.ssh_procs or c.session_procs, None, owners)
        owners.fronts = fronts
        self.port = await fronts.start()
        try:
            if c.web_port is not None:
                await self._start_local_front()
                await self._start_web()
            self.quic_ports = await owners.start(self.port, self.web_port, self.web_base())
        except RuntimeError:
            await fronts.close()
            if self._web is not None:
                await self._web.close()
            raise
        self.quic_ports = [p for p in self.quic_ports if p]  # 0: no QUIC (--no-quic)
        self.quic_port = self.quic_ports[0] if self.quic_ports else None

    async def _start_local_front(self) -> None:
        """Browser mates' terminals stay in this process (their WebSocket is here):
        a front like the SSH ones, at the other end of a socket pair, asks the
        session processes for them and pumps their bytes."""
        from .fronts import FrontProcess

        assert self._fronts is not None and self._owners is not None
        slot = FrontProcess(self._fronts, len(self._fronts.fronts))
        slot.local = True
        slot.restart = lambda: self._local_life(slot)  # its channel broke: a new one
        self._local_life(slot)
        await asyncio.sleep(0)  # its end of the channel is open
        self._owners.local_front = slot

    def _local_life(self, slot: FrontProcess) -> None:
        from tether.transport import fdchannel

        from .front import Front

        here, there = fdchannel.pair()
        slot.listen(here)
        local = self._local_front = Front(there)
        local.input_rate = self.config.mate_input_rate
        self._local_task = asyncio.create_task(local.run())

    async def close(self) -> None:
        if self._owners is not None:  # none started again while the fronts end
            self._owners.closing()
            if self._web is not None:  # browsers are told the relay is stopping (1001)
                await self._web.close()
                self._web = None
        if self._reaper is not None:
            self._reaper.cancel()
        if self._acceptor is not None:
            await ssh.wait_closed(self._acceptor)  # type: ignore[arg-type]
        if self._fronts is not None:
            await self._fronts.close()
        if self._owners is not None:
            await self._owners.close()
        if self._quic_server is not None:
            self._quic_server.close()  # type: ignore[attr-defined]
        if self._web is not None:
            await self._web.close()
        if self._local_front is not None:
            self._local_front.stop()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._local_task), 5)  # type: ignore[arg-type]
        await self.registry.end_all()

    def _check_jail(self) -> None:
        """Refuse to start jailed where jails cannot work; say what is weaker."""
        if not self.config.jail:
            log.warning("replica workers are NOT jailed: sessions are not isolated from each "
                        "other or from this machine")
            return
        why = jail_unavailable()
        if why:
            raise RuntimeError(
                f"cannot jail replica workers: {why} "
                "(`tether relay --no-jail` runs them unjailed)"
            )
        if warning := jail_warning():
            log.warning("%s", warning)
        if warning := cgroup_warning():
            log.warning("%s", warning)

    async def _start_ssh(self) -> None:
        if self.config.ssh_procs > 0:
            from .front_requests import Handlers
            from .fronts import FrontPool

            self._fronts = FrontPool(self.config, self.config.ssh_procs, Handlers(
                self.hosts.handle, self.mates.handle, self.joins.handle_ssh,
                self.registry.mate_keys_for))
            self.port = await self._fronts.start()
            return
        allowed = self._host_keys_allowed
        acceptor = await ssh.start_ssh_server(
            self.config.bind,
            self.config.port,
            self.host_keys,
            self.hosts.handle,
            self.mates.handle,
            key_check=(lambda key: key.public_data in allowed) if allowed is not None else None,
            mate_keys=self.registry.mate_keys_for,
            on_join=self.joins.handle_ssh,
            max_per_address=self.config.max_connections_per_address,
        )
        self._acceptor = acceptor
        self.port = acceptor.get_port()

    async def _start_quic(self) -> None:
        cert, key, self.quic_fingerprint = quic.load_or_create_certificate(self.config.keys_dir)
        port = self.config.quic_port if self.config.quic_port is not None else self.port
        # a silent host's connection outlives the wait for it (a minute more:
        # the session's own expiry, not QUIC's, ends it)
        server = await quic.start_quic_server(
            self.config.bind, port, cert, key, self._on_quic,
            idle_timeout=self.config.host_away_timeout + 60,
        )
        self._quic_server = server
        self.quic_port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        self.joins.quic = (f"{self.config.public_host}:{self.quic_port}",)
        self.joins.quic_fingerprint = self.quic_fingerprint

    async def _start_web(self) -> None:
        """The HTTP/WebSocket front: browser mates, handed to ``Mates`` like SSH's."""
        from tether.transport import web

        c = self.config
        bind = c.web_bind if c.web_bind is not None else c.bind
        try:
            tls = web.tls_context(c.web_cert, c.web_key) if c.web_cert and c.web_key else None
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise RuntimeError(f"cannot use the web certificate {c.web_cert}: {exc}") from None
        async def local_mate(term: web.WebTerminal) -> None:  # the front of the moment
            assert self._local_front is not None
            await self._local_front.on_mate(term)

        on_mate = local_mate if self._local_front is not None else self.mates.handle
        front = web.WebFront(
            on_mate, self._web_access, WEB_PAGE_DIR,
            trust_proxy=c.web_trust_proxy,
            max_per_address=c.max_connections_per_address,
        )
        try:
            await front.start(bind, c.web_port or 0, tls)
        except OSError as exc:
            raise RuntimeError(f"cannot listen for browsers on {bind}:{c.web_port}: "
                               f"{exc.strerror or exc}") from None
        self._web = front
        self.web_port = front.port

    def _web_access(self, token: str) -> web.Access | None:
        """What a browser gets with ``token``: None if it is no session's."""
        from tether.transport.web import Access

        if self._owners is not None:  # the session processes' directory
            known = self._owners.lookup(token)
            if known is None:
                return None
            sid, readonly, keys_only = known
            return Access(readonly, KEYS_ONLY if keys_only else "", sid)
        found = self.registry.lookup(token)
        if found is None:
            return None
        session, readonly = found
        return Access(readonly, KEYS_ONLY if session.mate_keys else "", session.id)

    async def _on_quic(self, link: quic.QuicLink) -> None:
        """A QUIC connection's first message says who it is: a host resuming its
        session (``Hello``) or a join client resuming its place (``Join``)."""
        try:
            first = await link.recv()  # delivered already: QUIC calls us on it
        except LinkClosed:
            link.close()
            return
        if isinstance(first, Join):
            await self.joins.handle_resume(link, first, link.peer)
        else:
            await self.hosts.handle_quic(Pushback(link, first))  # type: ignore[arg-type]
