"""The relay's SSH front processes: a front that cannot serve stops the relay's
start with a clear error (not a relay that answers no one); the relay answers
what a front asks, and a front that breaks the channel's rules is ended and
started again with what it served released."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tether.relay.config import RelayConfig
from tether.relay.front_requests import Handlers
from tether.relay.fronts import FrontPool
from tether.testing.procs import descendants
from tether.transport import fdchannel, ssh
from tether.transport.fdchannel import FdChannel


async def _never(*args: Any) -> None:
    raise AssertionError("nothing connects in this test")


def _pool(keys: Path) -> FrontPool:
    config = RelayConfig(keys_dir=keys, bind="127.0.0.1", port=0)
    return FrontPool(config, 2, Handlers(_never, _never, _never, lambda token: None))


async def test_fronts_that_cannot_load_the_host_keys_stop_the_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "ssh_host_ed25519_key").write_text("not a key\n")
    pool = _pool(keys)
    with pytest.raises(RuntimeError, match="did not start"):
        await pool.start()
    assert not [p for p in descendants(os.getpid()) if "tether.relay.front" in p.cmdline]


async def test_fronts_serve_and_end_with_the_pool(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "keys")
    ssh.load_or_create_host_keys(tmp_path / "keys")  # the relay makes them first
    port = await pool.start()
    try:
        assert len([f for f in pool.fronts if f.alive]) == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
        assert sum(len(f.conns) for f in pool.fronts) == 1
        writer.close()
        for _ in range(500):  # the front tells the relay when it is gone
            if not any(f.conns for f in pool.fronts):
                break
            await asyncio.sleep(0.01)
        assert not any(f.conns for f in pool.fronts)
        assert pool.admission.count == 0
    finally:
        await pool.close()
    assert not [p for p in descendants(os.getpid()) if "tether.relay.front" in p.cmdline]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


class FakeFront:
    """The far end of a front's channel, played by the test: no process."""

    def __init__(self, pool: FrontPool) -> None:
        self.front = pool.fronts[0]
        here, self.sock = fdchannel.pair()
        self.front.listen(here)

    def send(self, *msg: Any) -> None:
        self.sock.send(msgpack.packb(list(msg), use_bin_type=True))

    async def recv(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
        return list(msgpack.unpackb(data, raw=False))


async def test_a_front_asks_and_the_relay_answers_then_a_bad_message_ends_it(
    tmp_path: Path,
) -> None:
    seen: list[Any] = []

    async def on_mate(term: Any) -> None:
        seen.append((term.username, term.term, term.cols, term.rows, term.peer))
        term.write(b"x" * 40000)  # past one message: sent in pieces
        term.exit(1)

    config = RelayConfig(keys_dir=tmp_path, bind="127.0.0.1", port=0)
    pool = FrontPool(config, 1, Handlers(
        _never, on_mate, _never, lambda token: {b"key-blob"} if token == "needs-key" else None))
    fake = FakeFront(pool)
    fake.sock.setblocking(False)
    try:
        fake.send("mate_keys", 7, "needs-key")
        # digests, not blobs: 256 RSA keys would not fit one message
        assert await fake.recv() == ["keys", 7, [ssh.key_digest(b"key-blob")]]
        fake.send("mate_keys", 8, "free")
        assert await fake.recv() == ["keys", 8, []]
        fake.send("mate", 3, "tok", "xterm", 80, 24, "192.0.2.1:4000", "")
        first, second, last = await fake.recv(), await fake.recv(), await fake.recv()
        assert seen == [("tok", "xterm", 80, 24, "192.0.2.1:4000")]
        assert [first[:2], second[:2], last] == [["write", 3], ["write", 3], ["exit", 3, 1]]
        assert len(first[2]) + len(second[2]) == 40000
        # a connection it serves is counted; a bad message ends the front, and
        # what it served is released
        assert pool.admission.admit("192.0.2.9") is None
        pool.fronts[0].conns[1] = "192.0.2.9"
        fake.send("closed", 999)  # not one of its connections: ignored
        await asyncio.sleep(0.05)
        assert pool.admission.count == 1 and fake.front.alive
        fake.send("mate", "not", "enough")
        for _ in range(200):
            if not fake.front.alive:
                break
            await asyncio.sleep(0.01)
        assert not fake.front.alive
        assert pool.admission.count == 0
        assert pool.restarts.pending, "a front that broke the rules is started again"
    finally:
        await pool.close()
        fake.sock.close()


async def test_a_mate_of_a_dead_front_never_reaches_its_successor(tmp_path: Path) -> None:
    """A restarted front numbers its mates from 1 again: the relay's answer to a
    mate of the dead one (held back by a wrong token's wait, say) must not go
    to the new mate with the same number."""
    release = asyncio.Event()

    async def on_mate(term: Any) -> None:
        await release.wait()
        term.write(b"Invalid or expired session token.\r\n")
        term.exit(1)

    config = RelayConfig(keys_dir=tmp_path, bind="127.0.0.1", port=0)
    pool = FrontPool(config, 1, Handlers(_never, on_mate, _never, lambda token: None))
    old = FakeFront(pool)
    old.sock.setblocking(False)
    old.send("mate", 1, "wrong-token", "xterm", 80, 24, "192.0.2.1:4000", "")
    await asyncio.sleep(0.05)
    old.sock.close()  # the front dies with its mate's answer still to come
    for _ in range(200):
        if not pool.fronts[0].alive:
            break
        await asyncio.sleep(0.01)
    pool.restarts.cancel()
    new = FakeFront(pool)  # its successor, on the same slot
    new.sock.setblocking(False)
    try:
        release.set()
        await asyncio.sleep(0.1)
        with pytest.raises(BlockingIOError):
            new.sock.recv(65536)  # nothing for the successor's mate 1
        assert new.front.alive
    finally:
        await pool.close()
        new.sock.close()


async def test_a_session_of_many_keys_is_answered_in_one_message(tmp_path: Path) -> None:
    keys = {bytes([i]) * 550 for i in range(256)}  # 256 RSA-4096-sized public keys
    config = RelayConfig(keys_dir=tmp_path, bind="127.0.0.1", port=0)
    pool = FrontPool(config, 1, Handlers(_never, _never, _never, lambda token: keys))
    fake = FakeFront(pool)
    fake.sock.setblocking(False)
    try:
        fake.send("mate_keys", 1, "tok")
        kind, req, digests = await fake.recv()
        assert (kind, req, len(digests)) == ("keys", 1, 256)
        assert set(digests) == {ssh.key_digest(k) for k in keys}
        assert fake.front.alive
    finally:
        await pool.close()
        fake.sock.close()


async def test_a_front_whose_relay_does_not_answer_refuses_the_key_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tether.relay import front as front_mod
    from tether.transport.ssh import _RelaySSHServer
    from tether.transport.ssh_bounds import Admission

    monkeypatch.setattr(front_mod, "KEYS_WAIT", 0.05)
    mine, silent = fdchannel.pair()
    f = front_mod.Front(mine)
    f._chan = FdChannel(mine, f._on_message, lambda: None)
    try:
        server = _RelaySSHServer(None, None, Admission(1, 1), 30.0, f._mate_keys)
        assert await server.begin_auth("some-token") is True  # a key is asked for
        key = asyncssh_key()
        assert server.validate_public_key("some-token", key) is False
    finally:
        f._chan.close()
        silent.close()


def asyncssh_key() -> Any:
    from tether.transport.sshlib import asyncssh

    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


async def test_a_routed_host_reads_the_bytes_the_relay_read_then_its_channel() -> None:
    """With session processes the relay's process reads a host's first frame to
    route it: the session process gets those bytes in pieces, then the channel,
    and its link reads them first, then the rest, in order; it says once that
    the host's session is decided, whatever happens."""
    from tether.core.messages import Hello, Input
    from tether.relay.front_requests import FrontRequests

    got: list[Any] = []
    decided: list[int] = []
    done = asyncio.Event()

    async def on_host(link: Any, who: str, peer: str, refusal: str, told: Any) -> None:
        got.append((who, peer, refusal, await link.recv(), await link.recv()))
        told()
        done.set()

    sent: list[Any] = []
    req = FrontRequests("test", lambda m, fd=None: sent.append(m),
                        Handlers(on_host, _never, _never, lambda t: None, decided.append))
    frame = Hello(1, "test", mate_keys=("ssh-rsa " + "A" * 716,) * 100).encode()
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with there:
        for i in range(0, len(frame), 30000):  # three pieces
            req.handle("hello_part", [7, frame[i:i + 30000]], None)
        there.sendall(Input(5, 1, 0, b"after").encode())
        req.handle("hello", [7, "", "SHA256:key", "192.0.2.1:22", "ssh test"],
                   os.dup(here.fileno()))
        here.close()
        await asyncio.wait_for(done.wait(), 5)
        for _ in range(100):
            if not req.tasks:
                break
            await asyncio.sleep(0.01)
    who, peer, refusal, first, second = got[0]
    assert (who, peer, refusal) == ("SHA256:key", "192.0.2.1:22", "")
    assert isinstance(first, Hello) and len(first.mate_keys) == 100
    assert isinstance(second, Input) and second.keys == b"after"
    assert decided == [7]  # once, though both the handler and the end said so
    assert req._parts == {}
