"""`tether join` as a mate uses it: the command in a terminal (a local tmux the
test reads with capture-pane), a real relay and host, real tmux on both ends."""

from __future__ import annotations

import glob
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.core.tokens import new_token
from tether.testing.env import tether_cmd, tether_env, tmux

from .helpers import Host, RelayProcess, wait_for
from .test_limits import keypair


class JoinMate:
    """A person at another terminal running `tether join`."""

    def __init__(self, home: Path, argv: list[str], size: tuple[int, int] = (100, 30)) -> None:
        home.mkdir(parents=True, exist_ok=True)
        # the mate's own tmux config: a prefix of its own, to tell it applies locally
        (home / ".tmux.conf").write_text("set -g prefix C-a\nset -g status-style bg=blue\n")
        self.env = tether_env(home)
        self.env["TMPDIR"] = tempfile.mkdtemp(prefix="tether-test-")
        self.sock = str(Path(self.env["TMPDIR"]) / "term.sock")
        conf = home / "term.tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g default-terminal tmux-256color\n")
        cmd = shlex.join(argv) + '; echo "[join exited: $?]"; sleep 3600'
        subprocess.run(["tmux", "-S", self.sock, "-f", str(conf), "new-session", "-d", "-x",
                        str(size[0]), "-y", str(size[1]), cmd], check=True, env=self.env)

    def screen(self) -> str:
        return tmux(self.sock, "capture-pane", "-p")

    def type(self, text: str, enter: bool = True) -> None:
        tmux(self.sock, "send-keys", "-l", text)
        if enter:
            tmux(self.sock, "send-keys", "Enter")

    def wait_text(self, text: str, timeout: float = 30) -> str:
        try:
            return wait_for(lambda: s if text in (s := self.screen()) else "", timeout,
                            f"{text!r} on the join mate's screen")
        except Exception as exc:
            raise AssertionError(f"{exc}\nscreen:\n{self.screen()}") from None

    def replica(self, *args: str, check: bool = True) -> str:
        """A tmux command on the join's local replica: its own server, in a
        ``tether-join-*`` directory under the mate's TMPDIR."""
        socks = glob.glob(f"{self.env['TMPDIR']}/tether-join-*/tmux.sock")
        assert len(socks) == 1, f"the join's local tmux socket: {socks}"
        return tmux(socks[0], *args, check=check)

    def close(self) -> None:
        tmux(self.sock, "kill-server", check=False)


def join_argv(join_line: str, *extra: str) -> list[str]:
    """The host's printed `tether join ...` line, run as it is (with a log)."""
    words = join_line.split()
    assert words[:2] == ["tether", "join"] and "--pin" in words, join_line
    return tether_cmd("join", "--log", os.environ.get("TETHER_JOIN_LOG", "/dev/null"),
                      *extra, *words[2:])


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[RelayProcess, Host]]:
    relay = RelayProcess(tmp_path / "relay")
    host = _host(relay, Host(tmp_path / "host", relay.conf(), ready=False))
    yield relay, host
    host.close()
    relay.close()


def _host(relay: RelayProcess, host: Host) -> Host:
    """``host`` once ready; if it never is, the host and relay are ended (a
    failed setup has no teardown)."""
    try:
        host.wait_ready()
    except BaseException:
        host.close()
        relay.close()
        raise
    return host


def test_join_shows_the_session_and_types_into_it(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    _, host = shared
    host.type("echo host-says-$((6*7))")
    mate = JoinMate(tmp_path / "mate", join_argv(host.join_rw))
    try:
        mate.wait_text("host-says-42", 40)
        mate.type("echo mate-typed-$((7*6))")
        wait_for(lambda: "mate-typed-42" in host.screen().split("echo mate-typed")[-1], 20,
                 "the join mate's command to run on the host")
        mate.wait_text("mate-typed-42", 20)  # and its output back on the mate's screen
    finally:
        mate.close()


def test_a_read_only_join_sees_but_cannot_type(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    _, host = shared
    host.type("echo visible-$((2*21))")
    mate = JoinMate(tmp_path / "ro", join_argv(host.join_ro))
    try:
        mate.wait_text("visible-42", 40)
        mate.type("echo never-$((6*7))")
        host.type("echo marker-after")
        mate.wait_text("marker-after", 20)
        assert "never-42" not in host.screen()
    finally:
        mate.close()


def test_a_wrong_token_says_so_and_exits(shared: tuple[RelayProcess, Host],
                                         tmp_path: Path) -> None:
    relay, _ = shared
    argv = tether_cmd("join", "-p", str(relay.port), "--pin", relay.fingerprint,
                      f"{new_token()}@127.0.0.1")
    mate = JoinMate(tmp_path / "wrong", argv)
    try:
        text = mate.wait_text("[join exited:", 40)
        assert "invalid or expired" in text and "[join exited: 1]" in text
    finally:
        mate.close()


def test_the_join_ends_when_the_host_ends_the_session(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    _, host = shared
    host.type("echo joined-$((6*7))")
    mate = JoinMate(tmp_path / "mate", join_argv(host.join_rw))
    try:
        mate.wait_text("joined-42", 40)
        host.tmux("kill-server", check=False)
        text = mate.wait_text("[join exited:", 30)
        assert "ended the session" in text and "[join exited: 0]" in text
    finally:
        mate.close()


def test_the_join_comes_back_by_itself_after_a_relay_restart(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    relay, host = shared
    mate = JoinMate(tmp_path / "mate", join_argv(host.join_rw))
    try:
        host.type("echo before-$((6*7))")
        mate.wait_text("before-42", 40)
        port = relay.port
        relay.close()
        logged = len(relay.log.read_text())  # the new relay appends to the same log
        relay2 = RelayProcess(relay.dir, port)  # same keys, same port
        try:
            wait_for(lambda: "attached to session" in relay2.log.read_text()[logged:], 30,
                     "the host to come back to the restarted relay")
            host.type("echo after-$((6*7))")
            mate.wait_text("after-42", 40)
            mate.type("echo typed-after-restart")
            wait_for(lambda: "typed-after-restart" in host.screen(), 20,
                     "the join mate's keys on the re-created session")
            assert "[join exited" not in mate.screen()
        finally:
            relay2.close()
    finally:
        mate.close()


def test_the_join_shows_the_host_away_and_back(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    """The host's agent freezes (SIGSTOP: a laptop asleep): the join mate's status
    line says the host is away; once the agent runs again the notice goes, the
    mate sees what the host printed while away and after, and types again."""
    _, host = shared
    mate = JoinMate(tmp_path / "mate", join_argv(host.join_rw))
    try:
        host.type("echo before-$((6*7))")
        mate.wait_text("before-42", 40)
        # settled first: the host's move from its SSH bootstrap to QUIC flashes
        # the away notice on every mate (the relay sees the SSH link close first)
        wait_for(lambda: "quic" in host.read_format("#{tether_status}"), 20,
                 "the host to be on QUIC")
        wait_for(lambda: "host is away" not in mate.screen()
                 and mate.replica("show", "-gv", "@tether_notice").strip() == "", 20,
                 "no notice on the join mate's screen before the host goes away")
        pid = host.agent_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            mate.wait_text("host is away", 30)
            assert "the host is away" in mate.replica("show", "-gv", "@tether_notice")
            host.type("echo while-away-$((6*7))")
            assert "while-away-42" not in mate.screen()
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: "host is away" not in (s := mate.screen()) and "while-away-42" in s,
                 30, "the notice to go and the host's screen to catch up on the mate's")
        assert mate.replica("show", "-gv", "@tether_notice").strip() == ""
        host.type("echo back-$((6*7))")
        mate.wait_text("back-42", 20)
        mate.type("echo mate-after-$((7*6))")
        wait_for(lambda: "mate-after-42" in host.screen().split("echo mate-after")[-1], 20,
                 "the join mate's command to run on the host after its return")
        assert "[join exited" not in mate.screen()
    finally:
        mate.close()


def test_a_session_restricted_to_keys_admits_a_join_only_with_one(
    relay_and_keys: tuple[RelayProcess, Host, Path], tmp_path: Path
) -> None:
    _, host, mate_key = relay_and_keys
    wrong = tmp_path / "wrong_key"
    keypair(wrong)
    refused = JoinMate(tmp_path / "wrong", join_argv(host.join_rw, "-i", str(wrong)))
    try:
        text = refused.wait_text("[join exited:", 40)
        assert "[join exited: 1]" in text and "refused" in text, text
    finally:
        refused.close()
    host.type("echo listed-$((6*7))")
    good = JoinMate(tmp_path / "good", join_argv(host.join_rw, "-i", str(mate_key)))
    try:
        good.wait_text("listed-42", 40)
    finally:
        good.close()


@pytest.fixture
def relay_and_keys(tmp_path: Path) -> Iterator[tuple[RelayProcess, Host, Path]]:
    relay = RelayProcess(tmp_path / "relay")
    mate_key = tmp_path / "mate_key"
    (tmp_path / "mates.pub").write_text(keypair(mate_key) + "\n")
    host = _host(relay, Host(tmp_path / "host", relay.conf()
                             + f"set -g tether-authorized-keys {tmp_path / 'mates.pub'}\n",
                             ready=False))
    yield relay, host, mate_key
    host.close()
    relay.close()


def test_closing_the_terminal_leaves_no_tmux_behind(
    shared: tuple[RelayProcess, Host], tmp_path: Path
) -> None:
    """A mate closes the terminal window (SIGHUP): the join's own tmux server
    goes with it, not left running with the host's panes in it."""
    _, host = shared
    host.type("echo hello-$((6*7))")
    mate = JoinMate(tmp_path / "mate", join_argv(host.join_rw))
    tmp = mate.env["TMPDIR"]

    def local_servers() -> list[str]:
        out = subprocess.run(["pgrep", "-f", f"tmux -S {tmp}/tether-join-"],
                             capture_output=True, text=True).stdout
        return out.split()

    try:
        mate.wait_text("hello-42", 40)
        assert local_servers(), "the join's local tmux server is not where expected"
    finally:
        mate.close()  # the terminal goes: the join gets SIGHUP
    wait_for(lambda: not local_servers(), 15, "the join's local tmux server to exit")
