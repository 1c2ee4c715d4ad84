"""The relay's side of session processes (``relay.owners``), in process: how a
host's first message is found without taking a byte of it, where hosts and
tokens are routed, and the limits counted over every session process."""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from pathlib import Path

import pytest

from tether.core import tokens
from tether.core.messages import Hello, Input
from tether.relay.config import RelayConfig
from tether.relay.owners import HELLO_MOST, OwnerPool, _first_message, config_message


def hello(**kw: object) -> Hello:
    return Hello(version=1, client="test", **kw)  # type: ignore[arg-type]


async def test_the_first_message_is_looked_at_and_left_in_place() -> None:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here, there:
        here.setblocking(False)
        frame = hello(mate_keys=("ssh-ed25519 " + "A" * 60,) * 50).encode()
        then = Input(stream=1, seq=1, pane=0, keys=b"next").encode()

        async def dribble() -> None:  # the frame in three pieces, then the next one
            for piece in (frame[:3], frame[3:500], frame[500:] + then):
                there.sendall(piece)
                await asyncio.sleep(0.02)

        sender = asyncio.ensure_future(dribble())
        there_, first = await _first_message(here, 5)
        await sender
        assert there_ and isinstance(first, Hello) and len(first.mate_keys) == 50
        # every byte is still there for the session process
        got = b""
        while len(got) < len(frame + then):
            got += here.recv(65536)
        assert got == frame + then


async def test_a_host_that_goes_or_says_nothing_is_dropped() -> None:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here:
        here.setblocking(False)
        there.close()
        assert await _first_message(here, 5) == (False, None)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here, there:
        here.setblocking(False)
        there.sendall(b"\0\0")  # half a length: then silence
        assert await asyncio.wait_for(_first_message(here, 0.3), 5) == (False, None)


async def test_a_frame_too_long_or_undecodable_goes_on_unread() -> None:
    for data in (struct.pack(">I", HELLO_MOST + 1) + b"x" * 100,
                 struct.pack(">I", 3) + b"\xc1\xc1\xc1"):
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with here, there:
            here.setblocking(False)
            there.sendall(data)
            assert await _first_message(here, 5) == (True, None)
            assert here.recv(65536) == data  # the session process reads and refuses it


def test_each_session_process_gets_its_own_quic_port(tmp_path: Path) -> None:
    c = RelayConfig(keys_dir=tmp_path, port=2222)
    assert [config_message(c, i, 2222)["quic_port"] for i in range(3)] == [2222, 2223, 2224]
    c.quic_port = 4000
    assert config_message(c, 2, 2222)["quic_port"] == 4002
    for fixed in (0, -1):  # any free port each; no QUIC
        c.quic_port = fixed
        assert config_message(c, 1, 2222)["quic_port"] == fixed
    d = config_message(c, 1, 2345)
    assert (d["port"], d["public_port"], d["ssh_procs"], d["session_procs"]) == (2345, 2345, 0, 0)
    assert d["keys_dir"] == str(tmp_path)


class _Alive:
    """A session process as the pool's routing sees it."""

    def __init__(self, pool: OwnerPool, index: int) -> None:
        self.owner = pool.owners[index]
        self.owner.ready = asyncio.get_running_loop().create_future()
        self.owner.ready.set_result(0)
        self.owner.chan = type("Chan", (), {"closed": False})()  # type: ignore[assignment]


async def test_hosts_go_to_their_session_and_new_ones_to_the_least_loaded(
    tmp_path: Path,
) -> None:
    c = RelayConfig(keys_dir=tmp_path, max_sessions=3, max_sessions_per_key=2)
    pool = OwnerPool(c, 2)
    a, b = (_Alive(pool, i).owner for i in range(2))
    secret = secrets.token_bytes(32)
    sid, rw, ro = tokens.derive_session(secret)
    pool.directory_add(b, sid, rw, ro, "key-1")
    # a resume by id, or by the secret alone, goes where the session is
    assert pool._for_hello(hello(session=sid, secret=secret), "key-1") == (b, "")
    assert pool._for_hello(hello(secret=secret), "key-1") == (b, "")
    # a new session goes to the process with fewer sessions
    assert pool._for_hello(hello(), "key-2") == (a, "")
    # mates' tokens, both of them, lead to it; an unknown one to the first process
    assert pool._for_token(rw) is b and pool._for_token(ro) is b
    assert pool._for_token("x" * 26) is a
    # the limits count every process's sessions
    pool.directory_add(a, "s2", "rw2", "ro2", "key-1")
    assert pool._for_hello(hello(), "key-1")[1] == "too many sessions for this host key"
    pool.directory_add(a, "s3", "rw3", "ro3", "key-3")
    assert pool._for_hello(hello(), "key-4")[1] == "this relay is full; try again later"
    # a session that ended frees its place and its tokens
    pool.directory_remove(b, sid)
    assert pool._for_hello(hello(), "key-4")[1] == ""
    assert pool._for_token(rw) is a
    # a process that is not serving gets nothing
    a.ready = None
    assert pool._for_hello(hello(), "key-4")[0] is b
    b.ready = None
    assert pool._for_hello(hello(), "key-4") == (None, "")
    assert pool._for_token(rw) is None


@pytest.mark.parametrize("kind", ["nonsense", "host", "mate", "left"])
async def test_a_malformed_question_raises_for_its_front(tmp_path: Path, kind: str) -> None:
    """``FrontProcess`` then restarts the front that asked it."""
    pool = OwnerPool(RelayConfig(keys_dir=tmp_path), 1)
    _Alive(pool, 0)
    front = type("Front", (), {"index": 0, "gen": 1})()
    with pytest.raises((ValueError, IndexError)):
        pool.route(front, kind, [], None)  # type: ignore[arg-type]
