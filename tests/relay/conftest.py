"""A live (unjailed) replica worker for the replica tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from test_replica import Worker


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker()
    await w.handle.start()
    yield w
    await w.handle.close()
