"""The benchmarks still work: `bench/run.py --quick` on a small subset produces figures.

Figures are measured, never asserted: this only checks that they exist and are
positive and finite. Targets are for `python3 bench/run.py` to report.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Figure, percentile, visible  # noqa: E402
from bench.run import table  # noqa: E402
from bench.startup import parse_importtime  # noqa: E402

pytestmark = pytest.mark.e2e

MAIN = {
    "echo": ["mate keystroke echo", "  input: mate key -> host screen",
             "  output: host screen -> mate screen"],
    "wire": ["host->relay bytes", "relay->mate bytes"],
}


def _positive(stats: dict[str, Any]) -> bool:
    vals = [stats["median"], stats["p90"], stats["p99"]]
    return stats["runs"] > 0 and all(math.isfinite(v) and v > 0 for v in vals)


@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("ssh") is None,
                    reason="the benchmarks need tmux and ssh")
def test_quick_benchmarks_produce_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", *MAIN, "--json",
         str(out), "-q"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    figures = {(f["bench"], f["metric"]): f for f in result["figures"]}
    for bench, metrics in MAIN.items():
        for metric in metrics:
            f = figures.get((bench, metric))
            assert f is not None, f"no figure {bench}/{metric}: {sorted(figures)}"
            assert _positive(f["stats"]), f
            if f["floor_stats"] is not None:
                assert _positive(f["floor_stats"]), f
                assert f["ratio_to_floor"] is not None and f["ratio_to_floor"] > 0
    # the table shows them, each next to its floor
    assert "mate keystroke echo" in p.stdout and "host->relay bytes" in p.stdout
    assert len(figures[("echo", "mate keystroke echo")]["values"]) >= 30


def test_helpers() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert visible(b"\x1b[?25l\x1b[1;5Hx\x1b]0;title\x07y\x1b(Bz") == b"xyz"
    text = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |     _b",
        "import time:       200 |        300 |   b",
        "import time:        50 |        350 | a",
    ])
    (a,) = parse_importtime(text)
    assert (a.name, a.cum_us, a.children[0].name, a.children[0].children[0].name) == (
        "a", 350, "b", "_b")
    f = Figure("x", "y", "ms", [2.0, 4.0], [1.0, 1.0], "floor", "t", True, [[2.0], [4.0]])
    assert f.ratio == 3.0 and f.spread == [2.0, 4.0]
    assert "3.00" in table([f])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _bench_imports_problems(path: Path) -> list[str]:
    """What ``path`` takes from ``tests`` or from tether's private names."""
    tree = ast.parse(path.read_text(), str(path))
    bad: list[str] = []
    tether_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tests" or any(map(_private, a.name.split("."))):
                    bad.append(f"import {a.name}")
                if a.name.split(".")[0] == "tether":
                    tether_names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            if root == "tests":
                bad.append(f"from {node.module}")
            if root == "tether":
                for a in node.names:
                    if _private(a.name) or any(map(_private, node.module.split("."))):
                        bad.append(f"from {node.module} import {a.name}")
                    tether_names.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in tether_names:
                bad.append(f"{base.id}...{node.attr}")
    return [f"{path.name}:{b}" for b in bad]


def test_bench_uses_only_public_names() -> None:
    """Benchmarks build on ``tether.testing`` and public APIs: no ``tests``, no ``_x``."""
    bad = [b for f in sorted((ROOT / "bench").glob("*.py")) for b in _bench_imports_problems(f)]
    assert bad == []


def test_bench_entry_points_show_help() -> None:
    for module in ("bench.roaming", "bench.scale_fleet"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        assert p.returncode == 0 and "usage:" in p.stdout, (module, p.stderr)
