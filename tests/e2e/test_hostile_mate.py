"""Mates who flood, or type garbage: the relay stays up and other sessions carry on."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncssh

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_share import join


async def _flood(port: int, token: str, seconds: float, seed: int, term: str,
                 keys_only: bool = False) -> int:
    """A mate whose 'terminal' sends random bytes (invalid UTF-8, broken escapes).

    ``keys_only`` leaves out ESC and C-b: random escape sequences can spell any key,
    prefix key bindings included, which a read-write mate may legitimately press."""
    rng = random.Random(seed)
    sent = 0
    async with asyncssh.connect("127.0.0.1", port, username=token, known_hosts=None,
                                client_keys=None, agent_path=None) as conn:
        proc = await conn.create_process(term_type=term, term_size=(80, 24), encoding=None)
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            while asyncio.get_running_loop().time() < deadline:
                chunk = bytes(rng.getrandbits(8) for _ in range(4096))
                if keys_only:
                    chunk = chunk.replace(b"\x02", b"").replace(b"\x1b", b"")
                    proc.stdin.write(chunk + b"\xff\xfe\xc3")
                else:
                    proc.stdin.write(b"\x1b[" + chunk + b"\xff\xfe\x1b]")
                sent += len(chunk)
                await proc.stdin.drain()
        except (BrokenPipeError, asyncssh.Error):
            pass  # the flooder's own client gave up: that is the flooder's problem
        proc.close()
    return sent


def test_flooding_mates_leave_everyone_else_alone(relay: RelayProcess, host: Host,
                                                 tmp_path: Path, mates: list[Mate]) -> None:
    other = Host(tmp_path / "other", relay.conf())
    try:
        watcher = join(mates, tmp_path, other.ssh_rw, name="watcher")
        # no shell behind the sink: random bytes must not become host commands
        host.tmux("respawn-pane", "-k", "stty raw -echo; exec cat > /dev/null")
        wait_for(lambda: host.display("#{pane_current_command}") == "cat", 10, "the sink")
        ro = host.ssh_ro.split()[-1].split("@")[0]
        rw = host.ssh_rw.split()[-1].split("@")[0]
        sent = asyncio.run(_flood(relay.port, ro, 3, seed=1, term="no-such-terminal"))
        sent += asyncio.run(_flood(relay.port, rw, 3, seed=2, term="xterm-256color",
                                   keys_only=True))
        assert sent > 4096
        other.type("echo other-session-fine")
        watcher.wait_text("other-session-fine")
        assert relay.proc.poll() is None, "the relay died"
        # the flooded session itself still serves a well-behaved mate
        calm = join(mates, tmp_path, host.ssh_ro, name="calm")
        assert "0:" in calm.status_line()
    finally:
        other.close()


def test_confirm_before_bindings_ask_the_mate(host: Host, mates: list[Mate],
                                              tmp_path: Path) -> None:
    host.tmux("split-window", "-h")
    mate = join(mates, tmp_path, host.ssh_rw)
    mate.wait_text("│")
    mate.keys("C-b", "x")
    mate.wait_text("(y/n)")  # the question is asked on the mate's own client
    assert len(host.tmux("list-panes").splitlines()) == 2
    mate.keys("n")
    mate.keys("C-b", "x")
    mate.wait_text("(y/n)")
    mate.keys("y")
    wait_for(lambda: len(host.tmux("list-panes").splitlines()) == 1, 10,
             "the confirmed kill-pane to reach the host")
