"""The join client's local tmux against a real tmux server: events in, keys out, clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest

from tether.client.local_replica import PANE_BUFFER, LocalReplica
from tether.client.mate_mirror import (
    FOLLOW_KEY,
    LOOK_KEYS,
    LOOK_MOUSE_KEYS,
    MATE_MOUSE_KEYS,
    MATE_PREFIX_KEYS,
)
from tether.core.codec import compress
from tether.core.messages import (
    Binding,
    Bindings,
    Frame,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
    Window,
)
from tether.mirror.apply import MAGIC, MAGIC_END, SESSION
from tether.transport.tmux import TmuxError

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

T = TypeVar("T")
MATE_CONF = """\
set -g @mate_config yes
set -g mouse on
set -g history-limit 12345
bind-key -T copy-mode-vi y send-keys -X copy-pipe-and-cancel 'cat >/dev/null'
bind-key -T prefix X kill-server
bind-key -n M-x kill-server
"""
"""The mate's own config: an option that must stay, a copy-mode key that must stay,
and structural keys that the locked prefix and root tables must drop."""
PERCENT = Binding("prefix", "%")
KILL = Binding("prefix", "x", "kill-pane? (y/n)")


def layout(body: str) -> str:
    """A tmux layout string with its checksum, which tmux verifies."""
    csum = 0
    for ch in body.encode():
        csum = (csum >> 1) + ((csum & 1) << 15)
        csum = (csum + ch) & 0xFFFF
    return f"{csum:04x},{body}"


EDITOR = Window(1, 0, "editor", layout("80x24,0,0{40x24,0,0,5,39x24,41,0,6}"), 6)
SNAPSHOT = Snapshot(
    Structure((EDITOR,), 1),
    Status((("status-right", "host #(true) right"),)),
    Bindings("C-b", (PERCENT, KILL)),
)


def tmux(sock: str, *args: str, check: bool = True) -> str:
    return subprocess.run(
        ["tmux", "-S", sock, *args], capture_output=True, text=True, check=check, timeout=10
    ).stdout


async def until(fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``fn`` until it returns something true, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out; last {value!r}")
        await asyncio.sleep(0.02)


def held(path: str) -> int:
    """How many of this process's fds are open on ``path``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == path
    return n


def open_ttys(paths: set[str]) -> set[str]:
    """Which of ``paths`` this process still holds open."""
    return {p for p in paths if held(p)}


class World:
    """A LocalReplica on a private socket, and what it handed to ``on_input``."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.conf = os.path.join(directory, "mate.conf")
        with open(self.conf, "w") as f:
            f.write(MATE_CONF)
        self.inputs: list[tuple[int, bytes, Binding | None]] = []
        self.overflows: list[int] = []
        self.replica = LocalReplica(
            os.path.join(directory, "t.sock"),
            lambda pane, keys, binding: self.inputs.append((pane, keys, binding)),
            config_file=self.conf,
            on_overflow=self.overflows.append,
        )

    @property
    def sock(self) -> str:
        return self.replica.sock

    def pane(self, host: int) -> str:
        """The local tmux pane id ("%N") of a host pane."""
        return self.replica.panes[host].replica_id

    def keys(self, host: int) -> bytes:
        return b"".join(k for p, k, b in self.inputs if p == host and b is None)

    def bindings(self) -> list[tuple[int, Binding]]:
        return [(p, b) for p, k, b in self.inputs if b is not None]

    def screen(self, host: int) -> str:
        return tmux(self.sock, "capture-pane", "-p", "-t", self.pane(host))

    async def snapshot(self) -> None:
        r = self.replica
        await r.apply(SNAPSHOT)
        await r.apply(PaneReset(PaneImage(5, b"\x1bc\x1b[H\x1b[2Jpane five")))
        await r.apply(PaneReset(PaneImage(6, b"\x1bc\x1b[H\x1b[2Jpane six")))


@pytest.fixture
async def world() -> AsyncIterator[World]:
    directory = tempfile.mkdtemp(prefix="tether-test-")  # tmux socket paths are short
    w = World(directory)
    try:
        await asyncio.wait_for(w.replica.start(100, 30), 20)
        yield w
    finally:
        await asyncio.wait_for(w.replica.close(), 20)
        subprocess.run(["tmux", "-S", w.sock, "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def attached_client(sock: str) -> Iterator[int]:
    """A real ``tmux attach`` in a pty, as the mate's terminal runs it: its master fd."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        ["tmux", "-u", "-S", sock, "attach", "-t", SESSION],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    loop = asyncio.get_running_loop()

    def drain() -> None:  # the client's screen output, read so it never stalls
        try:
            os.read(master, 65536)
        except OSError:
            loop.remove_reader(master)

    loop.add_reader(master, drain)
    try:
        yield master
    finally:
        loop.remove_reader(master)
        proc.kill()
        proc.wait(timeout=10)
        os.close(master)


async def test_snapshot_images_and_output_render_in_the_local_panes(world: World) -> None:
    await world.snapshot()
    r = world.replica
    await r.apply(Output(5, b"\r\nline two"))
    await r.apply(Frame(6, compress(b"\x1b[H\x1b[2Jframed six")))
    await until(lambda: "line two" in world.screen(5))
    assert world.screen(5).splitlines()[:2] == ["pane five", "line two"]
    await until(lambda: world.screen(6).strip() == "framed six")
    assert tmux(world.sock, "list-windows", "-t", SESSION, "-F", "#{window_name}").split() == [
        "editor"
    ]
    assert len(tmux(world.sock, "list-panes", "-s", "-t", SESSION).splitlines()) == 2
    assert set(r.panes) == {5, 6}
    active = tmux(world.sock, "display", "-p", "-t", SESSION, "#{pane_id}").strip()
    assert active == world.pane(6)
    # the host's status line is shown as text, never run
    assert tmux(world.sock, "show", "-gv", "status-right").strip() == "host ##(true) right"
    # the mate's own config applies
    assert tmux(world.sock, "show", "-gv", "@mate_config").strip() == "yes"
    assert r.attach_argv() == ["tmux", "-S", world.sock, "attach", "-t", SESSION]


async def test_keys_typed_into_a_pane_reach_on_input_as_the_host_pane(world: World) -> None:
    await world.snapshot()
    tmux(world.sock, "send-keys", "-t", world.pane(5), "-l", "abc")
    await until(lambda: world.keys(5) == b"abc")
    assert world.inputs == [(5, b"abc", None)]
    tmux(world.sock, "send-keys", "-t", world.pane(6), "-l", "xy")
    await until(lambda: world.keys(6) == b"xy")


async def test_terminal_queries_are_not_answered_again(world: World) -> None:
    """The host's tmux answered ESC [ c already; the local one must not type a reply."""
    await world.snapshot()
    await world.replica.apply(Output(5, b"\x1b[c\x1b[6n\x1b]11;?\x07after queries"))
    await until(lambda: "after queries" in world.screen(5))
    tmux(world.sock, "send-keys", "-t", world.pane(5), "-l", "z")
    await until(lambda: world.keys(5) == b"z")
    assert world.inputs == [(5, b"z", None)]


async def test_magic_markers_split_across_reads_become_the_binding(world: World) -> None:
    await world.snapshot()
    first = b"ab" + MAGIC[:4]
    tmux(world.sock, "send-keys", "-t", world.pane(5), "-H", *(f"{c:02x}" for c in first))
    await until(lambda: world.keys(5) == b"ab")  # the partial marker is held back
    rest = MAGIC[4:] + b"1" + MAGIC_END + b"cd"
    tmux(world.sock, "send-keys", "-t", world.pane(5), "-H", *(f"{c:02x}" for c in rest))
    await until(lambda: world.keys(5) == b"abcd")
    assert world.bindings() == [(5, KILL)]
    # an index past the bindings is nobody's; a lone ESC _ is typed through
    junk = MAGIC + b"7" + MAGIC_END + b"\x1b_x"
    tmux(world.sock, "send-keys", "-t", world.pane(5), "-H", *(f"{c:02x}" for c in junk))
    await until(lambda: world.keys(5) == b"abcd\x1b_x")
    assert world.bindings() == [(5, KILL)]


def key_table(sock: str) -> str:
    """The key table of the attached (not control-mode) client, "" while none is."""
    for line in tmux(sock, "list-clients", "-F", "#{client_control_mode} #{client_key_table}"
                     ).splitlines():  # fmt: skip
        control, _, table = line.partition(" ")
        if control == "0":
            return table
    return ""


async def press(sock: str, term: int, key: bytes) -> None:
    """C-b then ``key``, typed as a person types them: tmux 3.3a reads keys that
    arrive in one read after the prefix in the root table again."""
    os.write(term, b"\x02")
    await until(lambda: key_table(sock) == "prefix")
    os.write(term, key)
    await until(lambda: key_table(sock) == "root")


async def test_a_host_binding_pressed_on_an_attached_client_arrives(world: World) -> None:
    await world.snapshot()
    with attached_client(world.sock) as term:
        await until(lambda: key_table(world.sock) == "root")
        await press(world.sock, term, b"%")
        await until(lambda: world.bindings() == [(6, PERCENT)])
        # the key tables are locked: the mate's config's M-x (kill-server) is typed
        # to the host instead, its C-b X is gone, and tmux's C-b $ opens no prompt
        # (which would take the next C-b %)
        os.write(term, b"\x1bx")
        await until(lambda: world.keys(6) == b"\x1bx")
        await press(world.sock, term, b"X")
        await press(world.sock, term, b"$")
        await press(world.sock, term, b"%")
        await until(lambda: world.bindings() == [(6, PERCENT), (6, PERCENT)])
        assert tmux(world.sock, "display", "-p", "-t", SESSION, "#{session_name}").strip() == (
            SESSION
        )
        # the host's binding ran nothing locally: no split here
        assert len(tmux(world.sock, "list-panes", "-s", "-t", SESSION).splitlines()) == 2
        assert world.keys(6) == b"\x1bx"
    prefix = {line.split()[3] for line in tmux(world.sock, "list-keys", "-T", "prefix"
                                               ).splitlines()}  # fmt: skip
    assert prefix == {"\\%", "x", FOLLOW_KEY, *MATE_PREFIX_KEYS}
    root = {line.split()[3] for line in tmux(world.sock, "list-keys", "-T", "root"
                                             ).splitlines()}  # fmt: skip
    assert root == set(MATE_MOUSE_KEYS)  # M-x is gone, no menus, no border drag
    # the mate's own look and feel stays
    assert tmux(world.sock, "show", "-gv", "mouse").strip() == "on"
    assert tmux(world.sock, "show", "-gv", "history-limit").strip() == "12345"
    # copy mode is the mate's own, as configured
    assert "cat >/dev/null" in tmux(world.sock, "list-keys", "-T", "copy-mode-vi", "y")


def shown_window(sock: str) -> str:
    return tmux(sock, "display", "-p", "-t", SESSION, "#{window_name}").strip()


def prefix_keys(sock: str, table: str = "prefix") -> dict[str, str]:
    """A key table as bound now: key -> command."""
    out = {}
    for line in tmux(sock, "list-keys", "-T", table).splitlines():
        words = line.split(None, 4)
        out[words[3]] = words[4] if len(words) > 4 else ""
    return out


async def test_looking_around_moves_only_the_mates_view_and_f_follows_again(
    world: World,
) -> None:
    """Prefix F: the window keys select windows here instead of running the host's
    bindings (which move the host), the host's selection no longer moves the view,
    typing still reaches the pane looked at; F again shows the host's window."""
    await world.snapshot()
    r = world.replica
    two = Structure((Window(1, 0, "editor", layout("80x24,0,0,5"), 5),
                     Window(2, 1, "logs", layout("80x24,0,0,7"), 7)), 1)  # fmt: skip
    await r.apply(two)
    await r.apply(Bindings("C-b", (PERCENT, KILL, Binding("prefix", "n"))))
    assert shown_window(world.sock) == "editor"
    with attached_client(world.sock) as term:
        await until(lambda: key_table(world.sock) == "root")
        await press(world.sock, term, FOLLOW_KEY.encode())
        await until(lambda: tmux(world.sock, "show", "-gv", "@tether_looking").strip() == "1")
        assert set(LOOK_KEYS) <= set(prefix_keys(world.sock))
        assert set(LOOK_MOUSE_KEYS) <= set(prefix_keys(world.sock, "root"))
        await press(world.sock, term, b"n")
        await until(lambda: shown_window(world.sock) == "logs")
        assert world.bindings() == []  # the host was not asked to move
        await r.apply(two)  # the host's window stays editor: the view stays here
        assert shown_window(world.sock) == "logs"
        os.write(term, b"typed into logs")
        await until(lambda: world.keys(7) == b"typed into logs")
        await press(world.sock, term, b"0")
        await until(lambda: shown_window(world.sock) == "editor")
        await press(world.sock, term, b"1")
        await until(lambda: shown_window(world.sock) == "logs")
        # and back to following: the host's window, and n is the host's again
        await press(world.sock, term, FOLLOW_KEY.encode())
        await until(lambda: shown_window(world.sock) == "editor")
        assert tmux(world.sock, "show", "-gv", "@tether_looking").strip() == "0"
        keys = prefix_keys(world.sock)
        assert "0" not in keys and "send-keys -H" in keys["n"]
        assert not set(LOOK_MOUSE_KEYS) & set(prefix_keys(world.sock, "root"))
        await press(world.sock, term, b"n")
        await until(lambda: world.bindings() == [(5, Binding("prefix", "n"))])
        assert shown_window(world.sock) == "editor"


async def test_a_join_started_looking_keeps_its_view_from_the_start() -> None:
    directory = tempfile.mkdtemp(prefix="tether-test-")
    r = LocalReplica(os.path.join(directory, "t.sock"), lambda *a: None, "/dev/null",
                     follow=False)  # fmt: skip
    try:
        await asyncio.wait_for(r.start(80, 24), 20)
        await r.apply(SNAPSHOT)
        assert tmux(r.sock, "show", "-gv", "@tether_looking").strip() == "1"
        assert set(LOOK_KEYS) <= set(prefix_keys(r.sock))
        assert "looking" in tmux(r.sock, "display", "-p", "#{T:status-left}")
    finally:
        await asyncio.wait_for(r.close(), 20)
        shutil.rmtree(directory, ignore_errors=True)


async def test_structure_changes_add_windows_and_close_panes(world: World) -> None:
    await world.snapshot()
    r = world.replica
    six = r.panes[6].tty
    assert open_ttys({six}) == {six}
    await r.apply(
        Structure(
            (
                Window(1, 0, "editor", layout("80x24,0,0,5"), 5),
                Window(2, 1, "logs", layout("60x20,0,0,7"), 7),
            ),
            2,
        )
    )
    assert tmux(world.sock, "list-windows", "-t", SESSION, "-F", "#{window_name}").split() == [
        "editor",
        "logs",
    ]
    assert len(tmux(world.sock, "list-panes", "-s", "-t", SESSION).splitlines()) == 2
    assert set(r.panes) == {5, 7}
    assert open_ttys({six}) == set()
    assert tmux(world.sock, "display", "-p", "-t", SESSION, "#{window_name}").strip() == "logs"
    assert tmux(world.sock, "display", "-p", "-t", world.pane(7), "#{pane_width}x#{pane_height}"
                ).strip() == "60x20"  # fmt: skip
    await r.apply(Output(7, b"log line"))
    await until(lambda: "log line" in world.screen(7))
    assert "pane five" in world.screen(5)


async def test_close_leaves_no_server_and_no_pane_fds(world: World) -> None:
    await world.snapshot()
    r = world.replica
    pid = int(tmux(world.sock, "display", "-p", "#{pid}").strip())
    ttys = {p.tty for p in r.panes.values()}
    assert open_ttys(ttys) == ttys
    await asyncio.wait_for(r.close(), 20)
    assert open_ttys(ttys) == set()
    assert r.panes == {}

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    await until(gone)
    assert subprocess.run(["tmux", "-S", world.sock, "has-session"], capture_output=True,
                          timeout=10).returncode != 0  # fmt: skip
    await r.close()  # twice is fine
    with pytest.raises(TmuxError):
        await r.apply(SNAPSHOT)


async def test_a_server_that_cannot_start_raises_and_leaves_nothing() -> None:
    directory = tempfile.mkdtemp(prefix="tether-test-")
    try:
        r = LocalReplica(os.path.join(directory, "no", "such", "t.sock"), lambda *a: None,
                         config_file="/dev/null")  # fmt: skip
        with pytest.raises(TmuxError):
            await asyncio.wait_for(r.start(80, 24), 20)
        assert r.panes == {}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_pane_tmux_does_not_read_is_bounded_and_reported() -> None:
    """A tty nobody reads: bytes wait up to PANE_BUFFER, then are dropped and reported."""
    master, slave = os.openpty()
    try:
        overflows: list[int] = []
        inputs: list[tuple[int, bytes, Binding | None]] = []
        r = LocalReplica("/nonexistent", lambda *a: inputs.append(a),
                         on_overflow=overflows.append)  # fmt: skip
        r.open_pane(9, "%9", os.ttyname(slave))
        chunk = b"x" * (512 * 1024)
        for _ in range(8):
            r.write(9, chunk)
            assert r.backlog() <= PANE_BUFFER
        assert overflows and set(overflows) == {9}
        # keys still come through while output is stuck
        r.mirror.bindings = [PERCENT]
        os.write(master, b"k" + MAGIC + b"0" + MAGIC_END)
        await until(lambda: len(inputs) == 2)
        assert inputs == [(9, b"k", None), (9, b"", PERCENT)]
        tty_path = r.panes[9].tty
        assert held(tty_path) == 2  # ours (the test's slave) and the replica's
        await r.close()
        assert r.backlog() == 0 and held(tty_path) == 1
    finally:
        os.close(master)
        os.close(slave)


async def test_local_echo_shows_keys_before_the_host_and_never_a_password() -> None:
    """predict=always: after one echo confirms the epoch, typed keys show in the local
    pane at once, underlined, and as the host drew them once echoed; after Enter a
    prompt that does not echo shows none of what is typed."""
    directory = tempfile.mkdtemp(prefix="tether-test-")
    typed: list[bytes] = []
    r = LocalReplica(os.path.join(directory, "t.sock"), lambda p, k, b: typed.append(k),
                     "/dev/null", predict="always")  # fmt: skip
    try:
        await asyncio.wait_for(r.start(80, 24), 20)
        await r.apply(Snapshot(Structure((Window(1, 0, "sh", layout("80x24,0,0,5"), 5),), 1),
                               Status(()), Bindings("C-b", ())))  # fmt: skip
        await r.apply(PaneReset(PaneImage(5, b"\x1bc\x1b[H\x1b[2J$ ")))
        r.rtt(0.2)

        def row(n: int, escapes: bool = False) -> str:
            args = ["-e"] if escapes else []
            return tmux(r.sock, "capture-pane", "-p", *args, "-t", r.panes[5].replica_id,
                        "-S", str(n), "-E", str(n)).rstrip("\n")  # fmt: skip

        with attached_client(r.sock) as term:
            await until(lambda: key_table(r.sock) == "root")
            os.write(term, b"l")
            await until(lambda: b"".join(typed) == b"l")
            await until(lambda: r.panes[5].echo is not None and r.panes[5].echo.engaged)
            await r.apply(Output(5, b"l"))
            os.write(term, b"s")  # a new epoch: shown only once confirmed
            await until(lambda: b"".join(typed) == b"ls")
            assert row(0).rstrip() == "$ l"
            await r.apply(Output(5, b"s"))
            os.write(term, b"x")
            await until(lambda: row(0).rstrip() == "$ lsx")  # no echo from the host yet
            assert "\x1b[4mx" in row(0, escapes=True)
            await r.apply(Output(5, b"x"))
            await until(lambda: "\x1b[4m" not in row(0, escapes=True))
            assert row(0).rstrip() == "$ lsx"
            os.write(term, b"\r")
            await until(lambda: b"".join(typed) == b"lsx\r")
            await r.apply(Output(5, b"\r\nPassword: "))
            for ch in b"hunter2":
                os.write(term, bytes([ch]))
                await asyncio.sleep(0.05)
                assert row(1).rstrip() == "Password:", row(1)
            await until(lambda: b"".join(typed) == b"lsx\rhunter2")
            await r.apply(Output(5, b""))
            assert row(1).rstrip() == "Password:"
    finally:
        await asyncio.wait_for(r.close(), 20)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(("conf", "mode"), [("set -g @tether-predict never\n", "never"),
                                            ("set -g @tether-predict bogus\n", "adaptive"),
                                            ("", "adaptive")])  # fmt: skip
async def test_the_mates_tmux_option_chooses_local_echo(conf: str, mode: str) -> None:
    directory = tempfile.mkdtemp(prefix="tether-test-")
    path = os.path.join(directory, "mate.conf")
    with open(path, "w") as f:
        f.write(conf)
    r = LocalReplica(os.path.join(directory, "t.sock"), lambda *a: None, path, predict=None)
    try:
        await asyncio.wait_for(r.start(80, 24), 20)
        assert r.predict == mode
    finally:
        await asyncio.wait_for(r.close(), 20)
        shutil.rmtree(directory, ignore_errors=True)
