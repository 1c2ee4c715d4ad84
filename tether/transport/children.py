"""asyncio's child processes without a thread each.

Python 3.11's default child watcher starts one thread per child process,
blocked in ``waitpid``: a relay with 1,000 sessions ran 1,000 threads, and a
container's pids limit (often 1,024) would turn the next ones into failed
sessions. A pidfd watcher waits in the event loop instead (Linux 5.3+);
Python 3.12 picks one by itself.
"""

from __future__ import annotations

import asyncio
import os
import sys


def use_pidfd_watcher() -> bool:
    """Install asyncio's pidfd child watcher where it helps; True if installed."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel without pidfds (or a seccomp filter refusing them)
        return False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    return True
