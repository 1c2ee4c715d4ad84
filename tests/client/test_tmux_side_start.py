"""The agent's control client attaching to a real tmux session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tether.client.tmux_side import TmuxSide
from tether.core.host_endpoint import HostEndpoint

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


async def test_start_reads_the_users_prefix_and_bindings_in_one_go(tmp_path: Path) -> None:
    sock = str(tmp_path / "tmux.sock")
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g prefix C-a\nbind-key Z new-window -n zed\n")
    subprocess.run(["tmux", "-S", sock, "-f", str(conf), "new-session", "-d", "-s", "s1",
                    "-x", "80", "-y", "24"], check=True)
    side = TmuxSide(sock, "s1", HostEndpoint(), lambda: None)
    try:
        await side.start()
        assert side.prefix == "C-a"
        assert side.bindings[("prefix", "Z")] == "new-window -n zed"
        # and the client runs commands after its start, as the agent's does
        assert await side.tmux.run("show -gv prefix") == ["C-a"]
    finally:
        await side.tmux.close()
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False)
