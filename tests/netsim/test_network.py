"""Impairments measured end to end through real namespaces (needs root + /dev/net/tun).

Every assertion is on what a receiver observed; forwarder counters are checked
only as a cross-check.  Statistical bounds are wide (>= 4.5 sigma) but still fail
if the feature is off.
"""

import math
import socket
import statistics
import time

import pytest

from tether.netsim import Network
from tether.netsim.probe import (
    StreamCollector,
    UdpEcho,
    big_buffers,
    percentile,
    ping_many,
    receive_stream,
    send_stream,
)

pytestmark = pytest.mark.netsim
PORT = 40000


def pair(
    net: Network, src: str = "host", dst: str = "relay"
) -> tuple[socket.socket, socket.socket]:
    """A sender in ``src`` and a bound receiver in ``dst``, with big buffers."""
    tx = big_buffers(net.socket(src))
    rx = big_buffers(net.socket(dst))
    rx.bind(("0.0.0.0", PORT))
    return tx, rx


def stream(
    net: Network,
    count: int,
    interval: float = 0.0002,
    size: int = 64,
    start: int = 0,
    wait: float = 3.0,
):
    tx, rx = pair(net)
    try:
        send_stream(tx, (net.addr("relay"), PORT), count, size=size, interval=interval, start=start)
        return receive_stream(rx, until=time.monotonic() + wait, idle=0.3, expect=count)
    finally:
        tx.close()
        rx.close()


def test_delay_shows_as_rtt_and_jitter_widens_spread(netsim: Network) -> None:
    with UdpEcho(netsim.socket("relay")) as echo:
        cli = netsim.socket("host")
        dest = (netsim.addr("relay"), echo.port)
        base = ping_many(cli, dest, 10)
        assert len(base) == 10 and statistics.median(base) < 0.005

        netsim.link("host", "wifi").set(delay="25ms")  # each direction: RTT += 50 ms
        rtts = ping_many(cli, dest, 20, start=100)
        med = statistics.median(rtts)
        assert len(rtts) == 20
        assert 0.050 <= med <= 0.050 + 0.010, f"median RTT {med * 1e3:.1f} ms"
        spread_plain = percentile(rtts, 90) - percentile(rtts, 10)

        netsim.link("host", "wifi").set(jitter="10ms")
        jittered = ping_many(cli, dest, 30, start=200)
        spread_jit = percentile(jittered, 90) - percentile(jittered, 10)
        assert len(jittered) == 30
        assert 0.040 <= statistics.median(jittered) <= 0.065
        assert spread_jit > max(0.008, 3 * spread_plain), (spread_plain, spread_jit)
        assert min(jittered) >= 0.030 - 0.001  # 2 x (25 - 10) ms
        cli.close()


def test_iid_loss_within_binomial_bounds(netsim: Network) -> None:
    n, p = 1000, 0.2
    netsim.link("host", "wifi").set(loss=p, direction="up")
    got = stream(netsim, n)
    lost = n - len(got.unique)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(lost - n * p) < 4.5 * sd, f"lost {lost} of {n}"
    c = netsim.link("host", "wifi").stats()["up"]
    assert c["rx_packets"] == n and c["dropped_loss"] == lost  # nothing lost elsewhere


def test_bursty_loss_produces_runs(netsim: Network) -> None:
    n, p_enter, p_exit = 2000, 0.03, 0.25
    netsim.link("host", "wifi").set(burst_loss=(p_enter, p_exit), direction="up")
    got = stream(netsim, n)
    lost = [i not in got.unique for i in range(n)]
    runs, cur = [], 0
    for x in [*lost, False]:
        if x:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    rate = sum(lost) / n
    assert 0.05 < rate < 0.20
    # i.i.d. loss at the same rate would give a mean run of 1/(1-rate) < 1.25
    assert statistics.mean(runs) > 2.5, f"mean run {statistics.mean(runs):.2f}"
    assert max(runs) >= 8


def test_same_seed_same_drop_pattern(netsim: Network) -> None:
    link = netsim.link("host", "wifi")
    patterns = []
    for seed in (1234, 1234, 999):
        link.set(loss=0.3, burst_loss=(0.05, 0.5), seed=seed, direction="up")
        got = stream(netsim, 300)
        patterns.append(frozenset(range(300)) - got.unique)
    assert patterns[0] == patterns[1]
    assert patterns[0] != patterns[2]
    assert 50 < len(patterns[0]) < 150


def test_reordering_and_duplication_rates(netsim: Network) -> None:
    n = 1000
    netsim.link("host", "wifi").set(reorder=0.1, duplicate=0.05, direction="up")
    # 1 ms spacing: a packet held 20 ms is overtaken by ~20 later ones
    got = stream(netsim, n, interval=0.001)
    assert got.unique == set(range(n))
    for measured, p in ((got.reordered(), 0.1), (got.duplicates(), 0.05)):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(measured - n * p) < 4.5 * sd, (measured, p)
    c = netsim.link("host", "wifi").stats()["up"]
    assert c["duplicated"] == got.duplicates()


def test_rate_limit_caps_throughput(netsim: Network) -> None:
    rate = 2e6
    netsim.link("host", "wifi").set(rate="2mbit", limit=100, direction="up")
    size = 1000
    tx, rx = pair(netsim)
    # offer ~4x the rate for 1.2 s, measure the receiver over a 1 s window
    rx_thread = StreamCollector(rx, until=time.monotonic() + 4.0, idle=0.3)
    send_stream(tx, (netsim.addr("relay"), PORT), 1200, size=size, interval=0.001)
    got = rx_thread.join()
    tx.close()
    rx.close()
    start = got.times[0] + 0.1
    window = [t for t in got.times if start <= t < start + 1.0]
    ip_bytes = len(window) * (size + 28)
    assert 0.85 * rate <= ip_bytes * 8 <= 1.05 * rate, f"{ip_bytes * 8 / 1e6:.2f} Mbit/s"
    assert netsim.link("host", "wifi").stats()["up"]["dropped_queue"] > 0


def test_blackout_drops_everything_then_nothing(netsim: Network) -> None:
    tx, rx = pair(netsim)
    link = netsim.link("host", "wifi")
    t0 = time.monotonic()
    link.blackout(0.5)  # starts when the forwarder gets it: between t0 and now
    send_stream(tx, (netsim.addr("relay"), PORT), 120, interval=0.01)  # 1.2 s
    got = receive_stream(rx, until=time.monotonic() + 2.0, idle=0.3)
    tx.close()
    rx.close()
    sent_at = {s: st for s, st in zip(got.seqs, got.sent, strict=True)}
    # 30 ms margin: a packet's trip to the forwarder may be slow on a loaded machine
    assert all(st - t0 >= 0.5 - 0.03 for st in sent_at.values()), "packet crossed the blackout"
    # every packet sent after the blackout (plus the command's latency) arrived
    first_after = math.ceil((0.5 + 0.03) / 0.01)
    assert set(range(first_after, 120)) <= got.unique
    assert link.stats()["up"]["dropped_blackout"] >= 40


def test_roaming_changes_source_and_wildcard_socket_survives(netsim: Network) -> None:
    with UdpEcho(netsim.socket("relay")) as echo:
        cli = netsim.socket("host")
        cli.bind(("0.0.0.0", 0))
        dest = (netsim.addr("relay"), echo.port)
        assert len(ping_many(cli, dest, 3)) == 3
        wifi_addr = netsim.addr("host")
        new_addr = netsim.move("host", "lte")
        assert new_addr != wifi_addr and netsim.active_link("host") == "lte"
        assert len(ping_many(cli, dest, 3, start=10)) == 3  # same socket, new path
        assert [a for a, _ in echo.sources] == [wifi_addr, new_addr]
        assert netsim.link("host", "lte").stats()["up"]["tx_packets"] >= 3
        # and back, IPv6 too
        netsim.move("host", "wifi")
        with UdpEcho(netsim.socket("relay", socket.AF_INET6)) as echo6:
            c6 = netsim.socket("host", socket.AF_INET6)
            assert len(ping_many(c6, (netsim.addr("relay", 6), echo6.port), 2)) == 2
            assert echo6.sources[0][0] == netsim.addr("host", 6)
            c6.close()
        cli.close()


def test_readdress_and_nat_rebinding_change_the_peer_view(netsim: Network) -> None:
    with UdpEcho(netsim.socket("relay")) as echo:
        cli = netsim.socket("host")
        cli.bind(("0.0.0.0", 0))
        dest = (netsim.addr("relay"), echo.port)
        assert len(ping_many(cli, dest, 1)) == 1
        old = netsim.addr("host")
        new = netsim.readdress("host")
        assert new != old
        assert len(ping_many(cli, dest, 1, start=1)) == 1
        netsim.nat("host")
        assert len(ping_many(cli, dest, 1, start=2)) == 1
        lo, hi = netsim.nat_rebind("host")
        assert len(ping_many(cli, dest, 1, start=3)) == 1
        router = netsim.link("relay", "eth0").router_addr4
        assert [a for a, _ in echo.sources[:2]] == [old, new]
        nat1, nat2 = echo.sources[2], echo.sources[3]
        assert nat1[0] == nat2[0] == router
        assert nat1[1] != nat2[1] and lo <= nat2[1] <= hi
        cli.close()


def test_block_udp_only(netsim: Network) -> None:
    srv = netsim.socket("relay", type=socket.SOCK_STREAM)
    srv.bind(("0.0.0.0", PORT))
    srv.listen()
    with UdpEcho(netsim.socket("relay")) as echo:
        cli = netsim.socket("host")
        dest = (netsim.addr("relay"), echo.port)
        netsim.block_udp("host", True)
        assert ping_many(cli, dest, 2, timeout=0.3) == []
        tcp = netsim.socket("host", type=socket.SOCK_STREAM)
        tcp.settimeout(2)
        tcp.connect((netsim.addr("relay"), PORT))  # TCP still passes
        tcp.close()
        netsim.block_udp("host", False)
        assert len(ping_many(cli, dest, 2, start=5)) == 2
        cli.close()
    srv.close()


def test_suspend_resume_process(netsim: Network) -> None:
    proc = netsim.popen("mate", ["sleep", "30"])

    def state() -> str:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def comm() -> str:
        with open(f"/proc/{proc.pid}/comm") as f:
            return f.read().strip()

    deadline = time.monotonic() + 5
    while comm() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for `ip netns exec` to exec sleep
    netsim.suspend(proc)
    deadline = time.monotonic() + 2
    while state() != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state() == "T"
    netsim.resume(proc)
    deadline = time.monotonic() + 2
    while state() == "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state() in ("S", "R")


def test_pcap_files_are_valid(netsim_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import struct

    net = netsim_factory({"a": ["eth0"], "b": ["eth0"]}, pcap_dir=tmp_path)
    tx = net.socket("a")
    rx = net.socket("b")
    rx.bind(("0.0.0.0", PORT))
    send_stream(tx, (net.addr("b"), PORT), 10)
    assert len(receive_stream(rx, until=time.monotonic() + 2, expect=10).unique) == 10
    net.flush_pcap()
    data = (tmp_path / "a.eth0.pcap").read_bytes()
    assert struct.unpack_from("<IHHiIII", data)[6] == 101
    off, records = 24, []
    while off < len(data):
        _, _, incl, _orig = struct.unpack_from("<IIII", data, off)
        records.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    udp = [r for r in records if r[0] >> 4 == 4 and r[9] == 17]
    assert len(udp) == 10
    assert socket.inet_ntoa(udp[0][12:16]) == net.addr("a")
    tx.close()
    rx.close()
