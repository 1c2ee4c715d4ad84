"""The host agent's relay side (``RelaySide``) over a memory link: the adapter
moves messages between a link and ``HostEndpoint`` and acts on its events. The
tmux side is a recorder here; the real one is covered end to end (tests/e2e)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tether.client.relay_side import RelaySide
from tether.core.host_endpoint import HostEndpoint
from tether.core.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Input,
    InputAck,
    Message,
    Ping,
    Pong,
    Resize,
    Welcome,
)
from tether.transport.link import LinkClosed

WELCOME = Welcome(PROTOCOL_VERSION, "s1", b"k" * 32, "rw", "ro", "ssh rw@x", "ssh ro@x", None)


class MemoryLink:
    """The host's end of a link; the test plays the relay through ``to_host``."""

    kind = "ssh"
    description = "memory"

    def __init__(self) -> None:
        self.to_host: asyncio.Queue[Message | None] = asyncio.Queue()
        self.sent: list[Message] = []
        self.acks: list[Message] = []
        self.closed = False

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)

    def send_nowait(self, msg: Message) -> None:
        if self.closed:
            raise LinkClosed("connection closed")
        self.sent.append(msg)

    def send_ack(self, msg: Message) -> None:
        self.acks.append(msg)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    async def recv(self) -> Message:
        msg = await self.to_host.get()
        if msg is None or self.closed:
            raise LinkClosed("closed by the test")
        return msg

    def close(self) -> None:
        self.closed = True
        self.to_host.put_nowait(None)


@dataclass
class FakeTmux:
    sent: list[str] = field(default_factory=list)

    def send(self, command: str) -> None:
        self.sent.append(command)


@dataclass
class Recorder:
    """Stands in for ``TmuxSide``: what the adapter asked of tmux."""

    tmux: FakeTmux = field(default_factory=FakeTmux)
    inputs: list[Input] = field(default_factory=list)
    resizes: list[tuple[int, int]] = field(default_factory=list)
    snapshots: int = 0

    def request_snapshot(self) -> None:
        self.snapshots += 1

    async def apply_input(self, msg: Input) -> None:
        self.inputs.append(msg)

    def apply_resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))


@dataclass
class FakeConnector:
    quic: Any = None
    cert_error: str = ""
    quic_failed_at: float | None = None
    learned: list[Welcome] = field(default_factory=list)

    def learn(self, welcome: Welcome) -> None:
        self.learned.append(welcome)


def make() -> tuple[RelaySide, Recorder, list[tuple[str, bool]], FakeConnector]:
    said: list[tuple[str, bool]] = []
    side = Recorder()
    connector = FakeConnector()
    relay = RelaySide(
        HostEndpoint(),
        connector,  # type: ignore[arg-type]
        side,  # type: ignore[arg-type]
        lambda text, show: said.append((text, show)),
        asyncio.Event(),
    )
    return relay, side, said, connector


async def until(cond: Any, what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_welcome_publishes_and_inputs_are_typed_once() -> None:
    relay, side, said, connector = make()
    link = MemoryLink()
    run = asyncio.create_task(relay._run_link(link))  # type: ignore[arg-type]
    await until(lambda: link.sent, "Hello")
    assert isinstance(link.sent[0], Hello) and link.sent[0].session is None
    link.to_host.put_nowait(WELCOME)
    await until(relay.ready.is_set, "ready")
    assert ("ssh session: ssh rw@x", True) in said
    assert ("connected to the relay over memory", False) in said
    assert any(c.startswith("set -g @tether_ssh ") for c in side.tmux.sent)
    assert "wait-for -S tether-ready" in side.tmux.sent
    assert connector.learned == [WELCOME] and relay.link is link
    await until(lambda: side.snapshots == 1, "a snapshot request")
    keys = Input(1, 1, 0, b"ls\r")
    for msg in (keys, keys, Resize(80, 24), Ping(7)):  # the second: a resend
        link.to_host.put_nowait(msg)
    await until(lambda: side.resizes, "the resize")
    assert side.inputs == [keys] and side.resizes == [(80, 24)]
    assert Pong(7) in link.sent
    await until(lambda: link.acks, "the coalesced input ack")
    assert link.acks == [InputAck(1, 1)]
    link.to_host.put_nowait(Error("go away"))
    await run
    assert said[-1] == ("connection to the relay lost: relay: go away", True)
    assert relay.link is None


async def test_a_bad_welcome_is_reported_and_the_next_hello_resumes() -> None:
    relay, _side, said, _ = make()
    link = MemoryLink()
    run = asyncio.create_task(relay._run_link(link))  # type: ignore[arg-type]
    await until(lambda: link.sent, "Hello")
    link.to_host.put_nowait(Ping(1))
    await run
    assert said[-1] == ("expected Welcome, got Ping", True)
    assert link.closed and not relay.ready.is_set()
    # a good session, then a second link resumes it
    first = MemoryLink()
    run = asyncio.create_task(relay._run_link(first))  # type: ignore[arg-type]
    await until(lambda: first.sent, "Hello")
    first.to_host.put_nowait(WELCOME)
    await until(relay.ready.is_set, "ready")
    first.close()
    await run
    second = MemoryLink()
    run = asyncio.create_task(relay._run_link(second))  # type: ignore[arg-type]
    await until(lambda: second.sent, "Hello")
    hello = second.sent[0]
    assert isinstance(hello, Hello) and hello.session == "s1" and hello.rw_token == "rw"
    second.close()
    await run


async def test_end_sends_end_on_the_welcomed_link() -> None:
    relay, _side, _said, _ = make()
    link = MemoryLink()
    run = asyncio.create_task(relay._run_link(link))  # type: ignore[arg-type]
    await until(lambda: link.sent, "Hello")
    link.to_host.put_nowait(WELCOME)
    await until(relay.ready.is_set, "ready")
    await relay.end("the host's tmux session ended")
    assert type(link.sent[-1]).__name__ == "End"
    link.close()
    await run
