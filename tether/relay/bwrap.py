"""The bubblewrap command line of a jail (``tether.relay.jail``): what the
jailed processes see (read-only /usr without its programs, their session
directory, a private /tmp), the uid they run as and their rlimits.

Pure: it builds argv and starts nothing; ``tether.relay.jail`` picks the mode,
passes the descriptors and runs it.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import tether

JAIL_UID = 65534
JAIL_GID = 65534

LIMIT_AS = 1024 * 1024 * 1024
"""Address space per process, 1 GiB. The worker (one thread) maps well under
100 MiB; the tmux server's scrollback is what a hostile host would inflate, and
it must hit this, not the relay host's memory."""
LIMIT_NPROC = 1024
"""Processes and threads per jail: a `sleep` per replica pane (MAX_PANES=512), a
tmux client per mate, the tmux server and the worker."""
LIMIT_NOFILE = 1024
"""Open files per process: the worker holds a tty per pane and the tmux server a
pty master per pane plus two per client, so MAX_PANES=512 needs more than 512."""
LIMIT_CPU = 7 * 24 * 3600
"""CPU seconds per process, a week: stops only a runaway spinning for days (a busy
session uses a few percent of a core). Exceeding it ends that replica."""
LIMIT_FSIZE = 16 * 1024 * 1024
"""Largest regular file a jailed process may write; the worker writes none."""
TMPFS_SIZE = 16 * 1024 * 1024
"""Size of the jail's private /tmp (tmpfs is RAM)."""

PATH = "/usr/local/bin:/usr/bin:/bin"
HIDDEN = ("/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/local")
"""Replaced by empty read-only tmpfs in the jail, so it has no shell (tmux runs
``#()`` and ``run-shell`` through /bin/sh) nor any other program but
``JAIL_TOOLS`` and the Python interpreter."""
JAIL_TOOLS = ("tmux", "sleep", "prlimit")
"""The programs run inside the jail: the replica tmux, its panes' command and
the rlimit setter."""


def _tool(name: str) -> str:
    return shutil.which(name, path=PATH) or name


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _hidden(path: str) -> bool:
    return any(_within(path, h) for h in _hidden_dirs())


@functools.cache
def _hidden_dirs() -> tuple[str, ...]:
    return tuple(h for h in HIDDEN if os.path.isdir(h) and not os.path.islink(h))


def _python_roots() -> list[str]:
    """Directories the worker's interpreter and imports need, beyond /usr: a
    prefix that is one of the hidden directories (Python in /usr/local) brings
    back only its lib."""
    roots: list[str] = []
    candidates = []
    for p in (sys.base_prefix, sys.prefix):
        p = os.path.realpath(p)
        candidates.append(os.path.join(p, "lib") if p in _hidden_dirs() else p)
    candidates.append(os.path.realpath(os.path.dirname(tether.__file__)))
    for p in candidates:
        if any(_within(p, r) for r in roots) or (_within(p, "/usr") and not _hidden(p)):
            continue
        roots = [r for r in roots if not _within(r, p)] + [p]
    return roots


def _chain(path: str) -> list[tuple[str, str | None]]:
    """Every path of ``path``'s symlink chain as (path, link target or None for
    the file at its end), with directory symlinks resolved as the jail has them."""
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    path = os.path.abspath(path)
    while path not in seen and len(seen) < 40:
        seen.add(path)
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if not os.path.islink(path):
            out.append((path, None))
            break
        target = os.readlink(path)
        out.append((path, target))
        path = os.path.join(os.path.dirname(path), target)
    return out


def _exposed() -> list[str]:
    """bwrap arguments putting back, into the hidden directories, exactly the
    programs the jail runs (and every symlink leading to them)."""
    args: list[str] = []
    done: set[str] = set()
    for program in [sys.executable, *(_tool(t) for t in JAIL_TOOLS)]:
        for path, target in _chain(program):
            if path in done or not _hidden(path):
                continue
            done.add(path)
            if target is None:
                args += ["--ro-bind", path, path]
            else:
                args += ["--symlink", target, path]
    return args


def _inner(
    directory: str, binds: list[tuple[str, str]], dir_source: str, seccomp_fd: int | None,
    as_pid_1: bool = False,
) -> list[str]:
    """The jail proper: bwrap, then prlimit, as whoever runs it."""
    argv = [
        _tool("bwrap"),
        *(["--as-pid-1"] if as_pid_1 else []),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for h in _hidden_dirs():
        argv += ["--size", "4096", "--perms", "0755", "--tmpfs", h]
    argv += [
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/sbin", "/sbin",
        # /tmp first: the binds below may live under /tmp (a venv in a CI checkout)
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(TMPFS_SIZE), "--tmpfs", "/tmp",
    ]  # fmt: skip
    for source, dest in binds:
        argv += ["--ro-bind", source, dest]
    argv += _exposed()
    for h in _hidden_dirs():
        argv += ["--remount-ro", h]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    pkg_parent = os.path.dirname(os.path.dirname(os.path.realpath(tether.__file__)))
    argv += [
        "--bind", dir_source, directory,
        "--uid", str(JAIL_UID),
        "--gid", str(JAIL_GID),
        "--cap-drop", "ALL",
        "--chdir", directory,
        "--clearenv",
        "--setenv", "PATH", PATH,
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PYTHONPATH", pkg_parent,
        "--setenv", "HOME", directory,
        # glibc reserves 64 MiB of address space per thread arena: threads (none
        # in the worker now, but tmux or a future change) must not exhaust
        # RLIMIT_AS without using memory
        "--setenv", "MALLOC_ARENA_MAX", "2",
        "--",
        _tool("prlimit"),
        f"--as={LIMIT_AS}",
        f"--nproc={LIMIT_NPROC}",
        f"--nofile={LIMIT_NOFILE}",
        f"--cpu={LIMIT_CPU}",
        f"--fsize={LIMIT_FSIZE}",
        "--core=0",
        "--",
    ]  # fmt: skip
    return argv


def command(
    directory: str, seccomp_fd: int | None, block_fd: int | None, stage: str | None,
    as_pid_1: bool = False,
) -> list[str]:
    """The argv prefix running a command jailed with ``directory`` writable.

    ``stage`` None: one bwrap as the caller's uid (``self`` mode). Otherwise the
    caller is root (``nobody`` mode): an outer bwrap binds the paths the jail
    needs under a tmpfs on ``stage`` and drops to ``JAIL_UID`` with setpriv
    before the jail's own bwrap, so uid 65534 need not be able to read them.

    ``as_pid_1``: the command is the jail's PID 1, with no bwrap reaper above
    it (a process less); it must reap orphans itself (a tmux server does), and
    when it exits the kernel ends every process of the jail.
    """
    directory = os.path.realpath(directory)
    roots = _python_roots()
    block = [] if block_fd is None else ["--block-fd", str(block_fd)]
    if stage is None:
        inner = _inner(directory, [(r, r) for r in roots], directory, seccomp_fd, as_pid_1)
        return [inner[0], *block, *inner[1:]]
    outer = [_tool("bwrap"), *block, "--die-with-parent", "--dev-bind", "/", "/"]
    outer += ["--tmpfs", stage]
    binds = []
    for i, root in enumerate(roots):
        outer += ["--ro-bind", root, f"{stage}/{i}"]
        binds.append((f"{stage}/{i}", root))
    outer += [
        "--bind", directory, f"{stage}/dir",
        "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        "--",
        _tool("setpriv"), "--reuid", str(JAIL_UID), "--regid", str(JAIL_GID), "--clear-groups",
        "--",
    ]  # fmt: skip
    return outer + _inner(directory, binds, f"{stage}/dir", seccomp_fd, as_pid_1)
