"""A root relay's per-session cgroup: every process of a jail in it from the
start, its limits set, and a session that hits them stopped alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_jail import descendants, start_session  # tests/relay is on sys.path

from tether.relay import cgroup, jail

WHY = jail.jail_unavailable()
HIERARCHIES = cgroup.relay_cgroups()[0] if WHY is None else ()
pytestmark = pytest.mark.skipif(
    not HIERARCHIES, reason=f"no cgroup here: {WHY or cgroup.relay_cgroups()[1]}"
)


def session_dirs(directory: str) -> list[tuple[Any, str]]:
    return [(h, os.path.join(h.path, os.path.basename(directory))) for h in HIERARCHIES]


def procs(path: str) -> set[int]:
    return {int(p) for p in Path(path, "cgroup.procs").read_text().split()}


def read(path: str, name: str) -> str:
    return Path(path, name).read_text().strip()


async def test_the_whole_jail_is_in_its_cgroup_with_limits() -> None:
    s = await start_session()
    try:
        assert s.handle.proc is not None
        below = set(descendants(s.handle.proc.pid))
        tree = {s.handle.proc.pid, *below}
        # bwraps, a pid 1 (bwrap's, or the direct replica's tmux server), worker, tmux
        assert s.worker in tree and len(tree) >= (4 if s.direct else 6), tree
        for h, path in session_dirs(s.handle.dir):
            # all of it, nothing else; the outermost bwrap only waits for its child
            # and stays out when it had forked before the move (Jail.started)
            assert below <= procs(path) <= tree, (path, procs(path), tree)
            assert os.getpid() not in procs(path)
            if h.v2:
                assert read(path, "memory.max") == str(cgroup.CGROUP_MEMORY)
                assert read(path, "pids.max") == str(cgroup.CGROUP_PIDS)
                assert (
                    read(path, "cpu.max") == f"{cgroup.CGROUP_CPU_QUOTA} {cgroup.CGROUP_CPU_PERIOD}"
                )
            if "memory" in h.controllers and not h.v2:
                assert read(path, "memory.limit_in_bytes") == str(cgroup.CGROUP_MEMORY)
            if "pids" in h.controllers and not h.v2:
                assert read(path, "pids.max") == str(cgroup.CGROUP_PIDS)
            if "cpu" in h.controllers and not h.v2:
                assert read(path, "cpu.cfs_quota_us") == str(cgroup.CGROUP_CPU_QUOTA)
                assert read(path, "cpu.cfs_period_us") == str(cgroup.CGROUP_CPU_PERIOD)
            # root's, outside the jail; the jail's own view is its cgroup namespace
            assert os.stat(path).st_uid == 0
    finally:
        directory = s.handle.dir
        await s.handle.close()
    for _, path in session_dirs(directory):
        assert not os.path.exists(path)  # removed with the session


def run_limited(limits: dict[str, int], code: str) -> tuple[int, list[Any]]:
    """Run ``code`` in a jail whose cgroup has these (lowered) limits: its exit
    status and the JSON lines it printed."""
    directory = jail.jail_directory()
    try:
        j = jail.jail_command(directory)
        assert j.cgroup is not None
        for _, path in j.cgroup.dirs:
            for name, value in limits.items():
                if os.path.exists(os.path.join(path, name)):
                    Path(path, name).write_text(str(value))
        r = j.run([sys.executable, "-c", textwrap.dedent(code)], timeout=60, capture_output=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines()]


def test_a_fork_bomb_stops_at_the_session_limit() -> None:
    status, out = run_limited(
        {"pids.max": 32},
        """
        import errno, json, os, time
        kids, err = [], None
        for _ in range(200):  # far below RLIMIT_NPROC (1024): the cgroup stops it
            try:
                pid = os.fork()
            except OSError as exc:
                err = exc.errno
                break
            if pid == 0:
                try:
                    os.fork()  # and every child tries again
                except OSError:
                    pass
                time.sleep(3)
                os._exit(0)
            kids.append(pid)
        print(json.dumps({"forked": len(kids), "err": err}))
        """,
    )
    assert status == 0
    assert out[-1]["err"] == 11 and out[-1]["forked"] < 32, out  # EAGAIN


def test_memory_beyond_the_session_limit_is_stopped() -> None:
    limit = 64 * 1024 * 1024
    status, out = run_limited(
        {
            "memory.limit_in_bytes": limit,
            "memory.memsw.limit_in_bytes": limit,
            "memory.max": limit,
            "memory.swap.max": 0,
        },
        """
        import json, sys
        chunks = []
        for i in range(1, 33):  # 512 MiB, within RLIMIT_AS (1 GiB)
            chunks.append(bytearray(b"x" * (16 << 20)))
            print(json.dumps(i * 16), flush=True)
        """,
    )
    assert status != 0  # killed by the OOM killer, in its own cgroup only
    assert out and out[-1] < 96, out


@pytest.mark.parametrize("reused", [False, True])
def test_a_new_relay_ends_what_a_dead_relay_left(reused: bool) -> None:
    """A jail that outlived a SIGKILLed root relay (a compromised one may ignore
    the end of its link) is killed by the next relay's start: cgroup v2's
    cgroup.kill on the dead relay's cgroup (v2), or each process it lists (v1).
    The dead relay is told by its pid and start time: also when its pid now
    runs something else (``reused``: this test's own pid, started at another
    time), and for a former relay's ``tether-relay-<pid>``."""
    base = os.path.dirname(HIERARCHIES[0].path)
    if reused:
        stale = Path(base, f"tether-relay-{os.getpid()}-1")
    else:
        gone = subprocess.Popen(["true"])
        gone.wait()
        stale = Path(base, f"tether-relay-{gone.pid}")
        if Path(f"/proc/{gone.pid}").exists():
            pytest.skip("the dead relay's pid was reused at once")
    (stale / "leftover").mkdir(parents=True)
    left = subprocess.Popen(["sleep", "60"])
    try:
        (stale / "leftover" / "cgroup.procs").write_text(str(left.pid))
        subprocess.run([sys.executable, "-c", "from tether.relay import cgroup; "
                        "assert cgroup.relay_cgroups()[0]"], check=True, timeout=60)
        assert left.wait(timeout=10) == -9
        assert not stale.exists()
    finally:
        left.kill()
        left.wait()
        for d in (stale / "leftover", stale):
            with contextlib.suppress(OSError):
                d.rmdir()


def test_a_live_relay_s_cgroup_is_left_alone() -> None:
    """Another relay running beside (its pid and start time match) keeps its
    sessions' cgroups when this one starts."""
    base = os.path.dirname(HIERARCHIES[0].path)
    other = subprocess.Popen(["sleep", "60"])  # stands for the other relay
    try:
        start = Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        mine = Path(base, f"tether-relay-{other.pid}-{start}")
        (mine / "session").mkdir(parents=True)
        (mine / "session" / "cgroup.procs").write_text(str(other.pid))
        subprocess.run([sys.executable, "-c", "from tether.relay import cgroup; "
                        "assert cgroup.relay_cgroups()[0]"], check=True, timeout=60)
        assert other.poll() is None and mine.exists()
    finally:
        other.kill()
        other.wait()
        for d in (mine / "session", mine):
            with contextlib.suppress(OSError):
                d.rmdir()


def test_a_relay_that_exits_ends_what_still_runs_in_its_sessions() -> None:
    """A relay that exits before its sessions ended (an error, a signal it exits
    on) kills what still runs in its sessions' cgroups and removes them, rather
    than leaving each busy one, its jail running without a relay."""
    left = subprocess.Popen(["sleep", "60"])
    script = textwrap.dedent(f"""
        import os
        from tether.relay import cgroup
        hierarchies, why = cgroup.relay_cgroups()
        assert hierarchies, why
        session = os.path.join(hierarchies[0].path, "session")
        os.mkdir(session)
        with open(os.path.join(session, "cgroup.procs"), "w") as f:
            f.write("{left.pid}")
        print(hierarchies[0].path, flush=True)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                              capture_output=True, text=True)
        parent = Path(done.stdout.strip())
        assert parent.name.startswith("tether-relay-"), done.stdout
        assert left.wait(timeout=10) == -9
        assert not parent.exists()
    finally:
        left.kill()
        left.wait()
