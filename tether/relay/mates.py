"""The mate role: a token to a session, a tmux client of its replica, and the
bytes between that client and the mate's terminal.

Written against ``Terminal``, not SSH: an SSH session (``ssh.MateTerminal``)
is one terminal, a browser's will be another, and both get the same token
back-off, mate limit, input rate and size rules.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import itertools
import logging
import math
import os
import secrets
import struct
import termios
import time
from collections.abc import Callable
from typing import Protocol

from tether.core.ratelimit import FailureBackoff, TokenBucket
from tether.transport.fdio import FdWriter

from .config import RelayConfig
from .registry import Registry
from .replica import ReplicaError
from .session import Mate, Session

log = logging.getLogger("tether.relay")

INVALID_TOKEN = b"Invalid or expired session token.\r\n"
MAX_HOLD = 10.0
"""Longest a wrong token's answer is held back (the back-off's wait, capped): a
guessing address holds its own connections, not the relay's attention."""
MATE_COLS = 1000
MATE_ROWS = 500
"""Largest terminal a mate may have, at attach and on every window change. tmux
draws a client of its whole size: one 65535x65535 window change pinned a
replica at 100% CPU and ~1 GB for over a minute, freezing every other mate of
the session. 1000x500 is past a 4K screen at a small font."""
MATE_WAIT_SCREEN = 10.0
"""How long a mate joining a brand-new session waits for the host's first
screen before attaching anyway (to a replica that says it is waiting)."""
KICKED_TEXT = "tether: the host disconnected you"
EXIT_KICKED = 4
"""The exit status of a mate the host disconnected (``tether kick-mate``): its
ssh exits with it, and the web front closes with 4004 for it
(``transport.web_terminal.EXIT_KICKED``, which must equal this)."""


def display_address(peer: str) -> str:
    """A peer's ``address:port`` as people write it (``[2001:db8::1]:22`` for IPv6)."""
    host, _, port = peer.rpartition(":")
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return peer


def proved(fingerprint: str, keys: set[bytes]) -> bool:
    """Whether the key a mate proved (its ``SHA256:`` fingerprint, empty: none)
    is one of ``keys`` (public key blobs)."""
    return bool(fingerprint) and any(
        hmac.compare_digest(fingerprint, "SHA256:" + base64.b64encode(
            hashlib.sha256(k).digest()).decode().rstrip("=")) for k in keys)


def clamp_size(cols: int, rows: int) -> tuple[int, int]:
    """A mate's terminal size as the relay lets it count (see MATE_COLS)."""
    return max(1, min(cols, MATE_COLS)), max(1, min(rows, MATE_ROWS))


class Terminal(Protocol):
    """A mate's terminal as the relay sees it, whatever carries it."""

    username: str
    """The session token the mate presented (an SSH user name, a URL's part)."""
    peer: str
    """"address:port": failed tokens are counted per address."""
    kind: str
    """``ssh`` or ``web``, as the host's list of mates shows it."""
    fingerprint: str
    """``SHA256:...`` of the SSH key the mate proved (sessions with ``-a``), or ""."""
    term: str
    """TERM for the tmux client; empty: no terminal, which is refused."""
    cols: int
    rows: int

    async def read(self) -> bytes | tuple[int, int]:
        """Typed bytes, a new ``(cols, rows)`` on resize, or b'' at the end."""
        ...

    def write(self, data: bytes) -> None:
        """Queue screen output; a peer that takes none for too long is cut off."""

    async def drain(self) -> None:
        """Wait until the peer took what was written (its flow control)."""

    def backlog(self) -> int:
        """Bytes written that wait for the peer's flow control (0: ``drain``
        returns at once)."""

    def exit(self, status: int = 0) -> None:
        """End the mate's connection."""


class MatePump(Protocol):
    """What moves a mate's bytes: ``Pump`` here, or one in an SSH front process."""

    kicked: bool

    async def run(self) -> None:
        """Until the mate leaves, its tmux client ends or ``kick``."""

    def kick(self) -> None:
        """The host disconnects the mate."""


class Mates:
    def __init__(self, registry: Registry, config: RelayConfig) -> None:
        self.registry = registry
        self.config = config
        self._ids = itertools.count(1)
        self.backoff = FailureBackoff(free=config.failed_tokens_free)
        """Wrong tokens per address, shared with join clients (``joins.Joins``)."""

    async def handle(self, term: Terminal) -> None:
        """One mate, from its token to its leaving."""
        found = self.registry.lookup(term.username)
        if found is None:
            await self._refuse_token(term)
            return
        session, readonly = found
        if session.mate_keys and not proved(getattr(term, "fingerprint", ""),
                                            session.mate_keys):
            # the SSH login checked the key already, against what the session
            # required then; with session processes that answer and this attach
            # can come from two lives of a session (its process died between)
            log.warning("mate from %s: no key the session requires; refused", term.peer)
            term.write(b"This session admits only mates with a key its host listed.\r\n")
            term.exit(1)
            return
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
        mate.kind = getattr(term, "kind", "ssh")
        mate.address = display_address(term.peer)
        mate.fingerprint = getattr(term, "fingerprint", "")
        log.info(
            "mate %d (%s, %s) joined session %s from %s",
            mate.id,
            mate.kind,
            "read-only" if readonly else "read-write",
            session.id,
            term.peer,
        )
        await self._serve(session, term, mate)

    async def _refuse_token(self, term: Terminal) -> None:
        # A valid token is always served: back-off keyed on the address alone
        # would lock out everyone behind the same NAT as a guesser. A wrong one
        # counts (tries while held back too) and its answer is held back, so
        # one address guesses no faster than its connections allow.
        address = term.peer.rpartition(":")[0]
        wait = self.backoff.failure(address, time.monotonic())
        if wait:
            log.warning("address %s: too many unknown tokens, waits %.0fs", address, wait)
        await asyncio.sleep(0.05 + secrets.randbelow(150) / 1000 + min(wait, MAX_HOLD))
        if wait:
            term.write(
                f"Too many failed attempts from your address; try again in "
                f"{math.ceil(wait)} s.\r\n".encode()
            )
        else:
            term.write(INVALID_TOKEN)
        await term.drain()
        term.exit(1)

    async def _attach(self, session: Session, term: Terminal, readonly: bool) -> Mate | None:
        """A tmux client of the replica for a mate, once the host's screen is there."""
        cols, rows = clamp_size(term.cols, term.rows)
        mate = Mate(next(self._ids), readonly, cols, rows)
        if not session.screen.is_set():
            await self._wait_screen(session, term)
        try:
            mate.fd = await session.replica.attach(mate.id, readonly, cols, rows, term.term)
        except (ReplicaError, TimeoutError) as exc:
            term.write(f"tether: cannot attach: {exc}\r\n".encode())
            term.exit(1)
            return None
        os.set_blocking(mate.fd, False)
        return mate

    @staticmethod
    async def _wait_screen(session: Session, term: Terminal) -> None:
        """A session just created: its replica has not shown the host's screen yet."""
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

    async def _serve(self, session: Session, term: Terminal, mate: Mate) -> None:
        """Pump an attached mate until either side leaves (or the host disconnects
        it), then let it go."""

        def on_resize() -> None:
            session.replica.resized(mate.id)
            if not session.ended and mate.id in session.mates:
                session.resize()

        remote = getattr(term, "pump", None)  # its pump runs in an SSH front process
        pump: MatePump = (remote(mate, on_resize) if remote is not None
                          else Pump(term, mate, self.config.mate_input_rate, on_resize))
        mate.kick = pump.kick
        show = getattr(term, "show_mates", None)  # a browser's page lists the mates
        if show is not None:
            mate.show = lambda infos: show(mate.id, infos)
        # listed only now, with no await since the mate limit counted it: a kick
        # from here on finds its pump
        session.add_mate(mate)
        session.resize()
        try:
            await pump.run()
        finally:
            session.remove_mate(mate.id)
            with contextlib.suppress(OSError):
                os.close(mate.fd)
            session.replica.detached(mate.id)
            session.resize()
            status = 0
            if pump.kicked:
                term.write(f"\r\n{KICKED_TEXT}.\r\n".encode())
                await term.drain()
                status = EXIT_KICKED
            elif session.ended:
                term.write(b"\r\ntether: the host ended the session.\r\n")
                await term.drain()
            term.exit(status)
            log.info("mate %d left session %s%s", mate.id, session.id,
                     " (disconnected by the host)" if pump.kicked else "")


class Pump:
    """Bytes between a mate's terminal and its tmux client's pty, both ways.

    Output: one read, then no more until the terminal drained it, so the
    terminal's flow control reaches the tmux client (which then skips frames
    rather than queue them). Input: rate-limited by not reading, so the
    terminal's flow control slows the mate down.
    """

    def __init__(
        self, term: Terminal, mate: Mate, input_rate: float, on_resize: Callable[[], None]
    ) -> None:
        self.term = term
        self.mate = mate
        self.on_resize = on_resize
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.writer = FdWriter(mate.fd)
        self.paused = False
        self.finished = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.bucket = TokenBucket(input_rate, 4 * input_rate, time.monotonic())
        self.drawn = asyncio.Event()
        self.kicked = False
        """The host disconnected this mate (``kick``)."""

    def kick(self) -> None:
        """The host disconnects the mate: the pump ends as if it had left."""
        self.kicked = True
        if not self.done.done():
            self.done.set_result(None)

    async def run(self) -> None:
        """Until the mate leaves or its tmux client ends."""
        fd = self.mate.fd
        self.loop.add_reader(fd, self._on_output)
        typer = asyncio.create_task(self._typing())
        try:
            await asyncio.wait([typer, self.done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # a drain still waiting must not watch the fd again once it is closed
            # (or, worse, another mate's fd given the same number)
            self.finished = True
            for t in self.tasks:
                t.cancel()
            typer.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)

    def _on_output(self) -> None:
        fd = self.mate.fd
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            if not self.done.done():
                self.done.set_result(None)
            return
        self.term.write(data)
        self.drawn.set()
        # only output the mate has not taken waits for its drain: pausing after
        # every read cost each echo a task and two epoll_ctl calls
        if not self.paused and self.term.backlog():
            self.paused = True
            self.loop.remove_reader(fd)
            resumer = self.loop.create_task(self._resume())
            self.tasks.add(resumer)
            resumer.add_done_callback(self.tasks.discard)

    async def _resume(self) -> None:
        await self.term.drain()  # the terminal's flow control reaches the tmux client
        self.paused = False
        if not self.done.done() and not self.finished:
            self.loop.add_reader(self.mate.fd, self._on_output)

    async def _typing(self) -> None:
        # keys reach the tmux client only once it has put its terminal in raw
        # mode (which discards pending input): its first drawing says it has
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drawn.wait(), MATE_WAIT_SCREEN)
        while True:
            item = await self.term.read()
            if isinstance(item, tuple):
                self._resize(*item)
                continue
            if not item:
                break
            wait = self.bucket.take(len(item), time.monotonic())
            if wait:  # not reading meanwhile: flow control slows the mate down
                await asyncio.sleep(wait)
            self.writer.write(item)
            await self.writer.drain()

    def _resize(self, cols: int, rows: int) -> None:
        mate = self.mate
        mate.cols, mate.rows = clamp_size(cols, rows)
        with contextlib.suppress(OSError):
            fcntl.ioctl(
                mate.fd, termios.TIOCSWINSZ, struct.pack("HHHH", mate.rows, mate.cols, 0, 0)
            )
        self.on_resize()
