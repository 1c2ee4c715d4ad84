"""The replica's jail, with real processes: bubblewrap, tmux, and what feeds it.

Two kinds of evidence. A live jailed replica (``DirectReplica``, fed by the
relay's process, and ``ReplicaHandle``, fed by a worker in the jail) shows the
jail does not break it (rendering, ptys passed back to the relay, mates' keys)
and is inspected from outside (``/proc/<pid>/`` of a jailed process: the
worker, or the replica's tmux server) and from inside its own namespaces
(``nsenter``). Probes run in a jail built by the same ``jail_command`` prefix try
what a compromised worker would: read the relay's files, reach the network,
see other processes, gain privileges.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tether.core.messages import (
    Ack,
    Bindings,
    Event,
    Input,
    Message,
    Output,
    Snapshot,
    Status,
    Structure,
    Window,
)
from tether.relay import jail
from tether.relay.replica import ReplicaHandle
from tether.relay.replica_direct import DirectReplica

WHY = jail.jail_unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"cannot jail here: {WHY}")

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
SNAPSHOT = Snapshot(
    Structure((Window(0, 0, "w", "b25d,80x24,0,0,0", 0),), 0), Status(()), Bindings("C-b", ())
)


class Session:
    def __init__(self, handle: ReplicaHandle, got: list[Message]) -> None:
        self.handle = handle
        self.got = got
        self.direct = isinstance(handle, DirectReplica)

    async def wait_for(self, pred: Callable[[Message], bool], timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.got:
                if pred(m):
                    return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"not received in {timeout}s; got {self.got}")

    @property
    def worker(self) -> int:
        """A jailed process's pid: the worker's interpreter, or (no worker) the
        replica's tmux server, the jail's first process and PID 1."""
        assert self.handle.proc is not None
        for pid in descendants(self.handle.proc.pid):
            argv = cmdline(pid)
            code = argv[argv.index("-c") + 1] if "-c" in argv[:-1] else ""
            if argv[:1] == [sys.executable] and "tether.relay.worker" in code:
                return pid
            if argv[:1] == ["tmux"] and "-D" in argv and isinstance(self.handle, DirectReplica):
                return pid
        raise AssertionError("no worker process")


def nspid(pid: int) -> list[int]:
    """``pid`` in each PID namespace it is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def gone(pid: int) -> bool:
    try:
        return status(pid).get("State", "").startswith("Z")
    except OSError:
        return True


async def start_session(kind: str = "direct") -> Session:
    got: list[Message] = []
    cls = DirectReplica if kind == "direct" else ReplicaHandle
    handle = cls("jailed", got.append, jail=True)
    await handle.start()
    session = Session(handle, got)
    handle.send(Event(1, SNAPSHOT))
    handle.send(Event(2, Output(0, b"hello\r\n")))
    await session.wait_for(lambda m: isinstance(m, Ack) and m.seq == 2)
    return session


@pytest.fixture(params=["direct", "worker"])
async def session(request: pytest.FixtureRequest) -> AsyncIterator[Session]:
    s = await start_session(request.param)
    yield s
    await s.handle.close()


def remove_session_dir(directory: str) -> None:
    """What a killed relay left: a session directory and its private parent."""
    shutil.rmtree(directory, ignore_errors=True)
    if os.path.basename(os.path.dirname(directory)).startswith("tether-relay-"):
        shutil.rmtree(os.path.dirname(directory), ignore_errors=True)


def run_jailed(code: str, *args: str) -> dict[str, Any]:
    """Run Python ``code`` in a fresh jail; it prints one JSON object."""
    directory = jail.jail_directory()
    try:
        r = jail.jail_command(directory).run(
            [sys.executable, "-c", textwrap.dedent(code), *args], timeout=60, capture_output=True
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


# --- the live worker ---------------------------------------------------------


async def test_jailed_replica_renders(session: Session) -> None:
    sock = os.path.join(session.handle.dir, "tmux.sock")

    def first_line() -> str:
        shown = subprocess.run(
            ["tmux", "-S", sock, "capture-pane", "-p", "-t", "tether:0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return (shown.splitlines() or [""])[0]

    # acked once on its way to tmux (a new pane's tty may still be crossing the
    # jail), so drawn a moment later
    deadline = time.monotonic() + 10
    while first_line() != "hello" and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert first_line() == "hello"


async def test_mates_pty_crosses_the_jail(session: Session) -> None:
    rw = await session.handle.attach(1, False, 80, 24, "xterm-256color")
    ro = await session.handle.attach(2, True, 80, 24, "xterm-256color")
    try:
        screen = b""
        deadline = time.monotonic() + 10
        while b"hello" not in screen and time.monotonic() < deadline:
            screen += await asyncio.to_thread(os.read, rw, 65536)
        assert b"hello" in screen
        os.write(ro, b"y")
        os.write(rw, b"x")
        msg = await session.wait_for(lambda m: isinstance(m, Input))
        assert isinstance(msg, Input) and msg.keys == b"x"
        await asyncio.sleep(0.3)
        assert [m.keys for m in session.got if isinstance(m, Input)] == [b"x"]
    finally:
        os.close(rw)
        os.close(ro)


async def test_a_mates_odd_terminal_type_falls_back(session: Session) -> None:
    """A TERM that is no terminfo file (a directory, a path, unknown) attaches
    as xterm-256color instead of failing or reaching a path."""
    for mate, term in enumerate(("..", "../../etc/passwd", "no-such-terminal"), start=10):
        fd = await session.handle.attach(mate, False, 80, 24, term)
        try:
            screen = b""
            deadline = time.monotonic() + 10
            while b"hello" not in screen and time.monotonic() < deadline:
                screen += await asyncio.to_thread(os.read, fd, 65536)
            assert b"hello" in screen, term
        finally:
            os.close(fd)


async def test_worker_identity_seen_from_outside(session: Session) -> None:
    pid = session.worker
    st = status(pid)
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == st["CapAmb"] == "0" * 16
    assert st["NoNewPrivs"] == "1"
    # uid 65534 inside its user namespace; outside, a root relay's workers are
    # really uid 65534 too, an unprivileged relay's are the relay's own uid
    real = os.geteuid()
    if real == 0 and jail.jail_warning() is None:
        real = jail.JAIL_UID
    inside, outside, _ = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert (inside, outside) == (str(jail.JAIL_UID), str(real))
    assert st["Uid"].split() == [str(real)] * 4
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert f"Max processes             {jail.LIMIT_NPROC}" in limits
    assert f"Max open files            {jail.LIMIT_NOFILE}" in limits
    assert f"Max address space         {jail.LIMIT_AS}" in limits
    assert f"Max cpu time              {jail.LIMIT_CPU}" in limits
    assert "Max core file size        0" in limits


async def test_sessions_cannot_see_each_other(session: Session) -> None:
    other = await start_session()
    try:
        a, b = session.worker, other.worker
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{a}/ns/{ns}") != os.readlink(f"/proc/{b}/ns/{ns}"), ns
        # look around from inside session A's namespaces
        look = textwrap.dedent(
            """
            import json, os, socket, sys
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
            cmds = {}
            for p in pids:
                try:
                    cmds[p] = open(f"/proc/{p}/cmdline", "rb").read().decode().replace("\\0", " ")
                except OSError:
                    pass
            print(json.dumps({"cmds": cmds, "ifs": [n for _, n in socket.if_nameindex()],
                              "own": os.path.isdir(sys.argv[1]),
                              "other": os.path.exists(sys.argv[2])}))
            """
        )
        r = subprocess.run(
            ["nsenter", "-t", str(a), "-m", "-p", "-n", "-i", "-u", "--",
             sys.executable, "-c", look, session.handle.dir, other.handle.dir],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        seen = json.loads(r.stdout)
        assert seen["own"] and not seen["other"]
        assert seen["ifs"] == ["lo"]
        cmds = " | ".join(seen["cmds"].values())
        assert session.handle.dir in cmds  # its own worker and tmux
        assert other.handle.dir not in cmds
        assert "pytest" not in cmds and str(os.getpid()) not in seen["cmds"]
        assert len(seen["cmds"]) < 10, seen["cmds"]
    finally:
        await other.handle.close()


async def test_close_ends_the_jail() -> None:
    """Even a worker that would not end by itself (stopped here): the jail's
    processes, the bwraps around them and its directory are gone."""
    s = await start_session()
    assert s.handle.proc is not None
    pids = [s.handle.proc.pid, *descendants(s.handle.proc.pid)]
    assert s.worker in pids and len(pids) >= (4 if s.direct else 6)
    directory = s.handle.dir
    os.kill(s.worker, signal.SIGSTOP)
    start = time.monotonic()
    await s.handle.close()
    assert time.monotonic() - start < 3
    for _ in range(100):
        if all(gone(p) for p in pids):
            break
        await asyncio.sleep(0.05)
    assert all(gone(p) for p in pids)
    assert not os.path.exists(directory)


async def test_close_never_follows_the_jails_tmux_socket(tmp_path: Path) -> None:
    """The jail owns its directory: a tmux.sock it replaced by a symlink to some
    other tmux server (root's, say) is not used by the relay ending the session."""
    other = str(tmp_path / "other.sock")
    subprocess.run(
        ["tmux", "-S", other, "-f", "/dev/null", "new-session", "-d", "sleep", "600"], check=True
    )
    try:
        s = await start_session()
        tree = [s.handle.proc.pid, *descendants(s.handle.proc.pid)]  # type: ignore[union-attr]
        sock = os.path.join(s.handle.dir, "tmux.sock")
        os.rename(sock, sock + ".moved")  # as the jail could: the directory is its own
        os.symlink(other, sock)
        await s.handle.close()
        alive = subprocess.run(["tmux", "-S", other, "has-session"], capture_output=True)
        assert alive.returncode == 0, "the relay killed a tmux server outside the jail"
        assert all(gone(p) for p in tree)
        assert not os.path.lexists(s.handle.dir)
    finally:
        subprocess.run(["tmux", "-S", other, "kill-server"], capture_output=True)


RELAY_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from test_jail import start_session
async def main():
    s = await start_session()
    print(s.worker, s.handle.dir, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_jail_holds_nothing_of_the_relays_but_its_sockets(tmp_path: Path) -> None:
    """No jailed process has the relay's stdout or stderr open (whose log or
    terminal it could write to, or take with pidfd_getfd)."""
    log = tmp_path / "relay-stderr"
    script = RELAY_SCRIPT.format(tests=os.path.dirname(__file__))
    with open(log, "w") as err:
        relay = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True
        )
    directory = ""
    try:
        assert relay.stdout is not None
        pid, directory = relay.stdout.readline().split()
        out_pipe = f"pipe:[{os.fstat(relay.stdout.fileno()).st_ino}]"
        worker = int(pid)
        pidns = os.readlink(f"/proc/{worker}/ns/pid")
        tree = descendants(relay.pid)
        jailed = [p for p in tree if os.readlink(f"/proc/{p}/ns/pid") == pidns]
        assert len(jailed) >= 2, jailed  # tmux's server (PID 1), a pane's sleep
        assert nspid(worker)[-1] == 1, (worker, cmdline(worker))
        for p in tree:  # the jail and the bwrap processes around it
            fds = {fd: os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")}
            assert str(log) not in fds.values(), (p, cmdline(p), fds)
            assert out_pipe not in fds.values(), (p, cmdline(p), fds)
        # the jail's first process is the replica's tmux server: its stdio is
        # /dev/null; the relay's control socket reached it over tmux's own socket
        worker_fds = {fd: os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(
            f"/proc/{worker}/fd")}
        assert [worker_fds[fd] for fd in ("0", "1", "2")] == ["/dev/null"] * 3, worker_fds
        assert any(v.startswith("socket:[") for v in worker_fds.values()), worker_fds
    finally:
        relay.kill()
        relay.wait()
        if directory:  # the killed relay could not clean up
            remove_session_dir(directory)


def test_relay_death_ends_the_jail() -> None:
    """A SIGKILLed relay leaves no jailed process behind. The parent-death
    signal alone does not do it where the jail runs as another uid than its
    bwrap (the kernel checks the dying sender's permission): the jail ends with
    its link to the relay (the worker on EOF, the replica's tmux server with its
    last client)."""
    script = RELAY_SCRIPT.format(tests=os.path.dirname(__file__))
    relay = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    directory = ""
    try:
        assert relay.stdout is not None
        pid, directory = relay.stdout.readline().split()
        worker = int(pid)
        tree = [worker, *descendants(worker)]
        assert not gone(worker)
        relay.send_signal(signal.SIGKILL)
        relay.wait()
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in tree)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        if directory:  # the killed relay could not clean up
            remove_session_dir(directory)


# --- probes: what a compromised worker could try ------------------------------


def test_cannot_read_the_relays_files(tmp_path: Path) -> None:
    home = tmp_path / "home" / "relay"
    (home / ".ssh").mkdir(parents=True)
    secret = home / ".ssh" / "id_ed25519"
    secret.write_text("secret")
    secret.chmod(0o644)  # readable by anyone who can reach it
    seen = run_jailed(
        """
        import errno, json, os, sys
        def try_read(path):
            try:
                return open(path).read()
            except OSError as exc:
                return type(exc).__name__
        def try_write(path):
            try:
                open(path, "w").close()
                return "written"
            except OSError as exc:
                return errno.errorcode[exc.errno]
        print(json.dumps({
            "secret": try_read(sys.argv[1]),
            "shadow": try_read("/etc/shadow"),
            "passwd": try_read("/etc/passwd"),
            "root": sorted(os.listdir("/")),
            "usr": try_write("/usr/tether-probe"),
            "prefix": try_write(os.path.join(sys.prefix, "tether-probe")),
            "cwd": try_write("ok"),
            "home": os.environ.get("HOME") == os.getcwd(),
            "env": sorted(os.environ),
        }))
        """,
        str(secret),
    )
    assert seen["secret"] == "FileNotFoundError"
    assert seen["shadow"] == seen["passwd"] == "FileNotFoundError"
    assert "etc" not in seen["root"] and "home" not in seen["root"]
    assert seen["usr"] == seen["prefix"] == "EROFS"
    assert seen["cwd"] == "written" and seen["home"]
    assert set(seen["env"]) <= {
        "PATH", "LANG", "PYTHONPATH", "HOME", "MALLOC_ARENA_MAX", "PWD", "LC_CTYPE",
    }  # fmt: skip


def test_no_shell_in_the_jail() -> None:
    """tmux runs ``#()`` and ``run-shell`` through /bin/sh: there is none, nor
    any other program but what the jail runs."""
    seen = run_jailed(
        """
        import json, os, sys
        def run(argv):
            pid = os.fork()
            if pid == 0:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                try:
                    os.execv(argv[0], argv)
                except OSError as exc:
                    os._exit(100 + exc.errno)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        shells = ["/bin/sh", "/usr/bin/sh", "/usr/bin/dash", "/usr/bin/bash", "/usr/bin/perl",
                  "/bin/bash", "/usr/local/bin/bash", "/usr/sbin/nologin"]
        print(json.dumps({
            "exists": [p for p in shells if os.path.lexists(p)],
            "exec": {p: run([p, "-c", "exit 0"]) for p in shells},
            "tmux": run(["/usr/bin/tmux", "-V"]),
            "sleep": run(["/usr/bin/sleep", "0"]),
            "python": run([sys.executable, "-c", "pass"]),
            "bin": sorted(os.listdir("/usr/bin")),
            "usr_local": os.listdir("/usr/local") if os.path.isdir("/usr/local") else [],
            "write": os.access("/usr/bin", os.W_OK),
        }))
        """
    )
    assert seen["exists"] == []
    assert set(seen["exec"].values()) == {100 + 2}, seen["exec"]  # ENOENT
    assert seen["tmux"] == seen["sleep"] == seen["python"] == 0
    assert {"tmux", "sleep", "prlimit"} <= set(seen["bin"])
    assert not {"sh", "dash", "bash", "perl", "env", "busybox"} & set(seen["bin"]), seen["bin"]
    assert len(seen["bin"]) <= 6, seen["bin"]  # the three tools and Python's links at most
    assert not seen["write"]


def test_cannot_reach_the_network() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet sent: just the routed source address
        host_ip = probe.getsockname()[0]
        probe.close()
    except OSError:
        host_ip = "127.0.0.1"
    seen = run_jailed(
        """
        import json, socket, sys
        port = int(sys.argv[1])
        out = {"ifs": [n for _, n in socket.if_nameindex()]}
        for name, addr in (("lo", "127.0.0.1"), ("host", sys.argv[2]), ("out", "1.1.1.1")):
            s = socket.socket()
            s.settimeout(3)
            try:
                s.connect((addr, port if name != "out" else 53))
                out[name] = "connected"
            except OSError as exc:
                out[name] = type(exc).__name__ + ": " + str(exc.errno)
            s.close()
        print(json.dumps(out))
        """,
        str(port),
        host_ip,
    )
    try:
        conn, _ = listener.accept()
        conn.close()
        accepted = True
    except TimeoutError:
        accepted = False
    listener.close()
    assert not accepted
    assert seen["ifs"] == ["lo"]
    assert seen["lo"] == "ConnectionRefusedError: 111"  # its own loopback, nobody there
    assert seen["out"] == "OSError: 101"  # ENETUNREACH: no route anywhere
    assert seen["host"] in ("OSError: 101", "ConnectionRefusedError: 111")


async def test_cannot_see_other_processes(session: Session) -> None:
    seen = run_jailed(
        """
        import json, os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(json.dumps({"pids": pids, "me": os.getpid(),
                          "one": open("/proc/1/cmdline").read().split("\\0")[0]}))
        """
    )
    # bwrap's reaper as pid 1 and the probe as pid 2: not the relay, not the
    # live session's worker running right now
    assert seen["pids"] == [1, 2] and seen["me"] == 2
    assert str(seen["one"]).endswith("bwrap")
    assert not gone(session.worker)


def test_runs_unprivileged() -> None:
    seen = run_jailed(
        """
        import ctypes, json, os, platform
        st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        libc = ctypes.CDLL(None, use_errno=True)
        nested = libc.unshare(0x10000000)  # CLONE_NEWUSER
        unshare_errno = ctypes.get_errno()
        # clone itself is not filtered: a child in a new user namespace
        nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
        pid = libc.syscall(nr, 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
        if pid == 0:
            os._exit(0)
        cloned = pid if pid < 0 else os.waitpid(pid, 0)[0] and 0
        print(json.dumps({
            "uid": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
            "groups": os.getgroups(),
            "capeff": st["CapEff"].strip(), "capbnd": st["CapBnd"].strip(),
            "nnp": st["NoNewPrivs"].strip(),
            "nested_userns": nested if nested == 0 else unshare_errno,
            "cloned_userns": cloned if cloned == 0 else ctypes.get_errno(),
            "pty": os.ttyname(os.openpty()[1]),
        }))
        """
    )
    assert seen["uid"] == [jail.JAIL_UID, jail.JAIL_UID, jail.JAIL_GID, jail.JAIL_GID]
    assert seen["groups"] == []
    assert seen["capeff"] == seen["capbnd"] == "0" * 16
    assert seen["nnp"] == "1"
    assert seen["nested_userns"] == 1  # EPERM: the seccomp filter
    assert seen["cloned_userns"] == 28  # ENOSPC: user.max_user_namespaces is 0 in there
    assert str(seen["pty"]).startswith("/dev/pts/")


def test_process_limit_is_enforced() -> None:
    if jail.jail_warning():
        pytest.skip(f"weaker jail here: {jail.jail_warning()}")
    seen = run_jailed(
        """
        import json, os, resource, time
        resource.setrlimit(resource.RLIMIT_NPROC, (16, 16))
        kids, err = [], None
        try:
            for _ in range(64):
                pid = os.fork()
                if pid == 0:
                    time.sleep(5)
                    os._exit(0)
                kids.append(pid)
        except OSError as exc:
            err = exc.errno
        for k in kids:
            os.kill(k, 9)
            os.waitpid(k, 0)
        print(json.dumps({"forked": len(kids), "err": err}))
        """
    )
    # counted per jail: bwrap's pid 1 and the probe itself are two of the 16
    assert seen["err"] == 11 and seen["forked"] <= 14, seen
