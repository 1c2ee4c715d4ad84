"""tmux's client protocol from Python: a real ``tmux -D`` server takes the
relay's control client, and a hostile server or socket gets nowhere."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tether.testing.procs import until
from tether.transport import tmux_imsg
from tether.transport.terminfo import TerminfoError, capabilities
from tether.transport.tmux import TmuxControl
from tether.transport.tmux_imsg import (
    HEADER,
    MAX_IMSGSIZE,
    MAX_INBOUND,
    MSG_EXIT,
    MSG_VERSION,
    ClientLink,
    ImsgError,
    Messages,
    command,
    frame,
    open_socket_at,
)

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def test_frames_are_tmuxs_imsg_layout() -> None:
    f = frame(106, b"ab", has_fd=True, pid=7)
    assert HEADER.unpack_from(f) == (106, HEADER.size + 2, 1, tmux_imsg.PROTOCOL_VERSION, 7)
    c = command(["new-session", "-s", "x"])
    assert struct.unpack_from("=i", c, HEADER.size) == (3,)
    assert c[HEADER.size + 4:] == b"new-session\0-s\0x\0"
    with pytest.raises(ImsgError):
        command(["a\0b"])
    with pytest.raises(ImsgError):
        command(["x" * MAX_IMSGSIZE])


def test_server_messages_are_bounded_and_checked() -> None:
    m = Messages()
    two = frame(MSG_EXIT) + frame(204, b"xyz")
    assert m.feed(two[:5]) == []
    assert m.feed(two[5:]) == [(MSG_EXIT, b""), (204, b"xyz")]
    with pytest.raises(ImsgError, match="claims"):
        Messages().feed(HEADER.pack(1, 3, 0, tmux_imsg.PROTOCOL_VERSION, 0))
    with pytest.raises(ImsgError, match="claims"):
        Messages().feed(HEADER.pack(1, MAX_IMSGSIZE + 1, 0, tmux_imsg.PROTOCOL_VERSION, 0))
    with pytest.raises(ImsgError, match="protocol 9"):
        Messages().feed(HEADER.pack(1, HEADER.size, 0, 9, 0))
    assert Messages().feed(HEADER.pack(MSG_VERSION, HEADER.size, 0, 9, 0)) == [(MSG_VERSION, b"")]
    with pytest.raises(ImsgError, match="more than"):
        Messages().feed(HEADER.pack(1, 100, 0, tmux_imsg.PROTOCOL_VERSION, 0)
                        + b"\0" * MAX_INBOUND)


def test_a_symlink_or_a_file_is_not_the_server(tmp_path: Path) -> None:
    """A jail that can write the directory cannot point the relay elsewhere."""
    outside = tmp_path / "outside.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(outside))
    srv.listen()
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "tmux.sock").symlink_to(outside)
    (jail / "file").write_text("x")
    dir_fd = os.open(jail, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in ("tmux.sock", "file"):
            with pytest.raises(ImsgError, match="not a socket"):
                open_socket_at(dir_fd, name)
        with pytest.raises(FileNotFoundError):
            open_socket_at(dir_fd, "missing")
    finally:
        os.close(dir_fd)
        srv.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    proc = subprocess.Popen(
        ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null", "-D"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(tmp_path)},
    )
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield proc, dir_fd
    os.close(dir_fd)
    proc.kill()
    proc.wait()


@needs_tmux
async def test_a_control_client_with_no_process(
    server: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    """The link is what ``tmux -C new-session`` makes: commands answer, the
    client is a UTF-8 control client, and a server with exit-unattached ends
    once the link closes (how a replica's jail ends with its relay)."""
    proc, dir_fd = server
    link = ClientLink()
    await link.connect(dir_fd, "tmux.sock",
                       ["set", "-g", "exit-empty", "on", ";",
                        "set", "-g", "exit-unattached", "on", ";",
                        "new-session", "-s", "t", "-x", "90", "-y", "20", "cat"],
                       cwd=str(tmp_path))
    assert link.control is not None and link.closed is not None
    t = TmuxControl(str(tmp_path / "tmux.sock"), lambda _: None)
    await t.start_on(link.control, replies=3)
    flags = await t.run("display -p '#{client_flags}|#{window_width}x#{window_height}'")
    assert "control-mode" in flags[0] and "UTF-8" in flags[0], flags
    assert flags[0].endswith("|90x20"), flags
    assert not link.closed.done()
    link.close()
    await t.close()
    assert await asyncio.to_thread(proc.wait, 10) == 0


@needs_tmux
async def test_the_server_ending_the_client_closes_the_link(
    server: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    _, dir_fd = server
    link = ClientLink()
    await link.connect(dir_fd, "tmux.sock", ["new-session", "-s", "t", "cat"],
                       cwd=str(tmp_path))
    assert link.control is not None and link.closed is not None
    t = TmuxControl(str(tmp_path / "tmux.sock"), lambda _: None)
    await t.start_on(link.control)
    t.send("kill-server")
    why = await asyncio.wait_for(link.closed, 10)
    assert "ended" in why or "closed" in why, why
    await t.close()


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[tuple[socket.socket, int]]:
    """A listening socket where the jail's tmux would be, and the directory's fd."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "tmux.sock"))
    srv.listen()
    srv.setblocking(False)
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield srv, dir_fd
    os.close(dir_fd)
    srv.close()


async def test_a_hostile_server_gets_a_closed_link(
    tmp_path: Path, fake_server: tuple[socket.socket, int]
) -> None:
    """Garbage, an oversized claim or a flood from the server ends the link
    (and only it) with a reason."""
    srv, dir_fd = fake_server
    loop = asyncio.get_running_loop()
    for reply, why in [
        (HEADER.pack(1, 2, 0, tmux_imsg.PROTOCOL_VERSION, 0), "claims"),
        (HEADER.pack(1, HEADER.size, 0, 3, 0), "protocol"),
        (frame(MSG_VERSION), "version"),
        (b"", "link"),  # closed, or reset (what the relay sent was unread)
    ]:
        link = ClientLink()
        await link.connect(dir_fd, "tmux.sock", ["new-session"], cwd=str(tmp_path))
        conn, _ = await loop.sock_accept(srv)
        if reply:
            conn.sendall(reply)
        else:
            conn.close()
        assert link.closed is not None
        assert why in await asyncio.wait_for(link.closed, 5)
        if link.control is not None:
            link.control.close()
        conn.close()
    flood = ClientLink(budget=lambda n: False)
    await flood.connect(dir_fd, "tmux.sock", ["new-session"], cwd=str(tmp_path))
    conn, _ = await loop.sock_accept(srv)
    conn.sendall(frame(204))
    assert flood.closed is not None
    assert "too much" in await asyncio.wait_for(flood.closed, 5)
    conn.close()


async def test_no_server_is_a_clear_error(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(ImsgError, match="no tmux server"):
            await ClientLink().connect(dir_fd, "tmux.sock", ["new-session"],
                                        cwd=str(tmp_path), timeout=0.2)
    finally:
        os.close(dir_fd)


@needs_tmux
async def test_a_terminal_client_with_no_process(
    server: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    """A pty of ours as a client's terminal, as ``tmux attach`` would be: tmux
    draws on it, learns its size changes from ``resize``, and cannot suspend
    or lock it into running anything."""
    _, dir_fd = server
    ctl = ClientLink()
    await ctl.connect(dir_fd, "tmux.sock", ["new-session", "-s", "t", "-x", "80", "-y", "24",
                                            "cat"], cwd=str(tmp_path))
    assert ctl.control is not None
    t = TmuxControl(str(tmp_path / "tmux.sock"), lambda _: None)
    await t.start_on(ctl.control)
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    mate = ClientLink()
    try:
        await mate.connect(dir_fd, "tmux.sock", ["attach-session", "-t", "t"],
                           cwd=str(tmp_path), term="xterm-256color", tty=slave,
                           ttyname="tether-mate-7")
        os.close(slave)
        assert mate.ready is not None and mate.closed is not None
        await asyncio.wait_for(mate.ready, 10)
        fmt = "'#{client_name} #{client_width}x#{client_height} #{client_flags}'"

        async def mate_line() -> str:
            lines = await t.run(f"list-clients -F {fmt}")
            return next(ln for ln in lines if ln.startswith("tether-mate-7"))

        assert " 100x30 " in await mate_line()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        mate.resize()
        for _ in range(100):
            if " 120x40 " in await mate_line():
                break
            await asyncio.sleep(0.02)
        assert " 120x40 " in await mate_line()
        await t.run("suspend-client -t tether-mate-7")
        await t.run("lock-client -t tether-mate-7")
        for _ in range(100):
            line = await mate_line()
            if "suspended" not in line:
                break
            await asyncio.sleep(0.02)
        assert "suspended" not in line, line
        assert not mate.closed.done()
        drawn = b""
        os.set_blocking(master, False)
        with contextlib.suppress(BlockingIOError):
            drawn = os.read(master, 65536)
        assert b"\x1b[" in drawn  # tmux drew on our pty
        os.close(master)  # the mate leaves: tmux drops its client
        await asyncio.wait_for(mate.closed, 10)
        lines = await t.run(f"list-clients -F {fmt}")
        assert not any(ln.startswith("tether-mate-7") for ln in lines), lines
    finally:
        mate.close()
        ctl.close()
        await t.close()


def test_terminal_capabilities_as_tmuxs_client_sends_them() -> None:
    caps = dict(c.split(b"=", 1) for c in capabilities("xterm-256color"))
    assert caps[b"colors"] == b"256" and caps[b"clear"].startswith(b"\x1b[")
    assert caps[b"am"] == b"1"
    for bad in ("no-such-terminal", "../../etc/passwd", "", "x" * 100):
        with pytest.raises(TerminfoError):
            capabilities(bad)


async def test_a_server_flooding_messages_gets_a_closed_link(
    tmp_path: Path, fake_server: tuple[socket.socket, int]
) -> None:
    """Small messages, each asking for an answer, stop at MAX_MESSAGES: the
    relay does not answer a server for ever."""
    srv, dir_fd = fake_server
    loop = asyncio.get_running_loop()
    link = ClientLink()
    await link.connect(dir_fd, "tmux.sock", ["new-session"], cwd=str(tmp_path))
    conn, _ = await loop.sock_accept(srv)
    conn.setblocking(False)
    flood = frame(tmux_imsg.MSG_SUSPEND) * (tmux_imsg.MAX_MESSAGES + 1)
    await loop.sock_sendall(conn, flood)
    assert link.closed is not None
    assert "more messages" in await asyncio.wait_for(link.closed, 5)
    if link.control is not None:
        link.control.close()
    conn.close()


async def test_an_introduction_waits_for_room_without_holding_up_the_loop() -> None:
    """A frame larger than the socket's buffer goes out as the server reads,
    the loop serving everything else meanwhile; a server that stops reading
    ends the wait at the deadline, with the descriptor sent on the first byte."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    theirs.setblocking(False)
    big = bytes(range(256)) * 1024  # 256 KiB: many buffers' worth
    read = bytearray()
    fds: list[int] = []

    def on_readable() -> None:
        with contextlib.suppress(BlockingIOError):
            data, anc, _flags, _addr = theirs.recvmsg(65536, socket.CMSG_SPACE(4))
            read.extend(data)
            fds.extend(struct.unpack("=i", d)[0] for lv, kind, d in anc
                       if lv == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS)

    r, w = os.pipe()
    try:
        loop.add_reader(theirs.fileno(), on_readable)
        await tmux_imsg._send_frame(ours, big, r, loop.time() + 10)
        await until(lambda: len(read) == len(big), 10, "the frame read whole", 0.005)
        assert bytes(read) == big and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
        loop.remove_reader(theirs.fileno())  # the server stops reading

        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = loop.create_task(tick())
        try:
            with pytest.raises(tmux_imsg.ImsgError, match="in time"):
                await tmux_imsg._send_frame(ours, big, None, loop.time() + 0.5)
        finally:
            ticker.cancel()
        assert ticks >= 5, "the loop stood still while the frame waited for room"
    finally:
        for fd in (r, w, *fds):
            os.close(fd)
        ours.close()
        theirs.close()
