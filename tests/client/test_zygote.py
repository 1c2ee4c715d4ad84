"""The zygote (``tether.zygote``) on its own: forking agents, refusing strangers,
leaving with the last agent. A real zygote process, requests over its real socket."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.zygote import MAGIC, address, request_agent

DEADLINE = 20.0


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


class Zygote:
    """A zygote for a private state directory, living as long as ``watched``."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.env = dict(os.environ, XDG_STATE_HOME=str(self.state), HOME=str(tmp))
        self.watched = subprocess.Popen(["sleep", "600"])
        self.log = tmp / "zygote.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tether", "_zygote", "--watch", str(self.watched.pid)],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.state_dir = self.state / "tether"
        wait_for(self.state_dir.exists, DEADLINE, "the zygote's state directory")

    def request(self, argv: list[str], env: dict[str, str] | None = None,
                log: Path | None = None) -> tuple[int | None, int]:
        """Ask for an agent; (its pid or None, the write end of its stdin)."""
        r, w = os.pipe()
        try:
            with open(log or os.devnull, "ab") as logf:
                pid = request_agent(self.state_dir, argv, env or self.env, r, logf.fileno())
        finally:
            os.close(r)
        return pid, w

    def close(self) -> None:
        for p in (self.watched, self.proc):
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Zygote]:
    z = Zygote(tmp_path)
    yield z
    z.close()


def first_agent(z: Zygote) -> tuple[int, int]:
    """The first request is answered once the zygote's imports are done."""
    def attempt() -> tuple[int, int] | None:
        pid, w = z.request(["--socket", "/nonexistent/sock", "--session", "-"])
        if pid is None:
            os.close(w)
            return None
        return pid, w
    return wait_for(attempt, DEADLINE, "the zygote to fork an agent")


def test_no_zygote_means_the_cli_starts_its_own(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        assert request_agent(tmp_path / "state", ["--socket", "x"], {}, r, w) is None
    finally:
        os.close(r)
        os.close(w)


def test_forks_agents_and_leaves_with_the_last(zygote: Zygote, tmp_path: Path) -> None:
    pid, stdin_w = first_agent(zygote)
    assert parent_of(pid) == zygote.proc.pid
    os.close(stdin_w)  # no session id: the agent leaves quietly
    wait_for(lambda: not alive(pid), DEADLINE, "the forked agent to leave on EOF")

    # a forked agent takes the CLI's environment, stdin, log and working directory
    conf = tmp_path / "bad.conf"
    conf.write_text("set -g tether-no-such-option 1\n")
    log = tmp_path / "agent.log"
    pid, stdin_w = zygote.request(["--socket", "/nonexistent/sock", "--session", "-"],
                                  dict(zygote.env, TETHER_CONF=str(conf)), log)
    assert pid is not None
    assert Path(f"/proc/{pid}/cwd").resolve() == Path.cwd().resolve()
    os.write(stdin_w, b"$1\n")
    os.close(stdin_w)
    wait_for(lambda: not alive(pid), DEADLINE, "the agent to fail on its config")
    assert f"{conf}:1: unknown option tether-no-such-option" in log.read_text()

    assert zygote.proc.poll() is None, "the watched process still lives"
    zygote.watched.kill()
    zygote.watched.wait()
    assert zygote.proc.wait(timeout=DEADLINE) == 0
    pid, stdin_w = zygote.request(["--socket", "x"])
    os.close(stdin_w)
    assert pid is None, "the zygote left with its last agent"


def test_malformed_requests_are_refused_and_the_zygote_serves_on(zygote: Zygote) -> None:
    pid, w = first_agent(zygote)
    os.close(w)
    wait_for(lambda: not alive(pid), DEADLINE, "the first agent to leave")
    for payload, fds in ((b"garbage", 2), (MAGIC.encode() + b"\0/\0" + b"18\0" + b"99", 2),
                         (b"\0".join([MAGIC.encode(), b"/", b"18", b"0"]), 0)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(DEADLINE)
            s.connect(address(zygote.state_dir))
            passed = [os.open(os.devnull, os.O_RDONLY) for _ in range(fds)]
            try:
                s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", passed))] if passed else [])
            finally:
                for fd in passed:
                    os.close(fd)
            assert s.recv(32) == b"", f"no agent for {payload!r}"
    assert "refused a request" in zygote.log.read_text()
    pid2, w2 = first_agent(zygote)
    assert parent_of(pid2) == zygote.proc.pid
    os.close(w2)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_gets_nothing(zygote: Zygote, tmp_path: Path) -> None:
    pid, w = first_agent(zygote)
    os.close(w)
    wait_for(lambda: not alive(pid), DEADLINE, "the first agent to leave")
    marker = tmp_path / "stranger"
    code = f"""
import array, os, socket
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect({address(zygote.state_dir)!r})
payload = "\\0".join([{MAGIC!r}, "/", "18", "2", "--socket", {str(marker)!r}]).encode()
fds = array.array("i", [0, 1])
try:
    # The zygote may check our credentials and hang up before we send: that
    # refusal is as good as one after.
    s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    print(repr(s.recv(32)))
except (ConnectionResetError, BrokenPipeError):
    print("reset")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("b''", "reset")
    children = Path(f"/proc/{zygote.proc.pid}/task/{zygote.proc.pid}/children").read_text()
    assert children.split() == [], "the zygote forked nothing for a stranger"
