"""tmux drops the agent's control client; the agent reattaches and replication goes on."""

from __future__ import annotations

from pathlib import Path

from .helpers import Host, Mate, wait_for


def control_clients(host: Host) -> list[str]:
    lines = host.tmux("list-clients", "-F", "#{client_name} #{client_control_mode}")
    return [line.split()[0] for line in lines.splitlines() if line.endswith(" 1")]


def test_agent_reattaches_when_tmux_detaches_it(host: Host, mates: list[Mate],
                                                tmp_path: Path) -> None:
    mate = Mate(tmp_path, host.ssh_rw, (100, 30), "mate")
    mates.append(mate)
    wait_for(lambda: "0:" in mate.status_line(), 15, "the mate to attach")
    host.type("echo before-$((20+1))")
    mate.wait_text("before-21")
    agent = host.agent_pid()
    (old,) = control_clients(host)
    host.tmux("detach-client", "-t", old)
    # the agent attaches a new control client: the session stays shared
    wait_for(lambda: control_clients(host) not in ([], [old]), 10, "a new control client")
    assert host.agent_pid() == agent
    host.type("echo after-$((40+2))")
    mate.wait_text("after-42", timeout=15)
    # the mate types into the host as before
    out = tmp_path / "typed-after-reattach.txt"
    mate.type(f"echo mate-$((6*7)) > {out}")
    wait_for(lambda: out.exists() and out.read_text() == "mate-42\n", 10,
             "the mate's command to run on the host")
