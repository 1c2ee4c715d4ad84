"""pytest fixtures for tests that need a faulty network.

Load with ``pytest_plugins = ["tether.netsim.pytest_plugin"]``.  Fixtures skip
(never fail) where namespaces or TUN are unavailable, so the suite stays green
on laptops and unprivileged CI.  Seeds default to a hash of the test id, so a
failing test replays the same decisions; set ``NETSIM_SEED`` to override.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from . import nsutil
from .network import Network, Topology

DEFAULT_TOPOLOGY: dict[str, list[str]] = {
    "host": ["wifi", "lte"],
    "relay": ["eth0"],
    "mate": ["eth0"],
}

NetworkFactory = Callable[..., Network]


def netsim_skip_reason() -> str | None:
    """Reason to skip netsim tests on this machine, or None when they can run."""
    return nsutil.unavailable_reason()


def _seed_for(request: pytest.FixtureRequest) -> int:
    env = os.environ.get("NETSIM_SEED")
    if env:
        return int(env)
    return zlib.crc32(request.node.nodeid.encode()) or 1


@pytest.fixture
def netsim_factory(request: pytest.FixtureRequest) -> Iterator[NetworkFactory]:
    """Build extra networks: ``netsim_factory({"a": ["eth0"]}, seed=1)``; all closed at teardown."""
    reason = netsim_skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[Network] = []
    base_seed = _seed_for(request)

    def make(
        topology: Topology | Mapping[str, Sequence[str]] | None = None, **kwargs: Any
    ) -> Network:
        kwargs.setdefault("seed", base_seed + len(made))
        net = Network(topology if topology is not None else DEFAULT_TOPOLOGY, **kwargs)
        made.append(net)
        net.start()
        print(f"netsim: run {net.run_id} seed={net.seed}")
        request.node.user_properties.append(("netsim_seed", net.seed))
        return net

    try:
        yield make
    finally:
        for net in reversed(made):
            net.close()


@pytest.fixture
def netsim(netsim_factory: NetworkFactory) -> Network:
    """A running network: ``host`` (links ``wifi``, ``lte``), ``relay`` and ``mate`` (``eth0``).

    ``host`` starts on ``wifi``.  Impair with ``netsim.link("host", "wifi").set(...)``,
    roam with ``netsim.move("host", "lte")``; torn down after the test.
    """
    return netsim_factory(DEFAULT_TOPOLOGY)
