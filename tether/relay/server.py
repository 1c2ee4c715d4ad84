"""The relay: sessions, tokens, hosts and mates, one asyncio process.

Hosts replicate into a per-session replica worker; mates get tmux clients of
that replica. The replica outlives the host's disconnects, so mates stay
attached and the same tokens keep working when the host comes back with its
resume secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import os
import secrets
import struct
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

from tether.core import tokens
from tether.core.errors import RemoteProtocolError
from tether.core.inputs import InputSender
from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    End,
    Error,
    Event,
    Hello,
    Input,
    InputAck,
    Message,
    Ping,
    Pong,
    Resize,
    Snapshot,
    Status,
    Welcome,
)
from tether.core.ratelimit import FailureBackoff, TokenBucket
from tether.core.replog import LogReceiver
from tether.transport import quic, ssh
from tether.transport.fdio import FdWriter
from tether.transport.link import Link, LinkClosed

from .cgroup import cgroup_warning
from .jail import jail_unavailable, jail_warning
from .replica import ReplicaError, ReplicaHandle

log = logging.getLogger("tether.relay")

INVALID_TOKEN = b"Invalid or expired session token.\r\n"
HOST_SILENCE = 5.0
"""Seconds without a word from a host before its mates are told it is away."""
ACK_EVERY = 0.03
"""Acks to the host are coalesced: a keystroke's echo then costs one message less."""
PING_RATE = 10.0
PING_BURST = 50.0
"""Pings a host may send a second, and in a burst: hosts ping about once a second
(more while reconnecting); answering a flood would keep a relay core busy."""
MAX_HOLD = 10.0
"""Longest a wrong token's answer is held back (the back-off's wait, capped): a
guessing address holds its own connections, not the relay's attention."""
MATE_COLS = 1000
MATE_ROWS = 500
"""Largest terminal a mate may have, at attach and on every window change. tmux
draws a client of its whole size: one 65535x65535 window change pinned a
replica at 100% CPU and ~1 GB for over a minute, freezing every other mate of
the session. 1000x500 is past a 4K screen at a small font."""


def clamp_size(cols: int, rows: int) -> tuple[int, int]:
    """A mate's terminal size as the relay lets it count (see MATE_COLS)."""
    return max(1, min(cols, MATE_COLS)), max(1, min(rows, MATE_ROWS))


MATE_WAIT_SCREEN = 10.0
"""How long a mate joining a brand-new session waits for the host's first
screen before attaching anyway (to a replica that says it is waiting)."""


RedactTokens = tokens.RedactTokens


@dataclass
class RelayConfig:
    keys_dir: Path
    bind: str = "0.0.0.0"
    port: int = 2222
    public_host: str = ""
    """Host name put in connection strings; defaults to the bind address."""
    public_port: int | None = None
    max_sessions: int = 1000
    max_sessions_per_key: int = 50
    max_mates: int = 32
    max_connections_per_address: int = ssh.MAX_CONNECTIONS_PER_ADDRESS
    """SSH connections at once from one IPv4 address or IPv6 /64 (a NAT shares one)."""
    host_away_timeout: float = 3600.0
    """How long a session waits for its host to come back."""
    hello_timeout: float = 15.0
    jail: bool = True
    """Run each replica worker in a bubblewrap jail (see SECURITY.md)."""
    quic_port: int | None = None
    """UDP port for QUIC; None: the SSH port's number; -1: no QUIC."""
    authorized_keys: list[str] | None = None
    """Host keys allowed to open sessions (authorized_keys lines); None: any key."""
    failed_tokens_free: int = 5
    """Unknown tokens an address may try before each further try doubles its wait."""
    mate_input_rate: float = 256 * 1024
    """Bytes per second one mate may type or paste (bursts up to 4x)."""


@dataclass
class Mate:
    id: int
    readonly: bool
    cols: int
    rows: int
    fd: int = -1


@dataclass
class Session:
    id: str
    rw_token: str
    ro_token: str
    secret: bytes
    host_key: str
    replica: ReplicaHandle
    mate_keys: set[bytes] = field(default_factory=set)
    receiver: LogReceiver = field(default_factory=LogReceiver)
    inputs: InputSender = field(default_factory=lambda: InputSender(1))
    host: Link | None = None
    mates: dict[int, Mate] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)
    status_rows: int = 1
    away_since: float | None = None
    ended: bool = False
    ack_timer: asyncio.TimerHandle | None = None
    acked: int = 0
    worker_log: TokenBucket = field(
        default_factory=lambda: TokenBucket(1.0, 20.0, time.monotonic())
    )
    """Lines the session's worker may put in the relay's log: 20, then 1 a second."""
    joining: int = 0
    """Mates past the token check and not yet attached: counted against max_mates."""
    screen: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the host's first snapshot went to the replica: a mate who
    attached before would see a placeholder and type into nothing."""


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self._by_token: dict[bytes, tuple[Session, bool]] = {}
        self._token_key = tokens.TokenKey()
        self._mate_ids = itertools.count(1)
        self._acceptor: object | None = None
        self.port = config.port
        self.host_keys = ssh.load_or_create_host_keys(config.keys_dir)
        self._reaper: asyncio.Task[None] | None = None
        self._backoff = FailureBackoff(free=config.failed_tokens_free)
        self._host_keys_allowed = (
            ssh.parse_public_keys(config.authorized_keys, limit=100000)
            if config.authorized_keys is not None
            else None
        )
        self._quic_server: object | None = None
        self.quic_port: int | None = None
        self.quic_fingerprint = ""

    # --- lifecycle -----------------------------------------------------------

    @property
    def fingerprints(self) -> list[tuple[str, str]]:
        """(config option name, SHA256 fingerprint) for each host key."""
        return [(ssh.key_option_name(k), ssh.fingerprint(k)) for k in self.host_keys]

    async def start(self) -> None:
        if self.config.jail:
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
        else:
            log.warning("replica workers are NOT jailed: sessions are not isolated from each "
                        "other or from this machine")
        allowed = self._host_keys_allowed
        acceptor = await ssh.start_ssh_server(
            self.config.bind,
            self.config.port,
            self.host_keys,
            self.handle_host,
            self.handle_mate,
            key_check=(lambda key: key.public_data in allowed) if allowed is not None else None,
            mate_keys=self._mate_keys_for,
            max_per_address=self.config.max_connections_per_address,
        )
        self._acceptor = acceptor
        self.port = acceptor.get_port()
        if self.config.quic_port != -1:
            cert, key, self.quic_fingerprint = quic.load_or_create_certificate(
                self.config.keys_dir
            )
            port = self.config.quic_port if self.config.quic_port is not None else self.port
            server = await quic.start_quic_server(
                self.config.bind, port, cert, key, self.handle_quic_host
            )
            self._quic_server = server
            self.quic_port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._acceptor is not None:
            await ssh.wait_closed(self._acceptor)  # type: ignore[arg-type]
        if self._quic_server is not None:
            self._quic_server.close()  # type: ignore[attr-defined]
        for s in list(self.sessions.values()):
            await self._end(s)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                gone = s.replica.closed.done()
                expired = (
                    s.away_since is not None and now - s.away_since > self.config.host_away_timeout
                )
                if gone or expired:
                    log.info("session %s ended (%s)", s.id, "worker gone" if gone else "host away")
                    await self._end(s)

    def ssh_string(self, token: str) -> str:
        host = self.config.public_host or self.config.bind
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        port = self.config.public_port or self.port
        return f"ssh -p {port} {token}@{host}" if port != 22 else f"ssh {token}@{host}"

    # --- sessions ------------------------------------------------------------

    async def _new_session(self, host_key: str, again: Hello | None = None) -> Session:
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
                self._from_replica(session, msg)

        replica = ReplicaHandle(sid, on_message, self.config.jail)
        session = Session(
            id=sid,
            rw_token=rw,
            ro_token=ro,
            secret=secret,
            host_key=host_key,
            replica=replica,
        )
        await replica.start()
        self.sessions[sid] = session
        self._by_token[self._token_key(session.rw_token)] = (session, False)
        self._by_token[self._token_key(session.ro_token)] = (session, True)
        log.info(
            "session %s created (tokens %s, %s)",
            sid,
            tokens.redact(session.rw_token),
            tokens.redact(session.ro_token),
        )
        return session

    def _can_recreate(self, h: Hello) -> bool:
        """A host's secret re-creates its session unless that session is live (the
        host then resumes it by id). The tokens a host sends are not trusted:
        they are derived from the secret again."""
        if h.secret is None or len(h.secret) != 32:
            return False
        return tokens.derive_session(h.secret)[0] not in self.sessions

    async def _end(self, s: Session) -> None:
        if s.ended:
            return
        s.ended = True
        if s.ack_timer is not None:
            s.ack_timer.cancel()
        self.sessions.pop(s.id, None)
        self._by_token.pop(self._token_key(s.rw_token), None)
        self._by_token.pop(self._token_key(s.ro_token), None)
        if s.host is not None:
            s.host.close()
        await s.replica.close()

    def _mate_keys_for(self, token: str) -> set[bytes] | None:
        found = self.lookup(token)
        return found[0].mate_keys or None if found else None

    def lookup(self, token: str) -> tuple[Session, bool] | None:
        """(session, read-only) for a token; keyed by HMAC so no secret is compared."""
        return self._by_token.get(self._token_key(token))

    def _from_replica(self, s: Session, msg: Message) -> None:
        if isinstance(msg, Ack):
            # the host needs acks only to trim its replay buffer: one per ACK_EVERY
            s.acked = msg.seq
            if s.ack_timer is None:
                s.ack_timer = asyncio.get_running_loop().call_later(
                    ACK_EVERY, self._flush_ack, s
                )
        elif isinstance(msg, Input):
            self._to_host(s, s.inputs.push(msg.pane, msg.keys, msg.binding))
        elif isinstance(msg, Error):
            # the worker is jailed because it may be hostile: its words are data,
            # and it may not flood the relay's log
            if s.worker_log.allow(1, time.monotonic()):
                log.warning("session %s: %s", s.id, ascii(msg.message[:300]))

    def _flush_ack(self, s: Session) -> None:
        s.ack_timer = None
        if s.host is not None:
            with contextlib.suppress(LinkClosed):
                s.host.send_ack(Ack(s.acked))

    def _to_host(self, s: Session, msg: Message) -> None:
        if s.host is not None:
            with contextlib.suppress(LinkClosed):
                s.host.send_nowait(msg)

    # --- hosts ---------------------------------------------------------------

    async def handle_quic_host(self, link: quic.QuicLink) -> None:
        """A host resuming over QUIC: it must name its session and prove the secret."""
        await self.handle_host(link, "", link.peer, resume_only=True)

    async def handle_host(
        self, link: Link, host_key: str, peer: str, resume_only: bool = False
    ) -> None:
        session: Session | None = None
        try:
            hello = await asyncio.wait_for(link.recv(), self.config.hello_timeout)
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("expected Hello first")
            if hello.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version {hello.version} is not supported (relay speaks "
                    f"{PROTOCOL_VERSION}); upgrade tether"
                )
            if hello.session is not None:
                found = self.sessions.get(hello.session)
                if (
                    found is None
                    or hello.secret is None
                    or not tokens.secrets_equal(found.secret, hello.secret)
                ):
                    found = None
                session = found
            if session is None and resume_only:
                raise RemoteProtocolError(
                    "unknown session or wrong secret: start over the SSH bootstrap"
                )
            if session is None:
                session = await self._new_session(host_key, hello)
            if hello.mate_keys or session.mate_keys:
                try:
                    session.mate_keys = ssh.parse_public_keys(hello.mate_keys)
                except ValueError as exc:
                    raise RemoteProtocolError(f"bad mate key list: {exc}") from None
            if session.host is not None:
                session.host.close()  # the old connection is dead or superseded
            session.host = link
            session.away_since = None
            log.info("host %s attached to session %s via %s", peer, session.id, link.description)
            await link.send(
                Welcome(
                    PROTOCOL_VERSION,
                    session.id,
                    session.secret,
                    session.rw_token,
                    session.ro_token,
                    self.ssh_string(session.rw_token),
                    self.ssh_string(session.ro_token),
                    session.receiver.next_seq,
                    (f"{self.config.public_host}:{self.quic_port}",) if self.quic_port else (),
                    self.quic_fingerprint,
                )
            )
            for msg in session.inputs.unacked():
                link.send_nowait(msg)
            link.send_nowait(Resize(*session.size))
            session.replica.presence(True, "tether: the host is back")
            await self._host_loop(session, link)
        except RemoteProtocolError as exc:
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
            if session is not None and session.host is link:
                session.host = None
                session.away_since = time.monotonic()
                session.replica.presence(False, "tether: the host is away; waiting for it")
                log.info("host left session %s", session.id)

    async def _host_loop(self, s: Session, link: Link) -> None:
        silent = False
        heard = time.monotonic()
        pings = TokenBucket(PING_RATE, PING_BURST, heard)
        while True:
            try:
                # away, a host is checked on every second; present, every HOST_SILENCE
                wait = 1.0 if silent else HOST_SILENCE - (time.monotonic() - heard)
                msg = await asyncio.wait_for(link.recv(), max(wait, 0.05))
            except TimeoutError:
                # hosts ping at least once a second: a silent link is a host that is
                # away, whatever SSH keepalives or the QUIC idle timeout still believe.
                # Over QUIC the pings are datagrams, answered in the link: they count
                # through its last_activity without reaching recv()
                heard = max(heard, getattr(link, "last_activity", 0.0))
                quiet = time.monotonic() - heard >= HOST_SILENCE
                if quiet and not silent:
                    silent = True
                    s.replica.presence(False, "tether: the host is away; waiting for it")
                elif silent and not quiet:
                    silent = False
                    s.replica.presence(True, "tether: the host is back")
                continue
            heard = time.monotonic()
            if silent:
                silent = False
                s.replica.presence(True, "tether: the host is back")
            if isinstance(msg, Event):
                if s.receiver.receive(msg):
                    if isinstance(msg.body, Status):
                        s.status_rows = self._status_rows(msg.body)
                    s.replica.send(msg)
                    if isinstance(msg.body, Snapshot):
                        # the worker handles its stream in order: a mate's attach
                        # sent after this finds the host's windows, not a placeholder
                        s.screen.set()
                    await s.replica.drain()
            elif isinstance(msg, InputAck):
                if msg.stream == s.inputs.stream:
                    s.inputs.on_ack(msg.seq)
            elif isinstance(msg, Ping):
                if not pings.allow(1, time.monotonic()):
                    raise RemoteProtocolError(
                        f"more than {PING_RATE:.0f} pings a second; a host pings once a second"
                    )
                link.send_nowait(Pong(msg.token))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, End):
                log.info("host ended session %s: %s", s.id, msg.reason)
                s.replica.presence(False, f"tether: the host ended the session ({msg.reason})")
                await self._end(s)
                return
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a host")

    @staticmethod
    def _status_rows(status: Status) -> int:
        """Rows the host's status line takes: tmux allows off, on, or 2 to 5."""
        value = dict(status.options).get("status", "on")
        if value == "off":
            return 0
        return int(value) if value in ("2", "3", "4", "5") else 1

    # --- mates ---------------------------------------------------------------

    async def handle_mate(self, term: ssh.MateTerminal) -> None:
        address = term.peer.rpartition(":")[0]
        found = self.lookup(term.username)
        if found is None:
            # A valid token is always served: back-off keyed on the address alone
            # would lock out everyone behind the same NAT as a guesser. A wrong one
            # counts (tries while held back too) and its answer is held back, so
            # one address guesses no faster than its connections allow.
            wait = self._backoff.failure(address, time.monotonic())
            if wait:
                log.warning("address %s: too many unknown tokens, waits %.0fs", address, wait)
            await asyncio.sleep(0.05 + secrets.randbelow(150) / 1000 + min(wait, MAX_HOLD))
            if wait:
                term.write(
                    f"Too many failed attempts from your address; try again in "
                    f"{math.ceil(wait)} s.\r\n".encode()
                )
                await term.drain()
                term.exit(1)
                return
            term.write(INVALID_TOKEN)
            await term.drain()
            term.exit(1)
            return
        session, readonly = found
        if not term.term:
            term.write(b"tether needs a terminal: connect with `ssh -t`.\r\n")
            term.exit(1)
            return
        if len(session.mates) + session.joining >= self.config.max_mates:
            term.write(b"This session has too many mates connected.\r\n")
            term.exit(1)
            return
        # counted from here, not once attached: the awaits below let others in
        session.joining += 1
        try:
            mate = await self._attach(session, term, readonly)
        finally:
            session.joining -= 1
        if mate is None:
            return
        session.mates[mate.id] = mate  # no await since the count above
        log.info(
            "mate %d (%s) joined session %s from %s",
            mate.id,
            "read-only" if readonly else "read-write",
            session.id,
            term.peer,
        )
        self._resize(session)
        try:
            await self._pump_mate(term, mate)
        finally:
            session.mates.pop(mate.id, None)
            with contextlib.suppress(OSError):
                os.close(mate.fd)
            self._resize(session)
            if session.ended:
                term.write(b"\r\ntether: the host ended the session.\r\n")
                await term.drain()
            term.exit(0)
            log.info("mate %d left session %s", mate.id, session.id)

    async def _attach(
        self, session: Session, term: ssh.MateTerminal, readonly: bool
    ) -> Mate | None:
        """A tmux client of the replica for a mate, once the host's screen is there."""
        cols, rows = clamp_size(term.cols, term.rows)
        mate = Mate(next(self._mate_ids), readonly, cols, rows)
        if not session.screen.is_set():
            # a session just created: its replica has not shown the host's screen yet
            try:
                await asyncio.wait_for(session.screen.wait(), 0.5)
            except TimeoutError:
                term.write(b"tether: waiting for the host's screen...\r\n")
                try:
                    await asyncio.wait_for(session.screen.wait(), MATE_WAIT_SCREEN)
                except TimeoutError:
                    log.warning(
                        "session %s: no screen from the host after %.0f s; mate joins anyway",
                        session.id,
                        MATE_WAIT_SCREEN,
                    )
        try:
            mate.fd = await session.replica.attach(mate.id, readonly, cols, rows, term.term)
        except (ReplicaError, TimeoutError) as exc:
            term.write(f"tether: cannot attach: {exc}\r\n".encode())
            term.exit(1)
            return None
        os.set_blocking(mate.fd, False)
        return mate

    async def _pump_mate(self, term: ssh.MateTerminal, mate: Mate) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        writer = FdWriter(mate.fd)
        paused = False
        tasks: set[asyncio.Task[None]] = set()

        def on_output() -> None:
            nonlocal paused
            try:
                data = os.read(mate.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(mate.fd)
                if not done.done():
                    done.set_result(None)
                return
            term.write(data)
            drawn.set()
            if not paused:
                paused = True
                loop.remove_reader(mate.fd)
                resumer = loop.create_task(resume())
                tasks.add(resumer)
                resumer.add_done_callback(tasks.discard)

        async def resume() -> None:
            nonlocal paused
            await term.drain()  # SSH flow control reaches the tmux client
            paused = False
            if not done.done() and not finished:
                loop.add_reader(mate.fd, on_output)

        rate = self.config.mate_input_rate
        bucket = TokenBucket(rate, 4 * rate, time.monotonic())

        drawn = asyncio.Event()

        async def typing() -> None:
            # keys reach the tmux client only once it has put its terminal in raw
            # mode (which discards pending input): its first drawing says it has
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drawn.wait(), MATE_WAIT_SCREEN)
            while True:
                item = await term.read()
                if isinstance(item, tuple):
                    mate.cols, mate.rows = clamp_size(*item)
                    with contextlib.suppress(OSError):
                        fcntl.ioctl(
                            mate.fd,
                            termios.TIOCSWINSZ,
                            struct.pack("HHHH", mate.rows, mate.cols, 0, 0),
                        )
                    self._resize_for(mate)
                    continue
                if not item:
                    break
                wait = bucket.take(len(item), time.monotonic())
                if wait:  # not reading meanwhile: SSH flow control slows the mate down
                    await asyncio.sleep(wait)
                writer.write(item)
                await writer.drain()

        finished = False
        loop.add_reader(mate.fd, on_output)
        typer = asyncio.create_task(typing())
        try:
            await asyncio.wait([typer, done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # a drain still waiting must not watch the fd again once it is closed
            # (or, worse, another mate's fd given the same number)
            finished = True
            for t in tasks:
                t.cancel()
            typer.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                loop.remove_reader(mate.fd)

    def _resize_for(self, mate: Mate) -> None:
        for s in self.sessions.values():
            if mate.id in s.mates:
                self._resize(s)

    def _resize(self, s: Session) -> None:
        """Window size follows the smallest read-write mate; read-only mates never count."""
        rw = [m for m in s.mates.values() if not m.readonly]
        if rw:
            size = (min(m.cols for m in rw), max(1, min(m.rows for m in rw) - s.status_rows))
        else:
            size = (0, 0)
        if size != s.size:
            s.size = size
            self._to_host(s, Resize(*size))
