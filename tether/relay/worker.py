"""The replica worker: one process per session, mirroring the host into a real tmux.

It is started by the relay with two inherited sockets (messages, and fd
passing) and a private directory, and needs nothing else, so a jail can wrap it
(no network, no view of the relay's files). It applies the replication log to
a replica tmux server: windows and panes are reconciled to the host's
structure (``tether.mirror`` decides how), pane bytes are written into the
replica panes' ttys so tmux renders them, and keys mates type into a replica
pane are read back from that tty and sent to the relay for the host. Mates'
tmux clients are started here too, and their pty masters are handed to the
relay.

Run as ``python -m tether.relay.worker MSG_FD FD_FD DIR``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import selectors
import signal
import socket
import struct
import sys
import termios
import tty
from collections.abc import Callable

from tether.core.codec import decompress
from tether.core.control import Notification, PaneOutput
from tether.core.errors import RemoteProtocolError
from tether.core.limits import MAX_DIMENSION
from tether.core.messages import (
    Ack,
    Bindings,
    Error,
    Event,
    Frame,
    HostPresence,
    Input,
    MateAttach,
    Message,
    MessageDecoder,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
)
from tether.core.queries import QueryFilter
from tether.mirror.apply import PANE_ARGV, SESSION, Mirror
from tether.mirror.keys import Mark, PaneKeys
from tether.mirror.plan import PaneOwner, Plan
from tether.mirror.run_sync import run_plan
from tether.transport.tmuxsync import BlockingTmuxControl, TmuxError, spawn

ACK_LAG = 256 * 1024
"""Bytes queued for the replica's panes before the worker stops reading the
relay: the relay's acks (and so the host's backlog) follow what tmux took."""
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
Send = Callable[[Message], None]


_report: Send | None = None


def warn(text: str) -> None:
    """A line for the relay's log, over the message socket: the jail holds
    nothing else of the relay's (its stdout and stderr are /dev/null)."""
    if _report is not None:
        with contextlib.suppress(OSError):
            _report(Error(f"worker: {text}"[:1000]))


def known_terminal(term: str) -> bool:
    """A TERM name that is safe to pass on and that this machine's terminfo knows."""
    if not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", term or ""):
        return False
    return any(
        os.path.isfile(os.path.join(base, term[0], term))
        for base in ("/usr/share/terminfo", "/lib/terminfo", "/usr/lib/terminfo")
    )


class Pane:
    """One replica pane: its tty (opened here, raw) and the bytes not yet taken."""

    __slots__ = ("fd", "host_id", "keys", "out", "queries", "replica_id")

    def __init__(self, host_id: int, replica_id: str, fd: int) -> None:
        self.host_id = host_id
        self.replica_id = replica_id  # e.g. "%3"
        self.fd = fd
        self.out = bytearray()
        self.keys = PaneKeys()
        self.queries = QueryFilter()
        """The host's tmux already answered its programs' terminal queries; the
        replica's answers would reach the host as mate input, a second reply."""


class Replica(PaneOwner):
    """The replica tmux server and its panes' ttys; ``Mirror`` decides what tmux runs."""

    def __init__(self, directory: str, sel: selectors.BaseSelector, send: Send) -> None:
        self.dir = directory
        self.sock = os.path.join(directory, "tmux.sock")
        self.sel = sel
        self.send = send
        self.tmux: BlockingTmuxControl | None = None
        self.mirror = Mirror()
        self.panes: dict[int, Pane] = {}  # host pane id -> replica pane

    def start(self) -> None:
        env = dict(os.environ, TERM="tmux-256color")
        null = os.open(os.devnull, os.O_RDWR)
        try:
            pid = spawn(
                ["tmux", "-S", self.sock, "-f", "/dev/null", "new-session", "-d",
                 "-s", SESSION, "-x", "80", "-y", "24", *PANE_ARGV],
                env, null, null, null,
            )  # fmt: skip
        finally:
            os.close(null)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise RuntimeError("cannot start the replica tmux server")
        self.tmux = t = BlockingTmuxControl(self.sock, self._on_tmux)
        t.start(["attach", "-t", SESSION], env)
        self.sel.register(t.fd, READ, t)
        t.run("refresh-client -f no-output")
        self.run(self.mirror.setup())

    def run(self, plan: Plan) -> None:
        """Carry out one of the mirror's plans on the replica tmux."""
        assert self.tmux is not None
        run_plan(plan, self.tmux, self)

    def _on_tmux(self, item: PaneOutput | Notification) -> None:
        if isinstance(item, Notification) and item.name == "exit":
            warn("replica tmux exited")
            if self.tmux is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(self.tmux.fd)

    # --- applying events ---------------------------------------------------

    def apply(self, body: object) -> None:
        m = self.mirror
        if isinstance(body, Output):
            self.write(body.pane, body.data)
        elif isinstance(body, Frame):
            try:
                self.write(body.pane, decompress(body.data))
            except RemoteProtocolError as exc:
                raise ValueError(str(exc)) from None
        elif isinstance(body, Structure):
            self.run(m.reconcile(body))
        elif isinstance(body, PaneReset):
            self.reset_pane(body.image)
        elif isinstance(body, Status):
            self.run(m.set_status(body))
        elif isinstance(body, Bindings):
            self.run(m.set_bindings(body))
        elif isinstance(body, Snapshot):
            self.run(m.reconcile(body.structure))
            self.run(m.set_status(body.status))
            self.run(m.set_bindings(body.bindings))

    def open_pane(self, host: int, replica: str, tty_path: str) -> None:
        """A new replica pane: its tty opened raw, without echo, and watched for keys."""
        fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        pane = Pane(host, replica, fd)
        self.panes[host] = pane
        self.sel.register(fd, READ, pane)

    def close_pane(self, host: int) -> None:
        pane = self.panes.pop(host, None)
        if pane is not None:
            self._close_pane(pane)

    def _close_pane(self, pane: Pane) -> None:
        if pane.fd < 0:
            return
        pane.out.clear()
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(pane.fd)
        with contextlib.suppress(OSError):
            os.close(pane.fd)
        pane.fd = -1

    # --- pane bytes ----------------------------------------------------------

    def write(self, host_pane: int, data: bytes) -> None:
        pane = self.panes.get(host_pane)
        if pane is None or pane.fd < 0:
            return  # output of a pane the structure has not shown yet; a reset follows
        data = pane.queries.feed(data)
        if not data:
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
            self.sel.modify(pane.fd, READ | WRITE, pane)
        pane.out += data

    def flush(self, pane: Pane) -> None:
        """Write what a pane's tty would not take before (it is writable now)."""
        try:
            n = os.write(pane.fd, pane.out)
        except BlockingIOError:
            return
        except OSError:
            self._close_pane(pane)
            return
        del pane.out[:n]
        if not pane.out:
            self.sel.modify(pane.fd, READ, pane)

    def backlog(self) -> int:
        return sum(len(p.out) for p in self.panes.values())

    def reset_pane(self, image: PaneImage) -> None:
        pane = self.panes.get(image.pane)
        if pane is None or pane.fd < 0 or self.tmux is None:
            return
        if pane.out:
            pane.out.clear()  # superseded by the image
            self.sel.modify(pane.fd, READ, pane)
        with contextlib.suppress(OSError):
            termios.tcflush(pane.fd, termios.TCOFLUSH)
        pane.queries = QueryFilter()  # an unfinished sequence is superseded too
        self.run(self.mirror.reset(image.pane))
        self.write(image.pane, image.data)

    def on_keys(self, pane: Pane) -> None:
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
                self.send(Input(0, 0, pane.host_id, piece))
            elif piece.isdigit() and int(piece) < len(bindings):
                self.send(Input(0, 0, pane.host_id, b"", bindings[int(piece)]))

    def presence(self, msg: HostPresence) -> None:
        self.run(self.mirror.presence(msg.present, msg.text))

    # --- mates -----------------------------------------------------------------

    def attach(self, msg: MateAttach, fdsock: socket.socket) -> None:
        master, slave = os.openpty()
        try:
            cols = max(1, min(msg.cols, MAX_DIMENSION))
            rows = max(1, min(msg.rows, MAX_DIMENSION))
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            # an unknown TERM (e.g. a terminal's own name) would stop tmux from attaching
            term = msg.term if known_terminal(msg.term) else "xterm-256color"
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "TERM": term,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "HOME": self.dir,
            }
            args = ["tmux", "-u", "-S", self.sock, "attach", "-t", SESSION]
            if msg.readonly:
                args.append("-r")
            # a new session whose first tty opened becomes its controlling terminal
            os.posix_spawnp(
                "tmux",
                args,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(slave)
        try:
            socket.send_fds(fdsock, [struct.pack(">Q", msg.mate)], [master])
        finally:
            os.close(master)


class RelayLink:
    """The message socket to the relay: non-blocking both ways, sends queued."""

    def __init__(self, fd: int, sel: selectors.BaseSelector) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.sel = sel
        self.out = bytearray()
        self.reading = True
        sel.register(self.sock, READ, self)

    def send(self, msg: Message) -> None:
        if not self.out:
            data = msg.encode()
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            self.out += data[n:]
            self._watch()
        else:
            self.out += msg.encode()

    def flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        del self.out[:n]
        if not self.out:
            self._watch()

    def recv(self) -> bytes | None:
        """What the relay sent; b"" when it is gone, None when nothing is there."""
        try:
            return self.sock.recv(1 << 20)
        except BlockingIOError:
            return None

    def pause(self, paused: bool) -> None:
        """Stop (or resume) reading the relay while the panes are behind."""
        if self.reading == paused:
            self.reading = not paused
            self._watch()

    def _watch(self) -> None:
        events = (READ if self.reading else 0) | (WRITE if self.out else 0)
        registered = self.sock in self.sel.get_map()
        if events and registered:
            self.sel.modify(self.sock, events, self)
        elif events:
            self.sel.register(self.sock, events, self)
        elif registered:  # a selector holds no file without events
            self.sel.unregister(self.sock)


def _reap() -> None:
    """Collect exited children (mates' tmux clients, the control client)."""
    for _ in range(1024):
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(msg: Message, replica: Replica, link: RelayLink, fdsock: socket.socket) -> int | None:
    """Apply one message from the relay; the sequence number of an event applied."""
    if isinstance(msg, Event):
        try:
            replica.apply(msg.body)
        except (ValueError, TmuxError) as exc:
            link.send(Error(f"replica refused event {msg.seq}: {exc}"))
        return msg.seq
    if isinstance(msg, MateAttach):
        replica.attach(msg, fdsock)
    elif isinstance(msg, HostPresence):
        replica.presence(msg)
    return None


def serve(msg_fd: int, fd_fd: int, directory: str) -> None:
    # the relay's sockets must not leak into tmux and its clients
    os.set_inheritable(msg_fd, False)
    os.set_inheritable(fd_fd, False)
    fdsock = socket.socket(fileno=fd_fd)
    fdsock.setblocking(True)
    sel = selectors.DefaultSelector()
    link = RelayLink(msg_fd, sel)
    global _report
    _report = link.send
    replica = Replica(directory, sel, link.send)
    replica.start()
    decoder = MessageDecoder()
    applied = 0
    acked = 0
    try:
        while True:
            for key, mask in sel.select():
                what = key.data
                if isinstance(what, Pane):
                    if mask & WRITE and what.out:
                        replica.flush(what)
                    if mask & READ and what.fd >= 0:
                        replica.on_keys(what)
                elif isinstance(what, BlockingTmuxControl):
                    what.read()
                else:  # the relay
                    if mask & WRITE and link.out:
                        link.flush()
                    data = link.recv() if mask & READ and link.reading else None
                    if data == b"":
                        return
                    for msg in decoder.feed(data or b""):
                        seq = _handle(msg, replica, link, fdsock)
                        applied = applied if seq is None else seq
            # ack once the bytes are on their way into tmux, with bounded lag; while
            # they are not, stop reading the relay
            behind = replica.backlog() > ACK_LAG
            if applied != acked and not behind:
                link.send(Ack(applied))
                acked = applied
            link.pause(behind)
            _reap()
    finally:
        if replica.tmux is not None:
            with contextlib.suppress(Exception):
                replica.tmux.run("kill-server", timeout=3)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m tether.relay.worker MSG_FD FD_FD DIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(int(args[0]), int(args[1]), args[2])
    except (ConnectionError, OSError) as exc:
        if exc.errno not in (None, errno.EPIPE, errno.ECONNRESET):
            warn(f"stopped: {exc!r}")
            raise
    except Exception as exc:  # stderr is /dev/null: the relay's log is the only witness
        warn(f"crashed: {exc!r}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
