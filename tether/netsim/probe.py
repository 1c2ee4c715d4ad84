"""Small UDP traffic tools (echo server, ping-pong, numbered streams) for tests and the bench.

They measure what the network did: every probe carries a sequence number and
a send timestamp, so loss, reordering, duplication and delay are read off the
receiver without trusting the forwarder's own counters.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_HDR = struct.Struct("!Id")  # sequence number, sender monotonic time
HEADER_SIZE = _HDR.size


def big_buffers(sock: socket.socket, size: int = 4 << 20) -> socket.socket:
    """Enlarge socket buffers (forced as root) so bursts are not lost in the receiver."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return sock


def make_probe(seq: int, size: int = 64) -> bytes:
    body = _HDR.pack(seq, time.monotonic())
    return body + b"\0" * max(0, size - len(body))


def parse_probe(data: bytes) -> tuple[int, float]:
    seq, sent = _HDR.unpack_from(data)
    return seq, sent


class UdpEcho:
    """Echo every datagram back to its sender from a thread; remembers the sources seen.

    ``sock`` must already live in the right namespace (``Network.socket``).
    The thread polls with a short timeout so ``close()`` is bounded.
    """

    def __init__(self, sock: socket.socket, port: int = 0) -> None:
        self.sock = sock
        if sock.getsockname()[1] == 0:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))
        self.port: int = sock.getsockname()[1]
        self.sources: list[tuple[str, int]] = []
        self.received = 0
        self._stop = threading.Event()
        sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._loop, name="netsim-echo", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            src = (addr[0], addr[1])
            if not self.sources or self.sources[-1] != src:
                self.sources.append(src)
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sock.close()

    def __enter__(self) -> UdpEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(
    sock: socket.socket, dest: tuple[str, int], seq: int, timeout: float = 1.0
) -> float | None:
    """One UDP ping-pong; RTT in seconds or None if no matching reply within timeout."""
    sock.sendto(make_probe(seq), dest)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        got, sent = parse_probe(data)
        if got == seq:
            return time.monotonic() - sent


def ping_many(
    sock: socket.socket, dest: tuple[str, int], count: int, timeout: float = 1.0, start: int = 0
) -> list[float]:
    """RTTs of ``count`` sequential pings (lost ones omitted)."""
    out = []
    for i in range(count):
        rtt = ping(sock, dest, start + i, timeout)
        if rtt is not None:
            out.append(rtt)
    return out


def send_stream(
    sock: socket.socket,
    dest: tuple[str, int],
    count: int,
    size: int = 64,
    interval: float = 0.0,
    start: int = 0,
) -> float:
    """Send ``count`` numbered datagrams, paced by ``interval`` (busy-free, drift-free).

    Returns the time the last one was sent.
    """
    t0 = time.monotonic()
    for i in range(count):
        if interval > 0:
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with contextlib.suppress(BlockingIOError, OSError):
            sock.sendto(make_probe(start + i, size), dest)
    return time.monotonic()


@dataclass
class Arrivals:
    """What a receiver saw: sequence numbers in arrival order and one-way timing."""

    seqs: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic arrival time
    sent: list[float] = field(default_factory=list)  # monotonic send time (same host clock)
    nbytes: int = 0

    @property
    def unique(self) -> set[int]:
        return set(self.seqs)

    def duplicates(self) -> int:
        return len(self.seqs) - len(set(self.seqs))

    def reordered(self) -> int:
        """Arrivals with a lower sequence number than one already seen."""
        n, top = 0, -1
        for s in self.seqs:
            if s < top:
                n += 1
            top = max(top, s)
        return n


def receive_stream(
    sock: socket.socket, until: float, idle: float = 0.5, expect: int | None = None
) -> Arrivals:
    """Collect numbered datagrams until the monotonic deadline ``until``, ``idle``
    seconds without traffic after the first one, or ``expect`` unique ones."""
    out = Arrivals()
    last = None
    while True:
        now = time.monotonic()
        limit = until if last is None else min(until, last + idle)
        if now >= limit or (expect is not None and len(out.unique) >= expect):
            return out
        sock.settimeout(limit - now)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return out
        last = time.monotonic()
        seq, sent = parse_probe(data)
        out.seqs.append(seq)
        out.times.append(last)
        out.sent.append(sent)
        out.nbytes += len(data)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) without numpy."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * (len(s) - 1))))
    return s[k]


class StreamCollector:
    """``receive_stream`` on a thread, so arrival times are real while the caller sends."""

    def __init__(
        self, sock: socket.socket, until: float, idle: float = 0.5, expect: int | None = None
    ) -> None:
        self.result = Arrivals()
        self._thread = threading.Thread(
            target=self._run, args=(sock, until, idle, expect), name="netsim-rx", daemon=True
        )
        self._thread.start()

    def _run(self, sock: socket.socket, until: float, idle: float, expect: int | None) -> None:
        self.result = receive_stream(sock, until, idle, expect)

    def join(self) -> Arrivals:
        self._thread.join()
        return self.result
