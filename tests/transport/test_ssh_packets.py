"""What the relay's SSH front puts on the wire for a mate's echo.

A real asyncssh server (the relay's front) and a real asyncssh client that
counts the packets it receives, by type.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncssh

from tether.transport.ssh import CIPHERS, MateTerminal, start_ssh_server, wait_closed

MSG_IGNORE = 2
MSG_CHANNEL_DATA = 94


def test_the_relay_offers_no_cbc_cipher() -> None:
    # dropping asyncssh's ignore packets (ssh_bounds.no_ignore_packets) is safe
    # only because no CBC cipher, whose next IV is predictable, can be chosen
    assert CIPHERS and not [c for c in CIPHERS if "cbc" in c.lower()]


async def test_an_echo_is_one_ssh_packet_without_an_ignore_before_it() -> None:
    async def on_host(*_: Any) -> None:
        raise AssertionError("no host here")

    async def on_mate(mate: MateTerminal) -> None:
        while isinstance(data := await mate.read(), bytes) and data:
            mate.write(data)  # echo, as a pane would

    acceptor = await start_ssh_server(
        "127.0.0.1", 0, [asyncssh.generate_private_key("ssh-ed25519")], on_host, on_mate
    )
    try:
        conn = await asyncssh.connect(
            "127.0.0.1", acceptor.get_port(), username="some-token", known_hosts=None,
            client_keys=None, agent_path=None,
        )
        received: Counter[int] = Counter()

        def counting(handler: Any) -> None:
            log = handler.log_received_packet

            def count(pkttype: int, *args: Any, **kwargs: Any) -> None:
                received[pkttype] += 1
                log(pkttype, *args, **kwargs)

            handler.log_received_packet = count

        counting(conn)  # an ignore packet is the connection's
        async with conn:
            proc = await conn.create_process(term_type="xterm", encoding=None)
            counting(proc.channel)  # data is the channel's
            keys = b"abcdefghijklmnopqrst"
            for key in keys:
                proc.stdin.write(bytes([key]))
                echo = await asyncio.wait_for(proc.stdout.readexactly(1), 5)
                assert echo == bytes([key])
            proc.stdin.write_eof()
        assert received[MSG_CHANNEL_DATA] >= len(keys)
        assert received[MSG_IGNORE] == 0, received
    finally:
        await wait_closed(acceptor)
