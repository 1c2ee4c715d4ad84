"""A relay session's fan-out of its host's stream, and its adapter part over the
core endpoint, with recording subscribers in place of the replica worker and a
recording host link: no tmux, no processes, no sockets."""

from __future__ import annotations

import asyncio
import time

from tether.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bindings,
    End,
    Error,
    Event,
    Hello,
    Input,
    Mates,
    Message,
    Output,
    Ping,
    Pong,
    Resize,
    Snapshot,
    Status,
    Structure,
    Welcome,
)
from tether.core.session import ACK_EVERY, AWAY_GRACE, HostEnded, ProtocolFailed
from tether.relay.session import Mate, Session


class Recorder:
    """A subscriber that keeps what it is given (a recorder, in miniature)."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.presence_seen: list[bool] = []
        self.drains = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send(self, msg: Message) -> None:
        self.got.append(msg)

    async def drain(self) -> None:
        self.drains += 1

    def presence(self, present: bool, text: str) -> None:
        self.presence_seen.append(present)

    async def close(self) -> None:
        self.closed.set_result(None)

    async def start(self) -> None:
        pass

    async def attach(self, mate: int, readonly: bool, cols: int, rows: int, term: str) -> int:
        return -1

    def resized(self, mate: int) -> None:
        pass

    def detached(self, mate: int) -> None:
        pass


class HostLink:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.acks: list[Message] = []
        self.closed = False

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_ack(self, msg: Message) -> None:
        self.acks.append(msg)

    def close(self) -> None:
        self.closed = True


HELLO = Hello(PROTOCOL_VERSION, "tether-host")


def snapshot(seq: int) -> Event:
    return Event(seq, Snapshot(Structure((), 0), Status(()), Bindings("C-b", ())))


def new_session() -> tuple[Session, Recorder]:
    replica = Recorder()
    return Session("s", "rw", "ro", b"x" * 32, "key", replica), replica  # type: ignore[arg-type]


def attached(session: Session, now: float = 0.0) -> tuple[HostLink, int]:
    host = HostLink()
    conn = session.attach(host, HELLO, now)  # type: ignore[arg-type]
    return host, conn


async def test_every_subscriber_gets_each_event_once_in_order() -> None:
    session, replica = new_session()
    _, conn = attached(session)
    joiner = Recorder()
    session.subscribe(joiner)
    events = [snapshot(1), Event(2, Output(0, b"a")), Event(3, Output(0, b"b"))]
    for ev in [*events, events[1], events[2]]:  # a reconnected host repeats itself
        assert session.receive(ev, 0.1, conn) == []
        await session.drain()
    assert replica.got == events
    assert joiner.got == events
    assert replica.drains == 3  # repeats are not waited for
    assert session.screen.is_set()
    session.unsubscribe(joiner)
    session.unsubscribe(replica)  # the replica is the authority: it stays
    session.receive(Event(4, Output(0, b"c")), 0.2, conn)
    assert len(replica.got) == 4 and len(joiner.got) == 3


async def test_presence_and_close_reach_every_subscriber() -> None:
    session, replica = new_session()
    joiner = Recorder()
    session.subscribe(joiner)
    session.presence(False, "away")
    await session.close()
    assert replica.presence_seen == joiner.presence_seen == [False]
    assert replica.closed.done() and joiner.closed.done()


async def test_window_follows_the_smallest_read_write_mate_less_the_status_line() -> None:
    session, _ = new_session()
    host, conn = attached(session)
    session.receive(snapshot(1), 0.1, conn)
    session.receive(Event(2, Status((("status", "2"),))), 0.1, conn)
    host.sent.clear()
    session.mates = {
        1: Mate(1, False, 120, 40), 2: Mate(2, False, 100, 50), 3: Mate(3, True, 20, 5)
    }
    session.resize()
    session.resize()  # unchanged: nothing more to say
    assert host.sent == [Resize(100, 38)]


async def test_host_link_welcome_acks_input_and_pings_go_out_by_channel() -> None:
    session, replica = new_session()
    session.from_replica(Input(1, 0, 0, b"early"))  # typed while no host: kept
    t0 = time.monotonic()  # the session reads the clock for the replica's acks
    host, conn = attached(session, t0)
    welcome, resent, resize, mates = host.sent
    assert isinstance(welcome, Welcome) and welcome.session == "s"
    assert isinstance(resent, Input) and resent.keys == b"early" and resize == Resize(0, 0)
    assert mates == Mates(())
    assert replica.presence_seen == []  # never told the host was away
    session.receive(snapshot(1), t0, conn)
    session.from_replica(Ack(1))
    session.from_replica(Ack(1))
    assert session.wake.is_set() and host.acks == []
    when = session.ep.next_timer()  # the replica's ack came at the real time
    assert when is not None
    session.tick(when - ACK_EVERY / 2)
    assert host.acks == []
    session.tick(when)
    assert host.acks == [Ack(1)]  # coalesced, on the ack channel
    session.receive(Ping(7), t0 + 0.1, conn)
    assert host.sent[-1] == Pong(7)


async def test_superseded_link_is_closed_and_its_stragglers_ignored() -> None:
    session, replica = new_session()
    old, old_conn = attached(session)
    new, conn = attached(session, 1.0)
    assert old.closed and conn != old_conn
    session.receive(snapshot(1), 1.1, old_conn)
    assert replica.got == []
    assert not session.detach(old, 1.2)  # type: ignore[arg-type]
    assert replica.presence_seen == []
    assert session.detach(new, 1.3)  # type: ignore[arg-type]
    assert session.away_since == 1.3 and replica.presence_seen == []
    session.tick(1.3 + AWAY_GRACE)  # the host did not come back: mates are told
    assert replica.presence_seen == [False]


async def test_protocol_failure_sends_error_and_end_is_reported() -> None:
    session, _ = new_session()
    host, conn = attached(session)
    [ev] = session.receive(Event(1, Output(0, b"x")), 0.1, conn)
    assert isinstance(ev, ProtocolFailed) and host.sent[-1] == Error(ev.text)
    session.detach(host, 0.2)  # type: ignore[arg-type]
    host, conn = attached(session, 0.3)
    assert session.receive(End("bye"), 0.4, conn) == [HostEnded("bye")]
