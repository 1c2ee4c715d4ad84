"""Nothing survives: normal exit, exceptions, and a SIGKILLed owner (needs root)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tether.netsim import Network, cleanup_stale, nsutil
from tether.netsim.cli import main as cli_main

pytestmark = pytest.mark.netsim
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _need_netsim() -> None:
    reason = nsutil.unavailable_reason()
    if reason:
        pytest.skip(reason)


def ours(run_id: str) -> list[str]:
    return [n for n in nsutil.list_netns() if n.startswith(run_id + "-")]


def alive(pid: int) -> bool:
    return nsutil.pid_alive(pid)


def wait_for(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_close_removes_everything() -> None:
    with Network({"a": ["eth0"], "b": ["wifi", "lte"]}, seed=1) as net:
        run_id = net.run_id
        proc = net.popen("a", ["sleep", "30"])
        fwd_pid = net._fwd.pid  # type: ignore[union-attr]
        assert len(ours(run_id)) == 3
    assert ours(run_id) == []
    assert proc.poll() is not None
    assert wait_for(lambda: not alive(fwd_pid))


def test_exception_inside_context_cleans_up() -> None:
    with pytest.raises(RuntimeError), Network({"a": ["eth0"]}, seed=1) as net:
        run_id = net.run_id
        raise RuntimeError("boom")
    assert ours(run_id) == []


def test_sigkilled_owner_is_cleaned_by_next_run(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from tether.netsim import Network
        net = Network({"a": ["eth0"], "b": ["eth0"]}, seed=5).start()
        p = net.popen("b", ["sleep", "300"])
        print(net.run_id, net._fwd.pid, p.pid, flush=True)
        time.sleep(300)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        run_id, fwd_pid, sleep_pid = child.stdout.readline().split()
        fwd, sleeper = int(fwd_pid), int(sleep_pid)
        assert len(ours(run_id)) == 3 and alive(sleeper)
    finally:
        child.kill()
        child.wait(timeout=5)
        child.stdout.close()  # type: ignore[union-attr]
    # the owner is gone; its namespaces and the process inside remain
    assert len(ours(run_id)) == 3 and alive(sleeper)
    assert wait_for(lambda: not alive(fwd)), "forwarder must exit when its owner dies"

    # neighbours cleanup must not touch: a foreign name and a live run's name
    foreign = f"netsimtest-foreign-{os.getpid()}"
    live = f"tns-{os.getpid()}-999-x"
    nsutil.create_netns(foreign)
    nsutil.create_netns(live)
    try:
        assert cli_main(["cleanup"]) == 0
        assert ours(run_id) == []
        assert wait_for(lambda: not alive(sleeper))
        assert foreign in nsutil.list_netns() and live in nsutil.list_netns()
        assert cleanup_stale() == []  # idempotent
    finally:
        nsutil.remove_netns(foreign)
        nsutil.remove_netns(live)
    assert foreign not in nsutil.list_netns()
