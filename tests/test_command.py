"""How tether's own processes, and its users, start the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tether
from tether import command


def test_the_command_runs_this_tether_whatever_the_current_directory(tmp_path: Path) -> None:
    # `python -m tether` would import a ./tether package of the user's cwd first
    fake = tmp_path / "tether"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('the wrong tether')\n")
    (fake / "__main__.py").write_text("raise SystemExit('the wrong tether')\n")
    p = subprocess.run(command("-V"), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"tether {tether.__version__}"


def _imports(argv: list[str]) -> set[str]:
    p = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()
            if line.startswith("import time:")}


def test_the_command_imports_neither_runpy_nor_re() -> None:
    # each costs every run ~4-5 ms, and a warm start runs the command twice
    imported = _imports(command("-V")[1:])
    assert "tether.cli" in imported
    assert not {"runpy", "re"} & imported


def test_the_installed_tether_command_is_the_plain_launcher() -> None:
    launcher = Path(sys.executable).parent / "tether"
    if not launcher.exists():
        pytest.skip(f"no tether command installed beside {sys.executable}")
    assert os.access(launcher, os.X_OK)
    imported = _imports([str(launcher), "-V"])
    assert "tether.cli" in imported
    assert "re" not in imported, "pip's console-script wrapper (import re) is installed"


def test_the_command_finds_its_own_tether_where_nothing_else_would(tmp_path: Path) -> None:
    # a checkout that is not installed, started from its own directory: the
    # child (-P, and here -S: no site-packages either) still imports it
    copy = tmp_path / "checkout"
    shutil.copytree(Path(tether.__file__).parent, copy / "tether",
                    ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, "-P", "-S", str(copy / "tether" / "__main__.py"), "-V"]
    p = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"tether {tether.__version__}"
