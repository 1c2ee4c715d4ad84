"""A mate running `tether join` on a pty: the caller is the mate's terminal.

The host's printed line (``tether display -p '#{tether_join}'``, e.g. ``tether
join -p 2222 --pin SHA256:... TOKEN@127.0.0.1``) is run as it is, by this
interpreter, on a pty the caller reads directly (``PtyProc``), so a benchmark
can time the bytes as they reach the terminal. Its processes: the join client
(the pty's process), its OpenSSH login (``ssh``, while on the SSH channel), and
the local tmux of the mate's own (a server, its control-mode client and the
client attached to the pty). The local tmux's socket lives under ``TMPDIR``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .env import tether_cmd, tmux
from .mate import PtyProc
from .procs import HarnessError, ProcInfo, descendants, processes, wait_for

__all__ = ["JoinMate", "join_argv"]


def join_argv(join_line: str, log: str | None = None) -> list[str]:
    """The host's printed `tether join ...` line as argv for this interpreter
    (``log``: the client's log file)."""
    words = join_line.split()
    if words[:2] != ["tether", "join"] or "--pin" not in words:
        raise HarnessError(f"not a pinned `tether join` line: {join_line!r}")
    return tether_cmd("join", *(["--log", log] if log else []), *words[2:])


def _base(arg: str) -> str:
    return arg.rsplit("/", 1)[-1]


def _sock(p: ProcInfo) -> str | None:
    if "-S" in p.argv:
        i = p.argv.index("-S")
        if i + 1 < len(p.argv):
            return p.argv[i + 1]
    return None


class JoinMate(PtyProc):
    """`tether join LINE` on its own pty (``env`` without TMUX: the join attaches
    a tmux client of its own to the pty)."""

    def __init__(self, join_line: str, env: dict[str, str], size: tuple[int, int],
                 log: str | None = None, cwd: str | None = None) -> None:
        env = {k: v for k, v in env.items() if k not in ("TMUX", "TMUX_PANE")}
        self.join_line = join_line
        super().__init__(join_argv(join_line, log), env, size, cwd)

    def local_sock(self, procs: Sequence[ProcInfo] | None = None) -> str | None:
        """The local tmux's socket, from the tmux clients the join client started."""
        below = descendants(self.pid, list(procs) if procs is not None else None)
        for p in below:
            if _base(p.argv[0]) == "tmux" and (sock := _sock(p)) is not None:
                return sock
        return None

    def attached(self) -> bool:
        """Whether the local tmux has a client on our pty (not just its control
        client): from then on the pty is raw, and what shows on it is tmux's."""
        if self.proc.poll() is not None:
            raise HarnessError(f"tether join exited ({self.proc.returncode})")
        sock = self.local_sock()
        if sock is None:
            return False
        out = tmux(sock, "list-clients", "-F", "#{client_control_mode}", check=False)
        return "0" in out.split()

    def wait_attached(self, timeout: float = 40) -> None:
        """Until the mate's terminal shows the local tmux (the join is up)."""
        wait_for(self.attached, timeout, "`tether join` to attach its terminal", 0.05)

    def pids(self) -> dict[str, list[int]]:
        """The mate's processes by role, now: the join client, its ssh login(s),
        the local tmux server (and its ``sleep`` panes), the local tmux clients."""
        procs = processes()
        below = descendants(self.pid, procs)
        sock = self.local_sock(procs)
        server = [p for p in procs if _base(p.argv[0]) == "tmux" and sock is not None
                  and _sock(p) == sock and "new-session" in p.argv]
        panes = [d.pid for s in server for d in descendants(s.pid, procs)]
        clients = [p.pid for p in below if _base(p.argv[0]) == "tmux"
                   and p.pid not in {s.pid for s in server}]
        ssh = [p.pid for p in below if _base(p.argv[0]) == "ssh"]
        known = {*clients, *ssh, *panes, *(s.pid for s in server)}
        other = [p.pid for p in below if p.pid not in known]
        return {
            "join client": [self.pid],
            "join ssh": ssh,
            "join local tmux server": [s.pid for s in server],
            "join local panes": panes,
            "join local tmux clients": clients,
            "join other": other,
        }
