"""The command line as a person uses it: plain `tether`, the embedded relay, endings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .helpers import Host, Mate, RelayProcess, tether, tether_env, tmux, wait_for
from .test_share import join


def test_plain_tether_starts_and_attaches_with_an_embedded_relay(tmp_path: Path,
                                                                mates: list[Mate]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = tether_env(home)
    term = str(tmp_path / "terminal.sock")
    # the person's own terminal: a tmux pane in which they type `tether`
    subprocess.run(["tmux", "-S", term, "-f", "/dev/null", "new-session", "-d", "-x", "110",
                    "-y", "32"], check=True, env={k: v for k, v in env.items() if k != "TMUX"})
    try:
        exports = " ".join(f"{k}={v}" for k, v in env.items()
                           if k in ("HOME", "XDG_STATE_HOME", "TETHER_CONF", "LANG", "TERM"))
        tmux(term, "send-keys", "-l", f"env {exports} {sys.executable} -m tether")
        tmux(term, "send-keys", "Enter")
        shown = wait_for(
            lambda: s if "ssh session:" in (s := tmux(term, "capture-pane", "-p")) else "",
            30, "the connection string in the attached session's message line")
        assert "embedded relay" in tether_messages(env) or "127.0.0.1" in shown
        sock = wait_for(lambda: next(iter(sorted((Path(f"/tmp/tether-{os.getuid()}")).glob(
            "s*"), key=lambda p: p.stat().st_mtime, reverse=True)), None), 5, "socket")
        ssh = tether(env, "-S", str(sock), "display", "-p", "#{tether_ssh}").strip()
        assert ssh.startswith("ssh -p ") and ssh.endswith("@127.0.0.1")
        messages = tether(env, "-S", str(sock), "show-messages")
        assert "no relay configured: using an embedded relay on 127.0.0.1" in messages
        mate = join(mates, tmp_path, ssh)
        tmux(term, "send-keys", "-l", "echo hello-from-plain-tether")
        tmux(term, "send-keys", "Enter")
        mate.wait_text("hello-from-plain-tether")
        tmux(str(sock), "kill-server", check=False)
    finally:
        tmux(term, "kill-server", check=False)


def tether_messages(env: dict[str, str]) -> str:
    logs = list((Path(env["XDG_STATE_HOME"]) / "tether").glob("messages-*.log"))
    return "\n".join(p.read_text() for p in logs)


def test_host_ending_the_session_lets_mates_go(relay: RelayProcess, tmp_path: Path,
                                               mates: list[Mate]) -> None:
    h = Host(tmp_path / "host", relay.conf())
    ssh = h.ssh_rw
    mate = join(mates, tmp_path, ssh)
    h.tmux("kill-server")
    mate.wait_text("tether: the host ended the session.", 20)
    wait_for(lambda: not mate.alive(), 10, "the mate's ssh to exit")
    # the token ended with the session
    late = Mate(tmp_path, ssh, name="late")
    mates.append(late)
    late.wait_text("Invalid or expired session token.")


def test_relay_help_and_tether_help_explain_flags(tmp_path: Path) -> None:
    env = tether_env(tmp_path)
    out = tether(env, "relay", "--help")
    for flag in ("-k KEYS_DIR", "-p PORT", "-h HOST", "-b BIND", "-l LOGFILE", "-v"):
        assert flag in out
    out = tether(env, "--help")
    assert "wait tether-ready" in out and "#{tether_ssh_ro}" in out
    p = subprocess.run([sys.executable, "-m", "tether", "-Z"], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 2 and "unknown option -Z" in p.stderr


def test_a_missing_identity_or_bad_pin_stops_new_session_with_the_reason(tmp_path: Path) -> None:
    env = tether_env(tmp_path)
    conf = tmp_path / ".tether.conf"
    sock = str(tmp_path / "s.sock")
    conf.write_text("set -g tether-server-host relay.invalid\n"
                    f"set -g tether-identity {tmp_path / 'nope'}\n")
    p = subprocess.run([sys.executable, "-m", "tether", "-S", sock, "new-session", "-d"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 2 and f"tether-identity {tmp_path / 'nope'}: no such file" in p.stderr
    conf.write_text("set -g tether-server-host relay.invalid\n"
                    "set -g tether-server-ed25519-fingerprint SHA256:short\n")
    p = subprocess.run([sys.executable, "-m", "tether", "-S", sock, "new-session", "-d"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 2 and "must look like SHA256" in p.stderr
    assert not os.path.exists(sock), "no tmux server was started"
