"""SSH front processes (``tether relay --ssh-procs N``), seen from the relay.

The relay's process listens, accepts and counts each SSH connection (the
per-address and total bounds stay exact), then hands it to the front process
with the fewest. A front (``relay.front``) speaks SSH on it and asks back:
which keys a token's session requires of mates; a mate's tmux client (the
relay attaches it and passes the pty's master, ``RemoteTerminal``); or it
passes the relay a socket spliced to a host's or a join client's channel,
read here as a link like any other. Tokens, sessions, limits and back-off
stay in this process; a mate's keystrokes and screen, and every SSH packet's
cryptography, leave it.

A front that dies takes its connections with it (their mates leave, as on a
lost connection) and is started again; sessions are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from tether.transport import fdchannel
from tether.transport.children import Child, reap
from tether.transport.ssh_bounds import MAX_CONNECTIONS, Admission, address_key

from .config import RelayConfig
from .front_requests import FrontRequests, Handlers

log = logging.getLogger("tether.relay")

RESTART_FIRST = 0.5
RESTART_MOST = 30.0
"""A front that died is started again after half a second, doubling while
they keep dying young, up to this."""
YOUNG = 10.0
"""A front that lived less than this counts as dying young."""
START_WAIT = 30.0
"""How long the relay's start waits for its fronts to serve (a loaded machine
starts an interpreter with asyncssh in well under a second)."""
MAX_PIECE = 48 * 1024
"""Bytes of hosts' allowed keys (``-a``) in one message to a front."""

class FrontProcess:
    """One front: its process, the channel to it, and what it holds."""

    def __init__(self, pool: FrontPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.gen = 0
        """How often it was started: the session processes tell its lives apart."""
        self.local = False
        """A front in the relay's own process (browser mates, with session
        processes): no process to start again, but ``restart``."""
        self.restart: Callable[[], None] | None = None
        self.chan: fdchannel.FdChannel | None = None
        self.proc: Child | None = None
        self.started = 0.0
        self.conns: dict[int, str] = {}
        """Connections it serves: their number and address key (for admission)."""
        self.requests: FrontRequests | None = None
        """Its questions answered here (no session processes)."""
        self.ready: asyncio.Future[None] | None = None
        """Done once the front has loaded the host keys and serves."""

    @property
    def alive(self) -> bool:
        return self.chan is not None and not self.chan.closed

    def start(self) -> None:
        here, self.proc = spawn("tether.relay.front", self.pool.children)
        self.listen(here)
        for piece in self.pool.allowed_pieces():
            self.send(["allow", piece])
        self.send(["config", self.pool.front_config()])
        log.info("ssh front %d started (pid %d)", self.index, self.proc.pid)

    def listen(self, sock: socket.socket) -> None:
        """Serve a new life of the front, at the other end of ``sock``."""
        self.gen += 1
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.chan = chan = fdchannel.FdChannel(sock, self._on_message, self._closed)
        if self.pool.handlers is not None:
            self.requests = FrontRequests(f"ssh front {self.index}", chan.send,
                                          self.pool.handlers)

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if self.chan is not None:
            self.chan.send(msg, fd)

    def stop(self) -> None:
        if self.chan is not None:
            self.chan.close()

    def _closed(self) -> None:
        """The front is gone (or is being stopped): what it served is gone with it."""
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"ssh front {self.index} ended at start"))
            self.ready.exception()  # retrieved: only the relay's start awaits it
        for key in self.conns.values():
            self.pool.admission.release(key)
        self.conns.clear()
        if self.requests is not None:
            self.requests.close()
        if self.pool.router is not None:
            self.pool.router.front_gone(self)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            self.proc = None
        self.pool.front_closed(self)

    # --- what the front asks ---------------------------------------------------------

    def _on_message(self, msg: list[Any], fd: int | None) -> None:
        try:
            self._handle(msg, fd)
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            log.error("ssh front %d: bad message %r: %s; restarting it", self.index,
                      msg[0] if msg else msg, exc)
            self.stop()

    def _handle(self, msg: list[Any], fd: int | None) -> None:
        kind, args = str(msg[0]), msg[1:]
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "closed":
            key = self.conns.pop(int(args[0]), None)
            if key is not None:
                self.pool.admission.release(key)
        elif self.requests is not None:
            self.requests.handle(kind, args, fd)
            return
        elif self.pool.router is not None:
            self.pool.router.route(self, kind, args, fd)
            return
        if fd is not None:
            os.close(fd)


def _child_env() -> dict[str, str] | None:
    """The relay's environment, with its own tether on the module path if the
    relay found it only where -P no longer looks (its working directory, as
    `python3 -m tether relay` in a checkout does); None: unchanged."""
    import tether

    root = os.path.dirname(os.path.dirname(os.path.abspath(tether.__file__)))
    if root in sys.path[1:]:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn(module: str, children: set[Child]) -> tuple[socket.socket, Child]:
    """A child process of the relay running ``module`` (logging where the relay
    does), and this end of its channel; ``children`` holds it until it is reaped."""
    here, there = fdchannel.pair()
    try:
        # -P: not the relay's current directory on the module path (-m puts it first)
        popen = subprocess.Popen(
            [sys.executable, "-P", "-m", module, str(there.fileno()), json.dumps(log_config())],
            pass_fds=[there.fileno()], stdin=subprocess.DEVNULL, env=_child_env(),
        )
    except OSError:
        here.close()
        raise
    finally:
        there.close()
    child = Child(popen)
    children.add(child)
    reap(child, children.discard)
    return here, child


def log_config() -> dict[str, Any]:
    """Where and how much the relay logs, for its child processes to do the same."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    level = logging.getLogger("tether.relay").getEffectiveLevel()
    return {"log_file": files[0].baseFilename if files else "", "log_level": level}


class Router(Protocol):
    """Where a front's questions go when session processes hold the sessions."""

    def route(self, front: FrontProcess, kind: str, args: list[Any], fd: int | None) -> None:
        """Forward one question (owning ``fd``); raises on a malformed one."""

    def front_gone(self, front: FrontProcess) -> None:
        """The front ended: its mates have left."""


class FrontPool:
    """Listens for SSH, and hands each connection to a front process."""

    def __init__(self, config: RelayConfig, count: int, handlers: Handlers | None,
                 router: Router | None = None) -> None:
        self.config = config
        self.handlers = handlers
        """Answers the fronts' questions here; None: ``router`` sends them on."""
        self.router = router
        self.admission = Admission(config.max_connections_per_address, MAX_CONNECTIONS)
        self.fronts = [FrontProcess(self, i) for i in range(count)]
        self._listeners: list[socket.socket] = []
        self._conn_ids = 0
        self._closing = False
        self.restarts = Restarts()
        self.children: set[Child] = set()
        """Front processes not yet reaped (``close`` waits for them)."""
        self.port = 0

    def front_config(self) -> dict[str, Any]:
        """The front's settings; the hosts' keys it may admit go before, in
        pieces (``allowed_pieces``): a long list does not fit one message."""
        c = self.config
        return {"keys_dir": str(c.keys_dir),
                "authorized_keys": "sent" if c.authorized_keys is not None else None,
                "mate_input_rate": c.mate_input_rate}

    def allowed_pieces(self) -> list[list[str]]:
        pieces: list[list[str]] = []
        size = MAX_PIECE
        for line in self.config.authorized_keys or ():
            n = len(line.encode()) + 8
            if n > MAX_PIECE:  # no key is this long: a comment is
                raise ValueError(f"an authorized_keys line of {n} bytes")
            if size + n > MAX_PIECE:
                pieces.append([])
                size = 0
            pieces[-1].append(line)
            size += n
        return pieces

    async def start(self) -> int:
        """Listen on the configured address (its port, when 0, chosen now) and
        start the fronts; returns the port."""
        c = self.config
        infos = socket.getaddrinfo(c.bind or None, c.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        port = c.port
        loop = asyncio.get_running_loop()
        try:
            for family, kind, proto, _, addr in infos:
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                port = sock.getsockname()[1]
                sock.listen(128)
                sock.setblocking(False)
        except OSError:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        for front in self.fronts:
            front.start()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(f.ready for f in self.fronts if f.ready is not None)),
                START_WAIT)
        except (RuntimeError, TimeoutError):
            await self.close()
            raise RuntimeError("the SSH front processes (--ssh-procs) did not start; "
                               "their errors are in the log") from None
        self.port = port
        return port

    async def close(self) -> None:
        self._closing = True
        loop = asyncio.get_running_loop()
        listeners, self._listeners = self._listeners, []
        for sock in listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.restarts.cancel()
        for front in self.fronts:
            front.stop()  # the front ends when its channel closes
            if front.requests is not None:
                front.requests.cancel()
        for proc in list(self.children):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the next turn may do
                log.warning("ssh: cannot accept a connection: %s", exc)
                return
            with conn:
                self._hand_over(conn, str(addr[0]))

    def _hand_over(self, conn: socket.socket, address: str) -> None:
        alive = [f for f in self.fronts if f.alive]
        if not alive:
            log.warning("ssh: no front process to serve %s; connection closed", address)
            return
        key = address_key(address)
        refusal = self.admission.admit(key) or ""
        front = min(alive, key=lambda f: len(f.conns))
        if refusal:
            log.warning("ssh %s: refused: %s", address, refusal)
            if front.chan is None or front.chan.backlog:
                return  # a flood: closed unanswered, not queued for a busy front

        self._conn_ids += 1
        try:
            front.send(["conn", self._conn_ids, refusal], conn.fileno())
        except OSError as exc:  # out of descriptors to queue it with
            log.warning("ssh %s: cannot hand the connection over: %s", address, exc)
            if not refusal:
                self.admission.release(key)
            return
        if not refusal:
            front.conns[self._conn_ids] = key

    def front_closed(self, front: FrontProcess) -> None:
        if front.local:
            if not self._closing and front.restart is not None:
                asyncio.get_running_loop().call_soon(front.restart)
            return
        if not self._closing:
            self.restarts.died(front.index, f"ssh front {front.index}", front.started,
                               front.start)


class Restarts:
    """Child processes of the relay that died, started again: after half a
    second, doubling while they keep dying young."""

    def __init__(self) -> None:
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._wait: dict[int, float] = {}

    def died(self, index: int, name: str, started: float, start: Callable[[], None]) -> None:
        lived = time.monotonic() - started
        wait = self._wait.get(index, RESTART_FIRST)
        wait = min(wait * 2, RESTART_MOST) if lived < YOUNG else RESTART_FIRST
        self._wait[index] = wait
        log.error("%s ended after %.1f s; starting it again in %.1f s", name, lived, wait)
        self._timers[index] = asyncio.get_running_loop().call_later(
            wait, self._restart, index, name, started, start)

    def _restart(self, index: int, name: str, started: float,
                 start: Callable[[], None]) -> None:
        self._timers.pop(index, None)
        try:
            start()
        except (OSError, ValueError) as exc:
            log.error("%s: cannot start: %s", name, exc)
            self.died(index, name, time.monotonic(), start)

    @property
    def pending(self) -> int:
        """Processes waiting to be started again."""
        return len(self._timers)

    def cancel(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
