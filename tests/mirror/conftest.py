"""Fixtures of the mirror's planner tests."""

from __future__ import annotations

import pytest
from fake_tmux import FakeTmux


@pytest.fixture
def fake() -> FakeTmux:
    return FakeTmux()
