"""Session processes (``tether relay --session-procs N``), seen from the relay.

With them, the relay's own process holds no session. It accepts and counts
SSH connections and hands each to an SSH front process (``relay.fronts``), as
with ``--ssh-procs``; what a front then asks about a session goes to the
session process (``relay.owner``) that holds it:

- a mate's login and attach, and which keys its session requires: by token;
- a join client's channel: by token;
- a host's channel: by the session its Hello names (a resume), else to the
  process with the fewest sessions (a new one), once this process has counted
  the relay's sessions against ``--max-sessions`` and the per-key limit.

A token no session has goes to the first live session process, so every wrong
guess meets one back-off. Each session process reports the sessions it creates
and ends, which is all the directory here knows: their tokens' HMACs, ids and
host keys. QUIC needs no routing: each session process listens on a UDP port
of its own (the first port plus its index) and its Welcome gives that port.

A session process that dies takes its sessions with it (their mates are told,
their hosts come back over SSH and start them again with the same tokens, as
after a relay restart) and is started again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from typing import Any

from tether.core import tokens
from tether.core.messages import Hello, Message, MessageDecoder
from tether.transport import fdchannel
from tether.transport.children import Child, reap

from .config import RelayConfig
from .fronts import START_WAIT, FrontPool, FrontProcess, Restarts, spawn

log = logging.getLogger("tether.relay")

HELLO_MOST = 256 * 1024
"""Bytes looked at (not taken) of a host's channel to find its Hello (a list of
256 RSA keys fits); past them it is routed as a new session, and its process
reads on."""
PEEK_AGAIN = 0.005
PEEK_MOST = 0.1
"""A Hello not whole yet is looked at again after 5 ms, then twice as long each
time, up to this."""
GONE_TEXT = b"\r\ntether: the relay's process for this session ended.\r\n"
NO_KEY = [b"\0" * 32]
"""A digest no key has: the answer to "which keys?" when no session process
can say, so the login fails closed at once."""


def config_message(config: RelayConfig, index: int, ssh_port: int) -> dict[str, Any]:
    """The settings a session process runs with: the relay's, with the SSH port
    it listens on and the process's own QUIC port."""
    d = dataclasses.asdict(config)
    for name in ("keys_dir", "web_cert", "web_key"):
        if d[name] is not None:
            d[name] = str(d[name])
    quic = config.quic_port
    d.update(port=ssh_port, ssh_procs=0, session_procs=0, web_port=None,
             quic_port=quic if quic in (-1, 0) else (quic or ssh_port) + index)
    if config.public_port is None:
        d["public_port"] = ssh_port
    return d


class OwnerProcess:
    """One session process: its child, the channel to it, and its sessions."""

    def __init__(self, pool: OwnerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.chan: fdchannel.FdChannel | None = None
        self.proc: Child | None = None
        self.started = 0.0
        self.quic_port = 0
        self.sessions: dict[str, tuple[str, bytes, bytes]] = {}
        """Its sessions: id -> (host key, HMACs of both tokens)."""
        self.routed = 0
        """New hosts sent to it: a tie-break between processes with as many sessions."""
        self.ready: asyncio.Future[int] | None = None

    @property
    def alive(self) -> bool:
        return (self.chan is not None and not self.chan.closed and self.ready is not None
                and self.ready.done() and not self.ready.cancelled()
                and self.ready.exception() is None)

    def start(self) -> None:
        here, popen = spawn("tether.relay.owner", FrontPool.log_config())
        self.proc = Child(popen)
        self.pool.children.add(self.proc)
        reap(self.proc, self.pool.children.discard)
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.chan = fdchannel.FdChannel(here, self._on_message, self._closed)
        self.send(["config", self.index,
                   config_message(self.pool.config, self.index, self.pool.ssh_port)])
        log.info("session process %d started (pid %d)", self.index, popen.pid)

    def send(self, msg: list[Any], fd: int | None = None) -> None:
        if self.chan is not None:
            self.chan.send(msg, fd)

    def stop(self) -> None:
        if self.chan is not None:
            self.chan.close()

    def _closed(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"session process {self.index} ended at start"))
            self.ready.exception()  # retrieved: only the relay's start awaits it
        self.pool.owner_gone(self)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            self.proc = None

    def _on_message(self, msg: list[Any], fd: int | None) -> None:
        try:
            self._handle(msg, fd)
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            log.error("session process %d: bad message %r: %s; restarting it", self.index,
                      msg[0] if msg else msg, exc)
            self.stop()

    def _handle(self, msg: list[Any], fd: int | None) -> None:
        kind = str(msg[0])
        if kind == "to":  # for a front: (index, life, message)
            self.pool.to_front(int(msg[1]), int(msg[2]), list(msg[3:]), fd)
            return
        if fd is not None:
            os.close(fd)
        if kind == "session":
            sid, rw, ro, host_key = (str(a) for a in msg[1:5])
            self.pool.directory_add(self, sid, rw, ro, host_key)
        elif kind == "ended":
            self.pool.directory_remove(self, str(msg[1]))
        elif kind == "ready":
            self.quic_port = int(msg[1])
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(self.quic_port)
        elif kind == "bad_front":
            self.pool.bad_front(int(msg[1]), int(msg[2]))
        else:
            raise ValueError(f"unknown message {kind!r}")


class OwnerPool:
    """The session processes and the directory of their sessions; the fronts'
    router (``fronts.Router``)."""

    def __init__(self, config: RelayConfig, count: int) -> None:
        self.config = config
        self.owners = [OwnerProcess(self, i) for i in range(count)]
        self.fronts: FrontPool | None = None
        self.ssh_port = 0
        self.children: set[Child] = set()
        self.restarts = Restarts()
        self._closing = False
        self._token_key = tokens.TokenKey()
        self._by_token: dict[bytes, OwnerProcess] = {}
        self._by_sid: dict[str, OwnerProcess] = {}
        self._per_key: collections.Counter[str] = collections.Counter()
        self._mates: dict[tuple[int, int, int], OwnerProcess] = {}
        """A front's mate (front, its life, the mate's number) -> where it went."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ssh_port: int) -> list[int]:
        """Start the session processes; their QUIC ports once all serve."""
        self.ssh_port = ssh_port
        for owner in self.owners:
            owner.start()
        try:
            return list(await asyncio.wait_for(
                asyncio.gather(*(o.ready for o in self.owners if o.ready is not None)),
                START_WAIT))
        except (RuntimeError, TimeoutError):
            await self.close()
            raise RuntimeError("the session processes (--session-procs) did not start; "
                               "their errors are in the log") from None

    async def close(self) -> None:
        self._closing = True
        self.restarts.cancel()
        for task in list(self._tasks):
            task.cancel()
        for owner in self.owners:
            owner.stop()  # it ends its sessions, then itself
        for proc in list(self.children):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()

    @property
    def sessions(self) -> int:
        return len(self._by_sid)

    # --- the directory -----------------------------------------------------------------

    def directory_add(self, owner: OwnerProcess, sid: str, rw: str, ro: str,
                      host_key: str) -> None:
        if sid in self._by_sid:  # another process's: the older one is the one mates reach
            log.error("session %s reported by two session processes", sid)
            return
        keys = (self._token_key(rw), self._token_key(ro))
        owner.sessions[sid] = (host_key, *keys)
        self._by_sid[sid] = owner
        for k in keys:
            self._by_token[k] = owner
        self._per_key[host_key] += 1

    def directory_remove(self, owner: OwnerProcess, sid: str) -> None:
        entry = owner.sessions.pop(sid, None)
        if entry is None:
            return
        host_key, *keys = entry
        self._by_sid.pop(sid, None)
        for k in keys:
            self._by_token.pop(k, None)
        self._per_key[host_key] -= 1
        if self._per_key[host_key] <= 0:
            del self._per_key[host_key]

    def _alive(self) -> list[OwnerProcess]:
        return [o for o in self.owners if o.alive]

    def _for_token(self, token: str) -> OwnerProcess | None:
        """The process holding ``token``'s session; an unknown token's goes to the
        first live one, whose back-off then counts every wrong guess."""
        owner = self._by_token.get(self._token_key(token))
        if owner is not None and owner.alive:
            return owner
        alive = self._alive()
        return alive[0] if alive else None

    def _for_hello(self, first: Message | None, host_key: str) -> tuple[OwnerProcess | None, str]:
        """(where a host goes, why it may not start a session: empty if it may)."""
        if isinstance(first, Hello):
            sids = [first.session] if first.session else []
            if first.secret is not None and len(first.secret) == 32:
                sids.append(tokens.derive_session(first.secret)[0])
            for sid in sids:
                owner = self._by_sid.get(sid)
                if owner is not None and owner.alive:
                    return owner, ""
        alive = self._alive()
        if not alive:
            return None, ""
        refusal = ""
        if len(self._by_sid) >= self.config.max_sessions:
            refusal = "this relay is full; try again later"
        elif self._per_key[host_key] >= self.config.max_sessions_per_key:
            refusal = "too many sessions for this host key"
        owner = min(alive, key=lambda o: (len(o.sessions), o.routed))
        owner.routed += 1
        return owner, refusal

    # --- a front's questions, routed -------------------------------------------------------

    def route(self, front: FrontProcess, kind: str, args: list[Any], fd: int | None) -> None:
        where = (front.index, front.gen)
        if kind == "host":
            if fd is None:
                raise ValueError("no socket")
            sock = socket.socket(fileno=fd)
            task = asyncio.ensure_future(self._route_host(front, where, args, sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        owner: OwnerProcess | None
        if kind in ("mate_keys", "mate"):
            owner = self._for_token(str(args[1]))
            if kind == "mate" and owner is not None:
                self._mates[(*where, int(args[0]))] = owner
        elif kind == "join":
            owner = self._for_token(str(args[0]))
        elif kind in ("left", "resized"):
            owner = self._mates.get((*where, int(args[0])))
        else:
            raise ValueError(f"unknown message {kind!r}")
        if owner is None:
            if fd is not None:
                os.close(fd)
            self._unserved(front, kind, args)
            return
        owner.send(["front", *where, kind, *args], fd)
        if fd is not None:
            os.close(fd)

    @staticmethod
    def _unserved(front: FrontProcess, kind: str, args: list[Any]) -> None:
        """No session process serves now (all restarting): refuse, at once."""
        if kind == "mate_keys":
            front.send(["keys", int(args[0]), NO_KEY])
        elif kind == "mate":
            front.send(["write", int(args[0]), b"tether: the relay is restarting; try again.\r\n"])
            front.send(["exit", int(args[0]), 1])

    async def _route_host(self, front: FrontProcess, where: tuple[int, int], args: list[Any],
                          sock: socket.socket) -> None:
        """Read a host's first message, then hand its channel, and the bytes read,
        to the process that holds (or will hold) its session."""
        with sock:
            there, first = await _first_message(sock, self.config.hello_timeout)
            if not there:
                return  # it went, or said nothing in time (a late Hello gets no answer)
            owner, refusal = self._for_hello(first, str(args[0]))
            if owner is None:
                log.warning("host %s: no session process serves now; closed", args[1])
                return
            owner.send(["front", *where, "hello", refusal, *args], sock.fileno())

    def to_front(self, index: int, gen: int, msg: list[Any], fd: int | None) -> None:
        """A session process's answer to a front, if that life of it still runs."""
        fronts = self.fronts.fronts if self.fronts is not None else []
        front = fronts[index] if 0 <= index < len(fronts) else None
        try:
            if front is None or front.gen != gen or not front.alive:
                return
            if msg and msg[0] == "exit":
                self._mates.pop((index, gen, int(msg[1])), None)
            front.send(msg, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def bad_front(self, index: int, gen: int) -> None:
        """A front sent what a session process could not read: restart it, as if
        the relay's process had read it."""
        fronts = self.fronts.fronts if self.fronts is not None else []
        if 0 <= index < len(fronts) and fronts[index].gen == gen:
            fronts[index].stop()

    def front_gone(self, front: FrontProcess) -> None:
        for key in [k for k in self._mates if k[:2] == (front.index, front.gen)]:
            del self._mates[key]
        for owner in self.owners:
            owner.send(["front_gone", front.index, front.gen])

    def owner_gone(self, owner: OwnerProcess) -> None:
        """Its sessions are gone: out of the directory; their mates are told."""
        for sid in list(owner.sessions):
            self.directory_remove(owner, sid)
        fronts = self.fronts.fronts if self.fronts is not None else []
        for key in [k for k, o in self._mates.items() if o is owner]:
            del self._mates[key]
            index, gen, req = key
            if fronts[index].gen == gen:
                fronts[index].send(["write", req, GONE_TEXT])
                fronts[index].send(["exit", req, 1])
        if not self._closing:
            self.restarts.died(owner.index, f"session process {owner.index}", owner.started,
                               owner.start)


async def _first_message(sock: socket.socket, timeout: float) -> tuple[bool, Message | None]:
    """(whether the host is there, its first message if it could be read) from a
    host's channel, looked at with MSG_PEEK: every byte stays for whoever gets
    the channel. (False, None) if it closed or stayed silent. A first frame that
    does not decode, or is too long to wait for, gives (True, None): whoever gets
    the channel reads it again and answers as to any host.

    The frame is decoded once, when it is all there (its length says when); a
    host that sends it slowly is looked at less and less often."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    want, pause = 4, PEEK_AGAIN
    while True:
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), lambda f=readable: f.done() or f.set_result(None))
        try:
            await asyncio.wait_for(readable, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            return False, None
        finally:
            loop.remove_reader(sock.fileno())
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                    b"\0" * 4))[0]
            if not queued and not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return False, None  # it closed
            if queued < want:
                await asyncio.sleep(pause)  # readable, but not enough yet
                pause = min(pause * 2, PEEK_MOST)
                continue
            if want == 4:
                (length,) = struct.unpack(">I", sock.recv(4, socket.MSG_PEEK))
                if length > HELLO_MOST:
                    return True, None
                want = 4 + length
                continue
            data = sock.recv(want, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            return False, None
        try:
            msgs = MessageDecoder().feed(data)
        except Exception:  # whoever gets the channel says what is wrong
            return True, None
        return True, (msgs[0] if msgs else None)
