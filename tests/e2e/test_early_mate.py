"""A mate who joins a session before the relay has the host's first screen waits for
that screen instead of typing into a placeholder (where keys went nowhere)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh

from tether.core.messages import (
    PROTOCOL_VERSION,
    Bindings,
    Event,
    Hello,
    Input,
    MessageDecoder,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
    Welcome,
    Window,
)

from .helpers import Mate, RelayProcess, wait_for

PANE = 7


def _appears(probe: Callable[[], str], seconds: float) -> str:
    """What ``probe`` shows within ``seconds`` (bounded wait for what must not come)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if seen := probe():
            return seen
        time.sleep(0.05)
    return ""


def tmux_layout(body: str) -> str:
    """A layout string with tmux's checksum, as `list-windows` prints it."""
    csum = 0
    for ch in body:
        csum = ((csum >> 1) + ((csum & 1) << 15) + ord(ch)) & 0xFFFF
    return f"{csum:04x},{body}"


async def _scenario(relay: RelayProcess, tmp_path: Path, mates: list[Mate]) -> list[Input]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with asyncssh.connect("127.0.0.1", relay.port, username="tether-host",
                                client_keys=[key], known_hosts=None, agent_path=None) as conn:
        writer, reader, _ = await conn.open_session(subsystem="tether", encoding=None)
        writer.write(Hello(PROTOCOL_VERSION, "slow-host").encode())
        decoder = MessageDecoder()
        welcome = None
        async with asyncio.timeout(15):
            while welcome is None:
                welcome = next((m for m in decoder.feed(await reader.read(65536))
                                if isinstance(m, Welcome)), None)
        shells = relay.log.read_text().count("Interactive shell requested")
        mate = Mate(tmp_path, welcome.ssh_rw)
        mates.append(mate)
        await asyncio.to_thread(
            wait_for, lambda: relay.log.read_text().count("Interactive shell requested") > shells,
            15, "the mate's ssh session at the relay")
        # no screen from the host yet: the mate is held back, not shown a placeholder
        # (a tmux client shows its status line within ~0.1 s; give it 2 s to appear)
        shown = await asyncio.to_thread(
            _appears, lambda: line if "0:" in (line := mate.status_line()) else "", 2.0)
        assert not shown, f"the mate was attached before the host's screen: {shown!r}"
        await asyncio.to_thread(mate.wait_text, "waiting for the host's screen", 10)
        mate.type("echo typed-early")  # and what they type meanwhile reaches the host
        layout = tmux_layout(f"80x24,0,0,{PANE}")
        structure = Structure((Window(3, 0, "shell", layout, PANE),), 3)
        writer.write(Event(1, Snapshot(structure, Status(()), Bindings("C-b", ()))).encode())
        writer.write(Event(2, PaneReset(PaneImage(PANE, b"\x1b[H\x1b[2Jslow-host$ "))).encode())
        await asyncio.to_thread(mate.wait_text, "slow-host$")
        inputs: list[Input] = []
        async with asyncio.timeout(15):
            while b"typed-early\r" not in b"".join(i.keys for i in inputs):
                data = await reader.read(65536)
                assert data, "the relay closed the host's channel"
                inputs += [m for m in decoder.feed(data) if isinstance(m, Input)]
        return inputs


def test_mate_waits_for_the_hosts_first_screen(relay: RelayProcess, tmp_path: Path,
                                              mates: list[Mate]) -> None:
    inputs = asyncio.run(_scenario(relay, tmp_path, mates))
    assert {i.pane for i in inputs} == {PANE}
