"""The relay's join role, driven by a protocol-level client: a real relay, a
real host (tmux, agent), the real OpenSSH client for the bootstrap and QUIC to
resume. (``tether join``, the client with a local tmux, builds on this.)"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Event,
    Input,
    InputAck,
    Join,
    Joined,
    Message,
    Output,
    Snapshot,
)
from tether.core.tokens import new_token
from tether.transport.link import Link, LinkClosed
from tether.transport.openssh import RelayAddress, connect_host
from tether.transport.quic import connect_quic

from .helpers import Host, RelayProcess, wait_for


def token_of(ssh_line: str) -> str:
    """``ssh -p PORT TOKEN@HOST`` -> TOKEN."""
    return ssh_line.split()[-1].split("@")[0]


class Client:
    """What a join client does with the log: applies (collects) and acks it."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.events: list[Event] = []
        self.others: list[Message] = []
        self.next_seq: int | None = None

    async def until(self, pred: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; others: {self.others[-5:]}")
            try:
                msg = await asyncio.wait_for(self.link.recv(), left)
            except TimeoutError:
                continue
            if isinstance(msg, Event):
                self.events.append(msg)
                self.next_seq = msg.seq + 1
                # best effort, as tether join's own acks: a relay that refused
                # this client may have closed the link behind what it sent
                with contextlib.suppress(LinkClosed):
                    self.link.send_ack(Ack(msg.seq))
            else:
                self.others.append(msg)

    async def close(self) -> None:
        """Close, and let an ssh child be reaped before the test's loop ends."""
        self.link.close()
        proc = getattr(self.link, "_proc", None)
        if proc is not None:
            await asyncio.wait_for(proc.wait(), 10)

    def output(self) -> bytes:
        return b"".join(e.body.data for e in self.events if isinstance(e.body, Output))

    def pane(self) -> int:
        snap = next(e.body for e in self.events if isinstance(e.body, Snapshot))
        return snap.structure.windows[0].active_pane


async def join(relay: RelayProcess, token: str, **kw: object) -> tuple[Client, Joined]:
    addr = RelayAddress("127.0.0.1", relay.port, [relay.fingerprint], user=token)
    link = await connect_host(addr)
    link.send_nowait(Join(PROTOCOL_VERSION, "test-join", **kw))  # type: ignore[arg-type]
    c = Client(link)
    await c.until(lambda: any(isinstance(m, Joined | Error) for m in c.others), 15, "Joined")
    first = next(m for m in c.others if isinstance(m, Joined | Error))
    if isinstance(first, Error):
        await c.close()
        raise LinkClosed(first.message)
    return c, first


@pytest.fixture
def shared(tmp_path):  # type: ignore[no-untyped-def]
    relay = RelayProcess(tmp_path / "relay")
    host = Host(tmp_path / "host", relay.conf())
    host.type("stty -echo; cat > ~/typed.txt", enter=True)
    yield relay, host
    host.close()
    relay.close()


async def test_a_join_client_gets_the_log_types_once_and_resumes_over_quic(
    shared: tuple[RelayProcess, Host],
) -> None:
    relay, host = shared
    c, joined = await join(relay, token_of(host.ssh_rw), cols=90, rows=30)
    assert not joined.readonly and joined.quic and joined.quic_fingerprint
    await c.until(lambda: c.events and isinstance(c.events[0].body, Snapshot), 15,
                  "a snapshot first")
    pane = c.pane()
    c.link.send_nowait(Input(1, 1, pane, b"first line\r"))
    await c.until(lambda: InputAck(1, 1) in c.others, 15, "the input's ack")
    typed = host.home / "typed.txt"
    wait_for(lambda: typed.exists() and "first line" in typed.read_text(), 15,
             "the join client's keys on the host")

    # the host's output reaches the join client as the host's own log
    host.tmux("split-window", "-d", "printf 'from-%s\\n' host-$((6*7)); sleep 30")
    await c.until(lambda: b"from-host-42" in c.output(), 15, "the host's output")

    # the same place over QUIC, with the resume secret: the SSH link is superseded
    host_part, _, port = joined.quic[0].rpartition(":")
    q = await connect_quic(host_part or "127.0.0.1", int(port), joined.quic_fingerprint)
    q.send_nowait(Join(PROTOCOL_VERSION, "test-join", joined.resume, c.next_seq, 90, 30))
    qc = Client(q)
    qc.next_seq = c.next_seq
    await qc.until(lambda: any(isinstance(m, Joined) for m in qc.others), 15, "Joined on QUIC")
    again = next(m for m in qc.others if isinstance(m, Joined))
    assert again.mate == joined.mate
    # a resend of input 1 (its ack may have been lost) and a new one: once each
    q.send_nowait(Input(1, 1, pane, b"first line\r"))
    q.send_nowait(Input(1, 2, pane, b"second line\r"))
    await qc.until(lambda: InputAck(1, 2) in qc.others, 15, "the ack over QUIC")
    wait_for(lambda: "second line" in typed.read_text(), 15, "input over QUIC on the host")
    assert typed.read_text().count("first line") == 1, "a resent key was typed twice"
    await qc.close()
    await c.close()


async def test_a_read_only_join_cannot_type(shared: tuple[RelayProcess, Host]) -> None:
    relay, host = shared
    c, joined = await join(relay, token_of(host.ssh_ro))
    assert joined.readonly
    await c.until(lambda: c.events, 15, "the log")
    c.link.send_nowait(Input(1, 1, c.pane(), b"rm -rf ~\r"))
    await c.until(lambda: any(isinstance(m, Error) for m in c.others), 15, "a refusal")
    err = next(m for m in c.others if isinstance(m, Error))
    assert "read-only" in err.message
    time.sleep(0.5)  # nothing to wait for: the keys must never arrive
    typed = host.home / "typed.txt"
    assert "rm -rf" not in (typed.read_text() if typed.exists() else "")
    await c.close()


async def test_a_wrong_token_is_refused(shared: tuple[RelayProcess, Host]) -> None:
    relay, _ = shared
    with pytest.raises(LinkClosed, match="invalid or expired"):
        await join(relay, new_token())


class Recording:
    """A ``Replica`` that keeps what it is given; ``behind`` plays the local tmux
    dropping a pane's bytes on the next event (``LocalReplica.on_overflow``)."""

    def __init__(self) -> None:
        self.bodies: list[object] = []
        self.behind: Callable[[int], None] | None = None

    async def apply(self, body: object) -> None:
        self.bodies.append(body)
        if self.behind is not None and isinstance(body, Output):
            behind, self.behind = self.behind, None
            behind(body.pane)

    async def presence(self, present: bool, text: str) -> None:
        pass

    def snapshots(self) -> int:
        return sum(isinstance(b, Snapshot) for b in self.bodies)


async def test_a_local_tmux_that_fell_behind_starts_over_from_a_snapshot(
    shared: tuple[RelayProcess, Host],
) -> None:
    """Dropped pane bytes leave the pane wrong: the client forgets its place and
    is given the present on a new link, and carries on (keys still arrive)."""
    from tether.client.join import JoinClient
    from tether.transport.reconnect import Connector

    relay, host = shared
    addr = RelayAddress("127.0.0.1", relay.port, [relay.fingerprint],
                        user=token_of(host.ssh_rw))  # fmt: skip
    replica = Recording()
    client = JoinClient(Connector(addr), replica)  # type: ignore[arg-type]
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.ready.wait(), 20)
        assert replica.snapshots() == 1
        replica.behind = client.fell_behind
        host.tmux("split-window", "-d", "printf 'out-%s\\n' $((6*7)); sleep 30")
        deadline = time.monotonic() + 20
        while replica.snapshots() < 2:
            assert time.monotonic() < deadline, "no snapshot after falling behind"
            assert not task.done(), task
            await asyncio.sleep(0.05)
        assert replica.behind is None  # it was called
        pane = next(b for b in reversed(replica.bodies) if isinstance(b, Snapshot))
        client.type(pane.structure.windows[0].active_pane, b"after the resync\r")
        typed = host.home / "typed.txt"
        await asyncio.to_thread(wait_for, lambda: "after the resync" in typed.read_text(),
                                15, "keys typed after the resync")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if client.link is not None:
            client.link.close()
