"""The jail around a session's replica worker: bubblewrap namespaces plus rlimits.

A hostile host controls every byte its replica renders, so the worker and its
tmux are treated as compromised-on-arrival. In the jail they see read-only /usr
and Python, their own session directory (for the tmux socket) and nothing else;
they have no network; their own PID, IPC, UTS, user and cgroup namespaces, in
which they cannot create further user namespaces; uid 65534 with no
capabilities and no_new_privs; and resource limits. One session can then
neither read the relay's files, reach the network, see other sessions, nor
starve the relay.

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
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

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
_PROBE = "import os, shutil, tether.relay.worker; os.openpty(); assert shutil.which('tmux')"


class JailError(Exception):
    pass


def _tool(name: str) -> str:
    return shutil.which(name, path=PATH) or name


def _python_roots() -> list[str]:
    """Directories the worker's interpreter and imports need, beyond /usr."""
    roots: list[str] = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(tether.__file__)):
        p = os.path.realpath(p)
        inside = [r for r in ["/usr", *roots] if p == r or p.startswith(r + "/")]
        if not inside:
            roots.append(p)
    return roots


def _stage_dir() -> str:
    """An existing directory the outer bwrap may hide under its staging tmpfs."""
    for d in ("/mnt", "/media", "/srv", "/run"):
        if os.path.isdir(d) and not os.path.islink(d):
            return d
    raise JailError("no /mnt, /media, /srv or /run to stage the jail's binds in")


def _inner(directory: str, binds: list[tuple[str, str]], dir_source: str) -> list[str]:
    """The jail proper: bwrap, then prlimit, as whoever runs it."""
    argv = [
        _tool("bwrap"),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/usr", "/usr",
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


def _command(mode: str, directory: str) -> list[str]:
    directory = os.path.realpath(directory)
    roots = _python_roots()
    if mode == "self":
        return _inner(directory, [(r, r) for r in roots], directory)
    stage = _stage_dir()
    outer = [_tool("bwrap"), "--die-with-parent", "--dev-bind", "/", "/", "--tmpfs", stage]
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
    return outer + _inner(directory, binds, f"{stage}/dir")


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
        r = subprocess.run(
            [*_command(mode, directory), sys.executable, "-c", _PROBE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
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
    for tool in ("bwrap", "prlimit"):
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
    where RLIMIT_NPROC does not apply."""
    mode, why = _probe()
    if mode == "self" and os.geteuid() == 0:
        return (
            f"jailed replica workers run as root outside their namespaces, without "
            f"capabilities and without a process limit, because uid {JAIL_UID} could not "
            f"run the jail: {why}"
        )
    return None


def _mode() -> str:
    mode, why = _probe()
    if mode is None:
        raise JailError(f"cannot jail the replica worker: {why}")
    return mode


def jail_directory() -> str:
    """A new empty session directory the jailed worker can write (mode 0700, owned
    by the uid the jail really runs as); remove it with ``shutil.rmtree``."""
    return _make_directory(_mode())


def jail_command(directory: str) -> list[str]:
    """The argv prefix running a command jailed, with ``directory`` (made by
    ``jail_directory``) as its only writable path, at the same path inside.

    Inherited file descriptors (``pass_fds``) stay open across it.
    """
    return _command(_mode(), directory)
