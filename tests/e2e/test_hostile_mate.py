"""Mates who flood, or type garbage: the relay stays up and other sessions carry on."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import asyncssh

from .helpers import Host, Mate, RelayProcess, tmux, wait_for
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
    # the answered question must be gone before the next: under load the first
    # prompt could still be on screen, and "y" would then go to the pane
    wait_for(lambda: "(y/n)" not in mate.screen(), 10, "the first question answered")
    mate.keys("C-b", "x")
    mate.wait_text("(y/n)")
    mate.keys("y")
    wait_for(lambda: len(host.tmux("list-panes").splitlines()) == 1, 10,
             "the confirmed kill-pane to reach the host")


def test_a_mate_cannot_run_commands_on_the_relay(relay: RelayProcess, host: Host,
                                                 mates: list[Mate], tmp_path: Path) -> None:
    """The replica started with tmux's default key table: a read-write mate's
    ``C-b :`` opened the replica's command prompt, and ``run-shell`` ran in the jail."""
    mate = join(mates, tmp_path, host.ssh_rw)
    mate.keys("C-b", ":")
    mate.type("run-shell 'cd; id > pwned-prompt'")
    # no prompt on the relay: the words reach the host's shell as typing
    wait_for(lambda: "pwned-prompt" in host.screen(), 10, "the typed words on the host")
    assert relay.replica_dirs(), "no replica directories to look in"
    assert not [p for d in relay.replica_dirs() for p in d.glob("pwned*")]


ATTACHED = b"\x1b[?1049h"
"""A replica tmux client attached to the mate's terminal (its alternate screen)."""


async def _mates_at_once(port: int, token: str, n: int, size: tuple[int, int]) -> list[bytes]:
    """``n`` mates joining together; what each saw within a few seconds."""

    async def one() -> bytes:
        async with asyncssh.connect("127.0.0.1", port, username=token, known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            proc = await conn.create_process(term_type="xterm-256color", term_size=size,
                                             encoding=None)
            seen = b""
            with contextlib.suppress(TimeoutError, asyncssh.Error):
                async with asyncio.timeout(30):  # 12 handshakes at once on a loaded machine
                    while ATTACHED not in seen and b"too many mates" not in seen:
                        data = await proc.stdout.read(65536)
                        if not data:
                            break
                        seen += data
            proc.close()
            return seen

    return await asyncio.gather(*(one() for _ in range(n)))


def test_mates_joining_at_once_keep_to_the_limit(tmp_path: Path) -> None:
    """The limit was checked before the awaits of joining and enforced after them:
    60 mates joining together all got in with a limit of 32."""
    relay = RelayProcess(tmp_path / "relay", None, "--max-mates", "3")
    h = Host(tmp_path / "host", relay.conf())
    try:
        token = h.ssh_ro.split()[-1].split("@")[0]
        seen = asyncio.run(_mates_at_once(relay.port, token, 12, (80, 24)))
        joined = [s for s in seen if ATTACHED in s]
        refused = [s for s in seen if b"too many mates" in s]
        assert len(joined) == 3 and len(refused) == 9, [s[-80:] for s in seen]
    finally:
        h.close()
        relay.close()


def test_a_mates_huge_terminal_is_clamped(tmp_path: Path, mates: list[Mate]) -> None:
    """One window change to 65535x65535 from a read-only mate pinned the replica at
    100% CPU and froze every other mate of the session for over a minute."""
    from tether.relay.server import MATE_COLS, MATE_ROWS

    relay = RelayProcess(tmp_path / "relay")
    h = Host(tmp_path / "host", relay.conf())
    try:
        watcher = join(mates, tmp_path, h.ssh_rw, name="watcher")
        ro = h.ssh_ro.split()[-1].split("@")[0]

        async def huge() -> None:
            async with asyncssh.connect("127.0.0.1", relay.port, username=ro,
                                        known_hosts=None, client_keys=None,
                                        agent_path=None) as conn:
                proc = await conn.create_process(term_type="xterm-256color",
                                                 term_size=(20000, 20000), encoding=None)
                await proc.stdout.read(1)
                proc.change_terminal_size(65535, 65535)
                h.type("echo while-a-mate-is-huge")
                await asyncio.to_thread(watcher.wait_text, "while-a-mate-is-huge", 10)
                (directory,) = relay.replica_dirs()

                def sizes() -> list[tuple[int, ...]]:
                    shown = tmux(str(directory / "tmux.sock"), "list-clients", "-F",
                                 "#{?client_control_mode,,#{client_width} #{client_height}}"
                                 ).split("\n")  # the worker's own control client aside
                    return sorted(tuple(map(int, s.split())) for s in shown if s)

                await asyncio.to_thread(
                    wait_for, lambda: len(sizes()) == 2 and max(sizes()) == (
                        MATE_COLS, MATE_ROWS), 10, "the huge client clamped")
                proc.close()

        asyncio.run(huge())
    finally:
        h.close()
        relay.close()

