#!/usr/bin/env python3
"""Cost of the netsim userspace path with no impairment set.

* added latency: UDP ping-pong a -> b through the TUN/forwarder path versus a
  plain veth pair between the same two namespaces, interleaved in one run so
  both see the same machine load;
* forwarding rate: packets per second the single-threaded forwarder moves
  while a separate process floods it.

Prints figures only (no assertions).  Needs root and /dev/net/tun.
Run: python3 bench/netsim_bench.py [--pings N] [--flood-seconds S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyroute2 import IPRoute

from tether.netsim import Network, nsutil
from tether.netsim.probe import percentile, ping

ECHO = textwrap.dedent(
    """
    import socket, select, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    s.settimeout(10)
    end = time.monotonic() + 600
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            break
        s.sendto(data, addr)
    """
)

FLOOD = textwrap.dedent(
    """
    import socket, sys, time
    dest, secs = (sys.argv[1], 9), float(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * 32
    n, end = 0, time.monotonic() + secs
    while time.monotonic() < end:
        for _ in range(256):
            try:
                s.sendto(payload, dest)
                n += 1
            except OSError:
                pass
    print(n)
    """
)


def add_direct_veth(net: Network) -> str:
    """A plain veth a<->b (198.19.255.0/30) as the kernel-only baseline; returns b's address."""
    ns_b = net.netns("b")

    def in_a() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname="direct", kind="veth", peer={"ifname": "directb"})
            peer = ipr.link_lookup(ifname="directb")[0]
            fd = os.open(nsutil.netns_path(ns_b), os.O_RDONLY)
            try:
                ipr.link("set", index=peer, net_ns_fd=fd)
            finally:
                os.close(fd)
            idx = ipr.link_lookup(ifname="direct")[0]
            ipr.addr("add", index=idx, address="198.19.255.1", prefixlen=30)
            ipr.link("set", index=idx, state="up")

    def in_b() -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="directb")[0]
            ipr.addr("add", index=idx, address="198.19.255.2", prefixlen=30)
            ipr.link("set", index=idx, state="up")

    nsutil.in_netns(net.netns("a"), in_a)
    nsutil.in_netns(ns_b, in_b)
    return "198.19.255.2"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt(xs: list[float]) -> str:
    return (
        f"median {statistics.median(xs) * 1e6:7.1f} us   "
        f"p90 {percentile(xs, 90) * 1e6:7.1f} us   p99 {percentile(xs, 99) * 1e6:7.1f} us"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=2000, help="ping-pongs per path")
    ap.add_argument("--flood-seconds", type=float, default=3.0)
    args = ap.parse_args()
    reason = nsutil.unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    with Network({"a": ["eth0"], "b": ["eth0"]}, seed=1) as net:
        direct = add_direct_veth(net)
        echo = net.popen("b", [sys.executable, "-c", ECHO])
        cli = net.socket("a")
        tun_dest, veth_dest = (net.addr("b"), 7), (direct, 7)
        deadline = time.monotonic() + 5
        while ping(cli, tun_dest, 0, 0.2) is None and time.monotonic() < deadline:
            pass  # echo server starting
        tun_rtt: list[float] = []
        veth_rtt: list[float] = []
        for i in range(1, args.pings + 1):
            for dest, out in ((tun_dest, tun_rtt), (veth_dest, veth_rtt)):
                rtt = ping(cli, dest, i, 1.0)
                if rtt is not None:
                    out.append(rtt)
        print(
            f"UDP ping-pong RTT, {args.pings} each, interleaved "
            "(each RTT crosses the forwarder 4 times: 2 links x 2 directions)"
        )
        print(f"  veth baseline : {fmt(veth_rtt)}")
        print(f"  TUN path      : {fmt(tun_rtt)}")
        for q in (50, 90, 99):
            added = percentile(tun_rtt, q) - percentile(veth_rtt, q)
            print(f"  added p{q:<2}     : {added * 1e6:7.1f} us per round trip")
        echo.terminate()
        echo.wait(timeout=5)

        sink = net.socket("b")
        sink.bind(("0.0.0.0", 9))  # never read: the kernel drops silently, no ICMP back
        fwd_pid = net._fwd.pid  # type: ignore[union-attr]

        def snap() -> tuple[float, float, int, int]:
            st = net.stats()
            return (
                time.monotonic(),
                cpu_seconds(fwd_pid),
                st["a.eth0"]["up"]["tx_packets"],
                st["b.eth0"]["down"]["tx_packets"],
            )

        flood = net.popen(
            "a",
            [sys.executable, "-c", FLOOD, net.addr("b"), str(args.flood_seconds)],
            stdout=-1,
            text=True,
        )
        time.sleep(0.5)  # steady state: sender started, queues full
        t0, c0, up0, down0 = snap()
        time.sleep(max(0.5, args.flood_seconds - 1.0))
        t1, c1, up1, down1 = snap()
        out, _ = flood.communicate(timeout=args.flood_seconds + 30)
        dt = t1 - t0
        print(
            f"Flood a -> b, 60-byte IP packets, measured over {dt:.1f} s "
            f"(sender offered {int(out.strip() or 0) / args.flood_seconds:,.0f} pkt/s)"
        )
        print(
            f"  end to end    : {(down1 - down0) / dt:,.0f} pkt/s delivered to b "
            f"(each crosses 2 links: {(up1 - up0 + down1 - down0) / dt:,.0f} "
            f"TUN-to-TUN moves/s)"
        )
        print(f"  forwarder cpu : {100 * (c1 - c0) / dt:.0f}% of one core (single thread)")
        sink.close()
        cli.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
