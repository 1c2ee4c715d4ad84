"""Child processes are reaped without a thread each (the relay runs one per session)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import asyncio, threading
from tether.transport.children import use_pidfd_watcher

async def main():
    procs = [await asyncio.create_subprocess_exec("sh", "-c", f"sleep 0.3; exit {i}")
             for i in range(20)]
    threads = threading.active_count()
    codes = [await p.wait() for p in procs]
    print(threads, codes == list(range(20)))

print(use_pidfd_watcher())
asyncio.run(main())
"""


def test_twenty_children_are_reaped_by_one_thread() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("no pidfds here (Python 3.12+ uses them by itself, or the kernel lacks them)")
    assert out[1:] == ["1", "True"], "one thread, every exit status right"
