"""The host agent as a background process: one per shared tmux server (cli layer).

Started by ``tether new-session``; connects to the configured relay (or runs
an embedded relay on 127.0.0.1 when none is configured) and replicates until
the tmux session ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket as socket_mod
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tether import command
from tether.client import config as config_mod
from tether.client.agentctl import control_path, short_path
from tether.client.host import HostAgent, discard_link
from tether.client.paths import messages_path, pid_path, state_dir
from tether.core.control import quote
from tether.core.tokens import RedactTokens
from tether.transport.children import use_pidfd_watcher
from tether.transport.openssh import RelayAddress, load_public_keys, prestart_host
from tether.transport.reconnect import Connector

if TYPE_CHECKING:
    from collections.abc import Callable

    from tether.relay.server import Relay

log = logging.getLogger("tether.agent")

MAX_LOG_LINES = 100
KICK_CONFIRM = 5.0
"""How long `tether kick-mate` waits for the relay to list the mate as gone."""
MAX_REQUEST = 4096
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class Messages:
    """tether's own message log: a file ``tether show-messages`` prints, and a
    message on the host's attached clients."""

    def __init__(self, path: Path) -> None:
        self.lines: list[str] = []
        self.agent: HostAgent | None = None
        self.path = path
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, text: str, show: bool = True) -> None:
        stamp = time.strftime("%a %b %d %H:%M:%S %Y")
        self.lines.append(f"{stamp} {text}")
        del self.lines[:-MAX_LOG_LINES]
        log.info("%s", text)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(self.path)
        agent = self.agent
        if not show or agent is None or agent.tmux.closed is None or agent.tmux.closed.done():
            return
        task = asyncio.get_running_loop().create_task(_display_all(agent, text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _display_all(agent: HostAgent, text: str) -> None:
    with contextlib.suppress(Exception):
        clients = await agent.tmux.run(
            "list-clients -F '#{client_control_mode} #{status} #{client_name}'")
        for line in clients:
            control, status, name = [*line.split(" ", 2), "", ""][:3]
            if name and control != "1":
                # one line (a newline would end the command in control mode),
                # literal (no format), quoted: whatever the text came from
                line = _CONTROL_CHARS.sub("?", text)
                shown = quote("tether: " + line.replace("#", "##"))
                # with the status line off, tmux draws the message over the pane
                # and freezes the client's screen while it shows: hold it only
                # for the user's own display-time then
                hold = "" if status == "off" else "-d 15000 "
                agent.tmux.send(f"display-message {hold}-c {quote(name)} {shown}")


async def amain(socket: str, session: str, conf: Path | None, authorized: str | None = None,
                warm: bool = True, start: _Start | None = None,
                early_ssh: _EarlySSH | None = None) -> int:
    """Share ``session`` until it ends; ``warm``: leave a zygote behind once shared;
    ``start``: start tmux first (a zygote's fork doing `tether new-session`);
    ``early_ssh``: the config, and ssh already started on it."""
    cfg = early_ssh.cfg if early_ssh is not None else config_mod.load(conf)
    messages = Messages(messages_path(socket))
    started = None
    if start is not None and not cfg.server_host:  # an embedded relay takes longer
        started = asyncio.ensure_future(start.session())
    addr, relay, jail_problem = await _relay_address(cfg)
    authorized = authorized or (
        os.path.expanduser(cfg.authorized_keys) if cfg.authorized_keys else None
    )
    mate_keys = tuple(load_public_keys(authorized)) if authorized else ()
    connector = Connector(addr)
    if early_ssh is not None:  # the first SSH attempt takes it (or main ends it)
        connector.prestarted = early_ssh.started
    early = asyncio.create_task(connector.connect())
    if start is not None and started is None:
        # tmux starts, in a thread, while ssh connects: the handshake is the
        # longer of the two, so ssh goes first
        started = asyncio.ensure_future(start.session())
    if session == "-":
        # `tether new-session` started us before tmux: the SSH handshake overlaps
        # tmux starting the session; no id means tmux failed
        session = await (started if started is not None else _read_session_id())
        if not session:
            discard_link(early)
            if relay is not None:
                await relay.close()
            return 0
    agent = HostAgent(socket, session, connector, messages, mate_keys)
    agent.early = early
    messages.agent = agent
    if relay is not None:
        messages(
            f"no relay configured: using an embedded relay on 127.0.0.1:{relay.port} "
            "(only this machine can join; set tether-server-host in ~/.tether.conf)"
        )
        if jail_problem:
            messages(f"embedded relay: the replica is not jailed: {jail_problem}")
    else:
        messages(f"connecting to relay {addr.host}:{addr.port}")
    ctl = control_path(socket)
    control = await _serve_control(agent, ctl)
    ours = _inode(ctl)
    try:
        await _run_until_stopped(agent, pid_path(socket), warm)
    finally:
        if control is not None:
            control.close()
            if ours is not None and _inode(ctl) == ours:  # not a newer agent's
                with contextlib.suppress(OSError):
                    os.unlink(ctl)
    if relay is not None:
        await relay.close()
    return 0


async def _serve_control(agent: HostAgent, path: str) -> asyncio.AbstractServer | None:
    """Listen for `tether list-mates` and `tether kick-mate` (``client.agentctl``);
    None if the socket cannot be made (the agent shares on without it)."""
    sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead agent's: the pid file's agent is us now
        where, fd = short_path(path)
        old = os.umask(0o177)  # the socket is born 0600
        try:
            sock.bind(where)
        finally:
            os.umask(old)
            if fd is not None:
                os.close(fd)
        return await asyncio.start_unix_server(
            lambda r, w: _control_client(agent, r, w), sock=sock, limit=MAX_REQUEST)
    except OSError as exc:
        sock.close()
        log.warning("no control socket (%s): list-mates and kick-mate will not work", exc)
        return None


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    with contextlib.suppress(OSError):
        creds = sock.getsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_PEERCRED,
                                struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    return None


async def _control_client(agent: HostAgent, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
    """One request from the CLI, one answer."""
    try:
        if _peer_uid(writer) not in (os.getuid(), 0):
            return  # the directory is ours alone; this is belt and braces
        line = await asyncio.wait_for(reader.readline(), 5)
        try:
            req = json.loads(line)
        except ValueError:
            req = None
        answer = await _answer(agent, req if isinstance(req, dict) else {})
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
    except (OSError, TimeoutError, ValueError):  # ValueError: a line over the limit
        pass
    finally:
        writer.close()


async def _answer(agent: HostAgent, req: dict[str, object]) -> dict[str, object]:
    relay = agent.relay
    presence = relay.presence
    op = req.get("op")
    if op == "mates":
        return {"ok": True, "connected": relay.link is not None, "mates": presence.rows(),
                "more": presence.more}
    if op == "kick":
        mate = req.get("mate")
        if type(mate) is not int:
            return {"ok": False, "error": "a mate's id is a number (see tether list-mates)"}
        if mate not in presence.mates:
            return {"ok": False, "error": f"no mate {mate} is connected (see tether list-mates)"}
        if not relay.kick(mate):
            return {"ok": False, "error": "not connected to the relay; try again once the "
                    "session is shared again"}
        messages = agent.publish
        messages(f"asked the relay to disconnect mate {mate}", False)
        if await presence.gone(mate, KICK_CONFIRM):
            return {"ok": True, "text": f"mate {mate} disconnected"}
        return {"ok": True, "text": f"asked the relay to disconnect mate {mate}; it has not "
                f"confirmed within {KICK_CONFIRM:.0f} s"}
    return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}


def _configured_address(cfg: config_mod.TetherConfig) -> RelayAddress | None:
    """The relay the config names (None: none, an embedded one serves)."""
    if not cfg.server_host:
        return None
    return RelayAddress(
        cfg.server_host,
        cfg.server_port,
        cfg.fingerprints,
        cfg.identities,
        cfg.known_hosts,
        str(state_dir() / "host_ed25519"),
    )


class _EarlySSH:
    """The config, loaded before the event loop, and ``ssh`` to the relay it
    names, started then: the SSH handshake is the longest part of a warm start,
    so it begins before anything else the agent does."""

    def __init__(self, conf: Path | None) -> None:
        self.cfg = config_mod.load(conf)
        addr = _configured_address(self.cfg)
        self.started = prestart_host(addr) if addr is not None else None

    def discard(self) -> None:
        """End ``ssh`` if no SSH attempt took it (the agent failed first)."""
        if self.started is not None:
            self.started.discard()
            self.started = None


async def _relay_address(
    cfg: config_mod.TetherConfig,
) -> tuple[RelayAddress, Relay | None, str | None]:
    """Where the host connects: the configured relay, or else an embedded one
    started here (returned, to close at the end, with why it is not jailed)."""
    addr = _configured_address(cfg)
    if addr is not None:
        return addr, None, None
    # the embedded relay only: a host with a relay configured never loads it
    from tether.relay.jail import jail_unavailable
    from tether.relay.server import Relay, RelayConfig

    jail_problem = jail_unavailable()
    relay = Relay(
        RelayConfig(
            keys_dir=state_dir() / "embedded-relay-keys",
            bind="127.0.0.1",
            port=0,
            jail=jail_problem is None,
        )
    )
    await relay.start()
    addr = RelayAddress(
        "127.0.0.1",
        relay.port,
        [fp for _, fp in relay.fingerprints],
        cfg.identities,
        fallback_identity=str(state_dir() / "host_ed25519"),
    )
    return addr, relay, jail_problem


async def _run_until_stopped(agent: HostAgent, pidfile: Path, warm: bool) -> None:
    """Run the agent until its session ends or a signal asks it to stop, with its
    pid in ``pidfile`` meanwhile."""
    pidfile.write_text(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda s=sig: (signals.append(s.name), stop.set()))
    runner = asyncio.create_task(agent.run())
    stopper = asyncio.create_task(stop.wait())
    warmer = asyncio.create_task(_start_zygote(agent) if warm else asyncio.sleep(0))
    await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not runner.done():
        # no one shares the session once we are gone: the relay ends it now
        # rather than keep it (and its mates waiting) for --host-away-timeout
        with contextlib.suppress(Exception):
            await agent.stop(f"the host's tether agent was stopped ({signals[0]})")
    runner.cancel()
    stopper.cancel()
    warmer.cancel()
    with contextlib.suppress(OSError):
        if pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await runner


async def _start_zygote(agent: HostAgent) -> None:
    """Once shared, leave a zygote behind so the user's next session starts warm.

    Started as a command (`tether _zygote`), not imported: the zygote imports this
    module to run forked agents, and this module must not import it back."""
    import subprocess

    await agent.ready.wait()
    with contextlib.suppress(OSError), open(state_dir() / "zygote.log", "ab") as log:
        subprocess.Popen(
            command("_zygote", "--watch", str(os.getpid())),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )


class _Start:
    """`tether new-session`'s own work, done by an agent the zygote forked: start
    tmux (in a thread: meanwhile the agent connects to the relay) and tell the
    CLI how it went."""

    def __init__(self, reply: Callable[[str | None, str], None], sock: str,
                 tmux_args: list[str], conf: Path | None, authorized: str | None) -> None:
        self.reply: Callable[[str | None, str], None] | None = reply
        self._args = (sock, tmux_args, str(conf) if conf is not None else None, authorized,
                      str(state_dir()), dict(os.environ))

    async def session(self) -> str:
        from tether.client.newsession import start_tmux

        try:
            session, problem = await asyncio.to_thread(start_tmux, *self._args)
        except Exception as exc:
            session, problem = None, f"tmux did not start: {exc}"
        self.answer(session, problem)
        return session or ""

    def answer(self, session: str | None, problem: str) -> None:
        """Once: the session id, or why there is none."""
        if self.reply is not None:
            reply, self.reply = self.reply, None
            reply(session, problem)


async def _read_session_id() -> str:
    """The session id `tether new-session` writes to our stdin once tmux made it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        line = await reader.readline()
    finally:
        transport.close()
    return line.decode(errors="replace").strip()


def main(argv: list[str] | None = None, *, forked: bool = False,
         reply: Callable[[str | None, str], None] | None = None) -> int:
    """The agent's command line; ``forked``: by a zygote, which need not start
    another; ``reply``: the CLI waiting to hear that tmux has the session (the
    agent starts tmux with the arguments after ``--``)."""
    a = _parser().parse_args(argv)
    start = None
    if reply is not None:
        start = _Start(reply, a.socket, a.tmux_args, a.config, a.authorized_keys)
    early_ssh = None
    try:
        early_ssh = _EarlySSH(a.config)
        return _run(a, forked, start, early_ssh)
    except Exception as exc:  # before tmux started (the config): the CLI says why
        if start is not None:
            start.answer(None, str(exc) or type(exc).__name__)
        raise
    finally:
        if early_ssh is not None:
            early_ssh.discard()
        if start is not None:
            start.answer(None, "the tether agent failed before tmux started; see its log")


_PARSER: argparse.ArgumentParser | None = None


def _parser() -> argparse.ArgumentParser:
    """The agent's argument parser, built once (a zygote builds it before it forks)."""
    global _PARSER
    if _PARSER is None:
        p = argparse.ArgumentParser(prog="tether-agent")
        p.add_argument("--socket", required=True)
        p.add_argument("--session", required=True,
                       help="tmux session id, or - to read it from stdin")
        p.add_argument("--config", type=Path)
        p.add_argument("--authorized-keys")
        p.add_argument("-v", "--verbose", action="store_true")
        p.add_argument("tmux_args", nargs="*", help="after --: tmux new-session's (with reply)")
        _PARSER = p
    return _PARSER


def _run(a: argparse.Namespace, forked: bool, start: _Start | None,
         early_ssh: _EarlySSH) -> int:
    handler = logging.StreamHandler()
    handler.addFilter(RedactTokens())
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[handler],
    )
    use_pidfd_watcher()
    return asyncio.run(amain(a.socket, a.session, a.config, a.authorized_keys,
                             warm=not forked, start=start, early_ssh=early_ssh))


if __name__ == "__main__":
    sys.exit(main())
