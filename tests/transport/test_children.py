"""Child processes: reaped without a thread each (the relay runs one per
session), and, for those the agent starts (``tether.transport.children.spawn``),
a loop torn down at any moment after one started still ends (asyncio's own
subprocess transport waited for ever there), every descriptor closed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from tether.transport.children import Child, spawn

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


LEFT_BEHIND = textwrap.dedent("""
    import asyncio, gc, os, sys
    from tether.transport.children import spawn, use_pidfd_watcher

    async def scenario(turns):
        task = asyncio.ensure_future(spawn(["cat"]))
        for _ in range(turns):
            await asyncio.sleep(0)
        if task.done():  # started: ours to end (cat leaves when its stdin closes)
            p = task.result()
            p.stdin.close()
            await asyncio.gather(p.stdout.read(), p.stderr.read(), p.proc.wait())

    use_pidfd_watcher()
    fds = len(os.listdir("/proc/self/fd"))
    for turns in range(24):
        asyncio.run(scenario(turns))  # cancels the spawn wherever it is
    gc.collect()  # a pipe a cancelled connect closed after the loop stopped
    print("ended", len(os.listdir("/proc/self/fd")) - fds)
""")


def test_a_loop_torn_down_just_after_a_child_started_still_ends() -> None:
    # asyncio.create_subprocess_exec here hung asyncio.run at the first turn:
    # the agent, stopped while it reconnected, never exited
    out = subprocess.run([sys.executable, "-c", LEFT_BEHIND], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ended", "0"], out.stdout  # no descriptor left open


async def test_a_child_is_waited_for_and_its_streams_work() -> None:
    before = set(os.listdir("/proc/self/fd"))
    p = await spawn(["sh", "-c", "read x; echo out-$x; echo err-$x >&2; exit 3"])
    p.stdin.write(b"7\n")
    await p.stdin.drain()
    assert p.stderr is not None
    out, err = await asyncio.gather(p.stdout.read(), p.stderr.read())
    assert (out, err) == (b"out-7\n", b"err-7\n")
    assert await p.proc.wait() == 3
    assert p.proc.returncode == 3
    p.stdin.close()
    await asyncio.sleep(0)  # the pipe transports close on the next turn
    assert set(os.listdir("/proc/self/fd")) <= before


async def test_a_killed_child_is_reaped_and_not_signalled_again() -> None:
    c = Child(subprocess.Popen(["sleep", "30"]))
    c.terminate()
    assert await asyncio.wait_for(c.wait(), 10) == -15
    c.kill()  # reaped: no signal to a pid that may be someone else's now
    assert await c.wait() == -15
