"""Relay limits and access control: each limit refuses one peer with a clear message while
everyone else carries on."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from tether.core.tokens import new_token

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_share import join


def keypair(path: Path) -> str:
    """An ed25519 key at ``path`` (OpenSSH format); returns the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.write_bytes(key.export_private_key())
    os.chmod(path, 0o600)
    public = key.export_public_key().decode().strip()
    path.with_suffix(".pub").write_text(public + "\n")
    return public


def test_unknown_tokens_back_off_per_address(tmp_path: Path, mates: list[Mate]) -> None:
    relay = RelayProcess(tmp_path / "relay", None, "--failed-tokens-free", "2")
    h = Host(tmp_path / "host", relay.conf())
    try:
        for i in range(4):
            m = Mate(tmp_path, f"ssh -p {relay.port} {new_token()}@127.0.0.1", name=f"bad{i}")
            mates.append(m)
            # two free failures, then each try doubles the wait (1 s, 2 s), and the
            # answer is held back for it
            m.wait_text("Invalid or expired session token." if i < 2 else "Too many failed")
        # a good token still joins from the held-back address: back-off on the
        # address alone would lock out everyone behind the guesser's NAT
        late = join(mates, tmp_path, h.ssh_rw, name="late")
        h.type("echo good-token-joined")
        late.wait_text("good-token-joined")
        # and a wrong one from there still waits
        again = Mate(tmp_path, f"ssh -p {relay.port} {new_token()}@127.0.0.1", name="again")
        mates.append(again)
        again.wait_text("Too many failed attempts from your address; try again in 4 s")
    finally:
        h.close()
        relay.close()


def test_mates_per_session_limit(tmp_path: Path, mates: list[Mate]) -> None:
    relay = RelayProcess(tmp_path / "relay", None, "--max-mates", "1")
    h = Host(tmp_path / "host", relay.conf())
    try:
        first = join(mates, tmp_path, h.ssh_rw, name="first")
        second = Mate(tmp_path, h.ssh_ro, name="second")
        mates.append(second)
        second.wait_text("This session has too many mates connected.")
        h.type("echo first-still-here")
        first.wait_text("first-still-here")
    finally:
        h.close()
        relay.close()


def test_sessions_per_host_key_and_authorized_host_keys(tmp_path: Path) -> None:
    allowed = keypair(tmp_path / "allowed")
    keypair(tmp_path / "stranger")
    (tmp_path / "hosts.pub").write_text(allowed + "\n")
    relay = RelayProcess(tmp_path / "relay", None, "--max-sessions-per-key", "1", "-a",
                         str(tmp_path / "hosts.pub"))
    hosts: list[Host] = []
    try:
        conf = relay.conf() + f"set -g tether-identity {tmp_path / 'allowed'}\n"
        hosts.append(Host(tmp_path / "h1", conf))
        second = Host(tmp_path / "h2", conf, ready=False)
        hosts.append(second)
        wait_for(lambda: "too many sessions for this host key" in second.messages(), 20,
                 "the second session of one key to be refused")
        stranger_conf = relay.conf() + f"set -g tether-identity {tmp_path / 'stranger'}\n"
        stranger = Host(tmp_path / "h3", stranger_conf, ready=False)
        hosts.append(stranger)
        wait_for(lambda: "refused our key" in stranger.messages(), 20,
                 "a host key not in the relay's authorized keys to be refused")
        assert hosts[0].ssh_rw.startswith("ssh -p")
    finally:
        for h in hosts:
            h.close()
        relay.close()


def test_host_limits_mates_to_listed_keys(relay: RelayProcess, tmp_path: Path,
                                          mates: list[Mate]) -> None:
    mate_key = tmp_path / "mate_key"
    (tmp_path / "mates.pub").write_text(keypair(mate_key) + "\n")
    home = tmp_path / "host"
    h = Host(home, relay.conf() + f"set -g tether-authorized-keys {tmp_path / 'mates.pub'}\n")
    try:
        ssh = h.ssh_rw
        keyless = Mate(tmp_path, ssh.replace("ssh ", "ssh -o PubkeyAuthentication=no ", 1),
                       name="keyless")
        mates.append(keyless)
        keyless.wait_text("Permission denied")
        wrong = tmp_path / "wrong_key"
        keypair(wrong)
        other = Mate(tmp_path, ssh.replace("ssh ", f"ssh -o IdentitiesOnly=yes -i {wrong} ", 1),
                     name="wrongkey")
        mates.append(other)
        other.wait_text("Permission denied")
        good = join(mates, tmp_path,
                    ssh.replace("ssh ", f"ssh -o IdentitiesOnly=yes -i {mate_key} ", 1),
                    name="good")
        h.type("echo listed-mate-joined")
        good.wait_text("listed-mate-joined")
    finally:
        h.close()


def open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def test_relay_raises_its_open_file_limit_and_says_when_it_is_too_low(tmp_path: Path) -> None:
    """A shell's soft limit of 1,024 descriptors runs out at ~330 idle sessions."""
    low = RelayProcess(tmp_path / "low", None, prefix=["prlimit", "--nofile=256:4096", "--"])
    roomy = RelayProcess(tmp_path / "roomy", None, prefix=["prlimit", "--nofile=256:16384", "--"])
    try:
        assert open_files(low.proc.pid) == (4096, 4096)
        banner = "".join(low.banner)
        assert "open-file limit (4096) leaves room for about 504 sessions" in banner
        assert "--max-sessions 1000" in banner
        assert open_files(roomy.proc.pid) == (16384, 16384)
        assert "open-file limit" not in "".join(roomy.banner)
    finally:
        low.close()
        roomy.close()
