"""The dependency direction of DESIGN.md, checked on the source (no import side effects).

core: standard library only (plus msgpack), never asyncio, socket or subprocess;
transport: core; mirror: core and transport, never relay or client;
relay and client: core, transport and mirror, never each other;
netsim: nothing of tether.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tether"
IO_MODULES = {"asyncio", "socket", "subprocess", "selectors", "asyncssh", "aioquic", "os"}
ALLOWED = {
    "core": {"core"},
    "transport": {"core", "transport"},
    "mirror": {"core", "transport", "mirror"},
    "relay": {"core", "transport", "mirror", "relay"},
    "client": {"core", "transport", "mirror", "client"},
    "netsim": {"netsim"},
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = path.parent.relative_to(ROOT.parent).parts[: len(
                    path.parent.relative_to(ROOT.parent).parts) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "tether" and len(parts) > 1:
                if parts[1] not in ALLOWED[package] and parts[1] not in ("__init__",):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif package == "core" and parts[0] in IO_MODULES:
                bad.append(f"{path.relative_to(ROOT)} imports {name} (core stays sans-I/O)")
    assert not bad, "\n".join(bad)


HEAVY = {
    "asyncio", "dataclasses", "typing", "shlex",
    "tether.core.screen", "tether.transport.tmux", "tether.mirror.capture",
    "tether.mirror.run_async",
}  # fmt: skip
"""What the jailed worker must not import through the mirror: it runs once per
session, and each of these costs it memory (``dataclasses`` pulls in ``inspect``)."""


def test_mirror_apply_stays_light() -> None:
    for name in ("__init__", "plan", "apply", "run_sync"):
        path = ROOT / "mirror" / f"{name}.py"
        heavy = imports(path) & HEAVY
        assert not heavy, f"mirror/{name}.py imports {sorted(heavy)}"

