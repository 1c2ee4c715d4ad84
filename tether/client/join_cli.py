"""``tether join``: join a shared session as a roaming mate.

The mate's terminal attaches to a tmux server of the mate's own (private
socket, the mate's ~/.tmux.conf) that mirrors the host's session; the link to
the relay (``join.JoinClient``) rides out address changes and outages behind
it, so the terminal never drops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from tether.core.predict import MODES
from tether.core.pubkeys import FINGERPRINT
from tether.core.tokens import is_well_formed
from tether.mirror.apply import SESSION
from tether.transport.openssh import RelayAddress
from tether.transport.reconnect import Connector

from .join import JoinClient, JoinEnded, JoinRefused
from .local_replica import LocalReplica

log = logging.getLogger("tether.join")

DESCRIPTION = """\
Join a shared tmux session as a mate that survives bad networks: the session
shows in a tmux of your own (your ~/.tmux.conf applies), and the link to the
relay rides out address changes (Wi-Fi <-> mobile), loss and outages; while
it is down the status line says so, and when it is back the screen is
current again. You follow the host's window; your prefix then F switches to
looking around (window keys move only your view) and back. TARGET is
TOKEN@HOST[:PORT], as printed by the host's
`tether display -p '#{tether_join}'` (with --pin) or taken from its ssh line.
Detach with your tmux prefix and d; that ends the join."""

FIRST_SCREEN_WITHIN = 30.0


def parse_target(text: str, port: int | None) -> tuple[str, str, int]:
    """TOKEN@HOST[:PORT] (or [IPv6]:PORT) -> (token, host, port)."""
    token, at, where = text.partition("@")
    if not at or not token or not where:
        raise ValueError(f"expected TOKEN@HOST[:PORT], got {text!r}")
    if not is_well_formed(token):
        raise ValueError("that token is not a tether session token")
    host, p = where, port
    if where.startswith("["):
        host, _, rest = where[1:].partition("]")
        if rest.startswith(":"):
            p = int(rest[1:])
    elif where.count(":") == 1:
        host, _, ps = where.partition(":")
        p = int(ps)
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"bad relay host {host!r}")
    return token, host, p or 22


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tether join", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="TOKEN@HOST[:PORT]")
    ap.add_argument("-p", "--port", type=int, help="the relay's SSH port (default 22)")
    ap.add_argument("--pin", action="append", default=[], metavar="SHA256:...",
                    help="accept only a relay host key with this fingerprint (repeatable); "
                    "without it the key is checked against ~/.ssh/known_hosts, as ssh does")
    ap.add_argument("--known-hosts", metavar="FILE",
                    help="known_hosts file when nothing is pinned (default ~/.ssh/known_hosts)")
    ap.add_argument("-i", "--identity", action="append", default=[], metavar="FILE",
                    help="an SSH key to offer (sessions restricted with -a); default: "
                    "your keys and ssh-agent")
    ap.add_argument("--tmux-config", metavar="FILE",
                    help="the tmux config of the local tmux (default ~/.tmux.conf)")
    ap.add_argument("--no-follow", action="store_true",
                    help="start looking around: your window keys (0-9 n p l) move only "
                    "your view, not the host; prefix F switches to following the host's "
                    "window (the default) and back")
    ap.add_argument("--predict", choices=MODES, default=None,
                    help="local echo: show what you type before the host echoes it, "
                    "underlined until it does (mosh-style). adaptive (the default): when "
                    "the link is slow or an echo is late; always; never. Default: your "
                    "tmux config's @tether-predict option, else adaptive")
    ap.add_argument("--no-quic", action="store_true",
                    help="stay on the SSH channel (do not move to QUIC)")
    ap.add_argument("--log", metavar="FILE", help="write the client's log here")
    return ap


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        token, host, port = parse_target(a.target, a.port)
    except ValueError as exc:
        print(f"tether join: {exc}", file=sys.stderr)
        return 2
    bad = [p for p in a.pin if not FINGERPRINT.fullmatch(p)]
    if bad:
        print(f"tether join: not a SHA256 key fingerprint: {bad[0]}", file=sys.stderr)
        return 2
    if shutil.which("tmux") is None or shutil.which("ssh") is None:
        print("tether join needs tmux and the OpenSSH client (ssh)", file=sys.stderr)
        return 2
    if a.log:
        logging.basicConfig(filename=a.log, level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    addr = RelayAddress(host, port, tuple(a.pin), tuple(a.identity), a.known_hosts, user=token)
    try:
        return asyncio.run(
            _join(addr, a.tmux_config, not a.no_quic, not a.no_follow, a.predict)
        )
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGHUP or SIGTERM: cleaned up, then gone
        return 129


async def _join(
    addr: RelayAddress,
    tmux_config: str | None,
    use_quic: bool,
    follow: bool = True,
    predict: str | None = None,
) -> int:
    cols, rows = _terminal_size()
    # a closed terminal (SIGHUP) or a kill must still end the local tmux below
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        # once cleaning up, a signal must not cut the cleanup short: a terminal
        # that closes often ends our tmux client first, and SIGHUP follows while
        # the local tmux server is being killed
        if main is not None and not stopping:
            main.cancel()

    for sig in (signal.SIGHUP, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    workdir = tempfile.mkdtemp(prefix="tether-join-")
    replica: LocalReplica | None = None
    client_task: asyncio.Task[None] | None = None
    client_ref: list[JoinClient] = []
    try:
        sock = os.path.join(workdir, "tmux.sock")

        def on_input(pane: int, keys: bytes, binding: object = None) -> None:
            if client_ref:
                client_ref[0].type(pane, keys, binding)  # type: ignore[arg-type]

        def on_overflow(pane: int) -> None:
            if client_ref:
                client_ref[0].fell_behind(pane)

        replica = LocalReplica(sock, on_input, tmux_config, on_overflow, follow=follow,
                               predict=predict)
        client = JoinClient(Connector(addr, use_quic=use_quic), replica, cols, rows,
                            notify=lambda text: log.info("%s", text))
        client_ref.append(client)
        print(f"tether: joining {addr.host}:{addr.port} ...", file=sys.stderr)
        await replica.start(cols, rows)  # before any event can arrive
        client_task = asyncio.create_task(client.run())
        ready = asyncio.create_task(client.ready.wait())
        done, _ = await asyncio.wait({ready, client_task}, timeout=FIRST_SCREEN_WITHIN,
                                     return_when=asyncio.FIRST_COMPLETED)
        if client_task in done:
            ready.cancel()
            return _why(client_task)
        if ready not in done:
            ready.cancel()
            print("tether join: no screen from the relay yet; attaching anyway", file=sys.stderr)
        attach = asyncio.create_task(_attach(sock, client))
        await asyncio.wait({attach, client_task}, return_when=asyncio.FIRST_COMPLETED)
        if client_task.done():  # refused, or the host ended the session
            await replica.close()  # the mate's tmux client exits with it
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(attach, 5)
            return _why(client_task)
        return attach.result()
    finally:
        stopping = True
        if client_ref and client_task is not None and not client_task.done():
            with contextlib.suppress(Exception):
                await client_ref[0].leave()  # the host's list drops us now
        if client_task is not None:
            client_task.cancel()
            with contextlib.suppress(BaseException):
                await client_task
        if replica is not None:
            await replica.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _why(task: asyncio.Task[None]) -> int:
    exc = task.exception() if not task.cancelled() else None
    if isinstance(exc, JoinEnded):
        print(f"{exc}", file=sys.stderr)
        return 0
    if isinstance(exc, JoinRefused):
        print(f"tether join: {exc}", file=sys.stderr)
        return 1
    if exc is not None:
        print(f"tether join: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _attach(sock: str, client: JoinClient) -> int:
    """The mate's terminal on the local tmux, until it detaches (or the join ends)."""
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    proc = await asyncio.create_subprocess_exec("tmux", "-S", sock, "attach", "-t", SESSION,
                                                env=env)
    loop = asyncio.get_running_loop()

    def on_winch() -> None:
        client.resize(*_terminal_size())

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
    try:
        return await proc.wait()
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGWINCH)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.columns, size.lines
    except OSError:
        return 80, 24
