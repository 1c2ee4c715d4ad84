"""tmux's own client protocol, spoken from Python: tmux clients with no process.

A tmux client process does little once it has introduced itself: it hands the
server its stdin and stdout (the server reads and writes the terminal, or for
``tmux -C`` the control-mode stream, on them itself), passes on window size
changes, and waits. Saying the same over the server's socket, with a
descriptor of ours as both, gives the same client for no process at all: the
relay's replicas save the 0.3 MiB a ``tmux -C`` costs per session, and the
0.5 MiB of a mate's ``tmux attach`` (whose pty the relay then opens itself).

What tmux asks of a client beyond that is refused or answered without acting:
the client never runs a command (``MSG_LOCK``'s lock command, ``MSG_EXEC``,
``MSG_SHELL``), never opens a file for the server (``MSG_READ_OPEN``,
``MSG_WRITE_OPEN`` get an error), and cannot be suspended (``MSG_SUSPEND`` is
answered at once with ``MSG_WAKEUP``).

The protocol is tmux's private one (``tmux-protocol.h``, OpenBSD ``imsg``
framing), versioned by ``PROTOCOL_VERSION``: a server of another version
answers ``MSG_VERSION`` and closes, which ``ClientLink`` reports as an error.
What the server sends back is data from a peer that may be hostile (a jailed
replica): messages are bounded in size and only their type is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Callable, Sequence

from tether.core.errors import TetherError

from .terminfo import capabilities

PROTOCOL_VERSION = 8
"""tmux 3.2 to 3.5 (``tmux-protocol.h``)."""
HEADER = struct.Struct("=IHHII")
"""``struct imsg_hdr``: type, length (header included), flags, peer id (the
protocol version), sender pid; host byte order."""
IMSGF_HASFD = 1
MAX_IMSGSIZE = 16384

MSG_VERSION = 12
MSG_IDENTIFY_FLAGS = 100
MSG_IDENTIFY_TERM = 101
MSG_IDENTIFY_TTYNAME = 102
MSG_IDENTIFY_STDIN = 104
MSG_IDENTIFY_ENVIRON = 105
MSG_IDENTIFY_DONE = 106
MSG_IDENTIFY_CLIENTPID = 107
MSG_IDENTIFY_CWD = 108
MSG_IDENTIFY_FEATURES = 109
MSG_IDENTIFY_STDOUT = 110
MSG_IDENTIFY_LONGFLAGS = 111
MSG_IDENTIFY_TERMINFO = 112
MSG_COMMAND = 200
MSG_DETACH = 201
MSG_DETACHKILL = 202
MSG_EXIT = 203
MSG_EXITED = 204
MSG_EXITING = 205
MSG_LOCK = 206
MSG_READY = 207
MSG_RESIZE = 208
MSG_SHUTDOWN = 210
MSG_SUSPEND = 214
MSG_UNLOCK = 215
MSG_WAKEUP = 216
MSG_EXEC = 217
MSG_READ_OPEN = 300
MSG_READ_DONE = 302
MSG_WRITE_OPEN = 303
MSG_WRITE_READY = 305
REFUSED = 13
"""EACCES: the answer to the server's file requests."""

CLIENT_CONTROL = 0x2000
CLIENT_UTF8 = 0x10000
CLIENT_STARTSERVER = 0x10000000
CONTROL_FLAGS = CLIENT_CONTROL | CLIENT_UTF8 | CLIENT_STARTSERVER
"""What ``tmux -C`` sends with a UTF-8 locale (tmux's own log shows 0x10012000)."""
TERMINAL_FLAGS = CLIENT_UTF8 | CLIENT_STARTSERVER
"""What ``tmux -u attach`` sends."""

MAX_INBOUND = 64 * 1024
"""Bytes of server messages buffered before the link is judged broken; the
server sends a control client only a handful of small ones."""
MAX_MESSAGES = 1024
"""Messages one link takes in its life (a client gets a handful: ready, flags,
exit); more ends it, so a server cannot keep the relay answering."""
HANDSHAKE_TIMEOUT = 1.0
"""Seconds the introduction may take: it fits an empty socket's buffer many
times over, so only a server that does not read ever waits."""
MESSAGE_COST = 1024
"""Bytes each message counts against the link's budget, whatever its size."""


class ImsgError(TetherError):
    """The tmux server refused the client or broke the protocol."""


def frame(kind: int, data: bytes = b"", *, has_fd: bool = False, pid: int = 0) -> bytes:
    """One imsg message."""
    size = HEADER.size + len(data)
    if size > MAX_IMSGSIZE:
        raise ImsgError(f"a tmux message of {size} bytes is over tmux's {MAX_IMSGSIZE}")
    flags = IMSGF_HASFD if has_fd else 0
    return HEADER.pack(kind, size, flags, PROTOCOL_VERSION, pid) + data


def cstring(text: str) -> bytes:
    raw = text.encode()
    if b"\0" in raw:
        raise ImsgError("a tmux client string may not hold a NUL")
    return raw + b"\0"


def command(argv: Sequence[str], pid: int = 0) -> bytes:
    """``MSG_COMMAND``: ``struct msg_command { int argc; }`` then argv, each
    NUL-terminated (tmux's ``cmd_pack_argv``)."""
    packed = b"".join(cstring(a) for a in argv)
    return frame(MSG_COMMAND, struct.pack("=i", len(argv)) + packed, pid=pid)


def identify(flags: int, term: str, cwd: str, pid: int, environ: Sequence[str] = (),
             ttyname: str = "", caps: Sequence[bytes] = ()) -> list[tuple[bytes, bool]]:
    """The introduction ``client_send_identify`` makes, in its order, as (frame,
    whether a descriptor goes with it): the two ``True`` ones are stdin and
    stdout."""
    out = [
        (frame(MSG_IDENTIFY_FLAGS, struct.pack("=i", flags & 0x7FFFFFFF), pid=pid), False),
        (frame(MSG_IDENTIFY_LONGFLAGS, struct.pack("=Q", flags), pid=pid), False),
        (frame(MSG_IDENTIFY_TERM, cstring(term), pid=pid), False),
        (frame(MSG_IDENTIFY_FEATURES, struct.pack("=i", 0), pid=pid), False),
        (frame(MSG_IDENTIFY_TTYNAME, cstring(ttyname), pid=pid), False),
        (frame(MSG_IDENTIFY_CWD, cstring(cwd), pid=pid), False),
        *((frame(MSG_IDENTIFY_TERMINFO, c.replace(b"\0", b"") + b"\0", pid=pid), False)
          for c in caps),
        (frame(MSG_IDENTIFY_STDIN, has_fd=True, pid=pid), True),
        (frame(MSG_IDENTIFY_STDOUT, has_fd=True, pid=pid), True),
        (frame(MSG_IDENTIFY_CLIENTPID, struct.pack("=i", pid), pid=pid), False),
    ]
    out += [(frame(MSG_IDENTIFY_ENVIRON, cstring(e), pid=pid), False) for e in environ]
    out.append((frame(MSG_IDENTIFY_DONE, pid=pid), False))
    return out


class Messages:
    """Splits what the server sends into (type, data); raises ``ImsgError`` on
    anything malformed or oversized."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        if len(self._buf) > MAX_INBOUND:
            raise ImsgError("the tmux server sent more than a control client takes")
        kinds = []
        at = 0
        while len(self._buf) - at >= HEADER.size:
            kind, size, _flags, peer, _pid = HEADER.unpack_from(self._buf, at)
            if size < HEADER.size or size > MAX_IMSGSIZE:
                raise ImsgError(f"a tmux message claims {size} bytes")
            if kind != MSG_VERSION and (peer & 0xFF) != PROTOCOL_VERSION:
                raise ImsgError(f"the tmux server speaks protocol {peer & 0xFF}, "
                                f"not {PROTOCOL_VERSION}")
            if len(self._buf) - at < size:
                break
            kinds.append((kind, bytes(self._buf[at + HEADER.size:at + size])))
            at += size
        del self._buf[:at]
        return kinds


def open_socket_at(dir_fd: int, name: str) -> int:
    """An ``O_PATH`` descriptor of the socket ``name`` in the directory ``dir_fd``,
    never following a symlink: connecting to ``/proc/self/fd/N`` of it reaches
    exactly that socket, whatever a jail that can write the directory put
    there meanwhile. Raises ``FileNotFoundError`` while it does not exist yet."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImsgError(f"{name} is not a socket")
    return fd


async def _send_frame(link: socket.socket, data: bytes, fd: int | None,
                      deadline: float) -> None:
    """All of ``data`` (with ``fd`` on its first byte) on the non-blocking
    ``link``, waiting for room until ``deadline`` (then ``ImsgError``)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            if fd is not None:
                sent = link.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack("=i", fd))])
                fd = None  # it went with the first byte sent
            else:
                sent = link.send(view)
        except (BlockingIOError, InterruptedError):
            room: asyncio.Future[None] = loop.create_future()
            loop.add_writer(link.fileno(), _settle, room)
            try:
                await asyncio.wait_for(room, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ImsgError("its tmux server did not take the client's "
                                "introduction in time") from None
            finally:
                loop.remove_writer(link.fileno())
            continue
        view = view[sent:]


def _settle(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


class ClientLink:
    """A tmux client made over a tmux server's socket.

    ``connect`` introduces it and sends its first command. A control client
    (``tty`` None) gets a socket pair: ``control`` is then the relay's end, the
    one the server reads commands from and writes control-mode output to (hand
    it to ``TmuxControl.start_on``). A terminal client is given ``tty``, a pty
    slave, whose master the caller keeps, and the capabilities of ``term``
    (``terminfo``); ``resize`` after changing its size.
    The link itself stays open for the client's life; ``closed`` is done (with
    why) when the server ends it (``MSG_EXITED``, a refused version, EOF).
    """

    def __init__(self, budget: Callable[[int], bool] | None = None) -> None:
        self.budget = budget
        """Called with each read's size; False ends the link (a hostile server)."""
        self.control: socket.socket | None = None
        self.closed: asyncio.Future[str] | None = None
        self.ready: asyncio.Future[None] | None = None
        """Done when the server says the client is attached (``MSG_READY``;
        never for a control client)."""
        self._link: socket.socket | None = None
        self._messages = Messages()
        self._exiting = False
        self._received = 0

    async def connect(self, dir_fd: int, name: str, argv: Sequence[str], *, cwd: str,
                      term: str = "tmux-256color", tty: int | None = None,
                      ttyname: str = "", timeout: float = 10.0) -> None:
        """Connect to the socket ``name`` in ``dir_fd`` as soon as the server
        listens there (at most ``timeout`` seconds), then attach with ``argv``."""
        loop = asyncio.get_running_loop()
        link = await self._connect(dir_fd, name, timeout)
        ours: socket.socket | None = None
        if tty is None:
            try:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except BaseException:
                link.close()
                raise
            fd, flags = theirs.fileno(), CONTROL_FLAGS
        else:
            theirs, fd, flags = None, tty, TERMINAL_FLAGS
        try:
            # the relay's pid is none of the jail's business: tmux uses it only in
            # the client's name when it has no tty name
            pid = 0
            caps = () if tty is None else capabilities(term)
            # a few KiB into an empty socket, a frame a send as tmux's client
            # does (each descriptor in a sendmsg of its own: tmux's imsg takes one
            # per read). A server that does not read leaves the rest waiting, at
            # most HANDSHAKE_TIMEOUT, without holding up the relay's other work.
            # (One send for all the frames without a descriptor lost a mate's
            # first keys in the e2e tests, for a reason not yet understood.)
            deadline = loop.time() + min(timeout, HANDSHAKE_TIMEOUT)
            for data, with_fd in identify(flags, term, cwd, pid, ttyname=ttyname, caps=caps):
                await _send_frame(link, data, fd if with_fd else None, deadline)
            await _send_frame(link, command(argv, pid), None, deadline)
        except BaseException:
            link.close()
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()
        self._link, self.control = link, ours
        self.closed = loop.create_future()
        self.ready = loop.create_future()
        loop.add_reader(link.fileno(), self._on_readable)

    def resize(self) -> None:
        """Tell the server the terminal's size changed (what a client does on
        SIGWINCH): it reads the new size from the tty."""
        self._send(MSG_RESIZE)

    def _send(self, kind: int, data: bytes = b"") -> None:
        if self._link is not None:
            with contextlib.suppress(OSError):
                self._link.send(frame(kind, data))

    async def _connect(self, dir_fd: int, name: str, timeout: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.001
        while True:
            try:
                fd = open_socket_at(dir_fd, name)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
                    return sock
                except (ConnectionRefusedError, FileNotFoundError):
                    sock.close()  # bound, not yet listening
                except BaseException:
                    sock.close()
                    raise
                finally:
                    os.close(fd)
            if loop.time() > deadline:
                raise ImsgError(f"no tmux server listened on {name} within {timeout:.0f}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _on_readable(self) -> None:
        assert self._link is not None
        try:
            data = self._link.recv(MAX_INBOUND)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(f"its tmux link failed: {exc}")
            return
        if not data:
            self._end("its tmux server closed the link")
            return
        if self.budget is not None and not self.budget(len(data)):
            self._end("its tmux server sent too much")
            return
        try:
            messages = self._messages.feed(data)
        except ImsgError as exc:
            self._end(str(exc))
            return
        self._received += len(messages)
        if self._received > MAX_MESSAGES or (
                self.budget is not None and messages
                and not self.budget(MESSAGE_COST * len(messages))):  # fmt: skip
            self._end("its tmux server sent more messages than a client takes")
            return
        for kind, body in messages:
            if self._link is None:
                return
            self._on_message(kind, body)

    def _on_message(self, kind: int, body: bytes) -> None:
        if kind == MSG_VERSION:
            self._end("its tmux server speaks another protocol version")
        elif kind == MSG_READY:
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif kind in (MSG_EXIT, MSG_SHUTDOWN, MSG_DETACH, MSG_DETACHKILL, MSG_EXEC):
            # as tmux's client does (without running MSG_EXEC's command): say so,
            # and the server answers MSG_EXITED
            if not self._exiting:
                self._exiting = True
                self._send(MSG_EXITING)
        elif kind == MSG_EXITED:
            self._end("its tmux server ended the client")
        elif kind == MSG_SUSPEND:
            self._send(MSG_WAKEUP)  # nothing to stop: carry on at once
        elif kind == MSG_LOCK:
            self._send(MSG_UNLOCK)  # tmux's client would run the lock command
        elif kind in (MSG_READ_OPEN, MSG_WRITE_OPEN) and len(body) >= 4:
            (stream,) = struct.unpack_from("=i", body)
            answer = MSG_READ_DONE if kind == MSG_READ_OPEN else MSG_WRITE_READY
            self._send(answer, struct.pack("=ii", stream, REFUSED))

    def _end(self, why: str) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(why)
        self.close()

    def close(self) -> None:
        """Close the link: the server then drops the client. ``control`` belongs to
        whoever reads it (``TmuxControl``)."""
        if self._link is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._link.fileno())
            self._link.close()
            self._link = None
        if self.closed is not None and not self.closed.done():
            self.closed.set_result("closed")


