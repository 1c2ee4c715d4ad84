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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pyroute2 import IPRoute

from . import forwarder as _fwd
from . import links as _links
from . import nsutil
from .links import Control, HostInfo, Link, LinkInfo
from .topology import PARAM_HELP as PARAM_HELP
from .topology import V4_BASE, V6_PREFIX, Event, Topology
from .topology import normalize_params as normalize_params

T = TypeVar("T")

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
        self._hosts: dict[str, HostInfo] = {}
        self._links: dict[str, Link] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._fwd: subprocess.Popen[bytes] | None = None
        self._ctrl: Control | None = None
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
        try:
            for host, links in self.topology.hosts.items():
                ns = f"{self.run_id}-h-{host}"
                self._new_ns(ns, common)
                self._hosts[host] = HostInfo(host, ns, list(links), active=links[0])
                for link in links:
                    hfd, rfd, info = self._add_link(host, ns, link, link == links[0])
                    fds += [hfd, rfd]
                    cfg_links.append({"name": info.key, "host_fd": hfd, "router_fd": rfd})
            self._start_forwarder(cfg_links, fds)
        finally:
            for fd in fds:  # the forwarder holds them now; devices die with it
                os.close(fd)

    def _add_link(self, host: str, ns: str, link: str, active: bool) -> tuple[int, int, LinkInfo]:
        """A TUN device in the host's netns and one in the router's, addressed;
        returns their descriptors (for the forwarder to splice) and the link."""
        index = len(self._links)
        rname = f"{host}.{link}"
        if len(rname) > 15:
            rname = f"l{index}"
        info = LinkInfo(
            host,
            link,
            index,
            rname,
            ipaddress.IPv4Network((int(V4_BASE.network_address) + 256 * index, 24)),
            ipaddress.IPv6Network(f"{V6_PREFIX}:{index:x}::/64"),
        )
        hfd = nsutil.in_netns(ns, nsutil.open_tun, link)
        try:
            rfd = nsutil.in_netns(self.router_ns, nsutil.open_tun, rname)
        except BaseException:
            os.close(hfd)
            raise
        self._links[info.key] = Link(self, info)
        try:
            nsutil.in_netns(self.router_ns, _links.configure_router_link, info)
            nsutil.in_netns(ns, _links.configure_host_link, info, active, 2)
        except BaseException:
            os.close(hfd)
            os.close(rfd)
            raise
        return hfd, rfd, info

    def _start_forwarder(self, cfg_links: list[dict[str, Any]], fds: list[int]) -> None:
        """Start the forwarder splicing the links' TUN pairs; wait until it is ready."""
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
        self._ctrl = Control(self._fwd)
        self._ctrl.request(None, timeout=10.0)  # wait for "ready"

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

    def _host(self, host: str) -> HostInfo:
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

    def exec_argv(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside ``host`` (``ip netns exec``),
        for processes a caller starts itself (with its own pipes or pty)."""
        return ["ip", "netns", "exec", self.netns(host)]

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
                        _links.host_addr(ipr, oidx, old, num, "del")
                    _links.host_addr(ipr, nidx, new, 2, "add")
                    _links.default_routes(ipr, nidx, new)

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
                    _links.host_addr(ipr, idx, info, old_num, "del")
                    _links.host_addr(ipr, idx, info, new_num, "add")
                    _links.default_routes(ipr, idx, info)

            nsutil.in_netns(h.netns, body)
            h.num = new_num
            addr = self.addr(host)
            self.log("readdress", host=host, addr=addr)
            return addr

    # -- nftables in the router ----------------------------------------------
    def _nft_ruleset(self) -> str:
        ifnames = {
            host: [self._links[f"{host}.{ln}"].router_ifname for ln in info.links]
            for host, info in self._hosts.items()
        }
        return _links.nft_ruleset(ifnames, self._udp_blocked, self._nat)

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
        proc = subprocess.Popen([*self.exec_argv(host), *argv], **kwargs)
        self._procs.append(proc)
        self.log("popen", host=host, pid=proc.pid, argv=" ".join(argv)[:80])
        return proc

    def run(
        self, host: str, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``host`` to completion (bounded by ``timeout``)."""
        return subprocess.run(
            [*self.exec_argv(host), *argv], timeout=timeout, **kwargs
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
        """Counter table, one row per link-direction (default: the counters now)."""
        return _links.format_stats(self.stats() if stats is None else stats)
