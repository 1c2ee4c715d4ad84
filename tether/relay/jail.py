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

from tether.core.errors import TetherError

from . import bwrap, proctree, seccomp
from .bwrap import HIDDEN as HIDDEN
from .bwrap import JAIL_GID, JAIL_TOOLS, JAIL_UID, PATH
from .bwrap import LIMIT_AS as LIMIT_AS
from .bwrap import LIMIT_CPU as LIMIT_CPU
from .bwrap import LIMIT_FSIZE as LIMIT_FSIZE
from .bwrap import LIMIT_NOFILE as LIMIT_NOFILE
from .bwrap import LIMIT_NPROC as LIMIT_NPROC
from .bwrap import TMPFS_SIZE as TMPFS_SIZE
from .cgroup import SessionCgroup, relay_cgroups

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


class JailError(TetherError):
    """Why a jail cannot be built or started here."""


def _stage_dir() -> str:
    """An existing directory the outer bwrap may hide under its staging tmpfs."""
    for d in ("/mnt", "/media", "/srv", "/run"):
        if os.path.isdir(d) and not os.path.islink(d):
            return d
    raise JailError("no /mnt, /media, /srv or /run to stage the jail's binds in")


def _command(mode: str, directory: str, seccomp_fd: int | None, block_fd: int | None,
             as_pid_1: bool = False) -> list[str]:
    stage = None if mode == "self" else _stage_dir()
    return bwrap.command(directory, seccomp_fd, block_fd, stage, as_pid_1)


# --- the jail --------------------------------------------------------------------


class Jail:
    """One jailed command: how to start it and how to end it.

    Spawn ``[*jail.argv, program, ...]`` with ``pass_fds`` including
    ``jail.pass_fds`` (and stdin, stdout, stderr not the relay's), then call
    ``started(pid)`` at once: the jail waits for it. End it with ``kill()``,
    wait until ``gone()`` (or ``wait()``), then ``close()``.
    """

    def __init__(self, mode: str, directory: str, as_pid_1: bool = False) -> None:
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
            self.argv = _command(mode, directory, self._seccomp, block, as_pid_1)
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


def jail_command(directory: str, as_pid_1: bool = False) -> Jail:
    """A ``Jail`` running a command with ``directory`` (made by ``jail_directory``)
    as its only writable path, at the same path inside; ``as_pid_1`` as in
    ``bwrap.command``.

    Inherited file descriptors (``pass_fds``) stay open across it.
    """
    return Jail(_mode(), directory, as_pid_1)
