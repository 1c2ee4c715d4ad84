"""Replication over QUIC (aioquic): ordered stream for the log, datagrams for liveness.

The relay's QUIC certificate is self-signed; hosts learn its SHA-256
fingerprint over the authenticated SSH bootstrap and accept only that
certificate. Connection migration is aioquic's: the client socket is bound to
the wildcard address, so when the host's address changes (Wi-Fi to LTE, a new
lease, NAT rebinding) the next packet simply leaves from the new address and
the relay validates the new path; the connection, and the replication on it,
carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import create_congestion_control, register_congestion_control
from aioquic.quic.congestion.reno import RenoCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.codec import unpack_body
from tether.core.errors import AuthError
from tether.core.join_endpoint import LOSS_MEMORY
from tether.core.messages import Message, MessageDecoder, Ping, Pong, decode

from .link import MAX_UNSENT, LinkClosed

log = logging.getLogger("tether.transport")

ALPN = "tether/1"
SERVER_NAME = "tether-relay"
IDLE_TIMEOUT = 24 * 3600.0
"""What each end offers as QUIC's idle timeout; the smaller of the two holds.
A host offers this much and the relay its ``host_away_timeout``: a silent
connection stays usable for as long as the session waits for its host, so the
first packet that gets through after an outage carries on with no handshake."""
MAX_DATAGRAM = 1200
ACK_DELAY = 0.02
"""How long a lone QUIC ACK may wait for data to ride on. aioquic acks every
packet after 1 ms, in a packet of its own: a keystroke's four small frames then
cost eight datagrams. Peers advertise max_ack_delay 25 ms, so 20 ms is within
what they allow for; a second unacked packet is still acked at once."""
LAZY_ACK_DELAY = 0.1
"""A host link's ACK delay, both ways, while its path has lost nothing for
``LOSS_MEMORY`` (``QuicLink.lazy_acks``): mosh's delayed ack. With 20 ms, every
echo the relay got was acked in a packet of its own (~18% of the relay's and
the agent's CPU a key): a mate's next key, the usual carrier, comes later than
that; at 100 ms it carries the ack whenever the mate types faster than ten
keys a second. Each end then also allows the other ``LAZY_ACK_ALLOWANCE``
before its probe timeout, so a packet lost on a quiet path is resent ~100 ms
later than with 20 ms. The first loss seen at either end (QUIC's loss
detection, or a gap in the packet numbers received) brings 20 ms back at that
end for a minute, and that end skips a packet number, a gap the other end
sees and follows it on."""
LAZY_ACK_ALLOWANCE = LAZY_ACK_DELAY + 0.025
"""What each end allows the other before its probe timeout while acks are lazy:
the delay and, as with 20 ms against the 25 ms aioquic advertises, a margin for
timers that fire late (RFC 9000 13.2.1: max_ack_delay includes them)."""
MAX_PTO_BACKOFF = 1
"""Doublings of QUIC's probe timeout after consecutive losses. RFC 9002 doubles
it without bound, which suits bulk transfers; tether's traffic is a keystroke
and its echo, a few hundred bytes, and on a lossy link (30% each way at 200 ms
RTT) unbounded doubling left one echo in ten waiting 5 s. Capped like mosh's
retransmission timer, a lost keystroke is probed again every ~2 PTOs; the
bytes this costs are negligible, and the congestion window still reacts."""
ACK_REPEAT = 1.0
"""An ack sent as a datagram is sent once more after this long, unless a newer
one of its kind went meanwhile: the last ack of a burst of activity otherwise
waits for the next activity when it is lost."""
PROBE_GAP = 0.4
"""Least time between two liveness datagrams sent past a full congestion window."""
MIN_WINDOW = 8
"""Packets the congestion window never shrinks below (RFC 9002 recommends 2;
``FloorReno``)."""
RESTART_AFTER = 5.0
"""Seconds without a packet from the peer after which the next one restarts the
congestion controller (``_restart_congestion``)."""
SEND_BUFFER = 512 * 1024
"""Unacked stream bytes past which ``drain`` waits: the log stays in the log, where
it can still be replaced by a snapshot, instead of piling up in QUIC's buffer."""


FIRST_MESSAGE_TIMEOUT = 10.0
"""Seconds from a QUIC connection's first packet to its first complete message,
past which the relay closes it. A host sends its Hello in the handshake's round
trip; before it, nobody is known, and each connection holds the relay's TLS and
stream state (over a megabyte): unbounded, a few clients could hold a lot."""
MAX_PENDING_DATAGRAMS = 64
"""Datagrams (Pongs, acks) queued for a peer that does not acknowledge what it gets
(its congestion window stays full). They are best effort: past this, new ones are
dropped instead of queued without end."""
MAX_INBOX = 16 * 1024 * 1024
"""Bytes received from a peer and not yet taken by the relay. QUIC acks what arrives
whether or not the application has read it, so this bounds what a peer can push
at a busy relay: a host keeps at most ``MAX_BACKLOG_BYTES`` (8 MiB) of its log
unacked, plus one frame (``MAX_FRAME``) of snapshot; twice that is never honest."""


def cert_fingerprint(der: bytes) -> str:
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def load_or_create_certificate(keys_dir: Path) -> tuple[Path, Path, str]:
    """The relay's QUIC certificate and key (created on first start) and its fingerprint."""
    cert_path, key_path = keys_dir / "quic_cert.pem", keys_dir / "quic_key.pem"
    if not (cert_path.exists() and key_path.exists()):
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), False)
            .sign(key, hashes.SHA256())
        )
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return cert_path, key_path, cert_fingerprint(der)


def _cap_probe_backoff(quic: QuicConnection) -> bool:
    """Bound the PTO's exponential backoff (``MAX_PTO_BACKOFF``); False if this
    aioquic keeps its loss recovery elsewhere."""
    loss = getattr(quic, "_loss", None)
    timeout = getattr(loss, "on_loss_detection_timeout", None)
    if loss is None or timeout is None or not hasattr(loss, "_pto_count"):
        return False

    def capped(*, now: float) -> None:
        before = loss._pto_count
        timeout(now=now)
        if loss._pto_count > before and getattr(loss, "handshake_confirmed", True):
            # a probe timeout: an ack overdue, how a lone lost packet is found
            # (``FloorReno.last_loss``; the controller may be a stand-in)
            with contextlib.suppress(AttributeError):
                loss._cc.last_loss = now
        loss._pto_count = min(loss._pto_count, MAX_PTO_BACKOFF)

    loss.on_loss_detection_timeout = capped
    return True


class FloorReno(RenoCongestionControl):
    """aioquic's NewReno, whose window never falls below ``MIN_WINDOW`` packets.

    NewReno reads every loss as congestion and halves its window once a round
    trip while losses go on. On a link that drops 30% of packets at random
    nearly every round trip has one, so the window sat at RFC 9002's
    recommended minimum of two packets: ten minutes of typing queued during an
    outage (60-70 KB) left two packets per round trip when the link was back,
    and a lost ack or a pair of lost packets stopped it for a probe timeout
    (2.5 to 8.5 s to drain over the new connection in the outage benchmark).
    tether's traffic is small and bounded (keys, their echo, a log that turns
    into a snapshot when behind); eight packets a round trip is less than the
    initial window every new connection sends at once (ten), and above it the
    window grows and shrinks as NewReno's does."""

    last_loss: float | None = None
    """When QUIC last found a packet of ours lost, or resent one whose ack was
    overdue (a probe timeout: how a lone lost keystroke or echo is found),
    for ``QuicLink.lost_at``."""
    declared_loss: float | None = None
    """When QUIC last declared a packet of ours lost (not a probe timeout, which
    a lazy ack can cause: ``QuicLink.lazy_acks``)."""

    def _floor(self) -> None:
        least = MIN_WINDOW * self._max_datagram_size
        self.congestion_window = max(self.congestion_window, least)
        if self.ssthresh is not None:
            self.ssthresh = max(self.ssthresh, least)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        self.last_loss = self.declared_loss = now
        super().on_packets_lost(now=now, packets=packets)
        self._floor()

    def on_persistent_congestion(self) -> None:
        super().on_persistent_congestion()
        self._floor()


CONGESTION_CONTROL = "tether-reno"
register_congestion_control(CONGESTION_CONTROL, FloorReno)


def _restart_congestion(quic: QuicConnection, now: float) -> bool:
    """Start the congestion controller over: the peer is heard again after a silence.

    Through an outage nothing is acked: each probe timeout sends one more packet
    past the window, so at the link's return the window is full of packets sent
    into the dark (after ten minutes, about 100 KB of them, 44 times the window),
    and the first ack declares them lost, over more than three probe timeouts:
    persistent congestion (RFC 9002 7.6.2), the window at its minimum and no
    slow start. What waited meanwhile (mate input: ten minutes of typing is
    60-70 KB) then leaves a few packets per round trip. That window describes a
    path that was not there; as after a path change (RFC 9000 9.4) the
    connection starts over with the initial window, in slow start. Packets sent
    before the last probe timeout are declared lost (as a probe timeout does:
    not a congestion event) and their data goes again first; those sent since
    may still arrive. Duplicates are QUIC's to drop: the stream delivers each
    byte once.

    False if this aioquic keeps its congestion state elsewhere."""
    loss = getattr(quic, "_loss", None)
    cc = getattr(loss, "_cc", None)
    spaces = getattr(quic, "_spaces", None)
    space = spaces.get(Epoch.ONE_RTT) if isinstance(spaces, dict) else None
    lost = getattr(loss, "_on_packets_lost", None)
    if cc is None or space is None or lost is None or not hasattr(loss, "_pto_count"):
        return False
    cutoff = now - loss.get_probe_timeout()
    stale = [p for p in space.sent_packets.values() if p.sent_time <= cutoff]
    if stale:
        lost(congestion_event=False, now=now, packets=stale, space=space)
    try:
        fresh = create_congestion_control(
            quic.configuration.congestion_control_algorithm,
            max_datagram_size=quic._max_datagram_size,
        )
    except Exception:  # a controller registered under another name: leave it
        return False
    fresh.bytes_in_flight = cc.bytes_in_flight
    if hasattr(cc, "last_loss"):
        fresh.last_loss = cc.last_loss  # the path's record, not the window's
    if hasattr(cc, "declared_loss"):
        fresh.declared_loss = cc.declared_loss
    if hasattr(fresh, "_congestion_recovery_start_time"):
        # the losses still to be found among packets sent in the dark are the
        # outage's, not a sign of congestion on the path that is back
        fresh._congestion_recovery_start_time = now
    loss._cc = fresh
    loss._pto_count = 0
    if getattr(loss, "_rtt_initialized", False):
        loss._pacer.update_rate(congestion_window=fresh.congestion_window,
                                smoothed_rtt=loss._rtt_smoothed)
    return True


class QuicLink(QuicConnectionProtocol):
    """A ``Link`` over one QUIC connection: frames on stream 0, liveness as datagrams."""

    kind = "quic"

    def __init__(self, quic: QuicConnection, **kwargs: object) -> None:
        super().__init__(quic, **kwargs)  # type: ignore[arg-type]
        self._decoder = MessageDecoder()
        self._inbox: asyncio.Queue[tuple[Message, int] | _Poison | None] = asyncio.Queue()
        self._inbox_bytes = 0
        self._undelivered = 0  # bytes of a message not yet complete
        self._stream: int | None = None
        self.closed = False
        self.reason = ""
        self.peer = ""
        self.on_first: Callable[[QuicLink], None] | None = None
        self._got_any = False
        self.bytes_sent = 0
        self.last_activity = time.monotonic()
        self._piggyback = False
        self._ack_repeats: dict[type, asyncio.TimerHandle] = {}
        self._probed = 0.0
        self._heard_at: float | None = None
        if hasattr(quic, "_ack_delay"):
            quic._ack_delay = ACK_DELAY
        _cap_probe_backoff(quic)
        self.lazy_acks = False
        """Acks wait ``LAZY_ACK_DELAY`` on a quiet path (``enable_lazy_acks``)."""
        self._gap_at: float | None = None
        self._peer_ack_delay = 0.025
        self._quiet = True

    # --- Link ------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"quic {self.peer}"

    @property
    def lost_at(self) -> float | None:
        """When QUIC last found a packet this link sent lost or overdue (``FloorReno.
        last_loss``), on ``time.monotonic``'s clock; None: never."""
        loss = getattr(self._quic, "_loss", None)
        return getattr(getattr(loss, "_cc", None), "last_loss", None)

    def enable_lazy_acks(self) -> None:
        """Delay acks ``LAZY_ACK_DELAY`` while the path loses nothing, and expect
        the peer to: for links whose both ends do so (a host's, protocol 6)."""
        loss = getattr(self._quic, "_loss", None)
        if loss is None or not hasattr(self._quic, "_ack_delay"):
            return
        if not self.lazy_acks:
            self._peer_ack_delay = loss.max_ack_delay  # what the peer's handshake said
        self.lazy_acks = True
        self._quiet = True
        self._ack_policy(self._loop.time())

    def _ack_policy(self, now: float) -> None:
        """Lazy acks on a quiet path, 20 ms (and the peer's own allowance) for a
        minute after a loss either end saw (``LAZY_ACK_DELAY``)."""
        loss = self._quic._loss
        cc = getattr(loss, "_cc", None)
        last = max(getattr(cc, "declared_loss", None) or -LOSS_MEMORY,
                   self._gap_at if self._gap_at is not None else -LOSS_MEMORY)
        quiet = now - last >= LOSS_MEMORY
        if self._quiet and not quiet and hasattr(self._quic, "_packet_number"):
            # turned strict: a gap in our packet numbers turns the peer strict
            # too, or it would wait 100 ms to ack while we probe after 25
            self._quic._packet_number += 1
        self._quiet = quiet
        self._quic._ack_delay = LAZY_ACK_DELAY if quiet else ACK_DELAY
        loss.max_ack_delay = LAZY_ACK_ALLOWANCE if quiet else self._peer_ack_delay

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed round-trip time (updated on every ack), None before a sample."""
        loss = getattr(self._quic, "_loss", None)
        if loss is None or not getattr(loss, "_rtt_initialized", False):
            return None
        return float(loss._rtt_smoothed)

    def send_nowait(self, msg: Message) -> None:
        if self.closed:
            raise LinkClosed(self.reason or "connection closed")
        if self._stream is None:
            self._stream = self._quic.get_next_available_stream_id()
        data = msg.encode()
        unacked = self._unacked()
        if unacked + len(data) > MAX_UNSENT:
            log.warning("%s: the peer has not taken %d bytes sent to it (bound %d); "
                        "closing its link", self.description, unacked, MAX_UNSENT)
            self._fail("the peer did not read what was sent to it")
            raise LinkClosed(f"the peer did not read what was sent to it ({unacked} bytes)")
        self.bytes_sent += len(data)
        self._quic.send_stream_data(self._stream, data)
        # one packet for everything sent in this turn of the event loop
        self._piggyback = True
        self._transmit_soon()

    def send_ack(self, msg: Message) -> None:
        """A cumulative ack, as a datagram: on the ordered stream, a lost ack would
        hold up the keystroke or the echo sent after it until it was resent (with
        30% loss each way, a keystroke's two acks doubled its chance of a wait)."""
        if self.closed:
            raise LinkClosed(self.reason or "connection closed")
        self.send_datagram(msg)
        old = self._ack_repeats.pop(type(msg), None)
        if old is not None:
            old.cancel()
        self._ack_repeats[type(msg)] = self._loop.call_later(ACK_REPEAT, self._repeat_ack, msg)

    def _repeat_ack(self, msg: Message) -> None:
        self._ack_repeats.pop(type(msg), None)
        self.send_datagram(msg)

    async def send(self, msg: Message) -> None:
        self.send_nowait(msg)
        await self.drain()

    def _unacked(self) -> int:
        stream = self._quic._streams.get(self._stream) if self._stream is not None else None
        return len(stream.sender._buffer) if stream is not None else 0

    async def drain(self) -> None:
        # aioquic has no write-buffer callback; poll its stream buffer (bounded wait)
        for _ in range(30000):
            if self.closed:
                raise LinkClosed(self.reason or "connection closed")
            if self._unacked() < SEND_BUFFER:
                return
            await asyncio.sleep(0.005)
        raise LinkClosed("send buffer did not drain in 150 s")

    def send_datagram(self, msg: Message) -> None:
        """Best-effort latest-state message (liveness); lost ones are not resent."""
        if self.closed:
            return
        data = msg.encode()
        pending = getattr(self._quic, "_datagrams_pending", ())
        if len(data) <= MAX_DATAGRAM and len(pending) < MAX_PENDING_DATAGRAMS:
            with contextlib.suppress(Exception):
                self._quic.send_datagram_frame(data[4:])
                self._probe_if_blocked()
                self._piggyback = True
                self._transmit_soon()

    def _probe_if_blocked(self) -> None:
        """A liveness datagram leaves even when the congestion window is full.

        After an outage everything in flight counts against the window, and
        aioquic then sends nothing but its loss-recovery probes, whose timer has
        grown through the outage: the ping that would find the path again (or
        the pong that answers it) waits seconds for it. Sent as a probe (one
        packet past the window, as RFC 9002 lets probes go), each ping, at most
        two a second, is one (``PROBE_GAP``: whatever a peer sends, a link
        probes no more often); the window still governs everything else."""
        loss = getattr(self._quic, "_loss", None)
        if loss is None or not hasattr(self._quic, "_probe_pending"):
            return
        now = time.monotonic()
        if loss.bytes_in_flight >= loss.congestion_window and now - self._probed >= PROBE_GAP:
            self._probed = now
            self._quic._probe_pending = True

    async def recv(self) -> Message:
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)
            raise LinkClosed(self.reason or "connection closed")
        if isinstance(item, _Poison):
            self.close()
            raise item.exc
        msg, size = item
        self._inbox_bytes -= size
        return msg

    def _fail(self, reason: str) -> None:
        """Close with ``reason`` for the peer, dropping what is queued for it."""
        if self.closed:
            return
        self.reason = reason
        self.closed = True
        for handle in self._ack_repeats.values():
            handle.cancel()
        self._ack_repeats.clear()
        with contextlib.suppress(Exception):
            self._quic.close(error_code=0, reason_phrase=reason)
            self.transmit()
        self._inbox.put_nowait(None)

    def close(self) -> None:
        for handle in self._ack_repeats.values():
            handle.cancel()
        self._ack_repeats.clear()
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.transmit()  # frames queued this turn (an Error) leave first
                self._quic.close(error_code=0, reason_phrase="bye")
                self.transmit()
            self._inbox.put_nowait(None)
        if self._quic.configuration.is_client and self._transport is not None:
            # the client owns its socket; give CONNECTION_CLOSE a moment to leave
            asyncio.get_running_loop().call_later(0.2, self._transport.close)

    # --- aioquic ----------------------------------------------------------------

    def _ack_space(self) -> object | None:
        spaces = getattr(self._quic, "_spaces", None)
        return spaces.get(Epoch.ONE_RTT) if isinstance(spaces, dict) else None

    def transmit(self) -> None:
        if self.lazy_acks:
            self._ack_policy(self._loop.time())
        if self._piggyback:
            # data leaves now: a pending ACK rides along instead of waiting alone
            self._piggyback = False
            space = self._ack_space()
            if space is not None and getattr(space, "ack_at", None) is not None:
                space.ack_at = self._loop.time()  # type: ignore[attr-defined]
        super().transmit()

    def datagram_received(self, data: bytes | str, addr: object) -> None:
        now = self._loop.time()
        space = self._ack_space()
        waiting = space is not None and getattr(space, "ack_at", None) is not None
        newest = getattr(space, "largest_received_packet", None)
        if self.lazy_acks:
            self._ack_policy(now)
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        largest = getattr(space, "largest_received_packet", None)
        if space is not None and largest != newest:
            if (self.lazy_acks and isinstance(newest, int) and newest >= 0
                    and isinstance(largest, int) and largest > newest + 1):
                self._gap_at = now  # a packet of the peer's lost (or late)
                self._ack_policy(now)
                ack_at = getattr(space, "ack_at", None)
                if ack_at is not None and ack_at > now + ACK_DELAY:
                    space.ack_at = now + ACK_DELAY  # type: ignore[attr-defined]
            # a packet of the peer's (authenticated, new): the path works
            if self._heard_at is not None and now - self._heard_at >= RESTART_AFTER:
                if _restart_congestion(self._quic, now):
                    log.info("%s: heard again after %.1f s; congestion window restarted",
                             self.description, now - self._heard_at)
            self._heard_at = now
        self._process_events()
        if waiting and space is not None and getattr(space, "ack_at", None) is not None:
            # two packets unacked: ack now (RFC 9000 13.2.2), bulk transfers need it
            space.ack_at = self._loop.time()  # type: ignore[attr-defined]
        # after what the application does with the data, so replies share a packet
        self._transmit_soon()

    def quic_event_received(self, event: QuicEvent) -> None:
        # anything from the peer proves the path alive, even before the app reads it
        self.last_activity = time.monotonic()
        if isinstance(event, StreamDataReceived):
            if self._stream is None:
                self._stream = event.stream_id
            if event.stream_id != self._stream:
                return
            self._undelivered += len(event.data)
            if not self._room():
                return
            try:
                for msg in self._decoder.feed(event.data):
                    # a chunk's bytes count with the first message it completes
                    self._deliver(msg, self._undelivered)
                    self._undelivered = 0
            except Exception as exc:  # a RemoteProtocolError: surfaces through recv
                self._inbox.put_nowait(_Poison(exc))
        elif isinstance(event, DatagramFrameReceived):
            with contextlib.suppress(Exception):
                msg = decode(unpack_body(event.data))
                if isinstance(msg, Ping):
                    self.send_datagram(Pong(msg.token))  # answered here, at once
                elif self._room(len(event.data)):
                    self._deliver(msg, len(event.data))
        elif isinstance(event, ConnectionTerminated):
            self.reason = event.reason_phrase or "connection closed"
            if not self.closed:
                self.closed = True
                self._inbox.put_nowait(None)
        elif isinstance(event, HandshakeCompleted):
            pass

    def _room(self, more: int = 0) -> bool:
        """Whether what the peer sent ahead (``more`` included) stays in MAX_INBOX;
        closes the link if not."""
        if self.closed:
            return False
        ahead = self._inbox_bytes + self._undelivered + more
        if ahead <= MAX_INBOX:
            return True
        log.warning("%s: sent %d bytes not read yet (bound %d); closing its link",
                    self.description, ahead, MAX_INBOX)
        self._fail("too much data sent ahead")
        return False

    def _deliver(self, msg: Message, size: int) -> None:
        self._inbox_bytes += size
        self._inbox.put_nowait((msg, size))
        if not self._got_any:
            self._got_any = True
            if self.on_first is not None:
                self.on_first(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed:
            self.closed = True
            self.reason = "socket closed"
            self._inbox.put_nowait(None)


class _Poison:
    """Carries a decode error through the inbox to the reader."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def _config(is_client: bool, idle_timeout: float = IDLE_TIMEOUT) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_frame_size=65536,
        server_name=SERVER_NAME if is_client else None,
        congestion_control_algorithm=CONGESTION_CONTROL,
    )


async def start_quic_server(
    bind: str,
    port: int,
    cert: Path,
    key: Path,
    on_host: Callable[[QuicLink], Awaitable[None]],
    *,
    first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
    retry: bool = True,
    idle_timeout: float = IDLE_TIMEOUT,
) -> QuicServer:
    """Listen for hosts resuming over QUIC; each connection's link goes to ``on_host``.

    A connection that has not delivered a complete message ``first_message_timeout``
    (``FIRST_MESSAGE_TIMEOUT``) seconds after its first packet is closed. With
    ``retry``, a new connection must first echo a Retry token (one round trip more),
    which proves it owns its source address: a spoofed one makes the relay hold
    no state and send no more than it received. ``idle_timeout``: how long a
    silent connection is kept (the relay passes its host-away timeout).
    """
    config = _config(is_client=False, idle_timeout=idle_timeout)
    config.load_cert_chain(str(cert), str(key))
    tasks: set[asyncio.Task[None]] = set()

    def create(quic: QuicConnection, **kwargs: object) -> QuicLink:
        link = QuicLink(quic, **kwargs)
        loop = asyncio.get_running_loop()

        def too_slow() -> None:
            if not link._got_any and not link.closed:
                paths = link._quic._network_paths
                addr = paths[0].addr if paths else ("?", 0)
                log.warning("quic %s:%s: no complete message within %g s; closed",
                            addr[0], addr[1], first_message_timeout)
                link._fail(f"no message within {first_message_timeout:g} s")

        timer = loop.call_later(first_message_timeout, too_slow)

        def first(lk: QuicLink) -> None:
            timer.cancel()
            addr = lk._quic._network_paths[0].addr if lk._quic._network_paths else ("?", 0)
            lk.peer = f"{addr[0]}:{addr[1]}"
            task = asyncio.get_running_loop().create_task(on_host(lk))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        link.on_first = first
        return link

    return await serve(
        bind or "::", port, configuration=config, create_protocol=create, retry=retry
    )


async def connect_quic(host: str, port: int, fingerprint: str, timeout: float = 5.0) -> QuicLink:
    """Connect to the relay and accept only the certificate with ``fingerprint``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    addr = infos[0][4]
    if len(addr) == 2:
        addr = ("::ffff:" + addr[0], addr[1], 0, 0)
    config = _config(is_client=True)
    config.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below, before any secret
    quic = QuicConnection(configuration=config)
    # wildcard bind: after an address change the kernel picks the new source address
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0, 0, 0))
    _, protocol = await loop.create_datagram_endpoint(lambda: QuicLink(quic), sock=sock)
    link: QuicLink = protocol  # type: ignore[assignment]
    link.peer = f"{host}:{port}"
    try:
        link.connect(addr)
        await asyncio.wait_for(link.wait_connected(), timeout)
    except (TimeoutError, ConnectionError) as exc:
        # aioquic fails its shielded handshake waiter later, when the connection
        # gives up; nobody awaits it any more ("exception was never retrieved")
        waiter = getattr(link, "_connected_waiter", None)
        if isinstance(waiter, asyncio.Future):
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        link.close()
        raise LinkClosed(f"QUIC to {host}:{port} failed: {str(exc) or 'timed out'}") from None
    except asyncio.CancelledError:  # another path won the race: no socket left behind
        waiter = getattr(link, "_connected_waiter", None)
        if isinstance(waiter, asyncio.Future):
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        link.close()
        raise
    peer = quic.tls._peer_certificate  # aioquic keeps it private; it is the leaf we got
    received = (
        cert_fingerprint(peer.public_bytes(serialization.Encoding.DER)) if peer else "none"
    )
    if received != fingerprint:
        link.close()
        raise AuthError(
            f"relay QUIC certificate fingerprint mismatch: expected {fingerprint}, "
            f"received {received}"
        )
    return link
