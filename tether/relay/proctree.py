"""Finding and killing a process tree through pidfds.

A jail's processes can exit and have their pid numbers reused at any moment, so
each is pinned by a pidfd (checked to still be the child of the parent we
found it under) before it is signalled, and watched through that pidfd after.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal


def ppid(pid: int) -> int | None:
    """The parent of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads started, from /proc (``CONFIG_PROC_CHILDREN``,
    in every distribution kernel): a walk of one tree, not of every process on the
    machine, which a relay with thousands of sessions would pay per session."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def descendants(root: int) -> list[tuple[int, int]]:
    """Every process below ``root`` now as (pid, parent), parents first."""
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        parent = todo.pop(0)
        for child in children(parent):
            out.append((child, parent))
            todo.append(child)
    return out


def is_pid_ns_init(pid: int) -> bool:
    """Whether ``pid`` is pid 1 of a PID namespace below ours: SIGKILL to it makes
    the kernel kill every process of that namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) >= 2 and ids[-1] == "1"
    except OSError:
        pass
    return False


def pidfd(pid: int, parent: int | None = None) -> int | None:
    """A pidfd for ``pid`` if it is (still) the process we mean: a child of
    ``parent`` when given, checked after the pidfd pins it."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if parent is not None and ppid(pid) != parent:
        os.close(fd)
        return None
    return fd


def alive(fd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not p.poll(0)


def kill(pid: int) -> None:
    """SIGKILL ``pid`` through a pidfd, if it still exists."""
    fd = pidfd(pid)
    if fd is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


def kill_tree(pid: int, fd: int) -> list[int]:
    """SIGKILL ``pid`` (pinned by its pidfd ``fd``) and every process below it,
    PID-namespace inits first (the kernel then kills their namespaces whole).
    Returns the pidfds of all of them, ``fd`` included, to watch with ``alive``
    and close."""
    found: list[tuple[int, int]] = [(pid, fd)]
    for child, parent in descendants(pid):
        child_fd = pidfd(child, parent)
        if child_fd is not None:
            found.append((child, child_fd))
    found.sort(key=lambda p: not is_pid_ns_init(p[0]))
    for _, f in found:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(f, signal.SIGKILL)
    return [f for _, f in found]
