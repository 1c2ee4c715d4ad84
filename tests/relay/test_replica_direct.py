"""The relay-fed replica's hand-off socket, as a compromised jail would use it.

The socket is how pane ttys and mates' ptys leave the jail; whatever connects
to it is treated as hostile: a descriptor that is not what its tag says is
closed, connections are bounded in number and time, and the session keeps
working through all of it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import pytest
from test_replica import Worker, layout, snapshot, tmux, until

from tether.core.messages import Input, Output, Window
from tether.relay import mate_clients, replica_direct
from tether.relay.replica_direct import HANDOFF, MAX_HANDOFFS, DirectReplica


def _send_fd(path: str, tag: bytes, fd: int) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        socket.send_fds(s, [tag], [fd])
    finally:
        s.close()


def _open_fds(pid: int) -> set[str]:
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return out


async def _one_window(w: Worker) -> None:
    """The host's first screen: one window, one pane (host pane 5)."""
    await w.applied(w.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1)))


async def _working(w: Worker) -> None:
    """The session still renders the host's bytes and reads back a mate's keys."""
    seq = w.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    await w.applied(seq)
    seq = w.send(Output(5, b"still here\r\n"))
    await w.applied(seq)
    await until(lambda: "still here" in tmux(w.sock, "capture-pane", "-p", "-t", "tether:"))
    tmux(w.sock, "send-keys", "-t", "tether:", "-l", "k")
    await until(lambda: any(isinstance(m, Input) and m.keys == b"k" for m in w.got))


async def test_descriptors_that_are_not_what_they_claim_are_closed(tmp_path: object) -> None:
    w = Worker("direct")
    h = w.handle
    assert isinstance(h, DirectReplica)
    await h.start()
    try:
        path = os.path.join(h.dir, HANDOFF)
        bait = os.path.join(h.dir, "bait-file")
        with open(bait, "w") as f:
            f.write("x")
        master, slave = os.openpty()
        tries = [
            (b"p", os.open(bait, os.O_RDONLY)),  # a file as a pane's tty
            (b"p", os.open(os.devnull, os.O_RDWR)),  # a character device, not a pty
            (b"p", master),  # a pty master as a pane's tty
            (b"m1", slave),  # a pty slave as a mate's master
            (b"m7", os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)),  # no mate 7 waits
            (b"x" * 31, os.open(os.devnull, os.O_RDWR)),  # an unknown tag
        ]
        for tag, fd in tries:
            _send_fd(path, tag, fd)
            os.close(fd)
        await until(lambda: not h._handoffs, 5)
        kept = _open_fds(os.getpid())
        assert bait not in kept
        ptmx = [p for p in kept if p in ("/dev/ptmx", "/dev/pts/ptmx")]
        assert not ptmx, f"a pty master from the socket was kept: {ptmx}"
        # an orphan pane tty is kept for a moment only, and never more than MAX_ORPHANS
        assert len(h._orphans) <= replica_direct.MAX_ORPHANS
        await _working(w)
    finally:
        await h.close()


async def test_connections_to_the_handoff_socket_are_bounded(tmp_path: object) -> None:
    w = Worker("direct")
    h = w.handle
    assert isinstance(h, DirectReplica)
    replica_direct_timeout = replica_direct.HANDOFF_TIMEOUT
    replica_direct.HANDOFF_TIMEOUT = 0.5
    await h.start()
    silent: list[socket.socket] = []
    try:
        path = os.path.join(h.dir, HANDOFF)
        for _ in range(3 * MAX_HANDOFFS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            silent.append(s)
        await asyncio.sleep(0.05)
        assert len(h._handoffs) <= MAX_HANDOFFS
        # silent connections are dropped after HANDOFF_TIMEOUT
        await until(lambda: not h._handoffs, 5)
        await _working(w)
    finally:
        replica_direct.HANDOFF_TIMEOUT = replica_direct_timeout
        for s in silent:
            s.close()
        await h.close()


async def test_a_mate_gets_a_pty_master_of_a_client_inside(tmp_path: object) -> None:
    w = Worker("direct")
    h = w.handle
    await h.start()
    try:
        await _one_window(w)
        fd = await h.attach(3, True, 100, 30, "xterm-256color")
        try:
            assert stat.S_ISCHR(os.fstat(fd).st_mode)
            assert os.fstat(fd).st_rdev == os.makedev(5, 2)
            fmt = "#{client_readonly} #{session_name} #{client_width}x#{client_height}"
            await until(lambda: "1 tether 100x30" in tmux(w.sock, "list-clients", "-F", fmt))
        finally:
            os.close(fd)
        # the session its client was started in is gone once the client runs
        await until(lambda: tmux(w.sock, "list-sessions", "-F", "#{session_name}") == "tether\n")
    finally:
        await h.close()


async def test_mates_terminals_are_bounded_and_let_go(monkeypatch: object) -> None:
    """A mate's pty is the relay's (the machine's /dev/pts): a session gets at
    most MAX_PTYS of them at once, departed mates' included until the jail
    closed their slave, and one is let go once tmux dropped its client."""
    monkeypatch.setattr(mate_clients, "MAX_PTYS", 2)
    w = Worker("direct")
    h = w.handle
    await h.start()
    try:
        await _one_window(w)
        a = await h.attach(1, False, 80, 24, "xterm-256color")
        b = await h.attach(2, False, 80, 24, "xterm-256color")
        try:
            await h.attach(3, False, 80, 24, "xterm-256color")
            raise AssertionError("a third terminal was handed out")
        except replica_direct.ReplicaError as exc:
            assert "no more" in str(exc)
        os.close(a)  # mate 1 leaves: its client is dropped, its slave closed
        h.detached(1)
        await until(lambda: "tether-mate-1" not in tmux(w.sock, "list-clients", "-F",
                                                         "#{client_name}"))
        c = await h.attach(4, False, 80, 24, "xterm-256color")
        os.close(b)
        os.close(c)
    finally:
        await h.close()


async def test_a_server_that_never_reads_runs_out_of_terminals_alone(
    tmp_path: object, monkeypatch: object
) -> None:
    """A compromised replica server that never reads its clients keeps each
    mate's slave in flight in its socket (``ETOOMANYREFS`` for a non-root
    relay's user once too many are): its unanswered attaches count against the
    session's ``MAX_PTYS``, so it runs out of room, and gets it back once the
    descriptors are let go. Waiting for it to read holds up nothing else."""
    monkeypatch.setattr(mate_clients, "MAX_PTYS", 2)
    d = str(tmp_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(d, "mute"))
    server.listen(16)  # connections wait in its backlog with what was sent on them
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    mates = mate_clients.MateClients(lambda n: True)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def attach(mate: int) -> None:
        await mates.attach(mate, False, 80, 24, "xterm-256color", dir_fd=dir_fd,
                           sock_name="mute", cwd=d, gone=gone, timeout=0.8)

    stall = 0.0  # the longest the loop stood still while an attach waited

    async def tick() -> None:
        nonlocal stall
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            stall = max(stall, loop.time() - before)

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        for mate in (1, 2):
            mates.check_room()
            stall = 0.0
            with pytest.raises(replica_direct.ReplicaError, match=r"in time|no answer"):
                await attach(mate)
            await asyncio.sleep(0.05)  # the ticker's turn: it records a stall on waking
            assert stall < 0.4, f"the relay's loop stood still {stall:.2f}s while nobody read"
        with pytest.raises(replica_direct.ReplicaError, match="no more"):
            mates.check_room()
        server.close()  # what it held unread is let go with it
        mates.check_room()
        # an attach that fails after the replica closed leaves no descriptor behind
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.unlink(os.path.join(d, "mute"))
        server.bind(os.path.join(d, "mute"))
        server.listen(16)
        before = len(os.listdir("/proc/self/fd"))
        late = asyncio.get_running_loop().create_task(attach(3))
        await asyncio.sleep(0.2)  # introduced, waiting for an answer
        mates.close()
        with pytest.raises(replica_direct.ReplicaError):
            await late
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        ticker.cancel()
        mates.close()
        server.close()
        os.close(dir_fd)


async def test_a_jail_that_cannot_start_ends_its_session_and_leaves_nothing() -> None:
    """The jail starts behind the host's Welcome, so ``start`` cannot report its
    failure: the replica is gone instead (the relay then ends the session and
    the host's agent makes it again), and a mate is refused."""
    got: list[object] = []
    h = DirectReplica("unstartable", got.append, jail=["/nonexistent/tether-jail"])
    before = set(os.listdir("/proc/self/fd"))
    await h.start()
    await asyncio.wait_for(asyncio.shield(h.closed), 5)
    assert h.proc is None
    with pytest.raises(replica_direct.ReplicaError):
        await h.attach(1, False, 80, 24, "xterm-256color", timeout=2)
    await h.close()
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open
    assert not os.path.exists(h.dir)


TORN_DOWN = """
import asyncio, shutil
from tether.relay.replica_direct import DirectReplica
from tether.transport.children import use_pidfd_watcher

made = []

async def main(turns):
    r = DirectReplica("torn", lambda m: None, jail=None)
    made.append(r)
    await r.start()  # its tmux spawns in the boot task, behind this
    for _ in range(turns):
        await asyncio.sleep(0)

use_pidfd_watcher()
for turns in range(10):
    asyncio.run(main(turns))  # cancels the boot wherever it is
for r in made:
    if r.proc is not None and r.proc.returncode is None:
        r.proc.kill()
    shutil.rmtree(r.dir, ignore_errors=True)
print("ended")
"""


def test_a_relay_stopped_while_a_jail_spawns_still_ends() -> None:
    """asyncio's subprocess transport left a loop torn down during the spawn
    waiting for ever: a relay stopped while it made a session never exited."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TORN_DOWN], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ended", out.stderr[-2000:]
