"""``~/.tether.conf``: tmux syntax, tether's own options plus ordinary tmux lines.

Lines of the form ``set[-option] [-g] tether-NAME VALUE`` configure tether;
every other line is tmux configuration and goes to the session's tmux, after
the user's ``~/.tmux.conf``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from tether.core.errors import TetherError
from tether.core.pubkeys import FINGERPRINT

KNOWN = {
    "tether-server-host",
    "tether-server-port",
    "tether-server-ed25519-fingerprint",
    "tether-server-rsa-fingerprint",
    "tether-server-ecdsa-fingerprint",
    "tether-identity",
    "tether-known-hosts",
    "tether-authorized-keys",
}


class ConfigError(TetherError):
    pass


class TetherConfig:
    """tether's options from the config file, plus its plain tmux lines.

    A plain class: ``dataclasses`` (through ``inspect``) would cost every
    ``tether new-session`` ~15 ms of imports.
    """

    __slots__ = (
        "authorized_keys",
        "fingerprints",
        "identities",
        "known_hosts",
        "path",
        "server_host",
        "server_port",
        "tmux_lines",
    )

    def __init__(
        self,
        server_host: str = "",
        server_port: int = 22,
        fingerprints: list[str] | None = None,
        identities: list[str] | None = None,
        known_hosts: str | None = None,
        authorized_keys: str | None = None,
        tmux_lines: list[str] | None = None,
        path: Path | None = None,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.fingerprints = list(fingerprints or [])
        self.identities = list(identities or [])
        self.known_hosts = known_hosts
        self.authorized_keys = authorized_keys
        self.tmux_lines = list(tmux_lines or [])
        self.path = path

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TetherConfig):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass would be

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"TetherConfig({inner})"


def default_path() -> Path:
    return Path(os.environ.get("TETHER_CONF", Path.home() / ".tether.conf"))


def parse(text: str, path: Path | None = None) -> TetherConfig:
    cfg = TetherConfig(path=path)
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            cfg.tmux_lines.append(line)
            continue
        try:
            words = shlex.split(stripped, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{path or 'config'}:{n}: {exc}") from None
        if not words or words[0] not in ("set", "set-option"):
            cfg.tmux_lines.append(line)
            continue
        rest = [w for w in words[1:] if not w.startswith("-")]
        if not rest or not rest[0].startswith("tether-"):
            cfg.tmux_lines.append(line)
            continue
        name = rest[0]
        value = rest[1] if len(rest) > 1 else ""
        if name not in KNOWN:
            raise ConfigError(f"{path or 'config'}:{n}: unknown option {name}")
        if name == "tether-server-host":
            cfg.server_host = value
        elif name == "tether-server-port":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ConfigError(f"{path or 'config'}:{n}: bad port {value!r}")
            cfg.server_port = int(value)
        elif name.endswith("-fingerprint"):
            if not FINGERPRINT.fullmatch(value):
                raise ConfigError(
                    f"{path or 'config'}:{n}: {name} must look like SHA256:... as "
                    f"`ssh-keygen -lf KEY.pub` prints it (got {value!r})"
                )
            cfg.fingerprints.append(value)
        elif name == "tether-identity":
            cfg.identities.append(os.path.expanduser(value))
        elif name == "tether-known-hosts":
            cfg.known_hosts = os.path.expanduser(value)
        elif name == "tether-authorized-keys":
            cfg.authorized_keys = os.path.expanduser(value)
    return cfg


def load(path: Path | None = None) -> TetherConfig:
    path = path or default_path()
    if not path.exists():
        return TetherConfig(path=path)
    return parse(path.read_text(), path)


def tmux_config(cfg: TetherConfig) -> str:
    """The session's tmux config: the user's ~/.tmux.conf, then tmux lines of ours."""
    lines = ["source-file -q ~/.tmux.conf"]
    lines += cfg.tmux_lines
    return "\n".join(lines) + "\n"
