"""Presence as a host uses it: a real relay and host, mates with OpenSSH `ssh`
(in a local tmux), `tether join` and the web front's protocol. The host is
told who joins and leaves, `tether list-mates` lists them, and
`tether kick-mate ID` disconnects one while its link goes on working."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.env import tether
from tether.testing.host import TMUX_CONF

from .helpers import Host, Mate, RelayProcess, free_port, tmux, wait_for
from .test_join import JoinMate, join_argv
from .test_limits import keypair


def list_mates(host: Host) -> str:
    return tether(host.env, "-S", host.sock, "list-mates")


def kick(host: Host, mate: int | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", "-S", host.sock, "kick-mate",
                           str(mate)], capture_output=True, text=True, env=host.env, timeout=30)


def mate_ids(host: Host, kind: str) -> list[int]:
    """The ids `tether list-mates` shows for mates of ``kind``."""
    return [int(line.split()[0]) for line in list_mates(host).splitlines()[1:]
            if line.split()[1:2] == [kind]]


def shown(host: Host, text: str, timeout: float = 20) -> str:
    """Wait until ``text`` is in the host's `tether show-messages`."""
    return wait_for(lambda: m if text in (m := host.messages()) else "", timeout,
                    f"{text!r} in the host's messages")


def fingerprint_of(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


def test_an_ssh_mate_is_listed_with_its_key_kicked_and_can_come_back(
    relay: RelayProcess, tmp_path: Path, mates: list[Mate]
) -> None:
    key = tmp_path / "mate_key"
    (tmp_path / "mates.pub").write_text(keypair(key) + "\n")
    fp = fingerprint_of(key.with_suffix(".pub"))
    host = Host(tmp_path / "host",
                relay.conf() + f"set -g tether-authorized-keys {tmp_path / 'mates.pub'}\n")
    try:
        assert list_mates(host).strip() == "no mates connected"
        ssh = host.ssh_rw.replace("ssh ", f"ssh -o IdentitiesOnly=yes -i {key} ", 1)
        first = Mate(tmp_path, ssh, name="first")
        mates.append(first)
        wait_for(lambda: "0:" in first.status_line(), 20, "the mate to attach")
        # the host is told, with the mate's address and the key it proved
        messages = shown(host, " joined (ssh, read-write, 127.0.0.1:")
        assert f"key {fp})" in messages
        table = list_mates(host).splitlines()
        assert table[0].split() == ["ID", "KIND", "ACCESS", "ADDRESS", "FINGERPRINT"]
        (row,) = table[1:]
        mate_id, kind, access, address, key_fp = row.split()
        assert (kind, access, key_fp) == ("ssh", "rw", fp)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
        assert host.read_format("#{@tether_mates}") == "1"
        # an id nobody has is an error, and kicks no one
        wrong = kick(host, 999)
        assert wrong.returncode == 1 and "no mate 999" in wrong.stderr
        assert first.alive()
        done = kick(host, mate_id)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"mate {mate_id} disconnected"
        first.wait_text("tether: the host disconnected you")
        first.wait_text("[ssh exited: 4]")
        shown(host, f"mate {mate_id} left (ssh, read-write")
        assert list_mates(host).strip() == "no mates connected"
        # the token (and the key) still work for a new mate
        host.type("echo still-shared-$((6*7))")
        second = Mate(tmp_path, ssh, name="second")
        mates.append(second)
        second.wait_text("still-shared-42")
        wait_for(lambda: mate_ids(host, "ssh"), 20, "the new mate to be listed")
        assert mate_ids(host, "ssh") != [int(mate_id)]
    finally:
        host.close()


class WebMate:
    """The web front's protocol from a terminal of its own (``tether.testing.web_mate``
    in a local tmux), as the browser's page speaks it."""

    def __init__(self, workdir: Path, link: str) -> None:
        self.sock = str(workdir / "web.sock")
        cmd = (shlex.join([sys.executable, "-m", "tether.testing.web_mate", link])
               + '; echo "[web exited: $?]"; sleep 3600')
        subprocess.run(["tmux", "-S", self.sock, "new-session", "-d", "-x", "100", "-y", "30",
                        cmd], check=True)

    def screen(self) -> str:
        return tmux(self.sock, "capture-pane", "-p")

    def close(self) -> None:
        tmux(self.sock, "kill-server", check=False)


@pytest.fixture
def web_shared(tmp_path: Path) -> Iterator[tuple[RelayProcess, Host]]:
    relay = RelayProcess(tmp_path / "relay", None, "--web-port", str(free_port()))
    try:
        host = Host(tmp_path / "host", relay.conf())
    except BaseException:
        relay.close()
        raise
    yield relay, host
    host.close()
    relay.close()


def test_ssh_join_and_web_mates_are_listed_by_kind_and_each_can_be_kicked(
    web_shared: tuple[RelayProcess, Host], tmp_path: Path, mates: list[Mate]
) -> None:
    _, host = web_shared
    host.type("echo everyone-$((6*7))")
    viewer = Mate(tmp_path, host.ssh_ro, name="viewer")
    mates.append(viewer)
    joiner = JoinMate(tmp_path / "joiner", join_argv(host.join_rw))
    web = WebMate(tmp_path, host.display("#{tether_web_ro}"))
    try:
        viewer.wait_text("everyone-42")
        joiner.wait_text("everyone-42", 40)
        wait_for(lambda: "everyone-42" in web.screen(), 30, "the web mate's screen")
        wait_for(lambda: all(mate_ids(host, k) for k in ("ssh", "join", "web")), 20,
                 "an ssh, a join and a web mate to be listed")
        rows = {line.split()[1]: line.split() for line in list_mates(host).splitlines()[1:]}
        assert rows["ssh"][2] == "ro" and rows["join"][2] == "rw" and rows["web"][2] == "ro"
        for kind in ("ssh", "join", "web"):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", rows[kind][3]), rows[kind]
        messages = host.messages()
        assert " joined (web, read-only, 127.0.0.1:" in messages
        assert " joined (join, read-write, 127.0.0.1:" in messages
        # the web mate is closed with 4004: its client exits 1 (not a normal end)
        (web_id,) = mate_ids(host, "web")
        assert kick(host, web_id).returncode == 0
        wait_for(lambda: "[web exited: 1]" in web.screen(), 20, "the web mate to be closed")
        # the join mate is told the session is over for it, and does not come back
        (join_id,) = mate_ids(host, "join")
        assert kick(host, join_id).returncode == 0
        joiner.wait_text("the host disconnected you", 20)
        joiner.wait_text("[join exited: 0]", 20)
        shown(host, f"mate {join_id} left (join, read-write")
        assert [line.split()[1] for line in list_mates(host).splitlines()[1:]] == ["ssh"]
        assert viewer.alive()
    finally:
        joiner.close()
        web.close()


def test_a_join_mate_who_detaches_leaves_the_list_at_once(host: Host, tmp_path: Path) -> None:
    """Detaching ends `tether join`, and it says goodbye: the host's list drops it
    now, where a link that merely ended keeps its place, listed "(link down)",
    until the relay forgets it."""
    host.type("echo leaving-$((6*7))")
    joiner = JoinMate(tmp_path / "joiner", join_argv(host.join_rw))
    try:
        joiner.wait_text("leaving-42", 40)
        (join_id,) = wait_for(lambda: mate_ids(host, "join"), 20, "the join mate listed")
        tmux(joiner.sock, "send-keys", "C-b", "d")  # detach (README: C-b d to leave)
        joiner.wait_text("[join exited: 0]", 20)
        shown(host, f"mate {join_id} left (join, read-write")
        assert list_mates(host).strip() == "no mates connected"
    finally:
        joiner.close()


def test_a_host_without_a_status_line_gets_its_last_line_back_soon(
    relay: RelayProcess, tmp_path: Path, mates: list[Mate]
) -> None:
    """With the status line off, tmux draws a message over the pane's last line
    (and, on a terminal that answers no queries, stops drawing the pane's cells
    until it goes): a mate's arrival shows for the user's display-time there,
    not the 15 s it shows in a status line."""
    host = Host(tmp_path / "host", relay.conf(), tmux_conf=TMUX_CONF + "set -g status off\n",
                command=["cat"])
    viewer = str(tmp_path / "viewer.sock")  # the host's own terminal: a local tmux
    env = {k: v for k, v in host.env.items() if k != "TMUX"}
    try:
        subprocess.run(["tmux", "-S", viewer, "-f", "/dev/null", "new-session", "-d", "-x",
                        "100", "-y", "30", f"tmux -S {shlex.quote(host.sock)} attach"],
                       check=True, env=env)
        wait_for(lambda: tmux(host.sock, "list-clients"), 20, "the host's terminal")
        mate = Mate(tmp_path, host.ssh_rw, size=(100, 31))
        mates.append(mate)

        shown(host, " joined (ssh, read-write")  # and put on the screen, for 750 ms
        mate.type("drawn-42", enter=False)
        wait_for(lambda: "drawn-42" in tmux(viewer, "capture-pane", "-p")
                 and "tether: mate" not in tmux(viewer, "capture-pane", "-p"), 6,
                 "the message to go and the pane to show what the mate typed")
    finally:
        tmux(viewer, "kill-server", check=False)
        host.close()
