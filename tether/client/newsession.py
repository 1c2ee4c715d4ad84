"""Starting the tmux session `tether new-session` shares: the config checked,
then tmux started with tether's options. Run by the CLI on a cold start, and by
the zygote's forked agent on a warm one (``tether.zygote``), so the CLI then
imports none of it."""

from __future__ import annotations

import os
import subprocess


def start_tmux(
    sock: str,
    tmux_args: list[str],
    conf: str | None,
    authorized: str | None,
    state: str,
    env: dict[str, str],
) -> tuple[str | None, str]:
    """Check the config, then start the tmux session with it: ``(session id, "")``,
    or ``(None, why it could not start)``."""
    from pathlib import Path

    from tether.client import config as config_mod

    try:
        cfg = config_mod.load(Path(conf) if conf else None)
    except config_mod.ConfigError as exc:
        return None, str(exc)
    for identity in cfg.identities:
        if not os.path.isfile(identity):
            return None, f"tether-identity {identity}: no such file"
    authorized = authorized or cfg.authorized_keys
    if authorized:
        from tether.transport.openssh import load_public_keys

        try:
            load_public_keys(authorized)
        except (OSError, ValueError) as exc:
            return None, f"cannot use {authorized}: {exc}"
    conf_file = os.path.join(state, f"tmux-{os.getpid()}.conf")
    with open(conf_file, "w") as f:
        f.write(config_mod.tmux_config(cfg))
    try:
        proc = subprocess.run(
            ["tmux", "-S", sock, "-f", conf_file, "new-session", "-d", "-P", "-F",
             "#{session_id}", *tmux_args],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    except OSError as exc:
        return None, f"cannot run tmux: {exc}"
    finally:
        os.unlink(conf_file)
    if proc.returncode != 0:
        return None, proc.stderr.strip() or "tmux could not start a session"
    return proc.stdout.strip().splitlines()[-1], ""
