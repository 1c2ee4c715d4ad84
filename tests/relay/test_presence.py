"""Presence at the relay and at the host, without sockets: the session lists its
mates for the host (``Mates``) and for browsers on every join and leave, a
host's ``Kick`` disconnects one (ssh, web or join) and leaves its token alone,
and whatever the relay says reaches the host's tmux only as inert text."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from test_session import HostLink, attached, new_session

from tether.agent import _display_all
from tether.client.presence import Presence, clean
from tether.core.limits import MAX_ITEMS
from tether.core.messages import Kick, MateInfo, Mates, Message, Notice
from tether.relay import mates as mates_mod
from tether.relay.config import RelayConfig
from tether.relay.joins import KICKED_JOIN_TEXT, Joins
from tether.relay.mates import EXIT_KICKED, KICKED_TEXT, display_address
from tether.relay.mates import Mates as MatesRole
from tether.relay.session import MORE, Mate, mate_list
from tether.transport import web_terminal as web


def sent_mates(host: HostLink) -> list[tuple[MateInfo, ...]]:
    return [m.mates for m in host.sent if isinstance(m, Mates)]


async def test_the_host_hears_every_join_and_leave_and_again_after_a_reconnect() -> None:
    session, _ = new_session()
    host, _ = attached(session)
    alice = Mate(1, False, 80, 24, kind="ssh", address="192.0.2.7:5000",
                 fingerprint="SHA256:abc")
    bob = Mate(2, True, 80, 24, kind="web", address="[2001:db8::1]:443")
    session.add_mate(alice)
    session.add_mate(bob)
    session.remove_mate(1)
    assert session.remove_mate(1) is None  # gone already: nothing more said
    assert sent_mates(host) == [
        (),  # on attach, even empty: a re-created session forgot its mates
        (MateInfo(1, "ssh", False, "192.0.2.7:5000", "SHA256:abc"),),
        (MateInfo(1, "ssh", False, "192.0.2.7:5000", "SHA256:abc"),
         MateInfo(2, "web", True, "[2001:db8::1]:443")),
        (MateInfo(2, "web", True, "[2001:db8::1]:443"),),
    ]
    again, _ = attached(session, 1.0)  # the host reconnects: told who is there
    assert sent_mates(again) == [(MateInfo(2, "web", True, "[2001:db8::1]:443"),)]


async def test_a_join_client_whose_link_is_down_is_listed_and_marked() -> None:
    session, _ = new_session()
    host, _ = attached(session)
    mate = Mate(1_000_000, False, 80, 24, kind="join", address="198.51.100.2:6000")
    session.add_mate(mate)
    mate.away = True
    session.mates_changed()
    assert sent_mates(host)[-1] == (
        MateInfo(1_000_000, "join", False, "198.51.100.2:6000 (link down)"),)


async def test_mates_that_watch_the_list_see_each_change() -> None:
    session, _ = new_session()
    seen: list[tuple[MateInfo, ...]] = []
    watcher = Mate(1, True, 80, 24, kind="web", address="a", show=seen.append)
    session.add_mate(watcher)
    session.add_mate(Mate(2, False, 80, 24, address="b"))
    session.remove_mate(2)
    assert [[m.id for m in infos] for infos in seen] == [[1], [1, 2], [1]]


def test_a_long_list_is_cut_to_one_message_and_says_so() -> None:
    crowd = {i: Mate(i, True, 80, 24, address=f"10.0.{i // 256}.{i % 256}:1")
             for i in range(1, MAX_ITEMS + 11)}
    listed = mate_list(crowd)
    assert len(listed) == MAX_ITEMS
    assert [m.id for m in listed[:-1]] == list(range(1, MAX_ITEMS))
    assert listed[-1] == MateInfo(0, MORE, True, "11 more not listed")
    Mates(listed).encode()  # fits the schema's bound


async def test_a_kick_from_the_host_disconnects_that_mate_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, _ = new_session()
    _, conn = attached(session)
    kicked: list[int] = []
    for i in (1, 2):
        session.add_mate(Mate(i, False, 80, 24, kick=lambda i=i: kicked.append(i)))
    session.receive(Kick(2), 0.5, conn)
    assert kicked == [2]
    with caplog.at_level(logging.INFO, logger="tether.relay"):
        session.receive(Kick(99), 0.6, conn)  # no such mate: ignored, logged
    assert kicked == [2]
    assert "mate 99, which is not connected; ignored" in caplog.text


class FakeTerminal:
    """A mate's terminal that types nothing and records what it is told."""

    def __init__(self, kind: str = "ssh") -> None:
        self.username = "rw"
        self.peer = "192.0.2.7:5000"
        self.kind = kind
        self.fingerprint = ""
        self.term = "xterm"
        self.cols, self.rows = 80, 24
        self.written = b""
        self.status: int | None = None
        self.closed = asyncio.Event()

    async def read(self) -> bytes:
        await self.closed.wait()
        return b""

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return

    def backlog(self) -> int:
        return 0

    def exit(self, status: int = 0) -> None:
        self.status = status


async def test_a_kicked_ssh_mate_is_told_and_exits(tmp_path: Path) -> None:
    session, _ = new_session()
    host, _ = attached(session)
    role = MatesRole(None, RelayConfig(keys_dir=tmp_path))  # type: ignore[arg-type]
    master, slave = os.openpty()
    os.set_blocking(master, False)
    term = FakeTerminal()
    mate = Mate(7, False, 80, 24, master, kind="ssh", address="192.0.2.7:5000")
    serving = asyncio.create_task(role._serve(session, term, mate))  # type: ignore[arg-type]
    try:
        for _ in range(100):
            if 7 in session.mates:
                break
            await asyncio.sleep(0.01)
        assert session.kick(7)
        await asyncio.wait_for(serving, 5)
    finally:
        os.close(slave)
    assert KICKED_TEXT.encode() in term.written and term.status == EXIT_KICKED
    assert session.mates == {}
    assert sent_mates(host)[-1] == ()
    assert session.kick(7) is False  # gone: a second kick finds nothing


def test_the_web_front_closes_a_kicked_mate_with_4004() -> None:
    assert web.EXIT_KICKED == mates_mod.EXIT_KICKED
    assert web.MORE == MORE
    term = web.WebTerminal(None, None, "rw", "192.0.2.7:5000", 80, 24)  # type: ignore[arg-type]
    term.accepted = True
    term._last = f"\r\n{KICKED_TEXT}.\r\n".encode()
    term.exit(EXIT_KICKED)
    assert term.verdict() == (web.CLOSE_KICKED, f"{KICKED_TEXT}.")


class Queued(web.WebTerminal):
    """A web terminal whose queue is looked at, not sent."""

    def __init__(self, readonly: bool) -> None:
        super().__init__(None, None, "t", "192.0.2.7:5000", 80, 24)  # type: ignore[arg-type]
        self.accepted, self.readonly = True, readonly
        self.queued: list[Any] = []

    def _queue(self, item: bytes | str) -> None:
        self.queued.append(json.loads(item) if isinstance(item, str) else item)


def test_a_browser_sees_addresses_only_on_a_read_write_link() -> None:
    infos = (MateInfo(1, "ssh", False, "192.0.2.7:5000", "SHA256:abc"),
             MateInfo(2, "web", True, "198.51.100.2:443"),
             MateInfo(0, MORE, True, "5 more not listed"))
    rw, ro = Queued(False), Queued(True)
    rw.show_mates(2, infos)
    ro.show_mates(2, infos)
    assert rw.queued == [{"type": "mates", "more": 5, "mates": [
        {"id": 1, "kind": "ssh", "readonly": False, "you": False, "address": "192.0.2.7:5000"},
        {"id": 2, "kind": "web", "readonly": True, "you": True, "address": "198.51.100.2:443"},
    ]}]
    assert ro.queued == [{"type": "mates", "more": 5, "mates": [
        {"id": 1, "kind": "ssh", "readonly": False, "you": False},
        {"id": 2, "kind": "web", "readonly": True, "you": True},
    ]}]


class JoinLink:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closed = False
        self.fingerprint = "SHA256:joinkey"

    def send_nowait(self, msg: Message) -> None:
        self.sent.append(msg)

    async def drain(self) -> None:
        return

    def close(self) -> None:
        self.closed = True


async def test_a_kicked_join_client_loses_its_place_and_is_told_the_session_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tether.relay.joins.KICK_GRACE", 0.01)
    session, _ = new_session()
    host, _ = attached(session)
    joins = Joins(None, RelayConfig(keys_dir=tmp_path))  # type: ignore[arg-type]
    link = JoinLink()
    place = joins._new_place(session, True, "203.0.113.9:7000", link.fingerprint)
    assert place is not None
    place.link = place.feed.link = link  # type: ignore[assignment]
    mid = place.mate.id
    assert sent_mates(host)[-1] == (
        MateInfo(mid, "join", True, "203.0.113.9:7000", "SHA256:joinkey"),)
    assert session.kick(mid)
    for _ in range(100):
        if link.closed:
            break
        await asyncio.sleep(0.01)
    assert link.closed and link.sent == [Notice(KICKED_JOIN_TEXT)]
    # the client's notice starts as an ended session's: it stops, and does not resume
    assert KICKED_JOIN_TEXT.startswith("tether: the host ended the session")
    assert mid not in session.mates and sent_mates(host)[-1] == ()
    assert joins._places == {} and session.joins == 0
    assert not place.ep.connected  # what it still sends is not taken


def test_addresses_are_written_as_people_write_them() -> None:
    assert display_address("192.0.2.7:5000") == "192.0.2.7:5000"
    assert display_address("2001:db8::1:443") == "[2001:db8::1]:443"


# --- at the host ------------------------------------------------------------------------

HOSTILE = MateInfo(3, "web\n", True, "1.2.3.4'\nrun-shell 'touch /tmp/x' #{pane_pid};", "#(id)\r")


def test_the_host_says_who_joined_and_left() -> None:
    said: list[tuple[str, bool]] = []
    p = Presence(lambda text, show: said.append((text, show)))
    alice = MateInfo(1, "ssh", False, "192.0.2.7:5000", "SHA256:abc")
    bob = MateInfo(2, "web", True, "198.51.100.2:443")
    p.update((alice,))
    p.update((alice, bob))
    p.update((bob,))
    p.update((bob,))  # a reconnect's repeat: nothing new
    assert said == [
        ("mate 1 joined (ssh, read-write, 192.0.2.7:5000, key SHA256:abc)", True),
        ("mate 2 joined (web, read-only, 198.51.100.2:443)", True),
        ("mate 1 left (ssh, read-write, 192.0.2.7:5000, key SHA256:abc)", True),
    ]
    assert p.rows() == [{"id": 2, "kind": "web", "readonly": True,
                         "address": "198.51.100.2:443", "fingerprint": ""}]


def test_a_crowd_is_one_message_on_screen() -> None:
    said: list[tuple[str, bool]] = []
    p = Presence(lambda text, show: said.append((text, show)))
    p.update(tuple(MateInfo(i, "ssh", True, f"10.0.0.{i}:1") for i in range(1, 11)))
    assert sum(1 for _, show in said if show) == 1
    assert said[-1] == ("10 mates joined and 0 left (10 connected; tether list-mates)", True)
    assert len(said) == 11  # each is logged


def test_relay_strings_reach_the_host_as_one_inert_line() -> None:
    said: list[str] = []
    p = Presence(lambda text, show: said.append(text))
    p.update((HOSTILE, MateInfo(4, "ssh", False, "x" * 5000)))
    assert all("\n" not in t and "\r" not in t for t in said)
    assert len(p.mates[4].address) == 100
    assert clean("a\u2028b\x1b[2Jc\x9b") == "a?b?[2Jc?"


class FakeTmux:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.closed = None

    async def run(self, command: str) -> list[str]:
        return ["0 on /dev/pts/3", "1 on control client", "0 off /dev/pts/4 x"]

    def send(self, command: str) -> None:
        self.commands.append(command)


async def test_the_message_on_the_host_expands_nothing_and_runs_nothing() -> None:
    class Agent:
        tmux = FakeTmux()

    text = "mate 3 joined (web, read-only, 1.2.3.4'\nrun-shell 'x' #{pane_pid}; #(id))"
    await _display_all(Agent(), text)  # type: ignore[arg-type]
    command, frozen = Agent.tmux.commands  # the control client is not shown it
    assert "\n" not in command
    assert command == ("display-message -d 15000 -c '/dev/pts/3' 'tether: mate 3 joined "
                       "(web, read-only, 1.2.3.4'\\''?run-shell '\\''x'\\'' ##{pane_pid}; "
                       "##(id))'")
    # status off: tmux freezes that screen while the message shows, so only for
    # the user's display-time
    assert frozen.startswith("display-message -c '/dev/pts/4 x' 'tether: mate 3")


async def test_a_mate_is_checked_against_the_keys_its_session_requires(tmp_path: Path) -> None:
    """The SSH login checked the key against what the session required then;
    the attach checks it again against what it requires now (with session
    processes the two can meet two lives of a session)."""
    import base64
    import hashlib

    from tether.relay.replica import ReplicaError

    session, replica = new_session()
    attached(session)
    session.screen.set()
    blob = b"\0\0\0\x0bssh-ed25519" + b"k" * 32
    session.mate_keys = {blob}

    async def no_attach(*args: object) -> int:
        raise ReplicaError("not in this test")

    replica.attach = no_attach  # type: ignore[method-assign]
    registry = type("Registry", (), {"lookup": lambda self, token: (session, False)})()
    role = MatesRole(registry, RelayConfig(keys_dir=tmp_path))  # type: ignore[arg-type]
    right = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    for proved, admitted in (("", False), ("SHA256:" + "A" * 43, False), (right, True)):
        term = FakeTerminal()
        term.fingerprint = proved
        await asyncio.wait_for(role.handle(term), 5)  # type: ignore[arg-type]
        assert term.status == 1
        assert (b"admits only mates with a key" in term.written) is not admitted, proved
        assert (b"cannot attach" in term.written) is admitted  # it got that far
