"""~/.tether.conf: tether's options out, tmux's lines through."""

from __future__ import annotations

import pytest

from tether.client.config import ConfigError, parse

FP = "SHA256:u3oGC4kDNGv9OcTn+c60RqhtuCi2SjQSXcg5SvUVDLU"


def test_relay_options_are_read_and_tmux_lines_pass_through() -> None:
    cfg = parse(
        "set -g tether-server-host relay.example.org\n"
        "set -g tether-server-port 2222\n"
        f"set -g tether-server-ed25519-fingerprint {FP}\n"
        "set -g status-style bg=blue\n"
    )
    assert (cfg.server_host, cfg.server_port, cfg.fingerprints) == ("relay.example.org", 2222, [FP])
    assert cfg.tmux_lines == ["set -g status-style bg=blue"]


@pytest.mark.parametrize(
    "value", ["SHA256:short", "MD5:aa:bb:cc", FP + "x", "SHA256:x'; touch /tmp/owned; '"]
)
def test_a_pin_that_is_not_a_fingerprint_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="must look like SHA256"):
        parse(f"set -g tether-server-ed25519-fingerprint {value!r}\n")


def test_unknown_tether_options_and_bad_ports_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown option tether-nope"):
        parse("set -g tether-nope 1\n")
    with pytest.raises(ConfigError, match="bad port"):
        parse("set -g tether-server-port 70000\n")
