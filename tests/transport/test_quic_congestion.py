"""QUIC congestion control after an outage: the window's floor and its restart.

Real aioquic connections, in process and in virtual time (``Pair``), and two
QuicLinks on loopback: a relay sends a host what a mate typed while the path
between them is dark, then the path returns.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aioquic.quic.congestion.base import K_INITIAL_WINDOW
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.tls import Epoch

from tether.core.messages import Notice, Ping, Pong
from tether.transport import quic as quic_mod
from tether.transport.quic import (
    MIN_WINDOW,
    FloorReno,
    _config,
    _restart_congestion,
    connect_quic,
    load_or_create_certificate,
    start_quic_server,
)

HOST, RELAY = ("10.0.0.1", 4433), ("10.0.0.2", 4433)
MDS = 1200


class Pair:
    """A host (client) and a relay (server) connection; a clock; a path that can go dark."""

    def __init__(self, keys: Path) -> None:
        cert, key, _ = load_or_create_certificate(keys)
        ccfg, scfg = _config(is_client=True), _config(is_client=False)
        ccfg.verify_mode = 0
        scfg.load_cert_chain(str(cert), str(key))
        self.now = 0.0
        self.dark = False
        self.host = QuicConnection(configuration=ccfg)
        self.relay = QuicConnection(
            configuration=scfg,
            original_destination_connection_id=self.host.original_destination_connection_id)
        for c in (self.host, self.relay):  # as QuicLink tunes them
            c._ack_delay = quic_mod.ACK_DELAY
            quic_mod._cap_probe_backoff(c)
        self.received = bytearray()
        self.host.connect(RELAY, now=self.now)
        self.step(1.0)

    def _flush(self) -> bool:
        moved = False
        for src, dst, addr in ((self.host, self.relay, HOST), (self.relay, self.host, RELAY)):
            for data, _ in src.datagrams_to_send(now=self.now):
                moved = True
                if not self.dark:
                    dst.receive_datagram(data, addr, now=self.now)
        while (ev := self.host.next_event()) is not None:
            if isinstance(ev, StreamDataReceived):
                self.received += ev.data
        return moved

    def step(self, seconds: float) -> None:
        """Run both ends' timers for ``seconds`` (packets arrive at once, or not at all)."""
        end = self.now + seconds
        while True:
            while self._flush():
                pass
            due = min(t for t in (self.host.get_timer(), self.relay.get_timer(), end)
                      if t is not None)
            if due >= end:
                self.now = end
                return
            self.now = max(self.now, due)
            for c in (self.host, self.relay):
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(now=self.now)


def test_the_window_never_falls_below_its_floor() -> None:
    """Loss after loss (30% at random reads as congestion) and persistent
    congestion leave MIN_WINDOW packets a round trip, not two."""
    cc = FloorReno(max_datagram_size=MDS)
    assert cc.congestion_window == K_INITIAL_WINDOW * MDS

    class Lost:
        sent_bytes = MDS
        sent_time = 0.0

    for i in range(10):
        Lost.sent_time = float(i + 1)
        cc.bytes_in_flight += MDS
        cc.on_packets_lost(now=float(i + 1), packets=[Lost()])
    assert cc.congestion_window == cc.ssthresh == MIN_WINDOW * MDS
    cc.on_persistent_congestion()
    assert cc.congestion_window == MIN_WINDOW * MDS
    assert 2 < MIN_WINDOW < K_INITIAL_WINDOW


def test_a_link_uses_the_floored_controller(tmp_path: Path) -> None:
    pair = Pair(tmp_path / "keys")
    assert isinstance(pair.relay._loss._cc, FloorReno)
    assert isinstance(pair.host._loss._cc, FloorReno)


@pytest.mark.parametrize("restart", [False, True])
def test_after_an_outage_the_window_starts_over(tmp_path: Path, restart: bool) -> None:
    """Two minutes dark while the relay has input to send: at the return the old
    window is full of packets sent into the dark and persistent congestion
    collapses it; restarted, the connection has its initial window, in slow
    start, with the data of the lost packets first in line. Each byte reaches
    the host once, in order."""
    pair = Pair(tmp_path / "keys")
    relay = pair.relay
    stream = 1  # the relay's first bidirectional stream
    typed = bytearray()

    def type_line(n: int) -> None:
        line = f"line {n:05d} abcdefghijklmnopqrstuvwxyz\n".encode()
        typed.extend(line)
        relay.send_stream_data(stream, line)

    for n in range(20):
        type_line(n)
        pair.step(0.4)
    assert pair.received == typed
    pair.dark = True
    for n in range(20, 320):  # 120 s of typing, nothing gets through
        type_line(n)
        pair.step(0.4)
    loss = relay._loss
    assert loss.bytes_in_flight >= loss.congestion_window  # the window is full
    pair.dark = False
    # the path is back: the relay's next probe reaches the host, and the host's
    # answer (its acks and a ping) the relay
    pair.now = relay.get_timer()
    relay.handle_timer(now=pair.now)
    for data, _ in relay.datagrams_to_send(now=pair.now):
        pair.host.receive_datagram(data, RELAY, now=pair.now)
    pair.host.send_datagram_frame(b"ping")
    pair.host._spaces[Epoch.ONE_RTT].ack_at = pair.now  # acks ride along (QuicLink)
    for data, _ in pair.host.datagrams_to_send(now=pair.now):
        relay.receive_datagram(data, HOST, now=pair.now)
    if restart:
        assert _restart_congestion(relay, pair.now)
    cc = loss._cc
    if restart:
        assert cc.congestion_window == K_INITIAL_WINDOW * MDS and cc.ssthresh is None
        assert loss.bytes_in_flight < cc.congestion_window  # room to send at once
        assert loss._pto_count == 0
    else:
        assert cc.congestion_window == MIN_WINDOW * MDS  # collapsed (to the floor)
    start = pair.now
    while pair.received != typed and pair.now - start < 30:
        pair.step(0.05)
    assert pair.received == typed  # all of it, once, in order
    took = pair.now - start
    if restart:  # with no loss and no delay: a few rounds of slow start
        assert took < 1.0


async def test_hearing_the_peer_after_a_silence_restarts_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The link restarts its window when the first packet after RESTART_AFTER of
    silence arrives, and not on ordinary traffic."""
    monkeypatch.setattr(quic_mod, "RESTART_AFTER", 0.5)
    caplog.set_level(logging.INFO, logger="tether.transport")
    heard: list[tuple[QuicConnection, float]] = []
    real = quic_mod._restart_congestion

    def spy(quic: QuicConnection, now: float) -> bool:
        heard.append((quic, now))
        return real(quic, now)

    def restarts() -> list[float]:
        """The relay's: the host, which hears the relay's probes, may go quiet
        long enough too when their back-off spaces them wide."""
        return [t for q, t in heard if q is relay_side._quic]

    monkeypatch.setattr(quic_mod, "_restart_congestion", spy)
    cert, key, fp = load_or_create_certificate(tmp_path / "keys")
    links: asyncio.Queue[quic_mod.QuicLink] = asyncio.Queue()

    async def on_host(link: quic_mod.QuicLink) -> None:
        await links.put(link)

    server = await start_quic_server("127.0.0.1", 0, cert, key, on_host)
    port = server._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
    try:
        client = await connect_quic("127.0.0.1", port, fp, timeout=5)
        client.send_nowait(Notice("hello"))
        relay_side = await asyncio.wait_for(links.get(), 5)
        assert await asyncio.wait_for(relay_side.recv(), 5) == Notice("hello")
        for i in range(3):
            client.send_datagram(Ping(i))
            assert await asyncio.wait_for(client.recv(), 5) == Pong(i)
        assert restarts() == []
        # the host goes dark for a second: what it sends is lost
        sendto = client._transport.sendto  # type: ignore[union-attr]
        client._transport.sendto = lambda *a, **k: None  # type: ignore[union-attr]
        relay_side.send_nowait(Notice("typed in the dark"))
        await asyncio.sleep(1.0)
        assert restarts() == []
        client._transport.sendto = sendto  # type: ignore[union-attr]
        client.send_datagram(Ping(9))
        assert await asyncio.wait_for(client.recv(), 5) == Notice("typed in the dark")
        assert await asyncio.wait_for(client.recv(), 5) == Pong(9)
        assert len(restarts()) == 1
        assert "congestion window restarted" in caplog.text
        client.close()
    finally:
        server.close()  # type: ignore[attr-defined]
