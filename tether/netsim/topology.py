"""What a netsim network is made of: hosts, their links, the impairment
parameters in user units, and the event log's entries. Plain data, checked
before anything is built (``network.Network`` builds it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .units import parse_burst, parse_duration, parse_probability, parse_rate

V4_BASE = ipaddress.IPv4Network("198.18.0.0/15")
V6_PREFIX = "fd74:6e73:0"  # ULA; "tns"
MAX_LINKS = 512  # /24s in 198.18.0.0/15
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
