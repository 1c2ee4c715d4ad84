"""The zygote (``tether.zygote``) on its own: forking agents that start tmux and
say how it went, refusing strangers, leaving with the last agent. A real zygote
process, requests over its real socket, real tmux."""

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

from tether.zygote import MAGIC, address, request_session

DEADLINE = 20.0


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Zygote:
    """A zygote for a private state directory, living as long as ``watched``.

    Its agents' relay is one nobody answers on: they start tmux, answer, and
    leave when their session ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        (tmp / ".tether.conf").write_text(
            "set -g tether-server-host 127.0.0.1\nset -g tether-server-port 1\n")
        self.env = dict(os.environ, XDG_STATE_HOME=str(self.state), HOME=str(tmp))
        self.env.pop("TMUX", None)
        self.watched = subprocess.Popen(["sleep", "600"])
        self.log = tmp / "zygote.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tether", "_zygote", "--watch", str(self.watched.pid)],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.state_dir = self.state / "tether"
        wait_for(self.state_dir.exists, DEADLINE, "the zygote's state directory")

    def request(self, tmux_args: list[str], env: dict[str, str] | None = None,
                log: Path | None = None) -> tuple[str | None, str] | None:
        """Ask for a session on a new socket, started with ``tmux_args``."""
        sock = str(self.tmp / f"s{time.monotonic_ns()}.sock")
        with open(log or os.devnull, "ab") as logf:
            return request_session(self.state_dir, ["--socket", sock, "--session", "-", "--",
                                                    *tmux_args], env or self.env, logf.fileno())

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


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


BAD_TMUX = ["-x", "nan"]
"""tmux refuses the session: the agent says so and leaves."""


def first_answer(z: Zygote) -> tuple[str | None, str]:
    """The first request is answered once the zygote's imports are done."""
    got = wait_for(lambda: z.request(BAD_TMUX), DEADLINE, "the zygote to fork an agent")
    assert got is not None
    return got


def test_no_zygote_means_the_cli_starts_its_own(tmp_path: Path) -> None:
    with open(os.devnull, "ab") as log:
        assert request_session(tmp_path / "state", ["--socket", "x"], {}, log.fileno()) is None


def test_an_agent_starts_tmux_answers_and_the_zygote_leaves_with_the_last(
    zygote: Zygote, tmp_path: Path
) -> None:
    session, problem = first_answer(zygote)
    assert (session, problem) == (None, "width invalid")  # tmux's own words
    wait_for(lambda: not children(zygote.proc.pid), DEADLINE, "the forked agent to leave")

    # a forked agent takes the CLI's environment, log and working directory, and
    # starts tmux with them: the session's command writes down what it got
    out = tmp_path / "got"
    session, problem = zygote.request(
        ["sh", "-c", f"pwd > {out}.tmp; echo $MARK >> {out}.tmp; mv {out}.tmp {out}"],
        dict(zygote.env, MARK="from-the-cli"))
    assert session is not None and session.startswith("$"), problem
    lines = wait_for(lambda: out.exists() and out.read_text().splitlines(), DEADLINE,
                     "the session's command")
    assert lines == [str(Path.cwd()), "from-the-cli"]
    wait_for(lambda: not children(zygote.proc.pid), DEADLINE,
             "the agent to leave with its session")

    # a bad config: the CLI is told why, in the config's own words
    conf = tmp_path / "bad.conf"
    conf.write_text("set -g tether-no-such-option 1\n")
    log = tmp_path / "agent.log"
    session, problem = zygote.request([], dict(zygote.env, TETHER_CONF=str(conf)), log)
    assert session is None
    assert f"{conf}:1: unknown option tether-no-such-option" in problem

    assert zygote.proc.poll() is None, "the watched process still lives"
    zygote.watched.kill()
    zygote.watched.wait()
    wait_for(lambda: not children(zygote.proc.pid), DEADLINE, "the last agent to leave")
    assert zygote.proc.wait(timeout=DEADLINE) == 0
    assert zygote.request(BAD_TMUX) is None, "the zygote left with its last agent"


def test_malformed_requests_are_refused_and_the_zygote_serves_on(zygote: Zygote) -> None:
    first_answer(zygote)
    for payload, fds in ((b"garbage", 1), (MAGIC.encode() + b"\0/\0" + b"18\0" + b"99", 1),
                         (b"\0".join([MAGIC.encode(), b"/", b"18", b"0"]), 0),
                         (b"\0".join([MAGIC.encode(), b"/", b"18", b"0"]), 2)):
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
    session, problem = zygote.request(BAD_TMUX)
    assert session is None and problem, "still serving"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_gets_nothing(zygote: Zygote, tmp_path: Path) -> None:
    first_answer(zygote)
    wait_for(lambda: not children(zygote.proc.pid), DEADLINE, "the first agent to leave")
    marker = tmp_path / "stranger"
    code = f"""
import array, os, socket
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect({address(zygote.state_dir)!r})
payload = "\\0".join([{MAGIC!r}, "/", "18", "2", "--socket", {str(marker)!r}]).encode()
fds = array.array("i", [1])
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
    assert children(zygote.proc.pid) == [], "the zygote forked nothing for a stranger"
    assert not marker.exists()
