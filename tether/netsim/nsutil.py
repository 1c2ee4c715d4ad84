"""Low-level network-namespace plumbing: create/remove, enter per thread, TUN, leftovers.

Namespaces are entered with setns(2) on a short-lived thread (setns on
CLONE_NEWNET only moves the calling thread), so the caller's own thread never
changes namespace and nothing forks a threaded interpreter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_DIR = "/run/netns"
DEFAULT_PREFIX = "tns"
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)
_mount_lock = threading.Lock()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None; used by the pytest skip."""
    if os.geteuid() != 0:
        return "netsim needs root (network namespaces, TUN devices, nftables)"
    if not os.path.exists("/dev/net/tun"):
        return "netsim needs /dev/net/tun (TUN driver) which is missing"
    if not os.path.exists("/proc/self/ns/net"):
        return "netsim needs network namespaces (no /proc/self/ns/net)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"netsim needs the `{tool}` command (iproute2 / nftables)"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"netsim cannot open /dev/net/tun: {e}"
    return None


def _ensure_netns_dir() -> None:
    """Make /run/netns a shared mount like iproute2 does, so other mount namespaces see it."""
    with _mount_lock:
        os.makedirs(NETNS_DIR, exist_ok=True)
        if _libc.mount(b"", NETNS_DIR.encode(), b"none", MS_SHARED | MS_REC, None) == 0:
            return
        _check(
            _libc.mount(NETNS_DIR.encode(), NETNS_DIR.encode(), b"none", MS_BIND | MS_REC, None),
            "bind-mount " + NETNS_DIR,
        )
        _check(
            _libc.mount(b"", NETNS_DIR.encode(), b"none", MS_SHARED | MS_REC, None),
            "share " + NETNS_DIR,
        )


def _on_thread(fn: Callable[[], T]) -> T:
    """Run fn on a fresh thread and return its result or re-raise its exception."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["r"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=body, name="netsim-ns", daemon=True)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


def create_netns(name: str) -> None:
    """Create a named network namespace (bind-mounted at /run/netns/NAME)."""
    _ensure_netns_dir()
    path = netns_path(name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))

    def body() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(src, path.encode(), b"none", MS_BIND, None), "bind netns")

    try:
        _on_thread(body)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) on a thread that has entered namespace `name`.

    Sockets and TUN devices created inside fn belong to that namespace for
    their whole life, whichever thread uses them later.
    """

    def body() -> T:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns({name})")
        finally:
            os.close(fd)
        return fn(*args, **kwargs)

    return _on_thread(body)


def open_tun(ifname: str) -> int:
    """Create a TUN device (raw IP, no packet info) in the current thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_sysctls(values: dict[str, str]) -> None:
    """Write /proc/sys entries (dotted keys); /proc/sys/net follows the thread's netns."""
    for key, value in values.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def flush_conntrack() -> None:
    """Delete all conntrack entries of the current namespace (raw ctnetlink, no tool needed).

    Used for NAT rebinding: without it existing flows keep their old mapping.
    """
    netlink_netfilter = 12
    ipctnl_msg_ct_delete = 2
    nfnl_subsys_ctnetlink = 1
    flags = 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter) as s:
        s.settimeout(2.0)
        s.bind((0, 0))
        for family in (socket.AF_INET, socket.AF_INET6):
            body = struct.pack("BBH", family, 0, 0)
            hdr = struct.pack(
                "=IHHII",
                16 + len(body),
                (nfnl_subsys_ctnetlink << 8) | ipctnl_msg_ct_delete,
                flags,
                1,
                0,
            )
            s.send(hdr + body)
            resp = s.recv(65536)
            if len(resp) >= 20:
                (err,) = struct.unpack_from("=i", resp, 16)
                if err not in (0, -errno.ENOENT):
                    raise OSError(-err, f"conntrack flush: {os.strerror(-err)}")


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def netns_pids(name: str) -> list[int]:
    """Pids of processes living in namespace `name` (like `ip netns pids`)."""
    target = _ns_id(netns_path(name))
    if target is None:
        return []
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _ns_id(f"/proc/{entry}/ns/net") == target:
            pids.append(int(entry))
    return pids


def kill_netns_processes(name: str, grace: float = 1.0) -> list[int]:
    """SIGTERM then SIGKILL every process in the namespace; bounded by `grace` seconds."""
    pids = netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and netns_pids(name):
        time.sleep(0.02)
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and netns_pids(name):
        time.sleep(0.02)
    return pids


def remove_netns(name: str) -> None:
    """Kill what runs inside, then unmount and unlink the namespace (devices go with it)."""
    path = netns_path(name)
    if not os.path.exists(path):
        return
    kill_netns_processes(name)
    _libc.umount2(path.encode(), MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes: it holds no namespace.
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def owner_pid(name: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    """Pid encoded in one of our namespace names (``<prefix>-<pid>-...``), else None."""
    m = re.fullmatch(re.escape(prefix) + r"-(\d+)-[A-Za-z0-9_.-]+", name)
    return int(m.group(1)) if m else None


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces (and their processes) left by runs whose pid is dead.

    Only names matching ``<prefix>-<pid>-...`` with a dead pid are touched;
    anything else, including namespaces of live runs, is left alone.
    """
    removed = []
    for name in list_netns():
        pid = owner_pid(name, prefix)
        if pid is None or pid_alive(pid):
            continue
        remove_netns(name)
        removed.append(name)
    return removed
