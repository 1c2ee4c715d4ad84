"""``tether relay``: self-hosting in one command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.relay.server import Relay, RelayConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether relay",
        add_help=False,
        description="Run a tether relay: hosts share sessions through it, mates join "
        "with `ssh -p PORT TOKEN@HOST`.",
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument(
        "-k",
        dest="keys_dir",
        type=Path,
        default=None,
        metavar="KEYS_DIR",
        help="directory of the relay's SSH host keys, created on first start "
        "(default: ~/.local/state/tether/relay-keys)",
    )
    p.add_argument(
        "-p",
        dest="port",
        type=int,
        default=2222,
        metavar="PORT",
        help="SSH port to listen on (default 2222)",
    )
    p.add_argument(
        "-h",
        dest="host",
        default="",
        metavar="HOST",
        help="host name mates use, shown in connection strings (default: the bind address)",
    )
    p.add_argument(
        "-b",
        dest="bind",
        default="0.0.0.0",
        metavar="BIND",
        help="address to listen on (default 0.0.0.0)",
    )
    p.add_argument(
        "-l",
        dest="logfile",
        type=Path,
        default=None,
        metavar="LOGFILE",
        help="write the log here instead of standard error",
    )
    p.add_argument(
        "-v", dest="verbose", action="count", default=0, help="more log detail (repeat for debug)"
    )
    p.add_argument(
        "--host-away-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long a session waits for its host to come back (default 3600)",
    )
    p.add_argument(
        "--max-sessions", type=int, default=1000, help="most sessions at once (default 1000)"
    )
    p.add_argument(
        "--quic-port",
        type=int,
        default=None,
        metavar="PORT",
        help="UDP port for QUIC replication (default: the SSH port's number)",
    )
    p.add_argument(
        "-a",
        dest="authorized_keys",
        type=Path,
        default=None,
        metavar="AUTHORIZED_KEYS",
        help="only hosts with a key in this authorized_keys file may open sessions "
        "(default: any key)",
    )
    p.add_argument("--max-mates", type=int, default=32, help="mates per session (default 32)")
    p.add_argument(
        "--max-sessions-per-key",
        type=int,
        default=50,
        help="sessions one host key may hold at once (default 50)",
    )
    p.add_argument(
        "--max-connections-per-address",
        type=int,
        default=32,
        metavar="N",
        help="SSH connections one IPv4 address (or IPv6 /64) may hold at once; more are "
        "refused with a message (default 32; raise it when many users share one address)",
    )
    p.add_argument(
        "--failed-tokens-free",
        type=int,
        default=5,
        metavar="N",
        help="unknown tokens an address may try before each further try doubles its wait "
        "(default 5)",
    )
    p.add_argument(
        "--mate-input-rate",
        type=float,
        default=256 * 1024,
        metavar="BYTES",
        help="bytes per second one mate may type or paste, bursts up to 4x (default 262144)",
    )
    p.add_argument(
        "--no-jail",
        action="store_true",
        help="run replica workers without the bubblewrap jail (unsafe with untrusted hosts)",
    )
    p.add_argument(
        "--replica",
        choices=("direct", "worker"),
        default="direct",
        help="feed each session's jailed replica tmux from the relay's own process "
        "(direct, the default), or from a Python worker per session (worker: costs "
        "~5 MiB and two process hops per keystroke more; kept for comparison)",
    )
    p.add_argument(
        "--ssh-procs",
        type=int,
        default=0,
        metavar="N",
        help="serve SSH connections in N processes of their own: their encryption and "
        "mates' terminals use other cores, while sessions, tokens and QUIC stay in the "
        "relay's process (default 0: one process does everything)",
    )
    p.add_argument(
        "--session-procs",
        type=int,
        default=0,
        metavar="N",
        help="hold the sessions in N processes of their own (one per core): each serves "
        "its share's QUIC links and replicas, on UDP ports QUIC-PORT to QUIC-PORT+N-1; "
        "the relay's process only accepts, counts and routes. SSH is then served by "
        "front processes (--ssh-procs, default N). Default 0: the relay's process "
        "holds every session",
    )
    p.add_argument(
        "--no-quic",
        action="store_true",
        help="replicate over the SSH channel only (for networks that block UDP)",
    )
    web = p.add_argument_group(
        "browser mates",
        "An HTTP/WebSocket front lets mates join from a browser (a link per token, "
        "beside the ssh and join lines), under the same token, back-off, mate-limit "
        "and input-rate rules as ssh mates. Off unless --web-port is given.",
    )
    web.add_argument(
        "--web-port",
        type=int,
        default=None,
        metavar="PORT",
        help="TCP port for browser mates (default: none, no web front; 0: any free port)",
    )
    web.add_argument(
        "--web-bind",
        default=None,
        metavar="ADDR",
        help="address the web front listens on (default: the -b address)",
    )
    web.add_argument(
        "--web-cert",
        type=Path,
        default=None,
        metavar="FILE",
        help="TLS certificate chain (PEM) for the web front; with --web-key it serves "
        "HTTPS/WSS. Without them it serves plain HTTP, where tokens cross the network "
        "in the clear: use that only behind a TLS reverse proxy or on loopback",
    )
    web.add_argument(
        "--web-key", type=Path, default=None, metavar="FILE",
        help="the TLS private key (PEM) for --web-cert",
    )
    web.add_argument(
        "--web-url",
        default="",
        metavar="URL",
        help="base URL printed in browser links, e.g. https://tether.example.org behind a "
        "reverse proxy (default: http(s)://HOST:WEB_PORT from -h)",
    )
    web.add_argument(
        "--web-trust-proxy",
        action="store_true",
        help="take a browser's address (for back-off and connection limits) from the "
        "last X-Forwarded-For entry; only when the web port is reachable solely "
        "through your reverse proxy",
    )
    return p


def _web_problem(a: argparse.Namespace) -> str:
    """What is wrong with the web options, or empty."""
    given = [name for name, v in (("--web-bind", a.web_bind), ("--web-cert", a.web_cert),
                                  ("--web-key", a.web_key), ("--web-url", a.web_url),
                                  ("--web-trust-proxy", a.web_trust_proxy)) if v]
    if a.web_port is None:
        return f"{given[0]} needs --web-port" if given else ""
    if not 0 <= a.web_port <= 65535:
        return f"--web-port {a.web_port}: not a port"
    if (a.web_cert is None) != (a.web_key is None):
        return "--web-cert and --web-key go together"
    url = a.web_url
    if url and (not url.startswith(("http://", "https://")) or any(
            c.isspace() or c in "\"'<>`" for c in url) or len(url) > 200):
        return f"--web-url {url!r}: expected a URL such as https://tether.example.org"
    return ""


def _procs_problem(a: argparse.Namespace) -> str:
    """What is wrong with the process options, or empty."""
    for name, n in (("--ssh-procs", a.ssh_procs), ("--session-procs", a.session_procs)):
        if not 0 <= n <= 64:
            return f"{name} {n}: expected 0 to 64"
    if a.session_procs and a.replica == "worker":
        return "--replica worker cannot be used with --session-procs"
    return ""


async def _run(a: argparse.Namespace) -> int:
    from tether.relay.server import Relay

    keys = a.keys_dir or _default_keys()
    if problem := _web_problem(a) or _procs_problem(a):
        print(f"tether relay: {problem}", file=sys.stderr)
        return 2
    config = _config(a, keys)
    if config is None:
        return 1
    relay = Relay(config)
    limit_note = _raise_open_files(a.max_sessions)
    if limit_note:
        print(f"tether relay: WARNING: {limit_note}", file=sys.stderr)
    if a.no_jail:
        print("tether relay: WARNING: --no-jail: replica workers run unjailed; sessions are "
              "NOT isolated from each other or from this machine", file=sys.stderr)
    try:
        await relay.start()
    except OSError as exc:
        print(f"tether relay: cannot listen on {a.bind}:{a.port}: {exc.strerror}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"tether relay: {exc}", file=sys.stderr)
        return 1
    _announce(a, relay, keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.close()
    return 0


def _config(a: argparse.Namespace, keys: Path) -> RelayConfig | None:
    """The relay's configuration from the command line; None (said why) if the
    authorized keys file cannot be used."""
    from tether.relay.server import RelayConfig

    authorized = None
    if a.authorized_keys is not None:
        from tether.transport.openssh import load_public_keys

        try:
            authorized = load_public_keys(str(a.authorized_keys))
        except (OSError, ValueError) as exc:
            print(f"tether relay: cannot use {a.authorized_keys}: {exc}", file=sys.stderr)
            return None
    return RelayConfig(
        keys_dir=keys,
        bind=a.bind,
        port=a.port,
        public_host=a.host,
        host_away_timeout=a.host_away_timeout,
        max_sessions=a.max_sessions,
        quic_port=-1 if a.no_quic else a.quic_port,
        jail=not a.no_jail,
        replica=a.replica,
        ssh_procs=a.ssh_procs,
        session_procs=a.session_procs,
        authorized_keys=authorized,
        max_mates=a.max_mates,
        max_sessions_per_key=a.max_sessions_per_key,
        max_connections_per_address=a.max_connections_per_address,
        failed_tokens_free=a.failed_tokens_free,
        mate_input_rate=a.mate_input_rate,
        web_port=a.web_port,
        web_bind=a.web_bind,
        web_cert=a.web_cert,
        web_key=a.web_key,
        web_url=a.web_url,
        web_trust_proxy=a.web_trust_proxy,
    )


def _announce(a: argparse.Namespace, relay: Relay, keys: Path) -> None:
    """Say where the relay listens and the lines hosts put in ~/.tether.conf."""
    host = a.host or (a.bind if a.bind not in ("0.0.0.0", "::") else "THIS-HOST")
    ports = [p for p in relay.quic_ports if p] or ([relay.quic_port] if relay.quic_port else [])
    quic_note = (f", QUIC on UDP {ports[0]}" + (f"-{ports[-1]}" if ports[-1] != ports[0]
                                                 else "")) if ports else ", no QUIC"
    if len(ports) > 1 and ports != list(range(ports[0], ports[-1] + 1)):
        quic_note = ", QUIC on UDP " + ",".join(map(str, ports))
    fronts = ""
    if a.session_procs > 0:
        fronts = (f", sessions held by {a.session_procs} processes, SSH served by "
                  f"{a.ssh_procs or a.session_procs} front processes")
    elif a.ssh_procs > 0:
        fronts = f", SSH served by {a.ssh_procs} front processes"
    print(f"tether relay listening on {a.bind}:{relay.port}{quic_note}{fronts} (keys in {keys})")
    if relay.web_port is not None:
        bind = a.web_bind if a.web_bind is not None else a.bind
        tls = "HTTPS" if a.web_cert else "plain HTTP"
        print(f"Browser mates: {tls} on {bind}:{relay.web_port}, links {relay.web_base()}/t/TOKEN")
        if not a.web_cert and not _loopback(bind) and not a.web_trust_proxy:
            print("tether relay: WARNING: the web front serves plain HTTP: tokens cross the "
                  "network in the clear; give --web-cert/--web-key, or put a TLS reverse "
                  "proxy in front (--web-url, --web-trust-proxy)", file=sys.stderr)
    print("Hosts use it with these lines in ~/.tether.conf:")
    print(f"  set -g tether-server-host {host}")
    print(f"  set -g tether-server-port {relay.port}")
    for option, fp in relay.fingerprints:
        print(f"  set -g {option} {fp}")
    sys.stdout.flush()


def _loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


FILES_PER_SESSION = 8
"""Descriptors an idle session holds in the relay (3: its worker's two sockets
and its pidfd) with room for a mate or two (2 each: the SSH connection and the
pty master)."""
FILES_SPARE = 64


def _raise_open_files(max_sessions: int) -> str:
    """Raise the soft open-file limit to the hard one; a warning if even that is
    too low for ``max_sessions`` (shells and services start at a soft 1,024,
    which an idle session in three descriptors runs out of at ~330 sessions)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return ""
    fits = max(0, (soft - FILES_SPARE) // FILES_PER_SESSION)
    if fits >= max_sessions:
        return ""
    return (
        f"the open-file limit ({soft}) leaves room for about {fits} sessions with a mate or "
        f"two, not --max-sessions {max_sessions}; raise it (`ulimit -n`, or LimitNOFILE= "
        "in a systemd unit)"
    )


def _default_keys() -> Path:
    import os

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tether" / "relay-keys"


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(a.verbose + 1, 2)
    handler: logging.Handler = (
        logging.FileHandler(a.logfile) if a.logfile else logging.StreamHandler(sys.stderr)
    )
    from tether.relay.server import RedactTokens
    from tether.transport.children import use_pidfd_watcher

    handler.addFilter(RedactTokens())
    logging.basicConfig(
        level=level, handlers=[handler], format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    profile = os.environ.get("TETHER_RELAY_PROFILE")
    if profile:  # a developer's tool: where the relay's time goes (bench/profile.py)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                use_pidfd_watcher()
                return asyncio.run(_run(a))
        finally:
            prof.disable()
            prof.dump_stats(profile)
    with contextlib.suppress(KeyboardInterrupt):
        use_pidfd_watcher()
        return asyncio.run(_run(a))
    return 0
