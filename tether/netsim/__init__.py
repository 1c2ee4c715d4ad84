"""tether.netsim: a standalone network-fault harness (namespaces, TUN, userspace impairments).

Imports nothing else from tether, so it can test any networked program.
"""

from .forwarder import COUNTERS, Impairment
from .network import PARAM_HELP, Event, Link, Network, Topology, normalize_params
from .nsutil import cleanup_stale, unavailable_reason

__all__ = [
    "COUNTERS",
    "PARAM_HELP",
    "Event",
    "Impairment",
    "Link",
    "Network",
    "Topology",
    "cleanup_stale",
    "normalize_params",
    "unavailable_reason",
]
