"""An SSH front process: the relay's SSH connections, on a core of their own.

The relay's own process accepts each connection and counts it (``fronts``);
a front speaks SSH on it: the handshake, the encryption of every packet and,
for a mate, the bytes between its terminal and its tmux client's pty, whose
master the relay passes over (``attached``). Hosts' and join clients'
channels are spliced to a socket whose other end the relay reads as a link.
So what a mate types and sees costs the relay's process nothing, and sessions
stay whole in it. The front holds no session and no token: it asks.

Run by the relay only: ``python3 -m tether.relay.front FD``, FD one end of an
``fdchannel`` socket pair. It ends when the relay's end closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tether.core.messages import MateInfo
from tether.transport import fdchannel, ssh
from tether.transport.ssh_bounds import Admission
from tether.transport.web_terminal import EXIT_AGAIN

from .mates import Pump
from .session import Mate

log = logging.getLogger("tether.relay")

KEYS_WAIT = 10.0
"""How long a mate's login waits for the relay to say which keys its session
requires; past it the login is refused (asked for a key none can be)."""
MAX_ALLOWED = 100000
"""Most host keys a relay's -a file may list."""
MAX_FIELD = 256
"""Longest token, TERM, address or fingerprint a mate's question carries (each
is far shorter when genuine: a token is 26 characters)."""
RESIZE_EVERY = 0.05
"""A mate's window changes reach the relay at most this often, the last size
always: dragging a corner sends tens a second, one message each."""


class Given(Admission):
    """One connection the relay's process admitted (or refused, ``refusal``);
    ``release`` tells it once that the connection is gone."""

    def __init__(self, front: Front, conn: int, refusal: str) -> None:
        super().__init__(0, 0)
        self._front = front
        self._conn = conn
        self._refusal = refusal
        self._released = False

    def admit(self, key: str) -> str | None:
        return self._refusal or None

    def release(self, key: str = "") -> None:
        if not self._released:
            self._released = True
            self._front.send(["closed", self._conn])


class MateState:
    """A mate's connection here, from its token to the relay's last word."""

    def __init__(self, req: int, term: ssh.MateTerminal, front: Front) -> None:
        self.req = req
        self.term = term
        self.front = front
        self.inbox: asyncio.Queue[tuple[list[Any], int | None]] = asyncio.Queue()
        self.mate: Mate | None = None
        self.pump: Pump | None = None
        self.pumping: asyncio.Task[None] | None = None
        self._resize: asyncio.TimerHandle | None = None
        self._resized_at = 0.0

    def resized(self) -> None:
        """The mate's window changed: tell the relay, at most every ``RESIZE_EVERY``."""
        if self._resize is not None:
            return  # the size sent then is the latest
        loop = asyncio.get_running_loop()
        wait = self._resized_at + RESIZE_EVERY - loop.time()
        if wait <= 0:
            self._send_size()
        else:
            self._resize = loop.call_later(wait, self._send_size)

    def _send_size(self) -> None:
        self._resize = None
        self._resized_at = asyncio.get_running_loop().time()
        if self.mate is not None:
            self.front.send(["resized", self.req, self.mate.cols, self.mate.rows])

    async def stop(self) -> None:
        """End the pump, if it runs, and wait until it has."""
        if self._resize is not None:
            self._resize.cancel()
            self._resize = None
        if self.pumping is not None and not self.pumping.done():
            assert self.pump is not None
            self.pump.kick()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pumping


class Front:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._chan: fdchannel.FdChannel | None = None
        self._configured = asyncio.Event()
        self._gone = asyncio.Event()
        self._ids = itertools.count(1)
        self._keys: dict[int, asyncio.Future[set[bytes] | None]] = {}
        self._mates: dict[int, MateState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._allowed: list[str] = []
        self.host_keys: list[Any] = []
        self.key_check: ssh.KeyCheck | None = None
        self.input_rate = 256 * 1024.0
        self.idle_timeout = ssh.SESSION_IDLE_TIMEOUT
        self.login_timeout = 30.0

    async def run(self) -> None:
        self._chan = fdchannel.FdChannel(self._sock, self._on_message, self._gone.set)
        try:
            await self._gone.wait()
        finally:
            self._chan.close()
            for t in list(self._tasks):
                t.cancel()

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if self._chan is not None:
            self._chan.send(msg, fd)

    def stop(self) -> None:
        self._gone.set()

    async def on_mate(self, term: Any) -> None:
        """A mate whose terminal is not an SSH channel (a browser's, in the
        relay's own process): served as an SSH front serves its own."""
        if self._gone.is_set():  # being replaced: the page comes back
            term.write(b"tether: the relay is restarting; try again.\r\n")
            term.exit(EXIT_AGAIN)
            return
        await self._on_mate(term)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- from the relay's process ----------------------------------------------------

    def _on_message(self, msg: list[Any], fd: int | None) -> None:
        kind = msg[0]
        if kind == "config":
            try:
                self._configure(msg[1])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("front %d: cannot start: %s", os.getpid(), exc)
                if self._chan is not None:
                    self._chan.close()
                return
            self.send(["ready"])
        elif kind == "allow":  # hosts' keys this relay admits, a piece of the list
            if len(self._allowed) + len(msg[1]) > MAX_ALLOWED:
                log.error("front %d: more than %d allowed host keys", os.getpid(), MAX_ALLOWED)
                if self._chan is not None:
                    self._chan.close()
                return
            self._allowed += [str(line) for line in msg[1]]
        elif kind == "conn" and fd is not None:
            self._spawn(self._serve(msg[1], socket.socket(fileno=fd), msg[2]))
            fd = None
        elif kind == "keys":  # digests (``ssh.key_digest``); none: no key asked
            waiter = self._keys.pop(msg[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result({bytes(k) for k in msg[2]} if msg[2] else None)
        elif kind in ("write", "attached", "kick", "exit", "mates"):
            state = self._mates.get(msg[1])
            if state is not None:
                state.inbox.put_nowait((msg, fd))
                fd = None
        else:
            log.error("front %d: unknown message %r from the relay", os.getpid(), kind)
        if fd is not None:
            os.close(fd)

    def _configure(self, c: dict[str, Any]) -> None:
        self.host_keys = ssh.load_or_create_host_keys(Path(c["keys_dir"]))
        if c.get("authorized_keys") is not None:  # "sent": in "allow" pieces before
            lines = self._allowed if c["authorized_keys"] == "sent" else c["authorized_keys"]
            allowed = ssh.parse_public_keys(lines, limit=MAX_ALLOWED)
            self._allowed = []
            self.key_check = lambda key: key.public_data in allowed
        self.input_rate = float(c["mate_input_rate"])
        self.idle_timeout = float(c.get("idle_timeout", self.idle_timeout))
        self.login_timeout = float(c.get("login_timeout", self.login_timeout))
        self._configured.set()

    async def _serve(self, conn: int, sock: socket.socket, refusal: str) -> None:
        await self._configured.wait()
        given = Given(self, conn, refusal)
        try:
            await ssh.serve_connection(
                sock, self.host_keys, self._on_host, self._on_mate, given,
                key_check=self.key_check, fetch_mate_keys=self._mate_keys,
                on_join=self._on_join, idle_timeout=self.idle_timeout,
                login_timeout=self.login_timeout,
            )
        except Exception as exc:  # a peer's failed login is its own business
            log.debug("ssh connection %d ended before login: %s", conn, exc)
            sock.close()
            given.release()

    async def _mate_keys(self, token: str) -> set[bytes] | None:
        req = next(self._ids)
        waiter: asyncio.Future[set[bytes] | None] = asyncio.get_running_loop().create_future()
        self._keys[req] = waiter
        self.send(["mate_keys", req, token[:MAX_FIELD]])
        try:
            return await asyncio.wait_for(waiter, KEYS_WAIT)
        except TimeoutError:
            log.warning("the relay did not say which keys a mate needs within %g s; "
                        "the login is refused", KEYS_WAIT)
            return set()  # a key is required and none can be it: fails closed
        finally:
            self._keys.pop(req, None)

    # --- a host's or a join client's channel: spliced to the relay's process ------------

    async def _on_host(self, link: ssh.SSHLink, host_key: str, peer: str) -> None:
        await self._splice(link, ["host", host_key[:MAX_FIELD], peer[:MAX_FIELD],
                                  link.description[:MAX_FIELD]])

    async def _on_join(self, link: ssh.SSHLink, token: str, peer: str) -> None:
        await self._splice(link, ["join", token[:MAX_FIELD], peer[:MAX_FIELD],
                                  link.description[:MAX_FIELD], link.fingerprint[:MAX_FIELD]])

    async def _splice(self, link: ssh.SSHLink, msg: list[Any]) -> None:
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.send(msg, there.fileno())
        finally:
            there.close()
        await ssh.splice(link, here)

    # --- a mate: its pty's master comes from the relay's process -------------------------

    async def _on_mate(self, term: ssh.MateTerminal) -> None:
        req = next(self._ids)
        state = self._mates[req] = MateState(req, term, self)
        # each string bounded: a 200 KiB TERM would not fit the relay's message
        self.send(["mate", req, term.username[:MAX_FIELD], term.term[:MAX_FIELD], term.cols,
                   term.rows, term.peer[:MAX_FIELD], term.fingerprint[:MAX_FIELD],
                   getattr(term, "kind", "ssh")])
        try:
            while True:
                (kind, *args), fd = await state.inbox.get()
                if kind == "attached" and fd is not None and state.pumping is None:
                    self._pump(state, args, fd)
                    continue
                if fd is not None:
                    os.close(fd)
                if kind == "kick" and state.pump is not None:
                    state.pump.kick()
                elif kind == "mates":  # a browser's page lists them
                    show = getattr(term, "show_mates", None)
                    if show is not None:
                        show(int(args[1]), [MateInfo(*info) for info in args[2]])
                elif kind in ("write", "exit"):
                    await state.stop()  # its last screen before the relay's words
                    if kind == "write":
                        term.write(bytes(args[1]))
                    else:
                        await term.drain()
                        term.exit(int(args[1]))
                        return
        finally:
            await state.stop()
            del self._mates[req]

    def _pump(self, state: MateState, args: list[Any], fd: int) -> None:
        mate_id, readonly, cols, rows = args[1:5]
        mate = state.mate = Mate(int(mate_id), bool(readonly), int(cols), int(rows), fd)
        os.set_blocking(fd, False)
        pump = state.pump = Pump(state.term, mate, self.input_rate, state.resized)

        async def run() -> None:
            try:
                await pump.run()
            finally:
                os.close(fd)
                self.send(["left", state.req])

        state.pumping = asyncio.get_running_loop().create_task(run())


def setup_logging(c: dict[str, Any], role: str = "front") -> None:
    """A child process of the relay logs where the relay does (``fronts.log_config``)."""
    from tether.core.tokens import RedactTokens

    handler: logging.Handler = (logging.FileHandler(c["log_file"]) if c.get("log_file")
                                else logging.StreamHandler(sys.stderr))
    handler.addFilter(RedactTokens())
    fmt = f"%(asctime)s %(name)s[{role} %(process)d] %(levelname)s %(message)s"
    logging.basicConfig(level=int(c.get("log_level", logging.WARNING)), handlers=[handler],
                        format=fmt)


async def _main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    front = Front(sock)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: front._gone.set())
    await front.run()


def main(argv: list[str]) -> int:
    import json

    if len(argv) != 2:
        print("usage: python3 -m tether.relay.front FD LOGCONFIG (run by tether relay)",
              file=sys.stderr)
        return 2
    setup_logging(json.loads(argv[1]))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
