"""Every exception class tether defines derives from one base (issue 13, part 5).

``TetherError`` for tether, ``NetsimError`` for ``tether.netsim`` (which imports
nothing of tether). ``tether.testing`` is the tests' harness: its
``HarnessError`` is an ``AssertionError`` on purpose, so pytest reports it as a
failed check.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import tether
from tether.core.errors import TetherError
from tether.netsim.errors import NetsimError

SKIPPED_PACKAGES = ("tether.testing",)
"""Not tether's own errors: the harness for tests and benchmarks."""

PENDING: set[str] = set()
"""Classes still to move under ``TetherError`` (none left)."""


def _modules() -> list[str]:
    """Every module of tether that imports without side effects (no ``__main__``)."""
    names = []
    for info in pkgutil.walk_packages(tether.__path__, "tether."):
        if info.name.endswith("__main__") or info.name.startswith(SKIPPED_PACKAGES):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency (netsim's pyroute2) is missing
            continue
        names.append(info.name)
    return names


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name):
                found[f"{name}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_derives_from_the_base() -> None:
    found = _defined_exceptions()
    assert "tether.transport.link.LinkClosed" in found  # the walk did see the tree
    bad = []
    for name, cls in sorted(found.items()):
        base = NetsimError if name.startswith("tether.netsim.") else TetherError
        if not issubclass(cls, base) and name not in PENDING:
            bad.append(f"{name} does not derive from {base.__name__}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["RemoteProtocolError", "LocalProtocolError", "AuthError"])
def test_core_errors(name: str) -> None:
    import tether.core.errors as errors

    assert issubclass(getattr(errors, name), TetherError)
