"""End-to-end helpers: the shared harness in ``tether.testing``, under the names tests use.

Everything is driven as a person would: the mate's `ssh` runs inside a separate
local tmux server; we type with send-keys and read the screen with capture-pane.
Waits are on conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

from tether.testing.env import ANSI, SSH_OPTS, have_tools, strip_lines, tether, tether_env, tmux
from tether.testing.host import Host
from tether.testing.mate import Mate
from tether.testing.procs import free_port, wait_for
from tether.testing.proxy import TcpProxy
from tether.testing.relay import RelayProcess

__all__ = [
    "ANSI", "SSH_OPTS", "Host", "Mate", "RelayProcess", "TcpProxy", "free_port", "have_tools",
    "strip_lines", "tether", "tether_env", "tmux", "wait_for",
]
