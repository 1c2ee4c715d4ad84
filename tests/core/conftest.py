"""Shared fixtures for the core tests: a private tmux server on its own socket."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from core_tmux import Tmux


@pytest.fixture(scope="module")
def tmux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmux]:
    """A tmux server with one detached 80x24 session ``base`` running ``sleep``."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = Tmux(tmp_path_factory.mktemp("tmux"))
    server.run("new-session", "-d", "-s", "base", "-x", "80", "-y", "24", "sleep 1000")
    try:
        yield server
    finally:
        server.kill()
