"""`python3 -m bench.scale_active --quick` still produces its figures.

Figures are measured, never asserted: this only checks that they exist and are
finite and positive (the lost-key count may be zero). The driver's matching of
keys to a mate's output is checked without processes.
"""

from __future__ import annotations

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

from bench.scale_active import Typist, split_escape, split_paths  # noqa: E402

POSITIVE = [
    ": mate keystroke echo",
    "  input: mate key -> fake host",
    "  output: fake host -> mate screen",
    "  relay-side CPU",
    "  busiest relay-side process",
    "  machine CPU (every process)",
    ": relay-side PSS total",
    "  PSS per active session (with its mate)",
    "what binds first",
]
# may be zero: idle hosts that connected together ping together every PING_IDLE (10 s),
# and a quick run's window is shorter than that
NONNEGATIVE = ["  idle keep-alives sent"]


def _positive(stats: dict[str, Any]) -> bool:
    vals = [stats["median"], stats["p90"], stats["p99"]]
    return stats["runs"] > 0 and all(math.isfinite(v) and v > 0 for v in vals)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("ssh") is None,
                    reason="the benchmark needs tmux and ssh")
def test_quick_scale_active_produces_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, "-m", "bench.scale_active", "--quick", "--seconds", "4",
         "--json", str(out), "-q"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    figures = [f for f in result["figures"] if f["bench"] == "scale-active"]
    for suffix in POSITIVE:
        f = next((f for f in figures if f["metric"].endswith(suffix)), None)
        assert f is not None, f"no figure ending {suffix!r}: {[f['metric'] for f in figures]}"
        assert _positive(f["stats"]), f
    for suffix in NONNEGATIVE:
        f = next((f for f in figures if f["metric"].endswith(suffix)), None)
        assert f is not None, f"no figure ending {suffix!r}"
        assert f["stats"]["runs"] > 0 and math.isfinite(f["stats"]["median"]), f
        assert f["stats"]["median"] >= 0, f
    echo = next(f for f in figures if f["metric"].endswith(": mate keystroke echo"))
    assert echo["stats"]["runs"] >= 50  # 4 mates, 5 keys a second, 4 s
    lost = next(f for f in figures if f["metric"].startswith("  keys lost"))
    assert lost["stats"]["median"] >= 0
    assert "binds first" in p.stdout


class _Pty:
    pid = 0
    fd = -1

    def write(self, data: bytes) -> None:
        pass


def test_split_escape_keeps_a_cut_sequence() -> None:
    assert split_escape(b"ab\x1b[1;5") == (b"ab", b"\x1b[1;5")
    assert split_escape(b"ab\x1b[1;5H") == (b"ab\x1b[1;5H", b"")
    assert split_escape(b"x\x1b") == (b"x", b"\x1b")
    assert split_escape(b"x\x1b]0;title") == (b"x", b"\x1b]0;title")
    assert split_escape(b"x\x1b]0;t\x07y") == (b"x\x1b]0;t\x07y", b"")


def test_typist_matches_keys_in_order_across_reads() -> None:
    t = Typist(0, _Pty())  # type: ignore[arg-type]
    t.type_key(1.0, True)  # "a"
    t.type_key(1.2, True)  # "b"
    t0a, t0b = t.pending[0][1], t.pending[1][1]
    # a CSI cut after its parameters must not show its final letter ("C" is not a key)
    assert t.feed(b"\x1b[1;5", t0a + 0.003) == 0
    assert t.feed(b"Ha", t0a + 0.004) == 1
    assert t.feed(b"\x1b[Cb", t0b + 0.005) == 1
    assert not t.pending and [round(s[2] - s[1], 3) for s in t.samples] == [0.004, 0.005]
    inputs, outputs = split_paths([t], {0: [(t0a + 0.001, b"a"), (t0b + 0.002, b"b")]})
    assert [round(x, 1) for x in inputs] == [1.0, 2.0]
    assert [round(x, 1) for x in outputs] == [3.0, 3.0]
