"""The host's bootstrap through the real OpenSSH client, against the relay's real SSH front.

Each test runs ``ssh`` with ``$HOME`` in a temporary directory, so the user's
keys and known_hosts of this machine play no part.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tether.core.errors import AuthError
from tether.core.messages import Hello, Notice, Output
from tether.transport.link import LinkClosed
from tether.transport.openssh import (
    PipeLink,
    RelayAddress,
    connect_host,
    prestart_host,
    ssh_command,
)
from tether.transport.ssh import (
    SSHLink,
    fingerprint,
    load_or_create_host_keys,
    start_ssh_server,
    wait_closed,
)

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")


class Front:
    """The relay's SSH front on loopback; hosts' links echo what they receive."""

    def __init__(self, keys: Path, accept: bool = True) -> None:
        self.keys = load_or_create_host_keys(keys)
        self.fingerprints = [fingerprint(k) for k in self.keys]
        self.accept = accept
        self.host_keys: list[str] = []
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self.port = 0

    async def start(self) -> None:
        async def on_host(link: SSHLink, key_fp: str, peer: str) -> None:
            self.host_keys.append(key_fp)
            try:
                while True:
                    msg = await link.recv()
                    await self.received.put(msg)
                    await link.send(msg)
            except LinkClosed:
                pass

        async def on_mate(mate: object) -> None:
            pass

        self.acceptor = await start_ssh_server(
            "127.0.0.1", 0, self.keys, on_host, on_mate, key_check=lambda key: self.accept  # type: ignore[arg-type]
        )
        self.port = self.acceptor.get_port()


@pytest.fixture
async def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Front]:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    f = Front(tmp_path / "relay-keys")
    await f.start()
    yield f
    await wait_closed(f.acceptor)


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    out = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], check=True, capture_output=True,
                         text=True).stdout
    return out.split()[1]


def ssh_processes(port: int) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-x", "ssh"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if f" -p {port} " in ln]


async def test_pinned_relay_carries_messages_both_ways(front: Front, tmp_path: Path) -> None:
    key_fp = keygen(Path.home() / ".ssh" / "id_ed25519")
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints[:1])
    link = await connect_host(addr)
    try:
        assert link.kind == "ssh"
        big = Output(3, bytes(range(256)) * 2000)
        await link.send(Hello(1, "test"))
        await link.send(big)
        assert await asyncio.wait_for(link.recv(), 10) == Hello(1, "test")
        assert await asyncio.wait_for(link.recv(), 10) == big
        link.send_ack(Notice("ack"))
        assert await asyncio.wait_for(link.recv(), 10) == Notice("ack")
        assert front.host_keys == [key_fp], "the user's default key identified the host"
    finally:
        link.close()
    with pytest.raises(LinkClosed):
        await link.recv()


async def test_wrong_pin_names_both_fingerprints(front: Front) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    wrong = "SHA256:" + "A" * 43
    with pytest.raises(AuthError) as err:
        await connect_host(RelayAddress("127.0.0.1", front.port, [wrong]))
    assert "mismatch" in str(err.value)
    assert wrong in str(err.value) and front.fingerprints[0] in str(err.value)
    assert front.host_keys == []


async def test_a_missing_identity_is_an_auth_error(front: Front, tmp_path: Path) -> None:
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints,
                        identities=[str(tmp_path / "nope")])
    with pytest.raises(AuthError, match="no such file"):
        await connect_host(addr)


async def test_a_pin_must_be_a_fingerprint(front: Front) -> None:
    """Pins go into a KnownHostsCommand: anything but a fingerprint is refused."""
    for bad in ("SHA256:x'; touch /tmp/owned; '", "MD5:aa:bb", ""):
        with pytest.raises(AuthError, match="not a SHA256 fingerprint"):
            ssh_command(RelayAddress("127.0.0.1", front.port, [bad]), 6)


async def test_known_hosts_decides_when_nothing_is_pinned(front: Front, tmp_path: Path) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    addr = RelayAddress("127.0.0.1", front.port)
    with pytest.raises(AuthError, match="not in known_hosts"):
        await connect_host(addr)
    pub = (tmp_path / "relay-keys" / "ssh_host_ed25519_key.pub").read_text().split()
    known = Path.home() / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{front.port} {pub[0]} {pub[1]}\n")
    link = await connect_host(addr)
    try:
        await link.send(Hello(1, "known"))
        assert await asyncio.wait_for(link.recv(), 10) == Hello(1, "known")
    finally:
        link.close()


async def test_refused_host_key_is_an_auth_error(front: Front) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    front.accept = False
    with pytest.raises(AuthError, match="refused our key"):
        await connect_host(RelayAddress("127.0.0.1", front.port, front.fingerprints))


async def round_trip(link: PipeLink) -> None:
    await link.send(Hello(1, "ping"))
    assert await asyncio.wait_for(link.recv(), 10) == Hello(1, "ping")
    link.close()


async def test_configured_identity_is_the_only_one_offered(front: Front, tmp_path: Path) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    chosen = keygen(tmp_path / "chosen")
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints,
                        identities=[str(tmp_path / "chosen")])
    await round_trip(await connect_host(addr))
    assert front.host_keys == [chosen]


async def test_a_host_without_keys_gets_one_of_its_own(front: Front, tmp_path: Path) -> None:
    own = tmp_path / "state" / "host_ed25519"
    own.parent.mkdir()
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints, fallback_identity=str(own))
    await round_trip(await connect_host(addr))
    assert own.exists() and own.stat().st_mode & 0o077 == 0
    out = subprocess.run(["ssh-keygen", "-lf", f"{own}.pub"], check=True, capture_output=True,
                         text=True).stdout
    assert front.host_keys == [out.split()[1]]
    await round_trip(await connect_host(addr))  # the same key again, not a new one
    assert front.host_keys[1] == front.host_keys[0]


def test_agents_making_their_key_at_once_agree_on_one_pair(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tether.transport.openssh import make_identity

    own = tmp_path / "host_ed25519"
    (tmp_path / "host_ed25519.pub").write_text("ssh-ed25519 AAAA stale\n")  # no private key
    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(lambda _: make_identity(own), range(6))) == {own}
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(own)], check=True,
                             capture_output=True, text=True).stdout.split()[:2]
    assert (tmp_path / "host_ed25519.pub").read_text().split()[:2] == derived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host_ed25519", "host_ed25519.pub"]


async def test_a_key_behind_a_passphrase_falls_back_to_tethers_own(front: Front,
                                                                  tmp_path: Path) -> None:
    """ssh cannot ask for a passphrase here (no agent holds the key)."""
    locked = Path.home() / ".ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret words", "-f", str(locked)],
                   check=True)
    own = tmp_path / "host_ed25519"
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints, fallback_identity=str(own))
    await round_trip(await connect_host(addr))
    out = subprocess.run(["ssh-keygen", "-lf", f"{own}.pub"], check=True, capture_output=True,
                         text=True).stdout
    assert front.host_keys == [out.split()[1]]


async def test_unreachable_relay_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(LinkClosed, match="refused"):
        await connect_host(RelayAddress("127.0.0.1", 1, ["SHA256:" + "A" * 43]), timeout=5)


async def test_closed_links_leave_no_ssh_behind(front: Front) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints)
    links = [await connect_host(addr) for _ in range(3)]
    assert len(ssh_processes(front.port)) == 3
    for link in links:
        link.close()
    deadline = asyncio.get_running_loop().time() + 10
    while ssh_processes(front.port) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert ssh_processes(front.port) == []


async def test_ssh_started_before_the_loop_is_the_link(front: Front) -> None:
    # a warm start begins ssh's handshake before the agent's event loop runs
    keygen(Path.home() / ".ssh" / "id_ed25519")
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints)
    started = prestart_host(addr)
    assert started is not None
    pid = started.proc.pid
    link = await connect_host(addr, started=started)
    try:
        assert link._ssh.proc.pid == pid, "the ssh started early carries the link"
        await link.send(Notice("early"))
        assert await asyncio.wait_for(link.recv(), 10) == Notice("early")
    finally:
        link.close()


async def test_ssh_started_for_another_relay_is_ended_not_used(front: Front) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    addr = RelayAddress("127.0.0.1", front.port, front.fingerprints)
    other = prestart_host(RelayAddress("127.0.0.1", 1, front.fingerprints))
    assert other is not None
    link = await connect_host(addr, started=other)
    try:
        assert link._ssh.proc.pid != other.proc.pid
        assert other.proc.returncode is not None, "the unused ssh was ended and reaped"
        await link.send(Notice("fresh"))
        assert await asyncio.wait_for(link.recv(), 10) == Notice("fresh")
    finally:
        link.close()


async def test_ssh_started_and_never_taken_is_ended(front: Front) -> None:
    keygen(Path.home() / ".ssh" / "id_ed25519")
    started = prestart_host(RelayAddress("127.0.0.1", front.port, front.fingerprints))
    assert started is not None
    assert len(ssh_processes(front.port)) == 1
    started.discard()
    assert started.proc.returncode is not None
    assert ssh_processes(front.port) == []
