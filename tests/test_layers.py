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


TOP = {"cli", "agent", "zygote", "__main__"}
"""The top layer: the command line, the host agent's process main, the zygote."""
TOP_ALLOWED = {
    "__main__": {"cli"},
    "cli": {"agent", "zygote"},
    "zygote": {"agent"},
    "agent": set(),
}
"""Among themselves imports go one way (the agent/zygote circle is cut)."""


def top_imports(path: Path) -> set[str]:
    """``imports`` plus ``from tether import agent``-style names."""
    names = imports(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "tether" and not node.level:
            names.update(f"tether.{alias.name}" for alias in node.names)
    return names


def test_top_layer_cli_agent_zygote() -> None:
    bad = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in top_imports(path):
                parts = name.split(".")
                if parts[0] == "tether" and len(parts) > 1 and parts[1] in TOP:
                    bad.append(f"{path.relative_to(ROOT)} imports {name} (the top layer)")
    for top, allowed in TOP_ALLOWED.items():
        for name in top_imports(ROOT / f"{top}.py"):
            parts = name.split(".")
            if parts[0] != "tether" or len(parts) < 2:
                continue
            if parts[1] == "testing":
                bad.append(f"{top}.py imports {name} (tether.testing is for tests)")
            elif parts[1] in TOP and parts[1] not in allowed:
                bad.append(f"{top}.py imports {name} (top-layer imports go one way)")
    assert not bad, "\n".join(bad)
