"""Mates as tmux clients of one session's replica, without a client process.

The relay opens each mate's pty itself, keeps the master (the mate's SSH
channel reads and writes it) and introduces the slave to the replica's tmux
server as a client's terminal, over tmux's client protocol
(``tether.transport.tmux_imsg``). The ptys are the relay's, the machine's
/dev/pts: a jail that held on to departed mates' slaves must not get more, so
a copy of each master is kept until the jail has closed the slave too, and one
session holds at most ``MAX_PTYS``. A slave sent to a server that never answered
counts as well: it may sit unread in the server's socket, a descriptor in
flight charged to the relay's user (a non-root relay's sends fail with
``ETOOMANYREFS`` once its user has more in flight than its open-file limit), so
a session whose server stops reading runs out of room, not every session.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import select
import struct
import termios
from collections.abc import Callable

from tether.core.errors import TetherError
from tether.core.limits import MAX_DIMENSION
from tether.mirror.apply import SESSION
from tether.transport.tmux_imsg import ClientLink

from .replica import ReplicaError
from .worker import known_terminal

MATE_CLIENT = "tether-mate-"
"""Prefix of a mate's tmux client's name (its ``ttyname``, then ``client_name``):
unique per mate, and never a pane's tty name (tmux would refuse it as nested)."""
MAX_PTYS = 64
"""Mate ptys whose slave one session's jail may hold at once, departed mates'
included (twice the default mate limit)."""


class MateClients:
    """One replica's mates: their client links and their ptys."""

    def __init__(self, budget: Callable[[int], bool]) -> None:
        self._budget = budget
        self._links: dict[int, ClientLink] = {}
        self._ptys: dict[int, int] = {}
        """A copy of each mate pty's master, kept until the jail closed the slave;
        an unanswered attach's too (its slave may be in flight: module docstring),
        under a key of its own that is never a mate's, as if it had departed."""
        self._departed: set[int] = set()
        self._unanswered = itertools.count(-1, -1)
        self._closed = False

    def check_room(self) -> None:
        """Raise ``ReplicaError`` when the jail holds ``MAX_PTYS`` ptys already."""
        self._reap()
        if len(self._ptys) >= MAX_PTYS:
            raise ReplicaError(f"the replica holds {len(self._ptys)} mates' terminals; "
                               "no more until it lets some go")

    async def attach(self, mate: int, readonly: bool, cols: int, rows: int, term: str, *,
                     dir_fd: int, sock_name: str, cwd: str, gone: asyncio.Future[None],
                     timeout: float) -> int:
        """A pty master connected to a new tmux client of the replica's server
        (``sock_name`` in the session directory ``dir_fd``); ``gone``: the
        replica ended (the attach fails)."""
        cols = max(1, min(cols, MAX_DIMENSION))
        rows = max(1, min(rows, MAX_DIMENSION))
        # an unknown TERM (e.g. a terminal's own name) would stop tmux from attaching
        term = term if known_terminal(term) else "xterm-256color"
        master, slave = os.openpty()
        link = ClientLink(self._budget)
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            await link.connect(dir_fd, sock_name,
                               ["attach-session", "-t", SESSION, *(["-r"] if readonly else [])],
                               cwd=cwd, term=term, tty=slave, ttyname=f"{MATE_CLIENT}{mate}",
                               timeout=timeout)
            assert link.ready is not None and link.closed is not None
            await asyncio.wait([link.ready, link.closed, gone], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not link.ready.done():
                why = link.closed.result() if link.closed.done() else "no answer"
                raise ReplicaError(f"cannot start a client of the replica: {why}")
        except BaseException as exc:
            link.close()
            if self._closed:  # the replica and its jail are gone: nothing holds the slave
                os.close(master)
            else:  # until the slave is let go (_reap)
                key = next(self._unanswered)
                self._ptys[key] = master
                self._departed.add(key)
            if isinstance(exc, TetherError | OSError):
                raise ReplicaError(f"cannot start a client of the replica: {exc}") from None
            raise
        finally:
            os.close(slave)
        if gone.done():  # the replica ended meanwhile
            link.close()
            os.close(master)
            raise ReplicaError("replica is gone")
        self._links[mate] = link
        self._ptys[mate] = os.dup(master)
        self._departed.discard(mate)

        def forget(_: object) -> None:
            if self._links.get(mate) is link:
                del self._links[mate]

        link.closed.add_done_callback(forget)
        return master

    def resized(self, mate: int) -> None:
        """No client process gets SIGWINCH: say it over the client's link."""
        link = self._links.get(mate)
        if link is not None:
            link.resize()

    def detached(self, mate: int) -> None:
        """The server drops the client when its tty hangs up; the link goes too,
        whatever a compromised server does."""
        link = self._links.pop(mate, None)
        if link is not None:
            link.close()
        if mate in self._ptys:
            self._departed.add(mate)
            self._reap()

    def close(self) -> None:
        self._closed = True
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
        for fd in self._ptys.values():
            os.close(fd)
        self._ptys.clear()
        self._departed.clear()

    def _reap(self) -> None:
        """Let go of departed mates' ptys, and unanswered attaches', whose slave
        nobody holds any more, not the jail nor a socket it has not read (the
        master then polls as hung up)."""
        for mate in list(self._departed):
            fd = self._ptys.get(mate)
            if fd is None:
                self._departed.discard(mate)
                continue
            p = select.poll()
            p.register(fd, select.POLLIN)
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0)):
                os.close(fd)
                del self._ptys[mate]
                self._departed.discard(mate)
