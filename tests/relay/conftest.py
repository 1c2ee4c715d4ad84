"""A live (unjailed) replica for the replica tests: fed by a worker process, or
by the relay's own process (``DirectReplica``); every test runs against both."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_replica import Worker


@pytest.fixture(params=["direct", "worker"])
async def worker(request: pytest.FixtureRequest) -> AsyncIterator[Worker]:
    w = Worker(request.param)
    await w.handle.start()
    yield w
    await w.handle.close()
