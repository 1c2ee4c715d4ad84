"""A forked agent starts ``ssh`` to its relay before anything else it does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tether.agent import _EarlySSH
from tether.core.protocol import SUBSYSTEM

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return tmp_path


def test_a_configured_relay_gets_ssh_started_at_once(home: Path) -> None:
    conf = home / "tether.conf"
    conf.write_text(
        "set -g tether-server-host 127.0.0.1\n"
        "set -g tether-server-port 1\n"
        f"set -g tether-server-ed25519-fingerprint SHA256:{'A' * 43}\n"
    )
    early = _EarlySSH(conf)
    assert early.cfg.server_host == "127.0.0.1"
    started = early.started
    assert started is not None
    assert started.argv[-1] == SUBSYSTEM and "1" in started.argv
    early.discard()
    assert early.started is None
    assert started.proc.returncode is not None, "an ssh never taken is ended and reaped"


def test_no_relay_configured_starts_nothing(home: Path) -> None:
    conf = home / "tether.conf"
    conf.write_text("")
    early = _EarlySSH(conf)
    assert early.started is None
    early.discard()
