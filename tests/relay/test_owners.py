"""The relay's side of session processes (``relay.owners``), in process: how a
host's first message is found without taking a byte of it, where hosts and
tokens are routed, and the limits counted over every session process."""

from __future__ import annotations

import asyncio
import os
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


async def test_the_first_message_is_read_and_nothing_after_it() -> None:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here, there:
        here.setblocking(False)
        # a Hello with 256 RSA-sized keys: past what a socket pair buffers
        frame = hello(mate_keys=("ssh-rsa " + "A" * 716,) * 256).encode()
        then = Input(stream=1, seq=1, pane=0, keys=b"next").encode()

        async def dribble() -> None:  # the frame in pieces, then the next one
            for piece in (frame[:3], frame[3:500], frame[500:] + then):
                await asyncio.get_running_loop().sock_sendall(there, piece)
                await asyncio.sleep(0.02)

        there.setblocking(False)
        sender = asyncio.ensure_future(dribble())
        prefix, first = await _first_message(here, 5)
        await sender
        assert prefix == frame and isinstance(first, Hello) and len(first.mate_keys) == 256
        assert here.recv(65536) == then  # the rest is the session process's to read


async def test_a_host_that_goes_or_says_nothing_is_dropped() -> None:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here:
        there.close()
        assert await _first_message(here, 5) == (None, None)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here, there:
        there.sendall(b"\0\0")  # half a length: then silence
        assert await asyncio.wait_for(_first_message(here, 0.3), 5) == (None, None)


async def test_a_frame_empty_too_long_or_undecodable_goes_on_to_be_refused() -> None:
    for data, read in ((b"\0\0\0\0", 4),  # an empty frame: no spinning on it
                       (struct.pack(">I", HELLO_MOST + 1) + b"x" * 100, 4),
                       (struct.pack(">I", 3) + b"\xc1\xc1\xc1", 7)):
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with here, there:
            there.sendall(data)
            prefix, first = await asyncio.wait_for(_first_message(here, 5), 5)
            assert (prefix, first) == (data[:read], None)


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
        self.owner.chan = type("Chan", (), {"closed": False, "backlog": 0})()  # type: ignore[assignment]


async def test_hosts_go_to_their_session_and_new_ones_to_the_least_loaded(
    tmp_path: Path,
) -> None:
    c = RelayConfig(keys_dir=tmp_path, max_sessions=3, max_sessions_per_key=2)
    pool = OwnerPool(c, 2)
    a, b = (_Alive(pool, i).owner for i in range(2))
    secret = secrets.token_bytes(32)
    sid, rw, ro = tokens.derive_session(secret)
    pool.directory_add(b, sid, rw, ro, "key-1")
    # a resume (its secret derives the session it names) goes where the session
    # is, and is not counted; the secret alone goes there too, but would start
    # a session (it names none to resume)
    assert pool._for_hello(hello(session=sid, secret=secret), "key-1") == (b, "", None)
    assert pool._for_hello(hello(secret=secret), "key-1") == (b, "", sid)
    # a new session goes to the process with fewer sessions
    assert pool._for_hello(hello(), "key-2") == (a, "", "")
    # mates' tokens, both of them, lead to it; an unknown one to the first process
    assert pool._for_token(rw) is b and pool._for_token(ro) is b
    assert pool.lookup(ro) == (sid, True, False) and pool.lookup("x" * 26) is None
    assert pool._for_token("x" * 26) is a
    # the limits count every process's sessions, for a resume too (its secret
    # is checked only there: it may turn out to start a session)
    pool.directory_add(a, "s2", "rw2", "ro2", "key-1")
    too_many = "too many sessions for this host key"
    assert pool._for_hello(hello(), "key-1") == (a, too_many, None)
    # naming a session without its secret: that session's process, which will
    # not resume it, and may start one, so the limits apply
    assert pool._for_hello(hello(session=sid), "key-1") == (b, too_many, None)
    assert pool._for_hello(hello(session=sid, secret=secret), "key-1") == (b, "", None)
    pool.directory_add(a, "s3", "rw3", "ro3", "key-3", keys_only=True)
    assert pool._for_hello(hello(), "key-4")[1] == "this relay is full; try again later"
    assert pool.lookup("rw3") == ("s3", False, True)
    # a session that ended frees its place and its tokens
    pool.directory_remove(b, sid)
    assert pool._for_hello(hello(), "key-4")[1] == ""
    assert pool._for_token(rw) is a
    # a process that is not serving gets nothing
    a.ready = None
    assert pool._for_hello(hello(), "key-4")[0] is b
    b.ready = None
    assert pool._for_hello(hello(), "key-4") == (None, "", None)
    assert pool._for_token(rw) is None


async def test_hosts_not_yet_decided_count_against_the_limits(tmp_path: Path) -> None:
    """Two hosts at once must not both take the last place: a routed host counts
    until its session process says its session exists or will not."""
    c = RelayConfig(keys_dir=tmp_path, max_sessions=2, max_sessions_per_key=5)
    pool = OwnerPool(c, 2)
    a, b = (_Alive(pool, i).owner for i in range(2))
    sent: list[list[object]] = []
    for o in (a, b):
        o.send = lambda msg, fd=None: sent.append(msg)  # type: ignore[method-assign]
    front = type("Front", (), {"index": 0, "gen": 1, "alive": True})()
    frame = hello().encode()
    for _ in range(3):
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with there:
            there.sendall(frame)
            here.setblocking(False)
            await pool._route_host(front, (0, 1), ["key", "192.0.2.1:1", "ssh"], here)
    hellos = [m for m in sent if m[3] == "hello"]
    assert [m[3] for m in sent] == ["hello_part", "hello"] * 3
    assert all(bytes(p[5]) == frame for p in sent if p[3] == "hello_part")  # type: ignore[arg-type]
    refs = [m[4] for m in hellos]
    assert [m[5] for m in hellos] == ["", "", "this relay is full; try again later"]
    assert a.deciding == b.deciding == 1
    # one was refused by its process: its place is free again
    pool.decided(int(refs[0]))  # type: ignore[call-overload]
    assert pool._for_hello(hello(), "key")[1] == ""
    pool.decided(int(refs[0]))  # twice is once
    assert a.deciding + b.deciding == 1
    # two hosts re-creating one session (after a restart) meet in one process
    secret = secrets.token_bytes(32)
    first = pool._for_hello(hello(secret=secret), "key")
    assert first[2] == tokens.derive_session(secret)[0]
    pool._deciding[999] = (first[0], "key", first[2])  # type: ignore[index]
    other = b if first[0] is a else a
    other.deciding -= 5  # the other process looks emptier
    assert pool._for_hello(hello(secret=secret), "key")[0] is first[0]
    other.deciding += 5
    del pool._deciding[999]


async def test_answers_for_a_front_that_ended_are_dropped_and_descriptors_closed(
    tmp_path: Path,
) -> None:
    pool = OwnerPool(RelayConfig(keys_dir=tmp_path), 1)
    got: list[tuple[list[object], int | None]] = []
    front = type("Front", (), {"index": 0, "gen": 2, "alive": True,
                               "send": lambda self, m, fd=None: got.append((m, fd))})()
    pool.fronts = type("Pool", (), {"fronts": [front]})()  # type: ignore[assignment]
    for gen, msg in ((1, ["attached", 5]), (2, ["attached", 6]), (2, ["exit", 6, 0])):
        r, w = os.pipe()
        os.close(w)
        pool.to_front(0, gen, msg, r)
        with pytest.raises(OSError):
            os.fstat(r)  # closed here whatever happened
    assert [m for m, _ in got] == [["attached", 6], ["exit", 6, 0]]
    # a malformed question's descriptor is closed too
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ValueError):
        pool.route(front, "nonsense", [], r)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        os.fstat(r)


@pytest.mark.parametrize("kind", ["nonsense", "host", "mate", "left"])
async def test_a_malformed_question_raises_for_its_front(tmp_path: Path, kind: str) -> None:
    """``FrontProcess`` then restarts the front that asked it."""
    pool = OwnerPool(RelayConfig(keys_dir=tmp_path), 1)
    _Alive(pool, 0)
    front = type("Front", (), {"index": 0, "gen": 1})()
    with pytest.raises((ValueError, IndexError)):
        pool.route(front, kind, [], None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "problem"), [
    ([], ""),
    (["--session-procs", "4"], ""),
    (["--session-procs", "2", "--ssh-procs", "1", "--web-port", "0"], ""),
    (["--session-procs", "65"], "--session-procs 65: expected 0 to 64"),
    (["--ssh-procs", "-1"], "--ssh-procs -1: expected 0 to 64"),
    (["--session-procs", "2", "--replica", "worker"], "--replica worker cannot be used"),
])
def test_the_relays_process_options(argv: list[str], problem: str) -> None:
    from tether.relay import cli as relay_cli

    a = relay_cli._parser().parse_args(argv)
    found = relay_cli._procs_problem(a)
    assert (problem in found) if problem else found == ""
