"""A session's replica fed straight from the relay's process: no worker per session.

The replica tmux server stays in its jail (``tether.relay.jail``), but the code
that feeds it runs here, on the relay's event loop, as ``tether join`` feeds
its local tmux (``tether.client.local_replica``): ``tether.mirror`` plans are
run over a tmux control client that is no process at all: the relay speaks
tmux's client protocol on the jailed server's socket (``tmux_imsg``) and hands
it a socket of its own as the client's stdin and stdout. The host's pane bytes
are written straight into the replica panes' ttys, and mates' keys are read
straight from them. A keystroke then crosses no Python process but the
relay's, and an idle session costs its tmux server (the jail's PID 1), two
bwraps around it and a ``sleep`` per pane, not a 5-6 MiB interpreter.

The relay reaches that socket only through the session directory's descriptor,
opened before the jail started, and never follows a symlink there
(``tmux_imsg.open_socket_at``): a jail that replaced it gets a refused session,
not a relay connected elsewhere.

Only a process inside the jail can open a replica pane's tty, so the
replica's own tmux runs ``pane_helper`` for a moment as each new pane's
command: it hands its tty to the relay and execs ``sleep``. The ttys reach the
relay through a unix socket it bound in the session directory before the jail
started; the relay only ever accepts on that descriptor. A mate's tmux client
is no process either: the relay opens a pty, keeps the master and hands the
slave to the replica's server as a client's terminal (``attach``), saying a
size change over that client's link (``resized``) as tmux's client would on
SIGWINCH.

Everything from the jail is data from a possibly hostile peer: a received
descriptor is kept only if it is a pty of the right kind (``_take``), the
control client's output and the server's client-protocol messages are
bounded in bytes per second (``CONTROL_RATE``)
and parsed by plans that treat any malformed reply as a refused event, and
connections to the socket are bounded in number and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import subprocess
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable
from typing import Any

from tether.core.codec import decompress
from tether.core.control import Notification, PaneOutput, quote
from tether.core.errors import RemoteProtocolError
from tether.core.limits import MAX_DATA
from tether.core.messages import (
    Ack,
    Bindings,
    Error,
    Event,
    Frame,
    Input,
    Message,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
)
from tether.core.queries import QueryFilter
from tether.core.ratelimit import TokenBucket
from tether.mirror.apply import PANE_ARGV, SESSION, Mirror
from tether.mirror.keys import Mark, PaneKeys
from tether.mirror.plan import PaneOwner, Plan
from tether.mirror.run_async import run_plan
from tether.transport.children import Child
from tether.transport.tmux import TmuxControl, TmuxError
from tether.transport.tmux_imsg import ClientLink

from . import pane_helper
from .mate_clients import MateClients
from .replica import ReplicaError, ReplicaHandle

log = logging.getLogger("tether.relay")

ACK_LAG = 256 * 1024
"""Bytes queued for the replica's panes before acks stop: the relay's acks (and
so the host's backlog) follow what tmux took, as the worker's did."""
PANE_BUFFER = 2 * MAX_DATA
"""Most bytes waiting for one pane's tty (a whole pane image and the output
after it); past it they are dropped, as a pane reset redraws."""
QUEUE_HIGH = 64
"""Events waiting behind a plan before ``drain`` holds the host's stream."""
MAX_HANDOFFS = 16
"""Connections to the hand-off socket open at once; more are closed."""
HANDOFF_TIMEOUT = 5.0
"""Seconds a connection to the hand-off socket may stay silent."""
ADOPT_WAIT = 2.0
"""Seconds a mate's attach waits for the replica's new panes' ttys to be the
relay's (then it attaches anyway)."""
ORPHAN_TIMEOUT = 5.0
"""Seconds a pane tty that came before tmux named its pane is kept."""
MAX_ORPHANS = 16
CONTROL_RATE = 4 * 1024 * 1024
"""Bytes a second the replica's control client may send the relay (a burst of
four times that); a tmux that sends more is ended with its session."""
PTY_SLAVE_MAJORS = range(136, 144)
"""UNIX98 pty slaves; their number is (major - 136) * 256 + minor."""
HELPER = pane_helper.__file__
HANDOFF = "relay.sock"
EXIT_WITH_CLIENTS = ["set", "-g", "exit-empty", "on", ";",
                     "set", "-g", "exit-unattached", "on", ";"]  # fmt: skip
"""The replica's server ends with its last client. When the relay dies its
link closes (and with it mates' ptys), and so the jail ends: a root relay's
parent-death signal never reaches a jail running as uid 65534 (the kernel
checks the dying sender's permission), and ``tmux -D`` turned exit-empty off."""


def _pts_number(path: str) -> int | None:
    """N of ``/dev/pts/N`` (tmux's ``#{pane_tty}``), or None for anything else."""
    head, _, tail = path.strip().rpartition("/")
    if head != "/dev/pts" or not tail.isdigit() or len(tail) > 9:
        return None
    return int(tail)


def _raw_no_echo(fd: int) -> None:
    """Raw, so the host's bytes reach tmux as written and its keys come back byte
    for byte; no echo, or a mate's keys would show as pane output."""
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys already typed stay
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class _Pane:
    __slots__ = ("fd", "host_id", "keys", "out", "pts", "queries", "replica_id", "writing")

    def __init__(self, host_id: int, replica_id: str, pts: int | None) -> None:
        self.host_id = host_id
        self.replica_id = replica_id
        self.pts = pts
        self.fd = -1
        """-1 until the pane's helper handed its tty over."""
        self.out = bytearray()
        self.writing = False
        self.keys = PaneKeys()
        self.queries = QueryFilter()
        """The host's tmux already answered its programs' terminal queries; the
        replica's answers would reach the host as mate input, a second reply."""


class DirectReplica(ReplicaHandle, PaneOwner):
    """One session's replica tmux, jailed, fed from the relay's own loop.

    The same interface as ``ReplicaHandle`` (the worker process it replaces):
    ``send`` events, ``drain``, ``attach`` mates, ``presence``, ``close``; what
    the worker sent back (acks, mates' keys, complaints) reaches ``on_message``.

    The jail runs the replica's tmux server alone (``tmux -D``, its PID 1: it
    reaps the jail's orphans, and when it ends the jail ends); its control
    client is no process but the relay speaking tmux's client protocol over
    the server's socket (``tether.transport.tmux_imsg``).
    """

    AS_PID_1 = True

    def __init__(self, name: str, on_message: Callable[[Message], None],
                 jail: bool | list[str] | None = None) -> None:
        super().__init__(name, on_message, jail)
        self._loop = asyncio.get_running_loop()
        self.sock = os.path.join(self.dir, "tmux.sock")
        self._handoff_path = os.path.join(self.dir, HANDOFF)
        self.mirror = Mirror()
        self.mirror.options = (*(o for o in self.mirror.options if not o.startswith("exit-")),
                               "exit-empty on", "exit-unattached on")
        self.mirror.pane_cmd = " ".join(
            quote(a) for a in (sys.executable, "-I", "-S", HELPER, self._handoff_path, "pane")
        )
        self.tmux: TmuxControl | None = None
        self.panes: dict[int, _Pane] = {}  # host pane id -> replica pane
        self._waiting: dict[int, _Pane] = {}  # pts number -> pane without its tty yet
        self._orphans: dict[int, tuple[int, float]] = {}  # pts number -> (fd, when)
        self._listen: socket.socket | None = None
        self._handoffs: dict[socket.socket, asyncio.TimerHandle] = {}
        self._queue: deque[Any] = deque()
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._applied = 0
        self._acked = 0
        self._ack_soon = False
        self._dead = False
        self._ready: asyncio.Future[None] = self._loop.create_future()
        """Done once the replica's tmux is set up: mates may attach."""
        self._control = TokenBucket(CONTROL_RATE, 4 * CONTROL_RATE, time.monotonic())
        self._link: ClientLink | None = None
        self.mates = MateClients(self._budget)
        self._dir_fd = -1
        """The session directory, opened before the jail: the relay reaches the
        jail's tmux socket through it, never by a path the jail could redirect."""

    # --- starting ---------------------------------------------------------------

    async def start(self) -> None:
        """Ready to take events; the jail starts behind the host's Welcome.

        Spawning it (a fork, then a move into each cgroup hierarchy, ~1.5 ms
        each) took 12-16 ms of every session's creation. Events queue behind
        the boot as they did behind tmux's set-up, and a jail that cannot start
        ends its session (``_gone``); the host's agent makes it again."""
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._dir_fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            # bound before the jail exists; after, the relay acts on the descriptor only
            listen.bind(self._handoff_path)
            os.chmod(self._handoff_path, 0o666)  # the jail's uid; the directory is private
            listen.listen(MAX_HANDOFFS)
            listen.setblocking(False)
        except BaseException:
            listen.close()
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1
            raise
        self._listen = listen
        self._loop.add_reader(listen.fileno(), self._accept)
        self._task = self._loop.create_task(self._boot())

    async def _spawn(self) -> None:
        # the server alone, in the foreground: the relay is its control client
        cmd = [*self._prefix, "tmux", "-S", self.sock, "-f", "/dev/null", "-D"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "TERM": "tmux-256color", "HOME": self.dir}  # fmt: skip
        # nothing of the relay's, not even its log; not asyncio's subprocess
        # transport, which left a loop torn down during a spawn waiting for ever
        # (``transport.children.Child``)
        self.proc = Child(subprocess.Popen(
            cmd,
            pass_fds=self._jail.pass_fds if self._jail else (),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        ))
        if self._jail is not None:
            await asyncio.to_thread(self._jail.started, self.proc.pid)
        self._tasks.append(asyncio.create_task(self._watch_proc()))

    async def _boot(self) -> None:
        try:
            await self._spawn()
        except Exception as exc:  # its jail (close() ends what did start)
            log.warning("replica %s: its jail did not start: %s", self.name, exc)
            self._gone(f"its jail did not start: {exc}")
            return
        t = TmuxControl(self.sock, self._on_tmux)
        t.budget = self._budget
        link = self._link = ClientLink(self._budget)
        try:
            # the same control client ``tmux -C new-session`` would make
            await link.connect(self._dir_fd, os.path.basename(self.sock),
                               [*EXIT_WITH_CLIENTS, "new-session", "-s", SESSION,
                                "-x", "80", "-y", "24", *PANE_ARGV],
                               cwd=os.path.realpath(self.dir))  # fmt: skip
            assert link.control is not None and link.closed is not None
            link.closed.add_done_callback(lambda f: self._gone(f.result()))
            await t.start_on(link.control, replies=3)
            self.tmux = t
            assert t.closed is not None
            t.closed.add_done_callback(lambda _: self._gone("its control client ended"))
            t.send("refresh-client -f no-output")
            await run_plan(self.mirror.setup(), t, self)
        except BaseException as exc:  # a tmux that fails (or lies) ends its own session
            link.close()
            if t.owns_stream:
                # its transport owns the socket: closing the socket under it would
                # leave a stale reader on a number the next descriptor reuses
                with contextlib.suppress(Exception):
                    await t.close()
            elif link.control is not None:
                link.control.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._gone(f"its tmux did not start: {exc}")
            return
        if not self._ready.done():
            self._ready.set_result(None)
        await self._run_queue()

    async def _watch_proc(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        self._gone("its tmux exited")

    def _budget(self, n: int) -> bool:
        if self._control.allow(n, time.monotonic()):
            return True
        log.warning("replica %s: its tmux sent more than %d bytes a second; ending it",
                    self.name, CONTROL_RATE)
        return False

    def _on_tmux(self, item: PaneOutput | Notification) -> None:
        """Control-mode news: with ``no-output`` only notifications, none needed."""

    def _gone(self, why: str) -> None:
        if not self.closed.done():
            log.info("replica %s: %s", self.name, why)
            self.closed.set_result(None)
        self._dead = True
        self._progress.set()

    # --- the hand-off socket: pane ttys and mates' ptys from the jail ---------------

    def _accept(self) -> None:
        assert self._listen is not None
        for _ in range(MAX_HANDOFFS):
            try:
                conn, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self._handoffs) >= MAX_HANDOFFS:
                conn.close()
                continue
            conn.setblocking(False)
            self._handoffs[conn] = self._loop.call_later(HANDOFF_TIMEOUT, self._drop, conn)
            self._loop.add_reader(conn.fileno(), self._on_handoff, conn)

    def _drop(self, conn: socket.socket) -> None:
        timer = self._handoffs.pop(conn, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(conn.fileno())
        conn.close()

    def _on_handoff(self, conn: socket.socket) -> None:
        try:
            tag, fds, _, _ = socket.recv_fds(conn, 32, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            tag, fds = b"", []
        self._drop(conn)
        for fd in fds:
            try:
                kept = self._take(tag, fd)
            except Exception:  # a descriptor from the jail is data
                kept = False
            if not kept:
                os.close(fd)

    def _take(self, tag: bytes, fd: int) -> bool:
        """Keep ``fd`` if it is what ``tag`` says: a pane's pty slave (nothing
        else comes this way: mates' ptys are the relay's own)."""
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode):
            return False
        if tag == b"p":
            major = os.major(st.st_rdev)
            if major not in PTY_SLAVE_MAJORS:
                return False
            pts = (major - 136) * 256 + os.minor(st.st_rdev)
            pane = self._waiting.pop(pts, None)
            if pane is None:
                self._orphan(pts, fd)
            else:
                self._adopt(pane, fd)
            return True
        return False

    def _orphan(self, pts: int, fd: int) -> None:
        """A pane's tty before tmux's reply named the pane: kept a moment."""
        now = time.monotonic()
        for n, (old, when) in list(self._orphans.items()):
            if n == pts or now - when > ORPHAN_TIMEOUT or len(self._orphans) >= MAX_ORPHANS:
                del self._orphans[n]
                os.close(old)
        self._orphans[pts] = (fd, now)

    # --- panes (PaneOwner) ------------------------------------------------------

    def open_pane(self, host: int, replica: str, tty_path: str) -> None:
        old = self.panes.pop(host, None)
        if old is not None:
            self._close_pane(old)
        pane = _Pane(host, replica, _pts_number(tty_path))
        self.panes[host] = pane
        if pane.pts is None:
            return  # tmux named no pty: the pane stays blind (its bytes are dropped)
        orphan = self._orphans.pop(pane.pts, None)
        if orphan is not None:
            self._adopt(pane, orphan[0])
        else:
            self._waiting[pane.pts] = pane

    def close_pane(self, host: int) -> None:
        pane = self.panes.pop(host, None)
        if pane is not None:
            self._close_pane(pane)

    def _close_pane(self, pane: _Pane) -> None:
        if pane.pts is not None and self._waiting.get(pane.pts) is pane:
            del self._waiting[pane.pts]
        pane.out.clear()
        if pane.fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(pane.fd)
            if pane.writing:
                with contextlib.suppress(Exception):
                    self._loop.remove_writer(pane.fd)
            with contextlib.suppress(OSError):
                os.close(pane.fd)
        pane.fd = -2  # closed: never adopted again
        pane.writing = False
        self._progress.set()

    def _adopt(self, pane: _Pane, fd: int) -> None:
        if pane.fd != -1:
            os.close(fd)
            return
        try:
            _raw_no_echo(fd)
            self._loop.add_reader(fd, self._on_keys, pane)
        except (OSError, RuntimeError):
            os.close(fd)
            return
        pane.fd = fd
        if pane.out:
            self._flush(pane)

    # --- pane bytes -------------------------------------------------------------

    def _write(self, host_pane: int, data: bytes) -> None:
        pane = self.panes.get(host_pane)
        if pane is None or pane.fd == -2:
            return  # a pane the structure has not shown yet; a reset follows
        data = pane.queries.feed(data)
        if not data:
            return
        if pane.fd >= 0 and not pane.out:
            try:
                n = os.write(pane.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close_pane(pane)
                return
            if n == len(data):
                return
            data = data[n:]
        if len(pane.out) + len(data) > PANE_BUFFER:
            pane.out.clear()  # too far behind: a reset will redraw it
            return
        pane.out += data
        if pane.fd >= 0 and not pane.writing:
            pane.writing = True
            self._loop.add_writer(pane.fd, self._flush, pane)

    def _flush(self, pane: _Pane) -> None:
        """Write what a pane's tty would not take before."""
        try:
            n = os.write(pane.fd, pane.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close_pane(pane)
            return
        del pane.out[:n]
        if pane.out and not pane.writing:
            pane.writing = True
            self._loop.add_writer(pane.fd, self._flush, pane)
        elif not pane.out and pane.writing:
            pane.writing = False
            self._loop.remove_writer(pane.fd)
        if n:
            self._progress.set()
            self._ack()

    def backlog(self) -> int:
        """Bytes tmux has yet to take. A pane still waiting for its tty does not
        count: its bytes are bounded by ``PANE_BUFFER`` alone, so a pane whose
        tty never comes cannot hold the host's stream."""
        return sum(len(p.out) for p in self.panes.values() if p.fd >= 0)

    def _on_keys(self, pane: _Pane) -> None:
        try:
            data = os.read(pane.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pane(pane)  # the replica pane is gone
            return
        bindings = self.mirror.bindings
        for piece in pane.keys.feed(data):
            if not isinstance(piece, Mark):
                self._on_message(Input(0, 0, pane.host_id, piece))
            elif piece.isdigit() and int(piece) < len(bindings):
                self._on_message(Input(0, 0, pane.host_id, b"", bindings[int(piece)]))

    # --- the host's events, in order -------------------------------------------

    def send(self, msg: Message) -> None:
        if self._dead:
            raise ReplicaError("replica is gone")
        if (not self._queue and isinstance(msg, Event) and isinstance(msg.body, Output)
                and (self._task is None or self._task.done())):  # fmt: skip
            # the keystroke path: straight into the pane's tty, no task, no plan
            self._write(msg.body.pane, msg.body.data)
            self._applied = msg.seq
            self._ack()
            return
        self._queue.append(msg)
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run_queue())

    def presence(self, present: bool, text: str) -> None:
        if not self._dead:
            self._queue.append((present, text))
            if self._task is None or self._task.done():
                self._task = self._loop.create_task(self._run_queue())

    async def drain(self) -> None:
        while not self._dead and (len(self._queue) > QUEUE_HIGH or self.backlog() > ACK_LAG):
            self._progress.clear()
            await self._progress.wait()

    def _ack(self) -> None:
        """Ack what was applied, once per loop turn, while the panes keep up."""
        if self._applied != self._acked and not self._ack_soon:
            self._ack_soon = True
            self._loop.call_soon(self._send_ack)

    def _send_ack(self) -> None:
        self._ack_soon = False
        if self._applied != self._acked and self.backlog() <= ACK_LAG and not self._dead:
            self._acked = self._applied
            self._on_message(Ack(self._applied))

    async def _run_queue(self) -> None:
        while self._queue and not self._dead:
            item = self._queue.popleft()
            if isinstance(item, asyncio.Future):  # an attach waiting for its turn
                if not item.done():
                    item.set_result(None)
                continue
            try:
                if isinstance(item, tuple):
                    await self._run(self.mirror.presence(*item))
                elif isinstance(item, Event):
                    await self._apply(item.body)
            except (ValueError, TmuxError) as exc:
                if isinstance(item, Event):
                    self._on_message(Error(f"replica refused event {item.seq}: {exc}"[:1000]))
            except Exception as exc:  # a hostile tmux's replies are data
                self._on_message(Error(f"replica failed: {exc!r}"[:1000]))
            if isinstance(item, Event):
                self._applied = item.seq
                self._ack()
            if len(self._queue) <= QUEUE_HIGH:
                self._progress.set()

    async def _run(self, plan: Plan) -> None:
        if self.tmux is None:
            plan.close()
            raise TmuxError("the replica tmux is not running")
        await run_plan(plan, self.tmux, self)

    async def _apply(self, body: object) -> None:
        m = self.mirror
        if isinstance(body, Output):
            self._write(body.pane, body.data)
        elif isinstance(body, Frame):
            try:
                self._write(body.pane, decompress(body.data))
            except RemoteProtocolError as exc:
                raise ValueError(str(exc)) from None
        elif isinstance(body, Structure):
            await self._run(m.reconcile(body))
        elif isinstance(body, PaneReset):
            await self._reset_pane(body.image)
        elif isinstance(body, Status):
            await self._run(m.set_status(body))
        elif isinstance(body, Bindings):
            await self._run(m.set_bindings(body))
        elif isinstance(body, Snapshot):
            await self._run(m.reconcile(body.structure))
            await self._run(m.set_status(body.status))
            await self._run(m.set_bindings(body.bindings))

    async def _reset_pane(self, image: PaneImage) -> None:
        pane = self.panes.get(image.pane)
        if pane is None or pane.fd == -2:
            return
        pane.out.clear()  # superseded by the image
        if pane.fd >= 0:
            if pane.writing:
                pane.writing = False
                self._loop.remove_writer(pane.fd)
            with contextlib.suppress(OSError):
                termios.tcflush(pane.fd, termios.TCOFLUSH)
        pane.queries = QueryFilter()  # an unfinished sequence is superseded too
        await self._run(self.mirror.reset(image.pane))
        self._write(image.pane, image.data)

    # --- mates --------------------------------------------------------------------

    async def attach(
        self, mate: int, readonly: bool, cols: int, rows: int, term: str, timeout: float = 10
    ) -> int:
        """A pty master connected to a new tmux client of the replica
        (``mate_clients``), once the replica is where the host's events say."""
        if not self._ready.done():
            await asyncio.wait([self._ready, self.closed], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        if self._dead or self.tmux is None or not self._ready.done():
            raise ReplicaError("replica is gone")
        self.mates.check_room()
        # in turn with the host's events, as the worker took them: a client that
        # attached before the host's first structure was applied would type
        # into the replica's placeholder pane
        turn: asyncio.Future[None] = self._loop.create_future()
        self._queue.append(turn)
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run_queue())
        await asyncio.wait([turn, self.closed], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if not turn.done():
            turn.cancel()
            raise ReplicaError("replica is gone" if self._dead else "replica is busy")
        # and once the panes shown so far are the relay's (raw): a key tmux wrote
        # into a pane still in its first, cooked mode would be changed (CR to LF)
        deadline = self._loop.time() + ADOPT_WAIT
        while self._waiting and not self._dead and self._loop.time() < deadline:
            await asyncio.sleep(0.005)
        return await self.mates.attach(
            mate, readonly, cols, rows, term, dir_fd=self._dir_fd,
            sock_name=os.path.basename(self.sock), cwd=os.path.realpath(self.dir),
            gone=self.closed, timeout=timeout)

    def resized(self, mate: int) -> None:
        self.mates.resized(mate)

    def detached(self, mate: int) -> None:
        self.mates.detached(mate)

    # --- ending -------------------------------------------------------------------

    async def close(self) -> None:
        self._dead = True
        self._progress.set()
        if self._task is not None:
            self._task.cancel()
        for pane in list(self.panes.values()):
            self._close_pane(pane)
        self.panes.clear()
        self._waiting.clear()
        for fd, _ in self._orphans.values():
            os.close(fd)
        self._orphans.clear()
        for conn in list(self._handoffs):
            self._drop(conn)
        if self._listen is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._listen.fileno())
            self._listen.close()
            self._listen = None
        for fut in self._attach_waiters.values():
            if not fut.done():
                fut.set_exception(ReplicaError("replica is gone"))
        if self.tmux is not None:
            with contextlib.suppress(Exception):
                await self.tmux.close()
        if self._link is not None:
            self._link.close()
        self.mates.close()
        if not self._jailed and self.proc is not None and self.proc.returncode is None:
            # a tmux -D server outlives its clients; a jail's ends with the jail
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        if not self.closed.done():
            self.closed.set_result(None)
        await super().close()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
