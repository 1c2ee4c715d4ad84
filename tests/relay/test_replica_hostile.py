"""A hostile host's strings and a hostile mate's keys against a real replica tmux.

The worker runs unjailed here, as root, with a shell on the machine: these tests
show that the replica itself never runs what a peer sends, whatever the jail
(tested in test_jail.py) would contain. Each attack would leave a file in the
session's directory if it ran.
"""

from __future__ import annotations

import asyncio
import os
import re

from test_replica import Worker, layout, snapshot, tmux, until

from tether.core.messages import (
    Binding,
    Bindings,
    Error,
    Input,
    Output,
    Status,
    Structure,
    Window,
)


def planted(w: Worker) -> list[str]:
    return sorted(f for f in os.listdir(w.handle.dir) if f.startswith("pwned"))


def one_window(name: str) -> Structure:
    return Structure((Window(1, 0, name, layout("80x24,0,0,5"), 5),), 1)


class Screen:
    """A mate's tmux client of the replica, read from its pty master."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = bytearray()
        os.set_blocking(fd, False)

    async def wait(self, text: bytes, timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while text not in self.seen:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{text!r} not shown; last: {bytes(self.seen[-400:])!r}")
            try:
                self.seen += os.read(self.fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.02)

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)


async def attach(w: Worker, readonly: bool = False) -> Screen:
    return Screen(await w.handle.attach(1, readonly, 100, 30, "xterm-256color"))


async def test_window_names_are_data(worker: Worker) -> None:
    d = worker.handle.dir
    name = f"#(touch {d}/pwned-name)"
    seq = worker.send(snapshot((Window(1, 0, name, layout("80x24,0,0,5"), 5),), 1))
    await worker.applied(seq)
    shown = tmux(worker.sock, "list-windows", "-F", "#{window_name}").strip()
    assert shown == name
    # a newline would end tmux's command line and start another: refused whole
    seq = worker.send(one_window(f"x\nrun-shell 'touch {d}/pwned-newline'"))
    await worker.applied(seq)
    assert any(isinstance(m, Error) and "newline" in m.message for m in worker.got)
    screen = await attach(worker)
    await screen.wait(b"pwned-name")  # the status line shows the name as it is
    assert planted(worker) == []


async def test_status_formats_never_run_or_reexpand(worker: Worker) -> None:
    d = worker.handle.dir
    worker.send(snapshot((
        Window(1, 0, f"#(touch {d}/pwned-e)", layout("80x24,0,0,5"), 5),
        Window(2, 1, "other", layout("80x24,0,0,6"), 6),  # drawn with window-status-format
    ), 1))  # fmt: skip
    seq = worker.send(Status((
        # the host's tmux shows '##(' as '#(': escaping '#(' alone made it '###('
        ("window-status-format", f"#I:#W##(touch {d}/pwned-parity)"),
        # E: expands a value (here the window name) as a format again
        ("window-status-current-format", "#I#{E:window_name}<#{=5;E:window_name}>"),
        ("status-right", f"#(touch {d}/pwned-right)"),
    )))  # fmt: skip
    await worker.applied(seq)
    screen = await attach(worker)
    await screen.wait(b"1:other")
    assert planted(worker) == []
    assert not [m for m in worker.got if isinstance(m, Error)]


async def test_a_mate_cannot_reach_the_replicas_command_prompt(worker: Worker) -> None:
    d = worker.handle.dir
    seq = worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    await worker.applied(seq)
    screen = await attach(worker)
    await screen.wait(b"0:w")
    # C-b : then run-shell; C-b c (a new window running the default shell)
    screen.type(b"\x02:")
    await asyncio.sleep(0.1)  # let the prefix and ':' be taken as keys, not a paste
    screen.type(f"run-shell 'touch {d}/pwned-prompt'\r".encode())
    screen.type(b"\x02c")

    def typed() -> bytes:
        return b"".join(m.keys for m in worker.got if isinstance(m, Input))

    # with no prompt open, the words reach the pane: the host gets them as typing
    await until(lambda: b"pwned-prompt" in typed())
    assert planted(worker) == []
    assert tmux(worker.sock, "list-windows", "-F", "#{window_id}").split() == [
        tmux(worker.sock, "display", "-p", "#{window_id}").strip()
    ]


async def test_replica_key_tables_run_nothing(worker: Worker) -> None:
    seq = worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    await worker.applied(seq)
    seq = worker.send(Bindings("C-a", (Binding("prefix", "%", ""), Binding("prefix", "d", ""))))
    await worker.applied(seq)
    keys = tmux(worker.sock, "list-keys").splitlines()
    assert keys, "no bindings at all"
    allowed = ("send-keys -H", "detach-client", "copy-mode", "refresh-client", "clock-mode",
               "send-keys -X", "send-keys -FX", "select-pane")
    for line in keys:
        m = re.match(r"^bind-key\s+(?:-r\s+)?-T\s+(\S+)\s+(\S+)\s+(.*)$", line)
        assert m, line
        table, command = m.group(1), m.group(3)
        assert "pipe" not in command and "run-shell" not in command, line
        assert "if-shell" not in command and "display-menu" not in command, line
        if table in ("prefix", "root"):
            assert command.startswith(allowed), line
        elif command.startswith("command-prompt"):
            assert command.endswith('"%%" }'), line
        else:
            assert command.startswith(allowed), line
    # the host's 'd' replaced the replica's detach; when the host drops it, detach is back
    seq = worker.send(Bindings("C-a", (Binding("prefix", "%", ""),)))
    await worker.applied(seq)
    assert "detach-client" in tmux(worker.sock, "list-keys", "-T", "prefix", "d")


async def test_terminal_queries_are_not_answered_twice(worker: Worker) -> None:
    """The host's tmux answers its programs' queries; the replica answered them too,
    and its replies reached the host's program as a mate's typing."""
    seq = worker.send(snapshot((Window(1, 0, "w", layout("80x24,0,0,5"), 5),), 1))
    await worker.applied(seq)
    # a query split across two events, then two whole ones
    worker.send(Output(5, b"before \x1b["))
    seq = worker.send(Output(5, b"c\x1b[6n\x1b[>0c after\r\n"))
    await worker.applied(seq)
    await until(lambda: "before  after" in tmux(worker.sock, "capture-pane", "-p"))
    screen = await attach(worker)
    await screen.wait(b"0:w")
    screen.type(b"x")  # typed after the replies would have been

    def typed() -> bytes:
        return b"".join(m.keys for m in worker.got if isinstance(m, Input))

    await until(lambda: b"x" in typed())
    assert typed() == b"x"
