"""SSH front processes (`tether relay --ssh-procs N`) as people meet them: a real
relay with two fronts, a host, and mates with OpenSSH `ssh` in a local tmux.
Mates of one session on different fronts share it; a kick and the relay's
limits reach them there; a front that dies takes only its own connections and
comes back, and the session goes on.

The whole end-to-end suite also runs through fronts with
``TETHER_TEST_RELAY_ARGS="--ssh-procs 2"``."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.procs import descendants

from .helpers import Host, Mate, RelayProcess, free_port, wait_for
from .test_presence import kick, list_mates, shown


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path_factory.mktemp("relay"), None, "--ssh-procs", "2")
    yield r
    r.close()


def fronts(relay: RelayProcess) -> list[int]:
    return sorted(p.pid for p in descendants(relay.pid) if "tether.relay.front" in p.cmdline)


def serving(relay: RelayProcess) -> set[int]:
    """The front processes that have accepted an SSH connection (from the log)."""
    text = relay.log.read_text(errors="replace")
    return {int(pid) for pid in re.findall(r"\[front (\d+)\] INFO \[conn=\d+\] Accepted", text)}


def admitted(port: int) -> bool:
    """Whether a new SSH connection from here gets the relay's key exchange
    (``SSH_MSG_KEXINIT``), not its refusal (``SSH_MSG_DISCONNECT``): the first
    packet after its version line, in the clear."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        seen = b""
        while True:
            line, _, rest = seen.partition(b"\r\n")
            if _ and len(rest) >= 6 and len(rest) >= 4 + int.from_bytes(rest[:4], "big"):
                return line.startswith(b"SSH-") and rest[5] == 20  # KEXINIT
            data = s.recv(4096)
            if not data:
                return False
            seen += data


def attach(mates: list[Mate], tmp_path: Path, ssh: str, name: str) -> Mate:
    m = Mate(tmp_path, ssh, (100, 30), name)
    mates.append(m)
    wait_for(lambda: "0:" in m.status_line(), 20, f"{name} to attach")
    return m


def test_mates_on_two_fronts_share_the_session_and_a_kick_reaches_them(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    assert len(fronts(relay)) == 2
    first = attach(mates, tmp_path, host.ssh_rw, "first")
    second = attach(mates, tmp_path, host.ssh_rw, "second")
    # the host's connection and the two mates' went to the fronts in turn
    assert serving(relay) == set(fronts(relay))
    first.type("echo from-first-$((6*7))")
    wait_for(lambda: "from-first-42" in host.screen(), 10, "the first mate's keys on the host")
    second.type("echo from-second-$((7*7))")
    wait_for(lambda: "from-second-49" in host.screen(), 10, "the second mate's keys")
    first.wait_text("from-second-49")
    second.wait_text("from-first-42")
    # window size follows the smaller read-write mate, whichever front has it
    second.resize(80, 20)
    wait_for(lambda: host.display("#{window_width}x#{window_height}") == "80x19", 10,
             "the window to follow the second mate's resize")
    ids = [line.split()[0] for line in list_mates(host).splitlines()[1:]]
    assert len(ids) == 2
    done = kick(host, ids[0])
    assert done.returncode == 0, done.stderr
    kicked = wait_for(lambda: next((m for m in (first, second)
                                    if "[ssh exited: 4]" in m.screen()), None), 15,
                      "the kicked mate's ssh to exit with status 4")
    assert "tether: the host disconnected you" in kicked.screen()
    other = second if kicked is first else first
    host.type("echo after-kick-$((8*8))")
    other.wait_text("after-kick-64")
    assert other.alive()


def test_a_front_that_dies_takes_only_its_connections_and_comes_back(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    first = attach(mates, tmp_path, host.ssh_rw, "first")
    second = attach(mates, tmp_path, host.ssh_ro, "second")
    before = fronts(relay)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    # one mate was on each front: exactly one loses its connection
    gone = wait_for(lambda: [m for m in (first, second) if "[ssh exited" in m.screen()], 15,
                    "a mate of the killed front to lose its connection")
    assert len(gone) == 1
    kept = second if gone[0] is first else first
    # the relay starts the front again; the session, the other mate and the
    # host's sharing are untouched (a host link on that front comes back)
    wait_for(lambda: len(fronts(relay)) == 2 and victim not in fronts(relay), 15,
             "the front to be started again")
    host.type("echo still-shared-$((5*5))")
    kept.wait_text("still-shared-25", timeout=30)
    again = attach(mates, tmp_path, host.ssh_rw, "again")
    again.wait_text("still-shared-25")
    again.type("echo back-in-$((9*9))")
    wait_for(lambda: "back-in-81" in host.screen(), 20, "the new mate's keys on the host")


def test_front_processes_do_not_import_from_the_relays_directory(tmp_path: Path) -> None:
    # `python -m` puts the current directory first on the module path: a relay
    # run in a directory others can write to must not import what they put there
    cwd = tmp_path / "cwd"
    (cwd / "tether").mkdir(parents=True)
    (cwd / "tether" / "__init__.py").write_text("raise SystemExit('the wrong tether')\n")
    relay = RelayProcess(tmp_path / "relay", free_port(), "--ssh-procs", "2", cwd=cwd)
    try:
        wait_for(lambda: len(fronts(relay)) == 2, 10, "two front processes")
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            assert s.recv(100).startswith(b"SSH-2.0-")  # a front speaks SSH on it
        assert "the wrong tether" not in relay.log.read_text(errors="replace")
    finally:
        relay.close()


def test_connections_per_address_are_counted_over_every_front(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay", free_port(), "--ssh-procs", "2",
                         "--max-connections-per-address", "2")
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            held.append(s)
            assert s.recv(100).startswith(b"SSH-2.0-")  # a front speaks SSH on it
        # the third goes to a front that has seen one connection: only the
        # relay's count over both refuses it
        third = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        held.append(third)
        third.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (chunk := third.recv(4096)):
            data += chunk
        assert b"too many connections from your address (at most 2)" in data
        # one held connection closing frees its place
        held.pop(0).close()
        wait_for(lambda: _greets(relay.port), 10, "a new connection to be served")
    finally:
        for s in held:
            s.close()
        relay.close()


def _greets(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"too many" not in data:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if len(data) > 200 and b"too many" not in data:
                return True  # past the version line, into the key exchange
        return data.startswith(b"SSH-2.0-") and b"too many" not in data


def test_a_session_that_requires_keys_checks_them_through_the_front(
    relay: RelayProcess, tmp_path: Path, mates: list[Mate]
) -> None:
    from .test_limits import keypair

    key, other = tmp_path / "mate_key", tmp_path / "other_key"
    (tmp_path / "mates.pub").write_text(keypair(key) + "\n")
    keypair(other)
    host = Host(tmp_path / "host",
                relay.conf() + f"set -g tether-authorized-keys {tmp_path / 'mates.pub'}\n")
    try:
        refused = Mate(tmp_path, host.ssh_rw.replace(
            "ssh ", f"ssh -o IdentitiesOnly=yes -i {other} ", 1), name="refused")
        mates.append(refused)
        refused.wait_text("[ssh exited: 255]")
        assert "Permission denied" in refused.screen()
        ok = attach(mates, tmp_path, host.ssh_rw.replace(
            "ssh ", f"ssh -o IdentitiesOnly=yes -i {key} ", 1), "ok")
        shown(host, " joined (ssh, read-write, 127.0.0.1:")
        ok.type("echo keyed-$((3*3))")
        wait_for(lambda: "keyed-9" in host.screen(), 10, "the keyed mate's keys")
    finally:
        host.close()


def test_a_connection_flood_leaves_attached_mates_alone(
    relay: RelayProcess, host: Host, mates: list[Mate], tmp_path: Path
) -> None:
    mate = attach(mates, tmp_path, host.ssh_rw, "steady")
    flood: list[socket.socket] = []
    try:
        for _ in range(300):  # past the per-address bound (32): the rest refused
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", relay.port))
            flood.append(s)
        mate.type("echo during-flood-$((4*4))")
        wait_for(lambda: "during-flood-16" in host.screen(), 20,
                 "the attached mate's keys during the flood")
        assert len(fronts(relay)) == 2 and mate.alive()
    finally:
        for s in flood:
            s.close()
    # the flood's places are given back (each front reports its closes to the
    # relay, which counts the address's connections): a new mate gets in
    wait_for(lambda: admitted(relay.port), 20, "the address to be let in again")
    again = attach(mates, tmp_path, host.ssh_rw, "after-flood")
    again.wait_text("during-flood-16")
