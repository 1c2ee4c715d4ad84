"""A shared session as a user starts one: `tether -S SOCK new-session -d`, `wait tether-ready`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from tether.client.paths import pid_path

from .env import SSH_OPTS, tether, tether_env, tmux
from .procs import HarnessError, descendants, end_pids, pid_alive, processes

TMUX_CONF = "set -g default-terminal tmux-256color\nset -g history-limit 5000\n"
"""The host's ~/.tmux.conf unless told otherwise."""


def write_host_home(home: Path, conf: str, tmux_conf: str = TMUX_CONF) -> None:
    """A host's home: ~/.tether.conf naming the relay, and a ~/.tmux.conf."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".tether.conf").write_text(conf)
    (home / ".tmux.conf").write_text(tmux_conf)


def agent_pid(env: dict[str, str], sock: str) -> int | None:
    """The live agent sharing ``sock``, from its pid file: an agent forked by the
    zygote (``tether.zygote``) has the zygote's command line, not the agent's."""
    path = pid_path(sock, Path(env["XDG_STATE_HOME"]) / "tether")
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


class Host:
    """A shared session in ``home``; ``conf`` (if given) becomes its ~/.tether.conf.

    ``start=False`` leaves the start to the caller (to time it), ``ready=False`` the
    wait for `tether-ready`.
    """

    def __init__(self, home: Path, conf: str | None, size: tuple[int, int] = (100, 30),
                 ready: bool = True, prefix: Sequence[str] = (), name: str = "tmux", *,
                 env: dict[str, str] | None = None, command: Sequence[str] = (),
                 start: bool = True, tmux_conf: str = TMUX_CONF) -> None:
        self.home = home
        self.prefix = list(prefix)
        self.size = size
        self.command = list(command)
        if conf is not None:
            write_host_home(home, conf, tmux_conf)
        self.env = env if env is not None else tether_env(home)
        self.sock = str(home / f"{name}.sock")
        self.started_at = 0.0
        if start:
            self.start()
            if ready:
                try:
                    self.wait_ready()
                except BaseException:
                    self.close()  # a failed start leaves no tmux server or agent behind
                    raise

    def start(self) -> None:
        self.started_at = time.perf_counter()
        tether(self.env, "-S", self.sock, "new-session", "-d", "-x", str(self.size[0]), "-y",
               str(self.size[1]), *self.command, prefix=self.prefix)

    def wait_ready(self, timeout: float = 30) -> None:
        tether(self.env, "-S", self.sock, "wait", "tether-ready", timeout=timeout)

    def display(self, fmt: str) -> str:
        """``fmt`` expanded by `tether display -p`, as a user asks."""
        return tether(self.env, "-S", self.sock, "display", "-p", fmt).strip()

    def read_format(self, fmt: str) -> str:
        """``fmt`` expanded by the host's tmux directly (tether's formats are its
        ``@tether_*`` options): no Python start-up, for timing loops."""
        return self.tmux("display", "-p", fmt.replace("#{tether_", "#{@tether_")).strip()

    @property
    def ssh_rw(self) -> str:
        return self.display("#{tether_ssh}")

    @property
    def ssh_ro(self) -> str:
        return self.display("#{tether_ssh_ro}")

    @property
    def join_rw(self) -> str:
        return self.display("#{tether_join}")

    @property
    def join_ro(self) -> str:
        return self.display("#{tether_join_ro}")

    def ssh_argv(self, readonly: bool = False) -> list[str]:
        """The mate's ssh command (argv), with options that keep it non-interactive."""
        line = self.read_format("#{tether_ssh_ro}" if readonly else "#{tether_ssh}")
        words = line.split()
        if not words or words[0] != "ssh":
            raise HarnessError(f"no ssh connection string: {line!r}")
        return ["ssh", *SSH_OPTS, *words[1:]]

    def tmux(self, *args: str, check: bool = True) -> str:
        return tmux(self.sock, *args, check=check)

    def type(self, text: str, enter: bool = True, target: str | None = None) -> None:
        args = ["send-keys"] + (["-t", target] if target else []) + ["-l", text]
        self.tmux(*args)
        if enter:
            self.tmux(*(["send-keys"] + (["-t", target] if target else []) + ["Enter"]))

    def screen(self, target: str | None = None, escapes: bool = False) -> str:
        args = ["capture-pane", "-p"] + (["-e"] if escapes else [])
        args += ["-t", target] if target else []
        return self.tmux(*args)

    def messages(self) -> str:
        return tether(self.env, "-S", self.sock, "show-messages", check=False)

    def agent_pid(self) -> int:
        """The live agent's pid; fails if there is none."""
        path = pid_path(self.sock, Path(self.env["XDG_STATE_HOME"]) / "tether")
        assert path.exists(), "no agent pid file"
        pid = int(path.read_text())
        os.kill(pid, 0)  # alive
        return pid

    def agent_pids(self) -> list[int]:
        pid = agent_pid(self.env, self.sock)
        return [pid] if pid is not None else []

    def agent_log(self) -> str:
        logs = list((Path(self.env["XDG_STATE_HOME"]) / "tether").glob("agent-*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def pids(self) -> dict[str, list[int]]:
        """The host side: agent, its control-mode tmux client, the host tmux server."""
        procs = processes()
        agent = self.agent_pids()
        ctl = [d.pid for a in agent for d in descendants(a, procs) if "-C" in d.argv]
        server = [p.pid for p in procs if p.argv[0].rsplit("/", 1)[-1] == "tmux"
                  and self.sock in p.argv and "new-session" in p.argv]
        return {"agent": agent, "agent tmux client": ctl, "host tmux server": server}

    def close(self) -> None:
        agents = self.agent_pids()
        self.tmux("kill-server", check=False)
        # the agent exits when its tmux server does; end it by pid if it lingers
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in agents):
            time.sleep(0.01)
        end_pids([p for p in agents if pid_alive(p)], 3)
