"""The jail around a session's replica worker: bubblewrap namespaces, a seccomp
filter, rlimits and, where the machine allows, a cgroup.

A hostile host controls every byte its replica renders, so the worker and its
tmux are treated as compromised-on-arrival. In the jail they see read-only /usr
without its programs (only tmux, sleep, prlimit and Python: no shell) and
Python, their own session directory (for the tmux socket) and nothing else;
they have no network; their own PID, IPC, UTS, user and cgroup namespaces, in
which they cannot create further user namespaces; uid 65534 with no
capabilities and no_new_privs; a seccomp filter (``tether.relay.seccomp``);
and resource limits. One session can then neither read the relay's files,
reach the network, see other sessions, nor starve the relay. They hold nothing
of the relay's but their two sockets: stdin, stdout and stderr are /dev/null.

Two ways to run it, picked once by a probe (``jail_unavailable``):

``nobody`` (relay runs as root, the default there)
    The jailed processes are really uid 65534 outside too, so an escape from
    the namespaces gains nothing, and RLIMIT_NPROC applies (the kernel never
    enforces it for real uid 0). uid 65534 may not be able to read the Python
    install or the session directory (e.g. under /root, or a 0700 parent), so a
    first bwrap, as root with only a mount namespace, exposes exactly those
    paths under a staging tmpfs, drops to 65534 with ``setpriv``, and runs the
    jail's bwrap unprivileged from there.
``self`` (relay runs unprivileged, or the above is impossible)
    One bwrap as the relay's uid, mapped to 65534 inside.

The rlimits are set by ``prlimit`` *inside* the jail, after bwrap made the user
namespace: the kernel counts RLIMIT_NPROC per (user namespace, uid), so the
limit is per session instead of shared by every process of one uid.

A root relay also puts each jail in its own cgroup (``tether.relay.cgroup``),
bounding memory, processes and CPU of the session as a whole. The outermost
bwrap waits on ``--block-fd`` until the relay has moved it into the cgroup, so
no process of the jail ever runs outside it.

The relay never acts on a path inside the session directory while a jail runs
(the jail may have replaced any of it with a symlink): it ends a jail by its
processes (``Jail.kill``), SIGKILLing the jail's PID namespace through a pidfd
(``tether.relay.proctree``), and only then removes the directory with
``shutil.rmtree``, which follows no symlink.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import tether

from . import proctree, seccomp
from .cgroup import SessionCgroup, relay_cgroups

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
SHELLS = ("/bin/sh", "/usr/bin/sh", "/usr/bin/dash", "/usr/bin/bash", "/usr/bin/perl")

_PROBE = "; ".join(
    [
        "import os, shutil, tether.relay.worker",
        "os.openpty()",
        "assert shutil.which('tmux') and shutil.which('sleep'), 'no tmux or sleep in the jail'",
        f"assert not any(os.path.lexists(p) for p in {SHELLS!r}), 'a shell in the jail'",
        "status = open('/proc/self/status').read()",
        f"assert {not seccomp.supported()} or '\\nSeccomp:\\t2' in status, 'no seccomp filter'",
    ]
)
"""What a jail must allow (the worker's imports, a pty, tmux and its panes'
program) and what it must not have (a shell, an unfiltered kernel)."""


class JailError(Exception):
    """Why a jail cannot be built or started here."""


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


def _stage_dir() -> str:
    """An existing directory the outer bwrap may hide under its staging tmpfs."""
    for d in ("/mnt", "/media", "/srv", "/run"):
        if os.path.isdir(d) and not os.path.islink(d):
            return d
    raise JailError("no /mnt, /media, /srv or /run to stage the jail's binds in")


def _inner(
    directory: str, binds: list[tuple[str, str]], dir_source: str, seccomp_fd: int | None
) -> list[str]:
    """The jail proper: bwrap, then prlimit, as whoever runs it."""
    argv = [
        _tool("bwrap"),
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


def _command(mode: str, directory: str, seccomp_fd: int | None, block_fd: int | None) -> list[str]:
    directory = os.path.realpath(directory)
    roots = _python_roots()
    block = [] if block_fd is None else ["--block-fd", str(block_fd)]
    if mode == "self":
        inner = _inner(directory, [(r, r) for r in roots], directory, seccomp_fd)
        return [inner[0], *block, *inner[1:]]
    stage = _stage_dir()
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
    return outer + _inner(directory, binds, f"{stage}/dir", seccomp_fd)


# --- the jail --------------------------------------------------------------------


class Jail:
    """One jailed command: how to start it and how to end it.

    Spawn ``[*jail.argv, program, ...]`` with ``pass_fds`` including
    ``jail.pass_fds`` (and stdin, stdout, stderr not the relay's), then call
    ``started(pid)`` at once: the jail waits for it. End it with ``kill()``,
    wait until ``gone()`` (or ``wait()``), then ``close()``.
    """

    def __init__(self, mode: str, directory: str) -> None:
        self._pidfds: list[int] = []
        self._pid: int | None = None
        self._root: int | None = None
        """A pidfd of the spawned process: its pid is not trusted once it exited
        (the relay reaps it, and the number may be reused)."""
        self._block: tuple[int, int] | None = None
        self._seccomp: int | None = None
        self.cgroup: SessionCgroup | None = None
        hierarchies, _ = relay_cgroups()
        try:
            if hierarchies:
                self.cgroup = SessionCgroup(hierarchies, os.path.basename(directory))
                self._block = os.pipe()
            if seccomp.supported():
                self._seccomp = _program_fd()
            block = self._block[0] if self._block else None
            self.argv = _command(mode, directory, self._seccomp, block)
        except BaseException:
            self.close()
            raise
        self.pass_fds = tuple(fd for fd in (self._seccomp, block) if fd is not None)

    def started(self, pid: int) -> None:
        """Let the jail spawned as ``pid`` run, inside its cgroup. Race-free: its
        outermost bwrap blocks before starting anything, so moving ``pid`` and
        then every process below it moves every process there will be."""
        self._pid = pid
        self._root = proctree.pidfd(pid, os.getpid())
        if self._seccomp is not None:
            os.close(self._seccomp)
            self._seccomp = None
        if self._block is None:
            return
        try:
            if self.cgroup is not None:
                # Each move costs ~1.5 ms per hierarchy (the kernel waits for RCU),
                # so only what runs the jail moves: the outer bwrap's child (it
                # blocks on the gate; the outer bwrap only waits for it), or the
                # outer bwrap itself if it has not forked yet.
                below = proctree.descendants(pid)
                if not below:
                    self.cgroup.add(pid)
                    below = proctree.descendants(pid)  # forked before the move
                for child, _ in below:
                    self.cgroup.add(child)
        except OSError as exc:
            self.kill()
            raise JailError(f"cannot put the jail in its cgroup: {exc}") from None
        os.write(self._block[1], b"x")
        for fd in self._block:
            os.close(fd)
        self._block = None

    def kill(self) -> None:
        """SIGKILL every process of the jail, touching nothing it can write: its
        PID namespace's init first (the kernel then kills the namespace), then
        the bwrap and setpriv processes above it, then anything left in its
        cgroup."""
        if self._pid is not None and self._root is not None and proctree.alive(self._root):
            self._pidfds += proctree.kill_tree(self._pid, self._root)
            self._root = None
        if self.cgroup is not None:
            self.cgroup.kill()
        if self._block is not None:  # never released: closing it now lets a dead jail go
            for fd in self._block:
                os.close(fd)
            self._block = None

    def gone(self) -> bool:
        """Whether every process ``kill`` found has exited and the cgroup is empty."""
        if any(proctree.alive(fd) for fd in self._pidfds):
            return False
        return self.cgroup is None or not self.cgroup.pids()

    def wait(self, timeout: float = 5) -> bool:
        """Block until ``gone()``, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.gone():
            if time.monotonic() > deadline:
                return False
            if self.cgroup is not None:
                self.cgroup.kill()
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Release the jail's file descriptors and remove its cgroup (call once
        its processes are gone; a cgroup still in use stays until the relay exits)."""
        fds = [*self._pidfds, *(self._block or ())]
        fds += [] if self._root is None else [self._root]
        fds += [] if self._seccomp is None else [self._seccomp]
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfds = []
        self._root = None
        self._block = None
        self._seccomp = None
        if self.cgroup is not None:
            self.cgroup.remove()

    def run(
        self, cmd: Sequence[str], timeout: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` of ``cmd`` in this jail (text mode), ending it after."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if kwargs.pop("capture_output", False):
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        pass_fds = (*kwargs.pop("pass_fds", ()), *self.pass_fds)
        try:
            with subprocess.Popen([*self.argv, *cmd], text=True, pass_fds=pass_fds, **kwargs) as p:
                try:
                    self.started(p.pid)
                    out, err = p.communicate(timeout=timeout)
                except BaseException:
                    self.kill()
                    p.kill()
                    p.communicate()
                    raise
            return subprocess.CompletedProcess(p.args, p.returncode, out, err)
        finally:
            self.kill()
            self.wait()
            self.close()


def _program_fd() -> int:
    """A pipe holding the seccomp program, read to EOF by bwrap."""
    data = seccomp.program()
    r, w = os.pipe()
    try:
        os.write(w, data)  # a few hundred bytes: well within a pipe's buffer
    finally:
        os.close(w)
    return r


# --- directories and the probe -----------------------------------------------------

_parent: str | None = None


def _private_parent() -> str:
    """A 0700 directory of the relay's, made once per process: uid 65534 owns the
    session directories in it, and no other uid-65534 process may reach them."""
    global _parent
    if _parent is None or not os.path.isdir(_parent):
        _parent = os.path.realpath(tempfile.mkdtemp(prefix="tether-relay-"))
        atexit.register(shutil.rmtree, _parent, True)
    return _parent


def _make_directory(mode: str) -> str:
    if mode == "self":
        return os.path.realpath(tempfile.mkdtemp(prefix="tether-replica-"))
    directory = tempfile.mkdtemp(prefix="tether-replica-", dir=_private_parent())
    os.chown(directory, JAIL_UID, JAIL_GID)
    return directory


def _try(mode: str) -> str | None:
    """Run a probe in a jail of this mode; the reason it failed, or None."""
    if mode == "nobody" and not shutil.which("setpriv", path=PATH):
        return "setpriv (util-linux) is not installed"
    try:
        directory = _make_directory(mode)
    except (OSError, JailError) as exc:
        return str(exc)
    try:
        r = Jail(mode, directory).run(
            [sys.executable, "-c", _PROBE],
            timeout=30,
            capture_output=True,
            env={"PATH": PATH, "LANG": "C.UTF-8"},
        )
    except (OSError, JailError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if r.returncode == 0:
        return None
    lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


@functools.cache
def _probe() -> tuple[str | None, str | None]:
    """(mode that works, why the better mode did not) or (None, why none does)."""
    for tool in ("bwrap", "prlimit", *JAIL_TOOLS):
        if not shutil.which(tool, path=PATH):
            return None, f"{tool} is not installed (Debian: apt install bubblewrap util-linux)"
    if os.geteuid() != 0:
        err = _try("self")
        return ("self", None) if err is None else (None, err)
    err = _try("nobody")
    if err is None:
        return "nobody", None
    fallback = _try("self")
    if fallback is None:
        return "self", err
    return None, f"as uid {JAIL_UID}: {err}; as root: {fallback}"


def jail_unavailable() -> str | None:
    """Why jailing cannot work here (probed once per process), or None if it can."""
    mode, why = _probe()
    return why if mode is None else None


def jail_warning() -> str | None:
    """Why the jail is weaker than intended, or None: a root relay whose workers
    could not run as real uid 65534 runs them as root without capabilities,
    where RLIMIT_NPROC does not apply; a machine without a seccomp table here
    runs them unfiltered."""
    mode, why = _probe()
    if mode == "self" and os.geteuid() == 0:
        return (
            f"jailed replica workers run as root outside their namespaces, without "
            f"capabilities and without a process limit, because uid {JAIL_UID} could not "
            f"run the jail: {why}"
        )
    if mode is not None and not seccomp.supported():
        return "jailed replica workers run without a seccomp filter (no table for this CPU)"
    return None


def _mode() -> str:
    mode, why = _probe()
    if mode is None:
        raise JailError(f"cannot jail the replica worker: {why}")
    return mode


def jail_directory() -> str:
    """A new empty session directory the jailed worker can write (mode 0700, owned
    by the uid the jail really runs as); remove it with ``shutil.rmtree`` once
    the jail is gone."""
    return _make_directory(_mode())


def jail_command(directory: str) -> Jail:
    """A ``Jail`` running a command with ``directory`` (made by ``jail_directory``)
    as its only writable path, at the same path inside.

    Inherited file descriptors (``pass_fds``) stay open across it.
    """
    return Jail(_mode(), directory)
