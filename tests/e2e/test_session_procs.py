"""Session processes (`tether relay --session-procs N`) as people meet them: a
real relay whose sessions live in two processes, real hosts, and mates with
OpenSSH `ssh` in a local tmux. Two sessions land in different processes, each
host's QUIC link goes to its own process's port, mates find their session by
token; a session process that dies takes only its own sessions, whose host
starts them again with the same tokens; the relay's limits hold over all.

The whole end-to-end suite also runs through session processes with
``TETHER_TEST_RELAY_ARGS="--session-procs 2"``."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.procs import descendants

from .helpers import Host, Mate, RelayProcess, wait_for
from .test_ssh_fronts import attach


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path_factory.mktemp("relay"), None, "--session-procs", "2")
    yield r
    r.close()


def owners(relay: RelayProcess) -> list[int]:
    return sorted(p.pid for p in descendants(relay.pid) if "tether.relay.owner" in p.cmdline)


def holder(relay: RelayProcess, sid: str) -> tuple[int, str]:
    """(pid of the session process that last attached the session's host, the link)."""
    text = relay.log.read_text(errors="replace")
    found = re.findall(rf"\[sessions (\d+)\] INFO host \S+ attached to session {sid} via (.*)",
                       text)
    return (int(found[-1][0]), found[-1][1]) if found else (0, "")


def session_id(host: Host) -> str:
    return wait_for(lambda: host.display("#{@tether_session}"), 20, "the session id")


@pytest.fixture
def two_hosts(relay: RelayProcess, tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    a = Host(tmp_path / "a", relay.conf())
    try:
        b = Host(tmp_path / "b", relay.conf())
    except BaseException:
        a.close()
        raise
    yield a, b
    a.close()
    b.close()


def test_sessions_spread_over_the_processes_and_mates_find_theirs(
    relay: RelayProcess, two_hosts: tuple[Host, Host], mates: list[Mate], tmp_path: Path
) -> None:
    a, b = two_hosts
    assert len(owners(relay)) == 2
    sid_a, sid_b = session_id(a), session_id(b)
    # both hosts move to QUIC, each to the port of the process holding it
    where = {}
    for sid in (sid_a, sid_b):
        where[sid] = wait_for(lambda s=sid: (h := holder(relay, s))[1].startswith("quic") and h,
                              30, f"session {sid}'s host on QUIC")
    assert {pid for pid, _ in where.values()} == set(owners(relay))
    ma = attach(mates, tmp_path, a.ssh_rw, "mate-a")
    mb = attach(mates, tmp_path, b.ssh_rw, "mate-b")
    ma.type("echo in-a-$((6*7))")
    wait_for(lambda: "in-a-42" in a.screen(), 15, "mate a's keys on host a")
    mb.type("echo in-b-$((7*7))")
    wait_for(lambda: "in-b-49" in b.screen(), 15, "mate b's keys on host b")
    assert "in-b-49" not in a.screen() and "in-a-42" not in b.screen()
    # a read-only mate of b, and a wrong token, routed like the rest
    ro = attach(mates, tmp_path, b.ssh_ro, "ro-b")
    ro.wait_text("in-b-49")
    wrong = Mate(tmp_path, a.ssh_rw.replace(a.ssh_rw.split()[-1].split("@")[0], "x" * 26),
                 name="wrong")
    mates.append(wrong)
    wrong.wait_text("Invalid or expired session token")


def test_a_session_process_that_dies_takes_only_its_sessions(
    relay: RelayProcess, two_hosts: tuple[Host, Host], mates: list[Mate], tmp_path: Path
) -> None:
    a, b = two_hosts
    sid_a, sid_b = session_id(a), session_id(b)
    pid_a = wait_for(lambda: holder(relay, sid_a)[0], 20, "a's session process")
    pid_b = wait_for(lambda: holder(relay, sid_b)[0], 20, "b's session process")
    assert pid_a != pid_b
    ma = attach(mates, tmp_path, a.ssh_rw, "mate-a")
    mb = attach(mates, tmp_path, b.ssh_rw, "mate-b")
    os.kill(pid_a, signal.SIGKILL)
    ma.wait_text("the relay's process for this session ended", timeout=20)
    ma.wait_text("[ssh exited: 75]")  # EX_TEMPFAIL: its host starts it again
    # the other session goes on
    mb.type("echo b-still-$((5*5))")
    wait_for(lambda: "b-still-25" in b.screen(), 15, "mate b's keys after the other process died")
    assert mb.alive()
    # the process is started again, and host a starts its session again: same tokens
    wait_for(lambda: len(owners(relay)) == 2 and pid_a not in owners(relay), 20,
             "the session process to be started again")
    wait_for(lambda: holder(relay, sid_a)[0] not in (0, pid_a), 60,
             "host a to start its session again")
    again = attach(mates, tmp_path, a.ssh_rw, "mate-a-again")
    again.type("echo a-back-$((9*9))")
    wait_for(lambda: "a-back-81" in a.screen(), 20, "the new mate's keys on host a")


def test_the_session_limit_counts_every_process(tmp_path: Path) -> None:
    """Each session process alone would take two sessions more: the relay's
    process counts them all, the host refused is told why."""
    relay = RelayProcess(tmp_path / "relay", None, "--session-procs", "2",
                         "--max-sessions", "2")
    hosts: list[Host] = []
    try:
        for name in ("a", "b"):
            hosts.append(Host(tmp_path / name, relay.conf()))
        pids = {wait_for(lambda h=h: holder(relay, session_id(h))[0], 20, "a session process")
                for h in hosts}
        assert pids == set(owners(relay)), "one session in each process"
        third = Host(tmp_path / "c", relay.conf(), ready=False)
        hosts.append(third)
        wait_for(lambda: "this relay is full" in third.agent_log() + third.messages(), 30,
                 "the third host to be refused: the relay is full")
    finally:
        for h in hosts:
            h.close()
        relay.close()


def test_a_browser_mate_reaches_its_session_through_the_relays_own_front(
    tmp_path: Path,
) -> None:
    """Browsers' WebSockets stay in the relay's process: their terminals are
    served there, their session's process attaches them; the page lists the
    mates, the host lists it as a web mate and can kick it."""
    import asyncio

    import aiohttp

    from .helpers import free_port
    from .test_presence import kick, mate_ids
    from .test_web_front import WebMate, poll, token_of

    relay = RelayProcess(tmp_path / "relay", None, "--session-procs", "2",
                         "--web-port", str(free_port()))
    host = Host(tmp_path / "host", relay.conf())
    try:
        link = host.display("#{tether_web}")
        assert link.startswith(relay.web_base + "/t/"), (link, relay.web_base)

        async def scenario() -> None:
            async with aiohttp.ClientSession() as http:
                mate = await WebMate.open(http, relay.web_base, token_of(link), 90, 25)
                try:
                    await asyncio.wait_for(mate.hello.wait(), 15)
                    await asyncio.to_thread(host.type, "echo web-marker-$((6*7))")
                    await mate.wait_text("web-marker-42")
                    await mate.type("echo from-web-$((7*7))\r")
                    await poll(lambda: "from-web-49" in host.screen(), 15,
                               "the web mate's keys on the host")
                    await poll(lambda: any(t.get("type") == "mates" for t in mate.texts), 15,
                               "the page's list of mates")
                    listed = [t for t in mate.texts if t.get("type") == "mates"][-1]
                    assert [m["kind"] for m in listed["mates"]] == ["web"]  # type: ignore[index]
                    ids = await asyncio.to_thread(mate_ids, host, "web")
                    assert len(ids) == 1
                    done = await asyncio.to_thread(kick, host, ids[0])
                    assert done.returncode == 0, done.stderr
                    assert await mate.wait_closed() == 4004
                finally:
                    await mate.close()
                # a wrong token is refused like an ssh mate's
                wrong = await WebMate.open(http, relay.web_base, "x" * 26)
                try:
                    assert await wrong.wait_closed() == 4001
                finally:
                    await wrong.close()
                # the session's process dies: the page is told to come back (1012),
                # not refused, and once the host started the session again it can
                again = await WebMate.open(http, relay.web_base, token_of(link), 90, 25)
                try:
                    await asyncio.wait_for(again.hello.wait(), 15)
                    sid = await asyncio.to_thread(session_id, host)
                    pid = holder(relay, sid)[0]
                    os.kill(pid, signal.SIGKILL)
                    assert await again.wait_closed() == 1012
                finally:
                    await again.close()
                await poll(lambda: holder(relay, sid)[0] not in (0, pid), 60,
                           "the host to start its session again")
                back = await WebMate.open(http, relay.web_base, token_of(link), 90, 25)
                try:
                    await asyncio.wait_for(back.hello.wait(), 15)
                    await back.type("echo web-back-$((8*8))\r")
                    await poll(lambda: "web-back-64" in host.screen(), 20,
                               "the returning web mate's keys on the host")
                finally:
                    await back.close()

        asyncio.run(scenario())
    finally:
        host.close()
        relay.close()
