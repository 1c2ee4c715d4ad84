"""The replica worker against real tmux servers: structure, bytes, images, refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tether.core.control import layout_pane_sizes
from tether.core.messages import (
    Bindings,
    Error,
    Event,
    Frame,
    Message,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
    Window,
)
from tether.relay.replica import ReplicaHandle
from tether.relay.replica_direct import DirectReplica
from tether.testing.procs import until


def tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True,
                          check=True).stdout


class Worker:
    def __init__(self, kind: str = "direct") -> None:
        self.got: list[Message] = []
        cls = DirectReplica if kind == "direct" else ReplicaHandle
        self.handle = cls("test", self.got.append)
        self.seq = 0

    @property
    def sock(self) -> str:
        return os.path.join(self.handle.dir, "tmux.sock")

    def send(self, body: object) -> int:
        self.seq += 1
        self.handle.send(Event(self.seq, body))  # type: ignore[arg-type]
        return self.seq

    async def applied(self, seq: int) -> None:
        await until(lambda: any(getattr(m, "seq", -1) >= seq for m in self.got))


def layout(body: str) -> str:
    """A tmux layout string with its checksum, which tmux verifies."""
    csum = 0
    for ch in body.encode():
        csum = (csum >> 1) + ((csum & 1) << 15)
        csum = (csum + ch) & 0xFFFF
    return f"{csum:04x},{body}"


def snapshot(windows: tuple[Window, ...], active: int) -> Snapshot:
    return Snapshot(Structure(windows, active), Status(()), Bindings("C-b", ()))


@pytest.fixture
def host_layout(tmp_path: Path) -> str:
    """A real tmux layout of 40 panes in one 200x100 window."""
    sock = str(tmp_path / "h.sock")
    subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", "new-session", "-d", "-x", "200",
                    "-y", "100"], check=True)
    try:
        for _ in range(39):
            tmux(sock, "split-window", "-d", "sleep 100")
            tmux(sock, "select-layout", "tiled")
        return tmux(sock, "display", "-p", "#{window_layout}").strip()
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False)


async def test_forty_panes_replicate_with_the_host_sizes(worker: Worker, host_layout: str) -> None:
    want = layout_pane_sizes(host_layout)
    assert len(want) == 40
    seq = worker.send(snapshot((Window(1, 0, "many", host_layout, min(want)),), 1))
    await worker.applied(seq)
    got = tmux(worker.sock, "list-panes", "-F", "#{pane_width}x#{pane_height}").split()
    assert sorted(got) == sorted(f"{w}x{h}" for w, h in want.values())
    assert not [m for m in worker.got if isinstance(m, Error)]


async def test_bytes_render_and_images_replace_the_pane(worker: Worker) -> None:
    worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    seq = worker.send(Output(5, "\x1b[31mred\x1b[0m héllo\r\nsecond line\r\n".encode()))
    await worker.applied(seq)
    screen = await until(lambda: s if "second line" in (
        s := tmux(worker.sock, "capture-pane", "-p", "-e")) else "")
    assert "\x1b[31mred\x1b[39m héllo" in str(screen)
    seq = worker.send(PaneReset(PaneImage(5, b"\x1bc\x1b[H\x1b[2Jonly this\x1b[3;5H")))
    await worker.applied(seq)
    await until(lambda: tmux(worker.sock, "capture-pane", "-p").strip() == "only this")
    assert tmux(worker.sock, "display", "-p", "#{cursor_x},#{cursor_y}").strip() == "4,2"


async def test_status_updates_set_only_the_options_that_changed(worker: Worker) -> None:
    """A host's clock changes its status line once a minute in every session at
    once: the replica gets one `set` for it, not one per status option."""
    worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))

    async def status(right: str) -> None:
        seq = worker.send(Status((("status-style", "bg=red"), ("status-right", right))))
        await worker.applied(seq)

    def shown(option: str) -> str:
        return tmux(worker.sock, "show", "-gv", option).strip()

    await status("12:00")
    assert (shown("status-right"), shown("status-style")) == ("12:00", "bg=red")
    tmux(worker.sock, "set", "-g", "status-style", "bg=blue")  # a change behind its back
    await status("12:01")
    assert (shown("status-right"), shown("status-style")) == ("12:01", "bg=blue")
    await status("12:00")  # back to an earlier value: still applied
    assert shown("status-right") == "12:00"


async def test_absurd_structures_are_refused_and_the_worker_carries_on(worker: Worker) -> None:
    worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    bad = [
        Structure((Window(1, 0, "w", "not a layout", 5),), 1),
        Structure((Window(1, 0, "w", layout("99999x24,0,0,5"), 5),), 1),
        Structure(tuple(Window(i, i, "w", layout(f"80x24,0,0,{i}"), i) for i in range(300)), 0),
    ]
    for st in bad:
        worker.send(st)
    seq = worker.send(Output(5, b"still alive\r\n"))
    await worker.applied(seq)
    errors = [m for m in worker.got if isinstance(m, Error)]
    assert len(errors) == 3, errors
    await until(lambda: "still alive" in tmux(worker.sock, "capture-pane", "-p"))


async def test_frames_redraw_the_screen_keep_scrollback_and_bombs_are_refused(
    worker: Worker,
) -> None:
    from tether.core.codec import compress

    worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    seq = worker.send(Output(5, b"".join(b"history %d\r\n" % i for i in range(40))))
    await worker.applied(seq)
    await until(lambda: "history 39" in tmux(worker.sock, "capture-pane", "-p"))
    seq = worker.send(Frame(5, compress(b"\x1bc\x1b[H\x1b[2J\x1b[32mframe one\x1b[0m\x1b[2;3H")))
    await worker.applied(seq)
    await until(lambda: tmux(worker.sock, "capture-pane", "-p").strip() == "frame one")
    assert tmux(worker.sock, "display", "-p", "#{cursor_x},#{cursor_y}").strip() == "2,1"
    # the scrollback holds what scrolled off before, not copies of redrawn screens
    history = tmux(worker.sock, "capture-pane", "-p", "-S", "-100", "-E", "-1")
    assert "history 0" in history and "frame one" not in history
    assert history.count("history 15") == 1
    seq = worker.send(Frame(5, compress(b"\0" * (2 << 20))))  # inflates past the bound
    seq = worker.send(Output(5, b"\r\nstill alive"))
    await worker.applied(seq)
    errors = [m for m in worker.got if isinstance(m, Error)]
    assert len(errors) == 1 and "inflates past" in errors[0].message, errors
    await until(lambda: "still alive" in tmux(worker.sock, "capture-pane", "-p"))
