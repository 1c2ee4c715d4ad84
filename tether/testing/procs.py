"""Waiting with deadlines, free ports and /proc readers (processes, CPU, memory, sockets)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

TICK = os.sysconf("SC_CLK_TCK")


class HarnessError(AssertionError):
    """A harness expectation failed (a timeout, a process that would not start).

    An AssertionError, so pytest reports it as a failed check, not a crash."""


def wait_for(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``.

    Waits are on conditions with deadlines, never fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise HarnessError(
                f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


async def until(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition",
                interval: float = 0.05) -> T:
    """``wait_for`` in a test's event loop: the loop runs between polls."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise HarnessError(
                f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A loopback port free right now for TCP and UDP alike (the OS picks it): a
    relay listens on both with one number (SSH, QUIC), and the UDP half may be
    some QUIC client's ephemeral port when the TCP half is free."""
    for _ in range(100):
        with socket.socket() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no loopback port free for both TCP and UDP in 100 tries")


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    argv: list[str]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def processes() -> list[ProcInfo]:
    """Every process we can read, from /proc (no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv:
            out.append(ProcInfo(int(entry), ppid, argv))
    return out


def descendants(root: int, procs: list[ProcInfo] | None = None) -> list[ProcInfo]:
    procs = processes() if procs is None else procs
    kids: dict[int, list[ProcInfo]] = {}
    for p in procs:
        kids.setdefault(p.ppid, []).append(p)
    out: list[ProcInfo] = []
    todo = [root]
    while todo:
        for p in kids.get(todo.pop(), []):
            out.append(p)
            todo.append(p.pid)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Mem:
    pss: int = 0
    rss: int = 0
    uss: int = 0
    """bytes"""

    def __add__(self, other: Mem) -> Mem:
        return Mem(self.pss + other.pss, self.rss + other.rss, self.uss + other.uss)


def memory(pid: int) -> Mem:
    """PSS, RSS and USS (private clean + dirty) from /proc/PID/smaps_rollup."""
    vals: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    vals[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        return Mem()
    return Mem(vals.get("Pss", 0), vals.get("Rss", 0),
               vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0))


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (a zombie still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def end_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM these pids (ours), then SIGKILL what is left after ``timeout``."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.02)
    for p in pids:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def remote_peers(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, remote address, remote port) of the IPv4 sockets of a process."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    out = []
    for proto in ("tcp", "udp"):
        with contextlib.suppress(OSError), open(f"/proc/net/{proto}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] not in inodes:
                    continue
                addr_hex, port_hex = parts[2].split(":")
                addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex, 16)))
                out.append((proto, addr, int(port_hex, 16)))
    return out
