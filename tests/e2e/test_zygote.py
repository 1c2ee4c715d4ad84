"""Warm start: a user's second session gets an agent forked by the zygote that the
first one left (``tether.zygote``), is shared like any other, and the zygote
leaves with the user's last session."""

from __future__ import annotations

import os
from pathlib import Path

from .helpers import Host, Mate, RelayProcess, wait_for


def zygotes_of(home: Path) -> list[int]:
    """Zygote processes whose state directory is this home's."""
    mark = f"XDG_STATE_HOME={home / 'state'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_zygote" in argv and mark in environ:
            found.append(int(entry.name))
    return found


def listening(pid: int) -> bool:
    """``pid`` holds a listening unix socket (the zygote has bound its address).

    The process shows in /proc as soon as it is exec'ed, tens of ms before it
    listens; a session started in between gets its agent the cold way."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing (the listing's own fd, for one)
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; __SO_ACCEPTCON = 0x10000
        if len(fields) >= 7 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            return True
    return False


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def test_second_session_is_forked_by_the_zygote_and_shared(
    relay: RelayProcess, tmp_path: Path, mates: list[Mate]
) -> None:
    home = tmp_path / "host"
    first = Host(home, relay.conf())
    try:
        zygote = wait_for(lambda: zygotes_of(home), 20, "the first agent to leave a zygote")[0]
        wait_for(lambda: listening(zygote), 20, "the zygote to listen")
        assert parent_of(first.agent_pid()) != zygote
        second = Host(home, relay.conf(), name="second")
        try:
            assert parent_of(second.agent_pid()) == zygote
            assert second.ssh_rw != first.ssh_rw
            second.type("echo warm-$((6*7))")
            mate = Mate(tmp_path, second.ssh_rw)
            mates.append(mate)
            mate.wait_text("warm-42")
            mate.type("echo from-mate-$((7*7))")
            wait_for(lambda: "from-mate-49" in second.screen(), 10, "the mate's typing")
        finally:
            second.close()
        assert zygotes_of(home) == [zygote], "the zygote stays while a session is shared"
        first.type("echo still-$((5*5))")
        wait_for(lambda: "still-25" in first.screen(), 10, "the first session to go on")
    finally:
        first.close()
    wait_for(lambda: not zygotes_of(home), 20, "the zygote to leave with the last session")
