"""Userspace impairment path between TUN devices.

The kernel here has no netem, so every packet of a link crosses this process:
it reads from the host-side TUN (direction ``up``) or the router-side TUN
(direction ``down``), decides drop/delay/duplicate/reorder with a seeded
``random.Random`` per link-direction, and writes it to the opposite TUN when
due.  It runs as its own interpreter (not a thread) so the GIL of the test
process cannot distort measured latency, and it only imports the stdlib so it
can be started by file path.

Control protocol: the configuration is a JSON object in argv[1]; then one
JSON object per line on stdin, one JSON reply per line on stdout.  EOF on stdin (parent died)
ends the process, as does a change of parent pid.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import select
import struct
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import IO, Any

DIRECTIONS = ("up", "down")
COUNTERS = (
    "rx_packets",
    "rx_bytes",
    "tx_packets",
    "tx_bytes",
    "dropped",
    "dropped_loss",
    "dropped_burst",
    "dropped_blackout",
    "dropped_queue",
    "dropped_error",
    "duplicated",
    "delayed",
    "reordered",
)
READ_BATCH = 64
MAX_PACKET = 65536


@dataclass
class Impairment:
    """Parameters of one link-direction; all zero means a transparent link."""

    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, uniform in [-jitter, +jitter], order kept (FIFO)
    loss: float = 0.0  # i.i.d. drop probability
    burst_enter: float = 0.0  # Gilbert-Elliott P(good -> bad)
    burst_exit: float = 0.0  # Gilbert-Elliott P(bad -> good)
    burst_bad_loss: float = 1.0  # drop probability while in the bad state
    reorder: float = 0.0  # probability a packet is held back and overtaken
    reorder_delay: float = 0.02  # extra hold for a reordered packet, seconds
    duplicate: float = 0.0  # probability a packet is delivered twice
    rate: float = 0.0  # bits per second, 0 = unlimited
    limit: int = 1000  # max packets queued in this direction (tail drop beyond)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Impairment:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown impairment parameter(s): {sorted(unknown)}")
        return cls(**d)

    def is_null(self) -> bool:
        return self == Impairment()


def derive_seed(seed: int, link: str, direction: str) -> str:
    """Per link-direction seed string; str seeds hash deterministically (sha512)."""
    return f"{seed}:{link}:{direction}"


class DirectionState:
    """Impairment state machine of one link-direction; pure so it is unit-testable."""

    def __init__(self, link: str, direction: str, seed: int) -> None:
        self.link = link
        self.direction = direction
        self.imp = Impairment()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.reseed(seed)
        self.blackout_until = 0.0
        self.queued = 0

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(derive_seed(seed, self.link, self.direction))
        self.bad = False
        self.free_at = 0.0
        self.last_due = 0.0

    def drop(self, reason: str) -> list[float]:
        self.counters["dropped"] += 1
        self.counters["dropped_" + reason] += 1
        return []

    def decide(self, now: float, size: int) -> list[float]:
        """Delivery times for a packet arriving at ``now`` (empty list = dropped)."""
        c = self.counters
        c["rx_packets"] += 1
        c["rx_bytes"] += size
        imp = self.imp
        if now < self.blackout_until:
            return self.drop("blackout")
        rng = self.rng
        if imp.burst_enter > 0.0 or self.bad:
            if self.bad:
                if rng.random() < imp.burst_exit:
                    self.bad = False
            elif rng.random() < imp.burst_enter:
                self.bad = True
            if self.bad and rng.random() < imp.burst_bad_loss:
                return self.drop("burst")
        if imp.loss > 0.0 and rng.random() < imp.loss:
            return self.drop("loss")
        if self.queued >= imp.limit:
            return self.drop("queue")
        due = now
        if imp.rate > 0.0:
            start = max(now, self.free_at)
            self.free_at = start + size * 8.0 / imp.rate
            due = self.free_at
        if imp.delay > 0.0 or imp.jitter > 0.0:
            d = imp.delay
            if imp.jitter > 0.0:
                d += rng.uniform(-imp.jitter, imp.jitter)
            due += max(0.0, d)
        due = max(due, self.last_due)
        self.last_due = due
        if imp.reorder > 0.0 and rng.random() < imp.reorder:
            due += imp.reorder_delay
            c["reordered"] += 1
        times = [due]
        if imp.duplicate > 0.0 and rng.random() < imp.duplicate:
            times.append(due)
            c["duplicated"] += 1
        if due > now:
            c["delayed"] += 1
        return times


class PcapWriter:
    """Classic libpcap file, LINKTYPE_RAW (101): raw IPv4/IPv6 packets, Wireshark-readable."""

    MAGIC = 0xA1B2C3D4
    LINKTYPE_RAW = 101

    def __init__(self, path: str, snaplen: int = MAX_PACKET) -> None:
        self.f: IO[bytes] = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", self.MAGIC, 2, 4, 0, 0, snaplen, self.LINKTYPE_RAW))
        self.snaplen = snaplen

    def write(self, ts: float, pkt: bytes) -> None:
        sec = int(ts)
        usec = int((ts - sec) * 1e6)
        data = pkt[: self.snaplen]
        self.f.write(struct.pack("<IIII", sec, usec, len(data), len(pkt)))
        self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Forwarder:
    """epoll loop moving packets between paired TUN fds through DirectionState."""

    def __init__(self, config: dict[str, Any], ctrl_in: IO[bytes], ctrl_out: IO[str]) -> None:
        self.seed = int(config["seed"])
        self.parent = int(config.get("parent", os.getppid()))
        self.ctrl_in = ctrl_in
        self.ctrl_out = ctrl_out
        self.ep = select.epoll()
        # fd -> (state, out_fd, pcap key)
        self.routes: dict[int, tuple[DirectionState, int, str]] = {}
        self.states: dict[str, dict[str, DirectionState]] = {}
        self.pcaps: dict[str, PcapWriter] = {}
        pcap_dir = config.get("pcap_dir")
        for link in config["links"]:
            name = link["name"]
            hfd, rfd = int(link["host_fd"]), int(link["router_fd"])
            os.set_blocking(hfd, False)
            os.set_blocking(rfd, False)
            up = DirectionState(name, "up", self.seed)
            down = DirectionState(name, "down", self.seed)
            self.states[name] = {"up": up, "down": down}
            self.routes[hfd] = (up, rfd, name)
            self.routes[rfd] = (down, hfd, name)
            self.ep.register(hfd, select.EPOLLIN)
            self.ep.register(rfd, select.EPOLLIN)
            if pcap_dir:
                self.pcaps[name] = PcapWriter(os.path.join(pcap_dir, f"{name}.pcap"))
        self.heap: list[tuple[float, int, DirectionState, int, bytes, str]] = []
        self.seq = 0
        self.ctrl_fd = ctrl_in.fileno()
        os.set_blocking(self.ctrl_fd, False)
        self.ep.register(self.ctrl_fd, select.EPOLLIN)
        self.ctrl_buf = b""
        self.running = True

    # -- control -----------------------------------------------------------
    def reply(self, obj: dict[str, Any]) -> None:
        self.ctrl_out.write(json.dumps(obj) + "\n")
        self.ctrl_out.flush()

    def _targets(self, msg: dict[str, Any]) -> list[DirectionState]:
        link = self.states[msg["link"]]
        d = msg.get("dir", "both")
        return [link[x] for x in (DIRECTIONS if d == "both" else (d,))]

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        now = time.monotonic()
        if op == "set":
            imp = Impairment.from_dict(msg["params"])
            for st in self._targets(msg):
                st.imp = imp
                if msg.get("seed") is not None:
                    st.reseed(int(msg["seed"]))
            return {"ok": True}
        if op == "blackout":
            for st in self._targets(msg):
                st.blackout_until = now + float(msg["seconds"])
            return {"ok": True}
        if op == "stats":
            return {
                "ok": True,
                "stats": {
                    name: {d: dict(st.counters) for d, st in dirs.items()}
                    for name, dirs in self.states.items()
                },
                "params": {
                    name: {d: asdict(st.imp) for d, st in dirs.items()}
                    for name, dirs in self.states.items()
                },
            }
        if op == "reset":
            for dirs in self.states.values():
                for st in dirs.values():
                    st.counters = dict.fromkeys(COUNTERS, 0)
            return {"ok": True}
        if op == "flush":
            for p in self.pcaps.values():
                p.flush()
            return {"ok": True}
        if op == "stop":
            self.running = False
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def read_ctrl(self) -> None:
        try:
            data = os.read(self.ctrl_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.running = False  # parent closed the pipe or died
            return
        self.ctrl_buf += data
        while b"\n" in self.ctrl_buf:
            line, self.ctrl_buf = self.ctrl_buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                resp = self.handle(json.loads(line))
            except Exception as e:  # report, never die on a bad command
                resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.reply(resp)

    # -- data path ---------------------------------------------------------
    def send(self, st: DirectionState, out_fd: int, pkt: bytes, name: str) -> None:
        try:
            os.write(out_fd, pkt)
        except OSError:
            st.counters["dropped"] += 1
            st.counters["dropped_error"] += 1
            return
        st.counters["tx_packets"] += 1
        st.counters["tx_bytes"] += len(pkt)
        pcap = self.pcaps.get(name)
        if pcap is not None:
            pcap.write(time.time(), pkt)

    def read_packets(self, fd: int) -> None:
        st, out_fd, name = self.routes[fd]
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                return
            now = time.monotonic()
            times = st.decide(now, len(pkt))
            for due in times:
                if due <= now:
                    self.send(st, out_fd, pkt, name)
                else:
                    self.seq += 1
                    st.queued += 1
                    heapq.heappush(self.heap, (due, self.seq, st, out_fd, pkt, name))

    def deliver_due(self) -> None:
        heap = self.heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, st, out_fd, pkt, name = heapq.heappop(heap)
            st.queued -= 1
            self.send(st, out_fd, pkt, name)

    def run(self) -> None:
        last_check = time.monotonic()
        while self.running:
            timeout = 0.5
            if self.heap:
                timeout = min(timeout, max(0.0, self.heap[0][0] - time.monotonic()))
            for fd, _ev in self.ep.poll(timeout):
                if fd == self.ctrl_fd:
                    self.read_ctrl()
                else:
                    self.read_packets(fd)
            self.deliver_due()
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                for p in self.pcaps.values():
                    p.flush()
                if os.getppid() != self.parent:
                    break  # orphaned: the owner was killed; cleanup_stale removes the rest
        for p in self.pcaps.values():
            p.close()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: forwarder.py CONFIG_JSON", file=sys.stderr)
        return 2
    fwd = Forwarder(json.loads(sys.argv[1]), sys.stdin.buffer, sys.stdout)
    fwd.reply({"ok": True, "pid": os.getpid()})
    try:
        fwd.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
