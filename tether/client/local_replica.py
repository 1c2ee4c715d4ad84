"""The join client's tmux server: the host's session mirrored on the mate's own machine.

``tether join`` applies the host's replication events to a private tmux server
(its own socket) that the mate's terminal attaches to, exactly as the relay's
replica worker (``tether.relay.worker.Replica``) does for ssh mates, but on
asyncio and without a jail: ``tether.mirror`` decides what tmux runs (windows,
panes running ``sleep``, names, layouts, the host's status line and bindings,
all of it defused there), the host's pane bytes are written into the local
panes' ttys so tmux renders them, and what the mate types into a pane is read
back from its tty and handed to ``on_input`` for the host, with the MAGIC
markers of the host's key bindings decoded into a ``Binding``.

Key tables, the one deliberate difference from the relay: its ``lock_keys``
replaces all of tmux's key tables because nothing may run on a relay for a
mate. Here the tmux is the mate's own, so copy mode is left as the mate's
config (or tmux's defaults) has it, pipes to their clipboard included; its
keys only read the screen. The prefix and root tables stay locked as on the
relay, though, for the mirror's sake rather than for safety: tmux's default
``C-b $`` (rename-session), ``C-b ,`` and ``C-b .`` (rename and move a window),
choose-tree's ``x`` and a mate's own structural bindings would change the
replica behind the ``Mirror``'s back, and its next plan would fail (a renamed
session fails every later one). Every prefix key then runs the host's binding
on the host, or one of the relay's safe local keys (detach, copy mode,
redraw, clock), or ``]``: pasting the mate's own buffer, which types it to the
host, or ``F``: following the host's window or looking around. The root table
holds tmux's mouse bindings of panes (``MATE_MOUSE_KEYS``), not its menus.
The mate's config still sets everything else (colours, borders, terminal
features, copy-mode keys, mouse, scrollback), except the options the mirror
needs (``MateMirror.options``) and the host's status line. The relay's worker starts its tmux with
``-f /dev/null``; this one reads ``~/.tmux.conf`` unless told otherwise.

Nothing here blocks the loop: pane ttys are non-blocking, bytes tmux has not
taken yet wait in a bounded buffer per pane (``PANE_BUFFER``), and past the
bound they are dropped and ``on_overflow`` asks for the pane's next reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios
import tty
from collections.abc import Callable

from tether.core.codec import decompress
from tether.core.control import Notification, PaneOutput
from tether.core.errors import RemoteProtocolError
from tether.core.limits import MAX_DATA, MAX_DIMENSION
from tether.core.messages import (
    Binding,
    Bindings,
    EventBody,
    Frame,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
)
from tether.core.predict import MODES
from tether.core.queries import QueryFilter
from tether.core.screen import parse_pane_state
from tether.mirror.apply import PANE_ARGV, SESSION
from tether.mirror.capture import capture_cmds, pane_image
from tether.mirror.keys import Mark, PaneKeys
from tether.mirror.plan import PaneOwner, Plan
from tether.mirror.run_async import run_plan
from tether.transport.children import run
from tether.transport.tmux import TmuxControl, TmuxError, tmux_cmd

from .local_echo import LocalEcho
from .mate_mirror import (
    FOLLOW_MARK,
    FOLLOWING_TEXT,
    LOOKING_TEXT,
    MateMirror,
)

log = logging.getLogger("tether.join")

__all__ = ["PANE_BUFFER", "SESSION", "LocalReplica"]

PANE_BUFFER = 2 * MAX_DATA
"""Most bytes waiting for one pane's tty: a whole pane image (up to MAX_DATA)
plus the output after it. Past it the backlog is dropped; a reset redraws."""
READ_SIZE = 65536
ENGAGE_WAIT = 0.2
"""Longest wait for tmux to read a pane's bytes before capturing it for local echo."""

InputHandler = Callable[[int, bytes, Binding | None], None]


class _Pane:
    """One local pane: its tty (opened here, raw) and the bytes tmux has not taken."""

    __slots__ = (
        "echo", "engaging", "fd", "host_id", "keys", "out", "queries", "replica_id", "timer",
        "tty",
    )

    def __init__(self, host_id: int, replica_id: str, fd: int, tty_path: str) -> None:
        self.host_id = host_id
        self.replica_id = replica_id  # e.g. "%3"
        self.fd = fd
        self.tty = tty_path
        self.out = bytearray()
        self.keys = PaneKeys()
        self.queries = QueryFilter()
        """The host's tmux already answered its programs' terminal queries; this
        tmux's answers would reach the host as the mate's input, a second reply."""
        self.echo: LocalEcho | None = None
        self.engaging = False
        self.timer: asyncio.TimerHandle | None = None


class LocalReplica(PaneOwner):
    """The join client's tmux server: the host's session mirrored on the mate's machine.

    ``apply`` and ``presence`` calls are serialised (a plan waits on tmux between
    commands and the mirror's state follows each one), so events may come from
    any task in order. ``TmuxError`` from them means this tmux refused a command
    (or is gone); ``ValueError`` means the event was refused (out of bounds).
    """

    def __init__(
        self,
        sock: str,
        on_input: InputHandler,
        config_file: str | None = None,
        on_overflow: Callable[[int], None] | None = None,
        follow: bool = True,
        predict: str | None = "never",
    ) -> None:
        """``sock``: the private tmux socket path. ``on_input(host_pane, keys,
        binding)``: keys the mate typed into a pane (``binding`` None), or a host
        binding they pressed (``keys`` empty). ``config_file`` None: tmux's
        default config (the mate's ``~/.tmux.conf``). ``on_overflow(host_pane)``:
        a pane's bytes were dropped; a ``PaneReset`` of it would redraw it.
        ``follow`` False: start looking around rather than following the host's
        window (prefix F switches). ``predict``: local echo, ``adaptive``,
        ``always`` or ``never``; None: the mate's ``@tether-predict`` option, else
        ``adaptive``."""
        self._sock = sock
        self.on_input = on_input
        self.on_overflow = on_overflow
        self.config_file = config_file
        self.mirror = MateMirror(follow)
        self.tmux: TmuxControl | None = None
        self.panes: dict[int, _Pane] = {}  # host pane id -> local pane
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._server_pid: int | None = None
        self._closed = False
        self._switches: set[asyncio.Task[None]] = set()
        self.predict = predict
        self._srtt: float | None = None

    @property
    def sock(self) -> str:
        """The tmux socket: attach with ``tmux -S SOCK attach -t SESSION``."""
        return self._sock

    @property
    def session(self) -> str:
        """The tmux session holding the host's windows."""
        return SESSION

    def attach_argv(self) -> list[str]:
        """The command line that attaches the mate's terminal to this tmux."""
        return ["tmux", "-S", self._sock, "attach", "-t", SESSION]

    # --- the tmux server ------------------------------------------------------------

    async def start(self, cols: int, rows: int) -> None:
        """Start the tmux server, its control client and the mirror's setup.

        ``cols`` x ``rows`` is only the placeholder window's size: the host's
        windows get the host's sizes. On failure everything started is stopped."""
        self._loop = asyncio.get_running_loop()
        env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        cols = max(1, min(cols, MAX_DIMENSION))
        rows = max(1, min(rows, MAX_DIMENSION))
        config = ["-f", self.config_file] if self.config_file is not None else []
        self._started = True
        try:
            # not asyncio's subprocess transport (``transport.children``)
            code, _, err = await run(["tmux", "-S", self._sock, *config, "new-session", "-d",
                                      "-s", SESSION, "-x", str(cols), "-y", str(rows),
                                      *PANE_ARGV], env=env)
            if code != 0:
                text = err.decode(errors="replace").strip()
                raise TmuxError(f"cannot start the local tmux server: {text}"[:500])
            self.tmux = TmuxControl(self._sock, self._on_tmux)
            await self.tmux.start(["attach", "-t", SESSION], env)
            await self.tmux.run("refresh-client -f no-output")
            pid = (await self.tmux.run("display -p '#{pid}'"))[0].strip()
            self._server_pid = int(pid) if pid.isdigit() else None
            if self.predict is None:
                lines = await self.tmux.run("show -gqv @tether-predict")
                mode = lines[0].strip() if lines else ""
                self.predict = mode if mode in MODES else "adaptive"
            async with self._lock:
                await self.run(self.mirror.setup())
        except BaseException:
            await self.close()
            raise

    async def run(self, plan: Plan) -> None:
        """Carry out one of the mirror's plans on this tmux."""
        if self.tmux is None or self._closed:
            plan.close()
            raise TmuxError("the local tmux is not running")
        await run_plan(plan, self.tmux, self)

    def _on_tmux(self, item: PaneOutput | Notification) -> None:
        """Control-mode news; with ``no-output`` only notifications, none needed here."""

    async def close(self) -> None:
        """Stop reading and writing panes, kill the tmux server, end the control client."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._switches):
            task.cancel()
        for pane in list(self.panes.values()):
            self._close_pane(pane)
        self.panes.clear()
        if self._server_pid is not None:
            # a signal, not a tmux command: when the mate's terminal closes, SIGHUP
            # reaches every process we started, a new tmux client included; the
            # server (a daemon in a session of its own) is spared, so it must be told
            with contextlib.suppress(OSError):
                os.kill(self._server_pid, signal.SIGTERM)
        elif self._started:
            with contextlib.suppress(OSError, TmuxError):
                await asyncio.wait_for(tmux_cmd(self._sock, "kill-server", check=False), 5)
        if self.tmux is not None:
            with contextlib.suppress(OSError, TmuxError):
                await self.tmux.close()

    # --- events -----------------------------------------------------------------------

    async def apply(self, body: EventBody) -> None:
        """One replication event, applied as the relay's replica applies it."""
        async with self._lock:
            m = self.mirror
            if isinstance(body, Output):
                self.write(body.pane, body.data)
            elif isinstance(body, Frame):
                try:
                    data = decompress(body.data)
                except RemoteProtocolError as exc:
                    raise ValueError(str(exc)) from None
                self.write(body.pane, data)
            elif isinstance(body, Structure):
                self._disengage_all()  # panes may be resized: overlays go first
                await self.run(m.reconcile(body))
            elif isinstance(body, PaneReset):
                await self._reset_pane(body.image)
            elif isinstance(body, Status):
                await self.run(m.set_status(body))
            elif isinstance(body, Bindings):
                await self.run(m.set_bindings(body))
            elif isinstance(body, Snapshot):
                self._disengage_all()
                await self.run(m.reconcile(body.structure))
                await self.run(m.set_status(body.status))
                await self.run(m.set_bindings(body.bindings))

    async def follow(self, on: bool) -> None:
        """Follow the host's active window (``on``), or look around; the mate is told."""
        async with self._lock:
            await self.run(self.mirror.follow(on))
            await self.run(self.mirror.tell(FOLLOWING_TEXT if on else LOOKING_TEXT))

    def _switch_follow(self) -> None:
        """The mate pressed prefix F: switch, off the tty reader (plans wait on tmux)."""
        if self._loop is None or self._closed:
            return
        task = self._loop.create_task(self.follow(not self.mirror.following))
        self._switches.add(task)
        task.add_done_callback(self._switched)

    def _switched(self, task: asyncio.Task[None]) -> None:
        self._switches.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # the local tmux is going away; the join ends with it
            log.info("local tmux: %s", exc)

    async def presence(self, present: bool, text: str) -> None:
        """The host's absence (``text``) in the status line, or its return."""
        async with self._lock:
            await self.run(self.mirror.presence(present, text))

    # --- pane ttys (PaneOwner) --------------------------------------------------------

    def open_pane(self, host: int, replica: str, tty: str) -> None:
        """A new local pane: its tty opened raw, without echo, and watched for keys.

        Raw, so tmux's keys arrive byte for byte and our bytes reach tmux as
        written; no echo, or the mate's keys would show up as pane output."""
        if self._closed:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        old = self.panes.pop(host, None)
        if old is not None:
            self._close_pane(old)
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            _raw_no_echo(fd)
            pane = _Pane(host, replica, fd, tty)
            self._loop.add_reader(fd, self._on_keys, pane)
        except BaseException:
            os.close(fd)
            raise
        self.panes[host] = pane

    def close_pane(self, host: int) -> None:
        pane = self.panes.pop(host, None)
        if pane is not None:
            self._close_pane(pane)

    def _close_pane(self, pane: _Pane) -> None:
        if pane.timer is not None:
            pane.timer.cancel()
            pane.timer = None
        if pane.fd < 0:
            return
        pane.out.clear()
        if self._loop is not None:
            self._loop.remove_reader(pane.fd)
            self._loop.remove_writer(pane.fd)
        with contextlib.suppress(OSError):
            os.close(pane.fd)
        pane.fd = -1

    # --- bytes to panes ---------------------------------------------------------------

    def write(self, host_pane: int, data: bytes) -> None:
        """Queue host bytes for a pane's tty: written now if it takes them, else later."""
        pane = self.panes.get(host_pane)
        if pane is None or pane.fd < 0 or self._loop is None:
            return  # output of a pane the structure has not shown yet; a reset follows
        data = pane.queries.feed(data)
        if not data:
            return
        if pane.echo is not None and pane.echo.engaged and self._loop is not None:
            data = pane.echo.host_output(data, self._loop.time())
            self._echo_timer(pane)
        self._put(pane, data)

    def _put(self, pane: _Pane, data: bytes) -> None:
        """Bytes for a pane's tty, after everything queued before them."""
        if pane.fd < 0 or self._loop is None or not data:
            return
        if not pane.out:
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
            self._loop.add_writer(pane.fd, self._flush, pane)
        if len(pane.out) + len(data) > PANE_BUFFER:
            # tmux is not reading this pane: drop the backlog, not the loop's memory
            pane.out.clear()
            self._loop.remove_writer(pane.fd)
            if pane.echo is not None:
                pane.echo.disengage()  # its undo went with the backlog; a reset redraws
            if self.on_overflow is not None:
                self.on_overflow(pane.host_id)
            return
        pane.out += data

    def _flush(self, pane: _Pane) -> None:
        """Write what a pane's tty would not take before (it is writable now)."""
        if pane.fd < 0:
            return
        try:
            n = os.write(pane.fd, pane.out)
        except BlockingIOError:
            return
        except OSError:
            self._close_pane(pane)
            return
        del pane.out[:n]
        if not pane.out and self._loop is not None:
            self._loop.remove_writer(pane.fd)

    def backlog(self) -> int:
        """Bytes waiting for the panes' ttys (for acks that follow what tmux took)."""
        return sum(len(p.out) for p in self.panes.values())

    async def _reset_pane(self, image: PaneImage) -> None:
        """Redraw a pane from an image: what was still queued for it is superseded."""
        pane = self.panes.get(image.pane)
        if pane is None or pane.fd < 0:
            return
        if pane.out:
            pane.out.clear()
            if self._loop is not None:
                self._loop.remove_writer(pane.fd)
        with contextlib.suppress(OSError):
            termios.tcflush(pane.fd, termios.TCOFLUSH)
        pane.queries = QueryFilter()  # an unfinished sequence is superseded too
        if pane.echo is not None:
            pane.echo.disengage()  # the image starts with a full reset
        await self.run(self.mirror.reset(image.pane))
        self.write(image.pane, image.data)

    # --- keys from panes --------------------------------------------------------------

    def _on_keys(self, pane: _Pane) -> None:
        """What the mate typed into a pane: raw keys, or MAGIC markers of host bindings."""
        if pane.fd < 0:
            return
        try:
            data = os.read(pane.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pane(pane)  # the local pane is gone
            return
        bindings = self.mirror.bindings
        for piece in pane.keys.feed(data):
            if not isinstance(piece, Mark):
                self._predict(pane, piece)
                self.on_input(pane.host_id, piece, None)
            elif piece == FOLLOW_MARK:
                self._switch_follow()
            elif piece.isdigit() and int(piece) < len(bindings):
                self.on_input(pane.host_id, b"", bindings[int(piece)])

    # --- local echo -------------------------------------------------------------------

    def rtt(self, srtt: float) -> None:
        """The link's smoothed round trip, for the panes' predictors."""
        self._srtt = srtt
        if self._loop is None:
            return
        now = self._loop.time()
        for pane in self.panes.values():
            if pane.echo is not None:
                pane.echo.rtt(srtt, now)

    def _predict(self, pane: _Pane, keys: bytes) -> None:
        """Show what ``keys`` will do before the host echoes them (if it can be guessed)."""
        if self.predict in (None, "never") or self._loop is None:
            return
        now = self._loop.time()
        if pane.echo is None:
            pane.echo = LocalEcho(self.predict)
            if self._srtt is not None:
                pane.echo.rtt(self._srtt, now)
        if pane.echo.engaged:
            self._put(pane, pane.echo.typed(keys, now))
            self._echo_timer(pane)
        elif pane.echo.wanted(now) and not pane.engaging:
            pane.engaging = True
            task = self._loop.create_task(self._engage(pane))
            self._switches.add(task)
            task.add_done_callback(self._switched)

    async def _engage(self, pane: _Pane) -> None:
        """Start a pane's model from what the local tmux shows now.

        Under the lock, so no host bytes arrive meanwhile; after tmux has read
        every byte written to the pane, so the capture is of all of them."""
        try:
            async with self._lock:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + ENGAGE_WAIT
                while (pane.out or _outq(pane.fd) > 0) and loop.time() < deadline:
                    await asyncio.sleep(0.002)
                if pane.out or pane.fd < 0 or self.tmux is None or pane.echo is None:
                    return
                replies = [await self.tmux.send(c)
                           for c in capture_cmds(int(pane.replica_id[1:]), history=False)]
                image = pane_image(pane.host_id, replies)
                if image is None or pane.fd < 0:
                    return
                state = parse_pane_state(replies[0].lines[0].decode("ascii", "replace"))
                pane.echo.engage(state.width, state.height, image.data)
        finally:
            pane.engaging = False

    def _echo_timer(self, pane: _Pane) -> None:
        """Wake at the pane's predictor's next deadline (a glitch, an expiry)."""
        if pane.timer is not None:
            pane.timer.cancel()
            pane.timer = None
        due = pane.echo.next_timer() if pane.echo is not None else None
        if due is not None and self._loop is not None and pane.fd >= 0:
            pane.timer = self._loop.call_at(due, self._echo_due, pane)

    def _echo_due(self, pane: _Pane) -> None:
        pane.timer = None
        if pane.echo is not None and self._loop is not None:
            self._put(pane, pane.echo.timer(self._loop.time()))
            self._echo_timer(pane)

    def _disengage_all(self) -> None:
        """Undo every overlay and drop the models (before the panes change shape)."""
        for pane in self.panes.values():
            if pane.echo is not None and pane.echo.engaged:
                self._put(pane, pane.echo.disengage())
                self._echo_timer(pane)

def _outq(fd: int) -> int:
    """Bytes written to a pane's tty that tmux has not read yet."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _raw_no_echo(fd: int) -> None:
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
