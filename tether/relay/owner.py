"""A session process (``tether relay --session-procs N``): a share of the relay's
sessions, on a core of its own.

It holds whole sessions: their registry, host links (QUIC on a UDP port of
its own, and SSH channels spliced to it), replicas, mates and join clients.
The relay's process (``relay.owners``) accepts SSH connections, hands them to
SSH front processes, and routes what the fronts ask to the session process
that owns the session: by token for mates and join clients, by the Hello's
session for hosts. Each session this process creates or ends is reported, so
the relay's directory knows where a token leads.

Run by the relay only: ``python3 -m tether.relay.owner FD LOGCONFIG``, FD one
end of an ``fdchannel`` socket pair. It ends its sessions and exits when the
relay's end closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tether.transport import fdchannel

from .config import RelayConfig
from .front import setup_logging
from .front_requests import FrontRequests, Handlers
from .server import Relay
from .session import Session

log = logging.getLogger("tether.relay")


def config_from(d: dict[str, Any]) -> RelayConfig:
    """The relay's settings as ``owners.config_message`` sent them."""
    d = dict(d)
    d["keys_dir"] = Path(d["keys_dir"])
    for name in ("web_cert", "web_key"):
        if d.get(name) is not None:
            d[name] = Path(d[name])
    return RelayConfig(**d)


class Owner:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._chan: fdchannel.FdChannel | None = None
        self._gone = asyncio.Event()
        self.relay: Relay | None = None
        self._fronts: dict[tuple[int, int], FrontRequests] = {}
        self._latest: dict[int, int] = {}
        """Each front's latest life heard of."""
        self._started: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._chan = fdchannel.FdChannel(self._sock, self._on_message, self._gone.set)
        try:
            await self._gone.wait()
        finally:
            if self._chan is not None:
                self._chan.close()
            for req in self._fronts.values():
                req.close()
                req.cancel()
            if self.relay is not None:
                await self.relay.close()

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if self._chan is not None:
            self._chan.send(msg, fd)

    def _on_message(self, msg: list[Any], fd: int | None) -> None:
        try:
            self._handle(msg, fd)
        except (IndexError, TypeError, ValueError) as exc:  # the relay's bug: say so
            log.error("session process %d: bad message %r from the relay: %s", os.getpid(),
                      msg[0] if msg else msg, exc)

    def _handle(self, msg: list[Any], fd: int | None) -> None:
        kind = msg[0]
        if kind == "front":
            index, gen, what = int(msg[1]), int(msg[2]), str(msg[3])
            req = self._front(index, gen)
            if req is None:  # before the sessions started, or for a front that ended
                if fd is not None:
                    os.close(fd)
                return
            try:
                req.handle(what, msg[4:], fd)  # it owns fd now
            except (IndexError, TypeError, ValueError, KeyError) as exc:
                log.error("session process %d: bad message %r from ssh front %d: %s",
                          os.getpid(), what, index, exc)
                self.send(["bad_front", index, gen])
            return
        if fd is not None:
            os.close(fd)
        if kind == "config":
            self._started = asyncio.get_running_loop().create_task(
                self._start(int(msg[1]), config_from(msg[2])))
        elif kind == "front_gone":
            index, gen = int(msg[1]), int(msg[2])
            self._latest[index] = max(self._latest.get(index, 0), gen)
            req = self._fronts.pop((index, gen), None)
            if req is not None:
                req.close()
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _front(self, index: int, gen: int) -> FrontRequests | None:
        """The questions of one life of one front, answered by this process."""
        req = self._fronts.get((index, gen))
        if req is None and self.relay is not None:
            if gen <= self._latest.get(index, 0):
                return None  # a life that ended (its last words came late)
            self._latest[index] = gen
            relay = self.relay
            for key in [k for k in self._fronts if k[0] == index]:  # its earlier life
                self._fronts.pop(key).close()

            def send(msg: list[Any], fd: int | None = None) -> None:
                self.send(["to", index, gen, *msg], fd)

            req = self._fronts[(index, gen)] = FrontRequests(
                f"ssh front {index}", send,
                Handlers(relay.hosts.handle, relay.mates.handle, relay.joins.handle_ssh,
                         relay.registry.mate_keys_for,
                         lambda ref: self.send(["decided", ref])))
        return req

    async def _start(self, index: int, config: RelayConfig) -> None:
        try:
            relay = Relay(config)
            relay.registry.on_change = self._session_changed
            await relay.start_sessions()
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("session process %d cannot start: %s", index, exc)
            self._gone.set()
            return
        self.relay = relay
        self.send(["ready", relay.quic_port or 0])
        log.info("session process %d serves (pid %d, QUIC on UDP %s)", index, os.getpid(),
                 relay.quic_port or "-")

    def _session_changed(self, session: Session, live: bool) -> None:
        if live:
            self.send(["session", session.id, session.rw_token, session.ro_token,
                       session.host_key, bool(session.mate_keys)])
        else:
            self.send(["ended", session.id])


async def _main(fd: int) -> None:
    owner = Owner(socket.socket(fileno=fd))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, owner._gone.set)
    await owner.run()


def main(argv: list[str]) -> int:
    import json

    if len(argv) != 2:
        print("usage: python3 -m tether.relay.owner FD LOGCONFIG (run by tether relay)",
              file=sys.stderr)
        return 2
    setup_logging(json.loads(argv[1]), "sessions")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
