"""Topology (hosts joined by a router namespace) and the runtime handles to fault it.

Each host link is a pair of TUN devices, one in the host namespace and one in
the router namespace, spliced by the forwarder process (``forwarder.py``)
which applies the impairments.  The router is a real kernel router, so
forwarding, nftables NAT and UDP blocking behave as on a real network.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute

from . import forwarder as _fwd
from . import nsutil
from .forwarder import COUNTERS, Impairment
from .units import parse_burst, parse_duration, parse_probability, parse_rate

T = TypeVar("T")

V4_BASE = ipaddress.IPv4Network("198.18.0.0/15")
V6_PREFIX = "fd74:6e73:0"  # ULA; "tns"
MAX_LINKS = 512  # /24s in 198.18.0.0/15
IFA_F_NODAD = 0x02
DIRECTIONS = ("up", "down")
_HOST_RE = re.compile(r"[a-z][a-z0-9_]{0,23}")
_LINK_RE = re.compile(r"[a-z][a-z0-9_]{0,14}")

PARAM_HELP = {
    "delay": "one-way delay added per direction (duration, e.g. 100ms)",
    "jitter": "uniform +/- spread around delay; packet order is kept (duration)",
    "loss": "i.i.d. drop probability (e.g. 20% or 0.2)",
    "burst_loss": "Gilbert-Elliott bursty loss as (P_ENTER, P_EXIT) per packet",
    "burst_bad_loss": "drop probability while in the bad state (default 100%)",
    "reorder": "probability a packet is held back reorder_delay and overtaken",
    "reorder_delay": "extra hold time of a reordered packet (default 20ms)",
    "duplicate": "probability a packet is delivered twice",
    "rate": "bandwidth cap (e.g. 1mbit, 500kbit; tc units)",
    "limit": "queue length in packets before tail drop (default 1000)",
}


def normalize_params(**params: Any) -> dict[str, Any]:
    """Turn user units into forwarder fields (seconds, fractions, bits/s); reject unknown keys."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if key in ("delay", "jitter", "reorder_delay"):
            out[key] = parse_duration(value)
        elif key in ("loss", "reorder", "duplicate", "burst_bad_loss"):
            out[key] = parse_probability(value)
        elif key == "rate":
            out[key] = parse_rate(value)
        elif key == "burst_loss":
            if value in (0, "0", "off", "none", False):
                out["burst_enter"], out["burst_exit"] = 0.0, 0.0
            else:
                out["burst_enter"], out["burst_exit"] = parse_burst(value)
        elif key == "limit":
            out[key] = int(value)
            if out[key] < 1:
                raise ValueError("limit must be >= 1 packet")
        else:
            raise ValueError(f"unknown impairment {key!r}; known: {', '.join(PARAM_HELP)}")
    return out


@dataclass
class Topology:
    """Hosts and their links, plus optional initial impairments keyed ``"host.link"``."""

    hosts: dict[str, list[str]]
    impair: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> Topology:
        return cls({"a": ["eth0"], "b": ["eth0"]})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Topology:
        """Read ``[hosts] a = ["wifi", "lte"]`` and optional ``[links."a.wifi"] delay = "20ms"``."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - {"hosts", "links"}
        if unknown:
            raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
        hosts = data.get("hosts")
        if not isinstance(hosts, dict) or not hosts:
            raise ValueError(f'{path}: needs a [hosts] table, e.g. a = ["eth0"]')
        topo = cls({h: list(v) for h, v in hosts.items()}, dict(data.get("links", {})))
        topo.validate()
        return topo

    def validate(self) -> None:
        n = 0
        for host, links in self.hosts.items():
            if not _HOST_RE.fullmatch(host):
                raise ValueError(f"bad host name {host!r} (lowercase, digits, _; max 24)")
            if not links or len(set(links)) != len(links):
                raise ValueError(f"host {host!r} needs distinct links")
            for link in links:
                if not _LINK_RE.fullmatch(link) or link == "lo":
                    raise ValueError(f"bad link name {link!r} (lowercase interface name)")
            n += len(links)
        if n > MAX_LINKS:
            raise ValueError(f"too many links ({n} > {MAX_LINKS})")
        for key, params in self.impair.items():
            host, _, link = key.partition(".")
            if link not in self.hosts.get(host, []):
                raise ValueError(f"impairment for unknown link {key!r} (use host.link)")
            normalize_params(**params)


@dataclass(frozen=True)
class Event:
    """One entry of the event log; ``t`` is seconds since the network started."""

    t: float
    wall: float
    kind: str
    detail: dict[str, Any]

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"[{self.t:8.3f}s] {self.kind} {args}".rstrip()


@dataclass
class _LinkInfo:
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
class _HostInfo:
    name: str
    netns: str
    links: list[str]
    active: str
    num: int = 2  # host part of the address on the active link


class _Control:
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

    def __init__(self, net: Network, info: _LinkInfo) -> None:
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


# Strong refs: a started network stays reachable until closed, so atexit can close it.
_live: set[Network] = set()
_run_counter = 0
_counter_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.close()


class Network:
    """A set of host namespaces joined through a router namespace, with impairable links.

    Use as a context manager; everything (namespaces, devices, processes it
    started, the forwarder) is removed on exit, on exceptions and at interpreter
    exit.  Leftovers of runs that were SIGKILLed are removed by the next start
    (see :func:`nsutil.cleanup_stale`).
    """

    def __init__(
        self,
        topology: Topology | Mapping[str, Sequence[str]] | None = None,
        *,
        seed: int | None = None,
        pcap_dir: str | os.PathLike[str] | None = None,
        prefix: str = nsutil.DEFAULT_PREFIX,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        if topology is None:
            topology = Topology.default()
        elif not isinstance(topology, Topology):
            topology = Topology({h: list(ls) for h, ls in topology.items()})
        topology.validate()
        self.topology = topology
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)
        self.pcap_dir = str(pcap_dir) if pcap_dir is not None else None
        self.prefix = prefix
        self.events: list[Event] = []
        self.on_event = on_event
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self._hosts: dict[str, _HostInfo] = {}
        self._links: dict[str, Link] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._fwd: subprocess.Popen[bytes] | None = None
        self._ctrl: _Control | None = None
        self._udp_blocked: set[str] = set()
        self._nat: dict[str, int] = {}  # host -> rebind generation
        self._started = False
        self._closed = False
        self.final_stats: dict[str, dict[str, dict[str, int]]] | None = None
        global _run_counter
        with _counter_lock:
            self.run_id = f"{prefix}-{os.getpid()}-{_run_counter}"
            _run_counter += 1
        self.router_ns = f"{self.run_id}-rt"

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Network:
        """Build namespaces, TUN pairs, addresses, routes and the forwarder."""
        if self._started:
            return self
        self._started = True
        _live.add(self)
        self._t0 = time.monotonic()
        try:
            removed = nsutil.cleanup_stale(self.prefix)
            if removed:
                self.log("cleanup_stale", removed=removed)
            self._build()
            self.log("start", run_id=self.run_id, seed=self.seed)
            for key, params in self.topology.impair.items():
                host, _, link = key.partition(".")
                self.link(host, link).set(**params)
        except BaseException:
            self.close()
            raise
        return self

    def _new_ns(self, name: str, sysctls: dict[str, str]) -> None:
        nsutil.create_netns(name)
        self._namespaces.append(name)

        def setup() -> None:
            nsutil.write_sysctls(sysctls)
            with IPRoute() as ipr:
                ipr.link("set", index=1, state="up")

        nsutil.in_netns(name, setup)

    def _build(self) -> None:
        common = {
            # No spontaneous IPv6 traffic (RS, link-local), so seeded decisions
            # see only the traffic the user sends.
            "net.ipv6.conf.all.accept_ra": "0",
            "net.ipv6.conf.default.accept_ra": "0",
            "net.ipv6.conf.default.router_solicitations": "0",
            "net.ipv6.conf.default.addr_gen_mode": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        self._new_ns(
            self.router_ns,
            {**common, "net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"},
        )
        self._apply_nft()  # before any device exists, so its MLD reports are dropped
        fds: list[int] = []
        cfg_links: list[dict[str, Any]] = []
        index = 0
        try:
            for host, links in self.topology.hosts.items():
                ns = f"{self.run_id}-h-{host}"
                self._new_ns(ns, common)
                self._hosts[host] = _HostInfo(host, ns, list(links), active=links[0])
                for link in links:
                    rname = f"{host}.{link}"
                    if len(rname) > 15:
                        rname = f"l{index}"
                    info = _LinkInfo(
                        host,
                        link,
                        index,
                        rname,
                        ipaddress.IPv4Network((int(V4_BASE.network_address) + 256 * index, 24)),
                        ipaddress.IPv6Network(f"{V6_PREFIX}:{index:x}::/64"),
                    )
                    index += 1
                    hfd = nsutil.in_netns(ns, nsutil.open_tun, link)
                    fds.append(hfd)
                    rfd = nsutil.in_netns(self.router_ns, nsutil.open_tun, rname)
                    fds.append(rfd)
                    self._links[info.key] = Link(self, info)
                    cfg_links.append({"name": info.key, "host_fd": hfd, "router_fd": rfd})
                    nsutil.in_netns(self.router_ns, self._cfg_router_link, info)
                    nsutil.in_netns(ns, self._cfg_host_link, info, link == links[0], 2)
            config = {
                "seed": self.seed,
                "links": cfg_links,
                "pcap_dir": self.pcap_dir,
                "parent": os.getpid(),
            }
            if self.pcap_dir:
                os.makedirs(self.pcap_dir, exist_ok=True)
            self._fwd = subprocess.Popen(
                [sys.executable, "-I", _fwd.__file__, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,  # Ctrl-C reaches us, we stop it after reading counters
            )
            self._ctrl = _Control(self._fwd)
            self._ctrl.request(None, timeout=10.0)  # wait for "ready"
        finally:
            for fd in fds:  # the forwarder holds them now; devices die with it
                os.close(fd)

    @staticmethod
    def _cfg_router_link(info: _LinkInfo) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=info.router_ifname)[0]
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=info.router4, prefixlen=24)
            ipr.addr("add", index=idx, address=info.router6, prefixlen=64, flags=IFA_F_NODAD)

    @staticmethod
    def _cfg_host_link(info: _LinkInfo, active: bool, num: int) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=info.name)[0]
            ipr.link("set", index=idx, state="up")
            if active:
                Network._host_addr(ipr, idx, info, num, "add")
                Network._default_routes(ipr, idx, info)

    @staticmethod
    def _host_addr(ipr: IPRoute, idx: int, info: _LinkInfo, num: int, op: str) -> None:
        ipr.addr(op, index=idx, address=str(info.subnet4.network_address + num), prefixlen=24)
        ipr.addr(
            op,
            index=idx,
            address=str(info.subnet6.network_address + num),
            prefixlen=64,
            **({"flags": IFA_F_NODAD} if op == "add" else {}),
        )

    @staticmethod
    def _default_routes(ipr: IPRoute, idx: int, info: _LinkInfo) -> None:
        ipr.route("replace", dst="0.0.0.0/0", gateway=info.router4, oif=idx)
        ipr.route("replace", family=socket.AF_INET6, dst="::/0", gateway=info.router6, oif=idx)

    def close(self) -> None:
        """Tear everything down; idempotent and safe after a partial start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._ctrl is not None:
            with contextlib.suppress(Exception):
                self.final_stats = self.stats()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        if self._fwd is not None:
            with contextlib.suppress(Exception):
                assert self._ctrl is not None
                self._ctrl.request({"op": "stop"}, timeout=2.0)
            try:
                self._fwd.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._fwd.kill()
                self._fwd.wait(timeout=2.0)
            for pipe in (self._fwd.stdin, self._fwd.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                nsutil.remove_netns(ns)
        self._namespaces.clear()
        self.log("stop")
        _live.discard(self)

    # -- events / control ----------------------------------------------------
    def log(self, kind: str, **detail: Any) -> Event:
        """Append to the timestamped event log (and notify ``on_event``)."""
        ev = Event(round(time.monotonic() - self._t0, 6), time.time(), kind, detail)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)
        return ev

    def _ctl(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._ctrl is None or self._closed:
            raise RuntimeError("network is not running")
        return self._ctrl.request(msg)

    # -- lookup --------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    @property
    def links(self) -> list[Link]:
        return list(self._links.values())

    def _host(self, host: str) -> _HostInfo:
        try:
            return self._hosts[host]
        except KeyError:
            raise KeyError(f"unknown host {host!r}; hosts: {', '.join(self._hosts)}") from None

    def link(self, host: str, name: str | None = None) -> Link:
        """Link ``name`` of ``host`` (default: its active link). Also accepts ``"host.link"``."""
        if name is None and "." in host:
            host, name = host.split(".", 1)
        h = self._host(host)
        name = name or h.active
        try:
            return self._links[f"{host}.{name}"]
        except KeyError:
            raise KeyError(f"host {host!r} has no link {name!r}; links: {h.links}") from None

    def netns(self, host: str) -> str:
        """Name of the host's namespace (for ``ip netns exec``)."""
        return self._host(host).netns

    def active_link(self, host: str) -> str:
        return self._host(host).active

    def addr(self, host: str, family: int = 4) -> str:
        """Current address of ``host`` on its active link (family 4 or 6)."""
        h = self._host(host)
        info = self._links[f"{host}.{h.active}"]._info
        subnet = info.subnet4 if family == 4 else info.subnet6
        return str(subnet.network_address + h.num)

    def env(self) -> dict[str, str]:
        """``NETSIM_ADDR_<HOST>``/``NETSIM_ADDR6_<HOST>`` for commands run in hosts."""
        out = {"NETSIM_SEED": str(self.seed)}
        for h in self._hosts:
            out[f"NETSIM_ADDR_{h.upper()}"] = self.addr(h)
            out[f"NETSIM_ADDR6_{h.upper()}"] = self.addr(h, 6)
        return out

    # -- mobility ------------------------------------------------------------
    def move(self, host: str, link: str) -> str:
        """Roam ``host`` to ``link``: old address gone, new address and default route.

        Returns the new IPv4 address.  Sockets bound to the wildcard address
        keep working; those bound to the old address do not (as on a phone).
        """
        with self._lock:
            h = self._host(host)
            new = self.link(host, link)._info
            old = self._links[f"{host}.{h.active}"]._info
            if new.key == old.key:
                return self.addr(host)
            num = h.num

            def body() -> None:
                with IPRoute() as ipr:
                    oidx = ipr.link_lookup(ifname=old.name)[0]
                    nidx = ipr.link_lookup(ifname=new.name)[0]
                    with contextlib.suppress(Exception):
                        self._host_addr(ipr, oidx, old, num, "del")
                    self._host_addr(ipr, nidx, new, 2, "add")
                    self._default_routes(ipr, nidx, new)

            nsutil.in_netns(h.netns, body)
            h.active, h.num = new.name, 2
            addr = self.addr(host)
            self.log("move", host=host, frm=old.name, to=new.name, addr=addr)
            return addr

    def readdress(self, host: str) -> str:
        """Give ``host`` a new address on the same link (DHCP renumbering); returns it."""
        with self._lock:
            h = self._host(host)
            info = self._links[f"{host}.{h.active}"]._info
            old_num, new_num = h.num, 2 + (h.num - 1) % 252

            def body() -> None:
                with IPRoute() as ipr:
                    idx = ipr.link_lookup(ifname=info.name)[0]
                    self._host_addr(ipr, idx, info, old_num, "del")
                    self._host_addr(ipr, idx, info, new_num, "add")
                    self._default_routes(ipr, idx, info)

            nsutil.in_netns(h.netns, body)
            h.num = new_num
            addr = self.addr(host)
            self.log("readdress", host=host, addr=addr)
            return addr

    # -- nftables in the router ----------------------------------------------
    def _nft_ruleset(self) -> str:
        def ifset(host: str) -> str:
            names = [self._links[f"{host}.{ln}"].router_ifname for ln in self._hosts[host].links]
            return "{ " + ", ".join(f'"{n}"' for n in names) + " }"

        fwd = []
        for host in sorted(self._udp_blocked):
            fwd.append(f"    iifname {ifset(host)} meta l4proto udp drop")
            fwd.append(f"    oifname {ifset(host)} meta l4proto udp drop")
        nat = []
        for host, gen in sorted(self._nat.items()):
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

    def _apply_nft(self) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.router_ns, "nft", "-f", "-"],
            input=self._nft_ruleset().encode(),
            check=True,
            capture_output=True,
            timeout=10,
        )

    def block_udp(self, host: str, on: bool = True) -> None:
        """Drop all UDP to and from ``host`` in the router (TCP/ICMP still pass)."""
        with self._lock:
            self._host(host)
            (self._udp_blocked.add if on else self._udp_blocked.discard)(host)
            self._apply_nft()
            self.log("block_udp", host=host, on=on)

    def nat(self, host: str, on: bool = True) -> None:
        """Masquerade ``host`` behind the router (source port mapped into 20000+)."""
        with self._lock:
            self._host(host)
            if on:
                self._nat.setdefault(host, 0)
            else:
                self._nat.pop(host, None)
            self._apply_nft()
            nsutil.in_netns(self.router_ns, nsutil.flush_conntrack)
            self.log("nat", host=host, on=on)

    def nat_rebind(self, host: str) -> tuple[int, int]:
        """NAT rebinding: new external port range and forgotten mappings for every flow.

        Enables NAT for the host if needed; returns the new port range.
        """
        with self._lock:
            self._host(host)
            gen = self._nat.get(host, -1) + 1
            self._nat[host] = gen
            self._apply_nft()
            nsutil.in_netns(self.router_ns, nsutil.flush_conntrack)
            lo = 20000 + (gen % 40) * 1000
            self.log("nat_rebind", host=host, ports=f"{lo}-{lo + 999}")
            return lo, lo + 999

    # -- processes and sockets -----------------------------------------------
    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host`` (via ``ip netns exec``); killed on close."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns(host), *argv], **kwargs)
        self._procs.append(proc)
        self.log("popen", host=host, pid=proc.pid, argv=" ".join(argv)[:80])
        return proc

    def run(
        self, host: str, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``host`` to completion (bounded by ``timeout``)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns(host), *argv], timeout=timeout, **kwargs
        )

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` on a thread inside ``host``'s namespace (create sockets there)."""
        return nsutil.in_netns(self.netns(host), fn, *args, **kwargs)

    def socket(
        self,
        host: str,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_DGRAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket living in ``host``'s namespace, usable from any thread or event loop."""
        return self.call(host, socket.socket, family, type, proto)

    def suspend(self, target: subprocess.Popen[Any] | int) -> None:
        """SIGSTOP a process (a frozen peer: the network is fine, the app is not)."""
        pid = target if isinstance(target, int) else target.pid
        os.kill(pid, signal.SIGSTOP)
        self.log("suspend", pid=pid)

    def resume(self, target: subprocess.Popen[Any] | int) -> None:
        pid = target if isinstance(target, int) else target.pid
        os.kill(pid, signal.SIGCONT)
        self.log("resume", pid=pid)

    # -- observability ---------------------------------------------------------
    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{"host.link": {"up": counters, "down": counters}}`` from the forwarder."""
        if self._ctrl is None or (self._closed and self.final_stats is not None):
            return self.final_stats or {}
        return self._ctrl.request({"op": "stats"})["stats"]

    def reset_stats(self) -> None:
        self._ctl({"op": "reset"})

    def flush_pcap(self) -> None:
        """Make pcap files complete up to now (they are also flushed every 0.5 s)."""
        self._ctl({"op": "flush"})

    def format_stats(
        self, stats: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None
    ) -> str:
        """Counter table, one row per link-direction."""
        stats = self.stats() if stats is None else stats
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
