"""A join client's ack of the relay's log rides with its next key, and one owed on
a link that ended never goes on the next (the relay may have moved the client
back to a snapshot there, and an ack past what it sent closes the link)."""

from __future__ import annotations

import asyncio
from typing import Any

from tether.client.join import JoinClient
from tether.core.messages import PROTOCOL_VERSION, Ack, Input, Joined, Message


class Link:
    """The relay's end as the client sees it: answers Join, records what is sent."""

    kind = "quic"
    description = "quic test"

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.acks: list[Message] = []
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._inbox.put_nowait(Joined(PROTOCOL_VERSION, "s1", 7, False, b"r" * 32))

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_ack(self, msg: Message) -> None:
        self.acks.append(msg)

    async def recv(self) -> Message:
        msg = await self._inbox.get()
        if msg is None:
            raise ConnectionError("closed")
        return msg

    def close(self) -> None:
        self._inbox.put_nowait(None)


class Connector:
    def learn(self, joined: Joined) -> None:
        pass


async def session(jc: JoinClient, link: Link) -> asyncio.Task[Any]:
    task = asyncio.create_task(jc._session(link))  # type: ignore[arg-type]
    for _ in range(100):
        if jc.link is link:
            return task
        await asyncio.sleep(0)
    raise AssertionError("the client did not take the link")


async def test_an_owed_ack_rides_with_a_key_but_never_onto_the_next_link() -> None:
    jc = JoinClient(Connector(), None)  # type: ignore[arg-type]
    first = Link()
    task = await session(jc, first)
    jc._ack = 5  # the relay's events up to 5 applied, the ack not sent yet
    jc.type(0, b"a")
    assert first.acks == [Ack(5)], "in the key's turn, so in its packet"
    assert [type(m) for m in first.sent] == [type(first.sent[0]), Input]
    jc._ack = 9  # owed when the link ends
    first.close()
    await asyncio.gather(task, return_exceptions=True)
    jc.link = None

    second = Link()
    task = await session(jc, second)
    jc.type(0, b"b")
    assert second.acks == [], "the old link's ack is not this one's"
    second.close()
    await asyncio.gather(task, return_exceptions=True)
