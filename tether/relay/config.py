"""The relay's settings, in their own module so every role can read them
without importing the server that wires the roles together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.transport import ssh


@dataclass
class RelayConfig:
    keys_dir: Path
    bind: str = "0.0.0.0"
    port: int = 2222
    public_host: str = ""
    """Host name put in connection strings; defaults to the bind address."""
    public_port: int | None = None
    max_sessions: int = 1000
    max_sessions_per_key: int = 50
    max_mates: int = 32
    max_connections_per_address: int = ssh.MAX_CONNECTIONS_PER_ADDRESS
    """SSH connections at once from one IPv4 address or IPv6 /64 (a NAT shares one)."""
    host_away_timeout: float = 3600.0
    """How long a session waits for its host to come back."""
    hello_timeout: float = 15.0
    jail: bool = True
    """Run each replica in a bubblewrap jail (see SECURITY.md)."""
    replica: str = "direct"
    """How replicas are fed: ``direct`` from the relay's own process
    (``relay/replica_direct.py``), or ``worker``, a Python process per session
    (``relay/worker.py``), kept to measure one against the other."""
    ssh_procs: int = 0
    """SSH front processes (``relay.fronts``): SSH connections, their encryption and
    mates' terminals are served there, sessions and QUIC stay in the relay's own
    process. 0: everything in one process."""
    session_procs: int = 0
    """Session processes (``relay.owners``): each holds a share of the sessions
    (their QUIC links on a UDP port of its own, replicas, mates), and the relay's
    process only accepts, routes and counts. Needs SSH front processes (at least
    one). 0: the relay's process holds every session."""
    quic_port: int | None = None
    """UDP port for QUIC (with session processes, the first of one each); None:
    the SSH port's number; -1: no QUIC."""
    authorized_keys: list[str] | None = None
    """Host keys allowed to open sessions (authorized_keys lines); None: any key."""
    failed_tokens_free: int = 5
    """Unknown tokens an address may try before each further try doubles its wait."""
    mate_input_rate: float = 256 * 1024
    """Bytes per second one mate may type or paste (bursts up to 4x)."""
    web_port: int | None = None
    """TCP port of the HTTP/WebSocket front for browser mates; None: no web front
    (the default: it is one more listening surface, and plain HTTP carries tokens
    in the clear); 0: any free port."""
    web_bind: str | None = None
    """Address the web front listens on; None: ``bind``."""
    web_cert: Path | None = None
    web_key: Path | None = None
    """TLS certificate chain and key (PEM) for the web front; None: plain HTTP."""
    web_url: str = ""
    """Base URL of the web front in printed links (e.g. behind a reverse proxy);
    empty: ``http(s)://public_host:web_port``."""
    web_trust_proxy: bool = False
    """Take a browser's address from the last X-Forwarded-For entry (the web
    port must then be reachable only through that proxy)."""
