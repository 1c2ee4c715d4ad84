from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Host, Mate, RelayProcess, have_tools

missing = have_tools()
if missing:
    pytest.skip(f"end-to-end tests need real tools: {missing}", allow_module_level=True)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path_factory.mktemp("relay"))
    yield r
    r.close()


@pytest.fixture
def host(relay: RelayProcess, tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path / "host", relay.conf())
    yield h
    h.close()


@pytest.fixture
def mates(tmp_path: Path) -> Iterator[list[Mate]]:
    made: list[Mate] = []
    yield made
    for m in made:
        m.close()
