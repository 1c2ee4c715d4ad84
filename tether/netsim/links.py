"""The links of a netsim network: their addresses, the handle users fault them
with (``Link``), the forwarder's control channel, and the router's rules.

``network.Network`` owns them; what is here touches one link or one netns at a
time (the pyroute2 calls run inside the namespace, via ``nsutil.in_netns``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from .forwarder import COUNTERS, Impairment
from .topology import DIRECTIONS, normalize_params
from .units import parse_duration

if TYPE_CHECKING:
    from .network import Network

IFA_F_NODAD = 0x02

@dataclass
class LinkInfo:
    host: str
    name: str
    index: int
    router_ifname: str
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network

    @property
    def key(self) -> str:
        return f"{self.host}.{self.name}"

    @property
    def router4(self) -> str:
        return str(self.subnet4.network_address + 1)

    @property
    def router6(self) -> str:
        return str(self.subnet6.network_address + 1)


@dataclass
class HostInfo:
    name: str
    netns: str
    links: list[str]
    active: str
    num: int = 2  # host part of the address on the active link


class Control:
    """Line-JSON request/response client for the forwarder process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.lock = threading.Lock()
        self.buf = b""
        self.out_fd = proc.stdout.fileno()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("netsim forwarder did not answer")
            r, _, _ = select.select([self.out_fd], [], [], left)
            if r:
                chunk = os.read(self.out_fd, 65536)
                if not chunk:
                    raise RuntimeError(f"netsim forwarder exited (rc={self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def request(self, msg: dict[str, Any] | None, timeout: float = 5.0) -> dict[str, Any]:
        with self.lock:
            if msg is not None:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
                self.proc.stdin.flush()
            resp = json.loads(self._readline(time.monotonic() + timeout))
        if not resp.get("ok"):
            raise RuntimeError(f"netsim forwarder: {resp.get('error')}")
        return resp


class Link:
    """Handle to one host link; impairments apply per direction (``up`` = host to router)."""

    def __init__(self, net: Network, info: LinkInfo) -> None:
        self._net = net
        self._info = info
        self._params = {d: Impairment() for d in DIRECTIONS}

    host = property(lambda self: self._info.host)
    name = property(lambda self: self._info.name)
    key = property(lambda self: self._info.key, doc="``host.link``, used in stats and pcap names")
    router_ifname = property(lambda self: self._info.router_ifname)
    subnet4 = property(lambda self: self._info.subnet4)
    subnet6 = property(lambda self: self._info.subnet6)
    router_addr4 = property(lambda self: self._info.router4)
    router_addr6 = property(lambda self: self._info.router6)

    def __repr__(self) -> str:
        return f"<Link {self.key} {self.subnet4}>"

    @staticmethod
    def _dirs(direction: str) -> tuple[str, ...]:
        if direction == "both":
            return DIRECTIONS
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be up, down or both, not {direction!r}")
        return (direction,)

    def set(self, *, direction: str = "both", seed: int | None = None, **params: Any) -> Link:
        """Change impairments now; unspecified parameters keep their value.

        ``seed`` restarts this link's generators so the same traffic replays the
        same decisions.  Units: see :data:`PARAM_HELP` (``delay=0.05`` or ``"50ms"``).
        """
        fields_ = normalize_params(**params)
        for d in self._dirs(direction):
            new = Impairment(**{**asdict(self._params[d]), **fields_})
            self._net._ctl(
                {"op": "set", "link": self.key, "dir": d, "params": asdict(new), "seed": seed}
            )
            self._params[d] = new
        self._net.log("set", link=self.key, direction=direction, seed=seed, **params)
        return self

    def clear(self, direction: str = "both") -> Link:
        """Remove every impairment (a transparent link again)."""
        for d in self._dirs(direction):
            self._net._ctl({"op": "set", "link": self.key, "dir": d, "params": {}})
            self._params[d] = Impairment()
        self._net.log("clear", link=self.key, direction=direction)
        return self

    def blackout(self, seconds: float | str, direction: str = "both") -> Link:
        """Drop every packet for ``seconds`` from now, then recover on its own."""
        secs = parse_duration(seconds)
        self._net._ctl({"op": "blackout", "link": self.key, "dir": direction, "seconds": secs})
        self._net.log("blackout", link=self.key, direction=direction, seconds=secs)
        return self

    def params(self, direction: str = "up") -> Impairment:
        return self._params[self._dirs(direction)[0]]

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters ``{"up": {...}, "down": {...}}`` (see forwarder.COUNTERS)."""
        return self._net.stats()[self.key]


# --- addresses and routes (each call runs inside one netns) ---


def configure_router_link(info: LinkInfo) -> None:
    """Bring up the router's end of a link with the router's addresses (in its netns)."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=info.router_ifname)[0]
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address=info.router4, prefixlen=24)
        ipr.addr("add", index=idx, address=info.router6, prefixlen=64, flags=IFA_F_NODAD)

def configure_host_link(info: LinkInfo, active: bool, num: int) -> None:
    """Bring up a host's end of a link; the active one gets its address and routes."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=info.name)[0]
        ipr.link("set", index=idx, state="up")
        if active:
            host_addr(ipr, idx, info, num, "add")
            default_routes(ipr, idx, info)

def host_addr(ipr: IPRoute, idx: int, info: LinkInfo, num: int, op: str) -> None:
    """Add or delete (``op``) the host's address number ``num`` on a link."""
    ipr.addr(op, index=idx, address=str(info.subnet4.network_address + num), prefixlen=24)
    ipr.addr(
        op,
        index=idx,
        address=str(info.subnet6.network_address + num),
        prefixlen=64,
        **({"flags": IFA_F_NODAD} if op == "add" else {}),
    )

def default_routes(ipr: IPRoute, idx: int, info: LinkInfo) -> None:
    ipr.route("replace", dst="0.0.0.0/0", gateway=info.router4, oif=idx)
    ipr.route("replace", family=socket.AF_INET6, dst="::/0", gateway=info.router6, oif=idx)


# --- the router's rules and the counters ---


def nft_ruleset(
    router_ifnames: Mapping[str, Sequence[str]],
    udp_blocked: Iterable[str],
    natted: Mapping[str, int],
) -> str:
    """The router's nftables ruleset: UDP dropped for ``udp_blocked`` hosts, and
    the ``natted`` hosts masqueraded into a port range of their rebind generation."""

    def ifset(host: str) -> str:
        return "{ " + ", ".join(f'"{n}"' for n in router_ifnames[host]) + " }"

    fwd = []
    for host in sorted(udp_blocked):
        fwd.append(f"    iifname {ifset(host)} meta l4proto udp drop")
        fwd.append(f"    oifname {ifset(host)} meta l4proto udp drop")
    nat = []
    for host, gen in sorted(natted.items()):
        lo = 20000 + (gen % 40) * 1000
        nat.append(
            f"    iifname {ifset(host)} oifname != {ifset(host)} "
            f"meta l4proto {{ tcp, udp }} masquerade to :{lo}-{lo + 999} random"
        )
    return (
        "flush ruleset\n"
        "table inet tns {\n"
        "  chain filter_forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        + "".join(r + "\n" for r in fwd)
        + "  }\n"
        "  chain filter_output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        # a forwarding router joins ff02::2 and sends MLD reports; keep links quiet
        "    ip6 daddr ff02::/16 drop\n"
        "  }\n"
        "  chain nat_post {\n"
        "    type nat hook postrouting priority 100; policy accept;\n"
        + "".join(r + "\n" for r in nat)
        + "  }\n"
        "}\n"
    )


def format_stats(stats: Mapping[str, Mapping[str, Mapping[str, int]]]) -> str:
    """Counter table, one row per link-direction."""
    cols = [
        "rx_packets",
        "tx_packets",
        "tx_bytes",
        "dropped",
        "duplicated",
        "delayed",
        "reordered",
    ]
    head = f"{'link':<18}{'dir':<5}" + "".join(f"{c:>12}" for c in cols) + "  drops"
    lines = [head]
    for key, dirs in stats.items():
        for d, c in dirs.items():
            why = ",".join(
                f"{k[8:]}={c[k]}" for k in COUNTERS if k.startswith("dropped_") and c[k]
            )
            lines.append(f"{key:<18}{d:<5}" + "".join(f"{c[k]:>12}" for k in cols) + f"  {why}")
    return "\n".join(lines)
