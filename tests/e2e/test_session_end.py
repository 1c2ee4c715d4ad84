"""A session ends at the relay when its host ends, whatever link the host has
then; and a refused session makes `wait tether-ready` fail instead of hang."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tether.testing.env import tether_cmd
from tether.testing.procs import HarnessError

from .helpers import Host, RelayProcess, wait_for

CYCLES = 30
LIMIT = 5


def ended_count(relay: RelayProcess) -> int:
    """Sessions the relay itself says its host ended."""
    return relay.log.read_text(errors="replace").count("host ended session")


def wait_ready(host: Host, timeout: float) -> subprocess.CompletedProcess[str]:
    """`tether wait tether-ready` as a script runs it."""
    return subprocess.run(tether_cmd("-S", host.sock, "wait", "tether-ready"),
                          capture_output=True, text=True, env=host.env, timeout=timeout)


def test_kill_server_ends_every_session_at_the_relay(tmp_path: Path) -> None:
    """Sessions that lingered would fill the key's limit of 5 and refuse the next."""
    relay = RelayProcess(tmp_path / "relay", None, "--max-sessions-per-key", str(LIMIT))
    rng = random.Random(14)
    conf = relay.conf()
    try:
        for i in range(CYCLES):
            h = Host(tmp_path / "home", conf, ready=False, name=f"s{i}")
            try:
                ready = wait_ready(h, 20)
                assert ready.returncode == 0, (
                    f"cycle {i}: not shared: {ready.stderr}\n{h.messages()}")
                if i % 2:  # half at once, half after a seeded pause
                    time.sleep(rng.uniform(0.0, 0.8))
                h.tmux("kill-server", check=False)
            finally:
                h.close()
            # the relay's own view: every session so far ended, none lingers
            try:
                wait_for(lambda n=i + 1: ended_count(relay) >= n, 10,
                         f"the relay to end session {i + 1}")
            except HarnessError as exc:
                tail = relay.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{exc}\n{h.agent_log()[-6000:]}\nrelay:\n{tail}") from None
        assert ended_count(relay) == CYCLES
    finally:
        relay.close()


def test_wait_ready_fails_with_the_relays_refusal(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay", None, "--max-sessions-per-key", "1")
    conf = relay.conf()
    first = Host(tmp_path / "home", conf, name="first")
    second = Host(tmp_path / "home", conf, ready=False, name="second")  # same key
    try:
        start = time.monotonic()
        refused = wait_ready(second, 25)
        assert refused.returncode != 0
        assert "too many sessions for this host key" in refused.stderr
        assert time.monotonic() - start < 15
        # the first session is shared as before, and its wait still succeeds at once
        assert wait_ready(first, 10).returncode == 0
    finally:
        second.close()
        first.close()
        relay.close()


def test_a_stopped_agent_ends_its_session_at_the_relay(tmp_path: Path) -> None:
    """SIGTERM, SIGINT or SIGHUP to the agent: nobody shares the session any
    more, so the relay ends it now, and its mates are told why."""
    relay = RelayProcess(tmp_path / "relay")
    conf = relay.conf()
    try:
        for n, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), 1):
            h = Host(tmp_path / "home", conf, name=f"s{n}")
            try:
                pid = h.agent_pid()
                os.kill(pid, sig)
                wait_for(lambda n=n: ended_count(relay) >= n, 15,
                         f"the relay to end the session after {sig.name}")
                assert f"stopped ({sig.name})" in relay.log.read_text(errors="replace")
                wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), 15,
                         "the agent to exit")
            finally:
                h.close()
    finally:
        relay.close()
