"""The dependency direction of DESIGN.md, checked on the source (no import side effects).

core: standard library only (plus msgpack), never asyncio, socket or subprocess;
transport: core; relay and client: core and transport, never each other;
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
    "relay": {"core", "transport", "relay"},
    "client": {"core", "transport", "client"},
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
