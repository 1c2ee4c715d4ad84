"""Per-session cgroups for a root relay: one per jail, bounding the memory,
processes and CPU of the session as a whole, where rlimits bound only each
process.

cgroup v2, or the v1 memory, pids and cpu hierarchies, under one
``tether-relay-<pid>-<start time>`` cgroup per relay process (removed at exit;
those of dead relays by the next relay that starts). The relay (root) makes,
fills and removes them; nothing of them is inside the jail, which sees only its
own cgroup namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tether.core.errors import TetherError

CGROUP_MEMORY = 512 * 1024 * 1024
"""Memory of a whole session (all its processes, page cache and kernel memory
charged to it; no swap where the machine lets us say so), 512 MiB: RLIMIT_AS is
per process, this bounds the sum. Beyond it the kernel's OOM killer picks a
process of that session only."""
CGROUP_PIDS = 1024
"""Tasks (processes and threads) of a whole session, as LIMIT_NPROC, but counted
by the kernel for the cgroup, also where RLIMIT_NPROC cannot apply."""
CGROUP_CPU_PERIOD = 100_000
CGROUP_CPU_QUOTA = 100_000
"""CPU time of a whole session per period (microseconds): one core at most, so a
spinning session leaves the relay's other cores to everyone else."""

V1_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(TetherError):
    """Why this machine gives the relay no usable cgroup."""


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy's directory for this relay process."""

    path: str
    v2: bool
    controllers: tuple[str, ...]


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and ``""`` for v2."""
    own: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    return own


def _v1_mounts() -> dict[str, tuple[str, str]]:
    """(mount point, mounted root) of each v1 controller's hierarchy."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] != "cgroup":
            continue
        for option in fields[sep + 3].split(","):
            mounts.setdefault(option, (fields[4], fields[3]))
    return mounts


def _start_time(pid: int | str) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None if none runs: with
    the pid it names one process, whatever pids are reused since."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5)


def _relay_gone(name: str) -> bool:
    """Whether the relay that made ``tether-relay-<pid>-<start>`` (or a former
    relay's ``tether-relay-<pid>``) no longer runs."""
    pid, _, start = name[len("tether-relay-") :].partition("-")
    if not pid.isdigit() or not (start.isdigit() or not start):
        return False  # not ours
    now = _start_time(pid)
    return now is None or (bool(start) and now != start)


def _make_parent(base: str) -> str:
    """``tether-relay-<pid>-<start time>`` in ``base``, removed at exit; stale ones
    of relays that died without cleaning up are emptied (a jail that outlived
    its relay, as a compromised one may) and removed."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            if entry.startswith("tether-relay-") and _relay_gone(entry):
                _kill_tree(os.path.join(base, entry))
                _remove_tree(os.path.join(base, entry))
    parent = os.path.join(base, f"tether-relay-{os.getpid()}-{_start_time('self')}")
    os.mkdir(parent, 0o755)
    atexit.register(_end_tree, parent, os.getpid())
    return parent


def _end_tree(path: str, owner: int) -> None:
    """At the relay's exit: end what still runs in its sessions' cgroups (a relay
    that exits on an error, or on a signal, before its sessions ended), then
    remove them. Without the kill, each busy cgroup held the exit up for
    ``_remove_tree``'s second and stayed, its jail running without its relay.
    Only in the process that made them: a forked child's exit ends nothing."""
    if os.getpid() != owner:
        return
    if os.path.isdir(path):
        _kill_tree(path)
    _remove_tree(path)


def _kill_tree(path: str) -> None:
    """SIGKILL every process in the cgroup ``path`` and below: v2's
    ``cgroup.kill``, or (v1) each pid its ``cgroup.procs`` lists, pinned by a
    pidfd and signalled only if still listed. Bounded passes: a fork racing the
    kill is caught by the next."""
    with contextlib.suppress(OSError):
        _write(os.path.join(path, "cgroup.kill"), "1")
        return
    for _ in range(10):
        found = False
        for top, dirs, _files in os.walk(path):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
            found = _kill_listed(top) or found
        if not found:
            return
        time.sleep(0.02)


def _kill_listed(path: str) -> bool:
    """SIGKILL each process ``path``'s ``cgroup.procs`` lists, pinned by a pidfd
    and signalled only if still listed; whether any was."""
    procs = os.path.join(path, "cgroup.procs")
    try:
        listed = _read(procs).split()
    except OSError:
        return False
    found = False
    for pid in listed:
        try:
            fd = os.pidfd_open(int(pid))
        except (OSError, ValueError):
            continue
        try:
            if pid in _read(procs).split():
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                found = True
        except OSError:
            pass
        finally:
            os.close(fd)
    return found


def _remove_tree(path: str) -> None:
    """rmdir a cgroup and its (empty) children, best effort and bounded."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path)
    for _ in range(20):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _setup_v2(mount: str) -> list[Hierarchy]:
    base = mount + _own_cgroups().get("", "/")
    need = {"memory", "pids", "cpu"}
    missing = need - set(_read(os.path.join(base, "cgroup.controllers")).split())
    if missing:
        raise CgroupError(f"cgroup v2 {base} lacks the {', '.join(sorted(missing))} controller")
    enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
    if need - enabled:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids +cpu")
        except OSError as exc:
            raise CgroupError(
                f"cannot enable controllers below {base} ({exc.strerror}; a cgroup with "
                "processes in it cannot delegate them: start the relay in a cgroup of its own)"
            ) from None
    parent = _make_parent(base)
    try:
        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids +cpu")
    except OSError:
        _remove_tree(parent)
        raise
    return [Hierarchy(parent, True, ("memory", "pids", "cpu"))]


def _setup_v1() -> list[Hierarchy]:
    own = _own_cgroups()
    mounts = _v1_mounts()
    by_mount: dict[str, list[str]] = {}
    bases: dict[str, str] = {}
    for c in V1_CONTROLLERS:
        if c not in mounts or c not in own:
            raise CgroupError(f"no cgroup v1 {c} hierarchy is mounted")
        point, root = mounts[c]
        rel = own[c]
        if root != "/" and (rel == root or rel.startswith(root.rstrip("/") + "/")):
            rel = rel[len(root) :] or "/"
        by_mount.setdefault(point, []).append(c)
        bases[point] = os.path.normpath(point + "/" + rel)
    made: list[Hierarchy] = []
    try:
        for point, controllers in by_mount.items():
            made.append(Hierarchy(_make_parent(bases[point]), False, tuple(controllers)))
    except OSError:
        for h in made:
            _remove_tree(h.path)
        raise
    return made


@functools.cache
def relay_cgroups() -> tuple[tuple[Hierarchy, ...], str | None]:
    """(this relay's cgroup directories, None) or ((), why there are none); set
    up on first use, once per process."""
    if os.geteuid() != 0:
        return (), "the relay is not root"
    try:
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return tuple(_setup_v2("/sys/fs/cgroup")), None
        return tuple(_setup_v1()), None
    except (OSError, CgroupError, ValueError) as exc:
        return (), str(exc)


def cgroup_warning() -> str | None:
    """Why a root relay's jailed sessions have no cgroup (only per-process
    rlimits then: no bound on a session's total memory or CPU), or None. An
    unprivileged relay never has one (nor this warning)."""
    from .jail import jail_unavailable  # imported here: jail imports this module

    if os.geteuid() != 0 or jail_unavailable() is not None:
        return None
    hierarchies, why = relay_cgroups()
    if hierarchies:
        return None
    return f"jailed sessions have no cgroup (memory, process and CPU limits per session): {why}"


class SessionCgroup:
    """One session's cgroup in each hierarchy, limits set, made and removed by
    the relay (root); nothing of it is inside the jail."""

    def __init__(self, hierarchies: Sequence[Hierarchy], name: str) -> None:
        self.dirs: list[tuple[Hierarchy, str]] = []
        try:
            for h in hierarchies:
                path = os.path.join(h.path, name)
                os.mkdir(path, 0o755)
                self.dirs.append((h, path))
                self._limit(h, path)
        except OSError:
            self.remove()
            raise

    @staticmethod
    def _limit(h: Hierarchy, path: str) -> None:
        def put(name: str, value: int | str, optional: bool = False) -> None:
            file = os.path.join(path, name)
            if optional and not os.path.exists(file):
                return
            _write(file, str(value))

        if h.v2:
            put("memory.max", CGROUP_MEMORY)
            put("memory.swap.max", 0, optional=True)
            put("pids.max", CGROUP_PIDS)
            put("cpu.max", f"{CGROUP_CPU_QUOTA} {CGROUP_CPU_PERIOD}")
            return
        if "memory" in h.controllers:
            put("memory.limit_in_bytes", CGROUP_MEMORY)
            put("memory.memsw.limit_in_bytes", CGROUP_MEMORY, optional=True)
        if "pids" in h.controllers:
            put("pids.max", CGROUP_PIDS)
        if "cpu" in h.controllers:
            put("cpu.cfs_period_us", CGROUP_CPU_PERIOD)
            put("cpu.cfs_quota_us", CGROUP_CPU_QUOTA)

    def add(self, pid: int) -> None:
        for _, path in self.dirs:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for _, path in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in _read(os.path.join(path, "cgroup.procs")).split())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in it: ``cgroup.kill`` (v2), else each listed pid,
        pinned by a pidfd and signalled only while still listed (a pid that
        exited meanwhile may already be another process's)."""
        for h, path in self.dirs:
            if h.v2:
                try:
                    _write(os.path.join(path, "cgroup.kill"), "1")
                    continue
                except OSError:  # before Linux 5.14
                    pass
            _kill_listed(path)

    def remove(self) -> None:
        """rmdir each of its directories; one still in use stays (until the
        relay's own cgroup is removed at exit)."""
        for _, path in self.dirs:
            with contextlib.suppress(OSError):
                os.rmdir(path)
