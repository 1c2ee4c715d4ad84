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
import itertools
import logging
import os
import socket
import struct
import time
from typing import Any

from tether.core import tokens
from tether.core.messages import Hello, Message, MessageDecoder
from tether.transport import fdchannel
from tether.transport.children import Child
from tether.transport.web_terminal import EXIT_AGAIN

from .config import RelayConfig
from .fronts import START_WAIT, FrontPool, FrontProcess, Restarts, spawn

log = logging.getLogger("tether.relay")

HELLO_MOST = 1024 * 1024
"""Longest first frame of a host's channel read here to find its Hello (a list
of 256 RSA keys is a fifth of it); a longer one is no Hello a host sends, and
goes on unread as a new session's, to be refused."""
CLOSE_WAIT = 20.0
"""How long the relay's stop waits for its session processes to end their
sessions (each ends its replicas' jails) before it kills them."""
BUSY = 4096
"""Messages a session process may have left unread before new hosts are
turned away rather than queued (its channel holds 16384)."""
PART = 48 * 1024
"""The bytes read go to the session process in pieces of this size, each one
channel message, before the channel itself."""
GONE_TEXT = b"\r\ntether: the relay's process for this session ended.\r\n"
NO_KEY = [b"\0" * 32]
"""A digest no key has: the answer to "which keys?" when no session process
can say, so the login fails closed at once."""


def config_message(config: RelayConfig, index: int, ssh_port: int, web_port: int | None = None,
                   web_base: str = "") -> dict[str, Any]:
    """The settings a session process runs with: the relay's, with the ports it
    listens on (SSH, and the web front's, whose links its Welcomes give) and
    the process's own QUIC port."""
    d = dataclasses.asdict(config)
    for name in ("keys_dir", "web_cert", "web_key"):
        if d[name] is not None:
            d[name] = str(d[name])
    quic = config.quic_port
    # hosts' keys are checked by the SSH fronts; a long list would not fit one message
    d.update(port=ssh_port, ssh_procs=0, session_procs=0, web_port=web_port, web_url=web_base,
             authorized_keys=None,
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
        self.sessions: dict[str, tuple[str, bytes, bytes, bool]] = {}
        """Its sessions: id -> (host key, HMACs of both tokens, mates need a key)."""
        self.deciding = 0
        """Hosts sent to it that may start a session, not yet decided."""
        self.ready: asyncio.Future[int] | None = None

    @property
    def alive(self) -> bool:
        return (self.chan is not None and not self.chan.closed and self.ready is not None
                and self.ready.done() and not self.ready.cancelled()
                and self.ready.exception() is None)

    def start(self) -> None:
        here, self.proc = spawn("tether.relay.owner", self.pool.children)
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.chan = fdchannel.FdChannel(here, self._on_message, self._closed)
        pool = self.pool
        self.send(["config", self.index, config_message(
            pool.config, self.index, pool.ssh_port, pool.web_port, pool.web_base)])
        log.info("session process %d started (pid %d)", self.index, self.proc.pid)

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
            try:
                index, gen = int(msg[1]), int(msg[2])
            except (IndexError, TypeError, ValueError):
                if fd is not None:
                    os.close(fd)
                raise
            self.pool.to_front(index, gen, list(msg[3:]), fd)
            return
        if fd is not None:
            os.close(fd)
        if kind == "session":
            sid, rw, ro, host_key = (str(a) for a in msg[1:5])
            self.pool.directory_add(self, sid, rw, ro, host_key, bool(msg[5]))
        elif kind == "ended":
            self.pool.directory_remove(self, str(msg[1]))
        elif kind == "ready":
            self.quic_port = int(msg[1])
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(self.quic_port)
        elif kind == "decided":
            self.pool.decided(int(msg[1]))
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
        self.local_front: FrontProcess | None = None
        """The front in the relay's own process that browser mates come by."""
        self.ssh_port = 0
        self.web_port: int | None = None
        self.web_base = ""
        self.children: set[Child] = set()
        self.restarts = Restarts()
        self._closing = False
        self._token_key = tokens.TokenKey()
        self._by_token: dict[bytes, tuple[OwnerProcess, str, bool]] = {}
        """HMAC of a token -> (its process, its session, read-only)."""
        self._by_sid: dict[str, OwnerProcess] = {}
        self._per_key: collections.Counter[str] = collections.Counter()
        self._deciding: dict[int, tuple[OwnerProcess, str, str]] = {}
        """Hosts routed that may start a session, until their process says it is
        decided (by number): their process, host key, and the session their
        secret would re-create (empty: a new one)."""
        self._refs = itertools.count(1)
        self._mates: dict[tuple[int, int, int], OwnerProcess] = {}
        """A front's mate (front, its life, the mate's number) -> where it went."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ssh_port: int, web_port: int | None = None,
                    web_base: str = "") -> list[int]:
        """Start the session processes; their QUIC ports once all serve."""
        self.ssh_port, self.web_port, self.web_base = ssh_port, web_port, web_base
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

    def closing(self) -> None:
        """The relay is stopping: a session process that ends now stays ended (a
        SIGTERM to the relay's whole group reaches them too)."""
        self._closing = True
        self.restarts.cancel()

    async def close(self) -> None:
        self.closing()
        for task in list(self._tasks):
            task.cancel()
        for owner in self.owners:
            owner.stop()  # it ends its sessions, then itself
        children = list(self.children)
        if children:  # one deadline for all: they end their sessions side by side
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in children],
                               timeout=CLOSE_WAIT)
        for proc in children:
            if proc.returncode is None:
                proc.kill()

    @property
    def sessions(self) -> int:
        return len(self._by_sid)

    # --- the directory -----------------------------------------------------------------

    def directory_add(self, owner: OwnerProcess, sid: str, rw: str, ro: str,
                      host_key: str, keys_only: bool = False) -> None:
        """A session its process created, or whose keys for mates changed."""
        if sid in self._by_sid:
            if self._by_sid[sid] is owner:  # a change
                host_key, rw_key, ro_key, _ = owner.sessions[sid]
                owner.sessions[sid] = (host_key, rw_key, ro_key, keys_only)
            else:  # another process's: the older one is the one mates reach
                log.error("session %s reported by two session processes", sid)
            return
        rw_key, ro_key = self._token_key(rw), self._token_key(ro)
        owner.sessions[sid] = (host_key, rw_key, ro_key, keys_only)
        self._by_sid[sid] = owner
        self._by_token[rw_key] = (owner, sid, False)
        self._by_token[ro_key] = (owner, sid, True)
        self._per_key[host_key] += 1

    def directory_remove(self, owner: OwnerProcess, sid: str) -> None:
        entry = owner.sessions.pop(sid, None)
        if entry is None:
            return
        host_key, rw_key, ro_key, _ = entry
        self._by_sid.pop(sid, None)
        for k in (rw_key, ro_key):
            self._by_token.pop(k, None)
        self._per_key[host_key] -= 1
        if self._per_key[host_key] <= 0:
            del self._per_key[host_key]

    def lookup(self, token: str) -> tuple[str, bool, bool] | None:
        """(session id, read-only, mates need a key) for a token; None: no session's."""
        found = self._by_token.get(self._token_key(token))
        if found is None:
            return None
        owner, sid, readonly = found
        return sid, readonly, owner.sessions[sid][3]

    def _alive(self) -> list[OwnerProcess]:
        return [o for o in self.owners if o.alive]

    def _for_token(self, token: str) -> OwnerProcess | None:
        """The process holding ``token``'s session; an unknown token's goes to the
        first live one, whose back-off then counts every wrong guess."""
        found = self._by_token.get(self._token_key(token))
        if found is not None and found[0].alive:
            return found[0]
        alive = self._alive()
        return alive[0] if alive else None

    def _for_hello(self, first: Message | None,
                   host_key: str) -> tuple[OwnerProcess | None, str, str | None]:
        """(where a host goes, why it may not start a session: empty if it may,
        the session it would start: None if it only resumes one).

        The secret is checked only in the session process. A Hello whose secret
        derives the live session it names resumes it (only its host knows that
        secret). Any other may start a session there: the limits are judged for
        it, counting hosts not yet decided, and the process applies them only if
        it does. The session it would start is named by its secret (a re-created
        one), so two hosts re-creating one session meet in one process."""
        alive = self._alive()
        if not alive:
            return None, "", None
        owner: OwnerProcess | None = None
        derived = ""
        if isinstance(first, Hello):
            if first.secret is not None and len(first.secret) == 32:
                derived = tokens.derive_session(first.secret)[0]
            found = self._by_sid.get(first.session or "")
            if found is not None and found.alive:
                if derived == first.session:
                    return found, "", None  # a resume, proven there
                owner = found
        if owner is None and derived:
            found = self._by_sid.get(derived) or next(
                (o for o, _, s in self._deciding.values() if s == derived), None)
            if found is not None and found.alive:
                owner = found
        refusal = ""
        per_key = sum(k == host_key for _, k, _ in self._deciding.values())
        if len(self._by_sid) + len(self._deciding) >= self.config.max_sessions:
            refusal = "this relay is full; try again later"
        elif self._per_key[host_key] + per_key >= self.config.max_sessions_per_key:
            refusal = "too many sessions for this host key"
        if owner is None:
            owner = min(alive, key=lambda o: (len(o.sessions) + o.deciding, o.index))
        return owner, refusal, None if refusal else derived

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
        try:
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
            if owner is not None:
                try:
                    owner.send(["front", *where, kind, *args], fd)
                except (OSError, ValueError) as exc:  # too long once wrapped; no descriptors
                    log.warning("ssh front %d: cannot pass on %r: %s", front.index, kind, exc)
                    owner = None
            if owner is None:
                self._unserved(front, kind, args)
        finally:
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
            prefix, first = await _first_message(sock, self.config.hello_timeout)
            if prefix is None:
                return  # it went, or said nothing in time
            if front.gen != where[1] or not front.alive:
                return  # the front died meanwhile, and the channel with it
            owner, refusal, sid = self._for_hello(first, str(args[0]))
            if owner is None:
                log.warning("host %s: no session process serves now; closed", args[1])
                return
            if owner.chan is None or owner.chan.backlog > BUSY:
                # a flood of first frames must not fill its channel (which ends it)
                log.warning("host %s: session process %d is behind; closed", args[1],
                            owner.index)
                return
            ref = next(self._refs)
            if sid is not None:  # it may start a session: counted until its process says
                self._deciding[ref] = (owner, str(args[0]), sid)
                owner.deciding += 1
            try:
                channel = os.dup(sock.fileno())  # before any part: no part left orphaned
            except OSError as exc:  # out of descriptors
                log.warning("host %s: cannot hand the channel over: %s", args[1], exc)
                self.decided(ref)
                return
            try:
                for i in range(0, len(prefix), PART):
                    owner.send(["front", *where, "hello_part", ref, prefix[i:i + PART]])
                owner.send(["front", *where, "hello", ref, refusal, *args], channel)
            except (OSError, ValueError) as exc:
                log.warning("host %s: cannot hand the channel over: %s", args[1], exc)
                self.decided(ref)
            finally:
                os.close(channel)

    def decided(self, ref: int) -> None:
        """A routed host's session exists now (and was reported), or will not."""
        entry = self._deciding.pop(ref, None)
        if entry is not None:
            entry[0].deciding -= 1

    def _front(self, index: int) -> FrontProcess | None:
        """A front process by index, or the relay's own front for browsers."""
        fronts = self.fronts.fronts if self.fronts is not None else []
        if 0 <= index < len(fronts):
            return fronts[index]
        local = self.local_front
        return local if local is not None and local.index == index else None

    def to_front(self, index: int, gen: int, msg: list[Any], fd: int | None) -> None:
        """A session process's answer to a front, if that life of it still runs."""
        front = self._front(index)
        try:
            if front is None or front.gen != gen or not front.alive:
                return
            if msg and msg[0] == "exit":
                self._mates.pop((index, gen, int(msg[1])), None)
            try:
                front.send(msg, fd)
            except OSError as exc:  # out of descriptors to queue it with
                log.warning("ssh front %d: cannot pass on %r: %s", index, msg[0], exc)
        finally:
            if fd is not None:
                os.close(fd)

    def bad_front(self, index: int, gen: int) -> None:
        """A front sent what a session process could not read: restart it, as if
        the relay's process had read it."""
        front = self._front(index)
        if front is not None and front.gen == gen:
            front.stop()

    def front_gone(self, front: FrontProcess) -> None:
        for key in [k for k in self._mates if k[:2] == (front.index, front.gen)]:
            del self._mates[key]
        for owner in self.owners:
            owner.send(["front_gone", front.index, front.gen])

    def owner_gone(self, owner: OwnerProcess) -> None:
        """Its sessions are gone: out of the directory; their mates are told."""
        for sid in list(owner.sessions):
            self.directory_remove(owner, sid)
        for ref in [r for r, (o, _, _) in self._deciding.items() if o is owner]:
            del self._deciding[ref]
        owner.deciding = 0
        for key in [k for k, o in self._mates.items() if o is owner]:
            del self._mates[key]
            index, gen, req = key
            front = self._front(index)
            if front is not None and front.gen == gen:
                front.send(["write", req, GONE_TEXT])
                front.send(["exit", req, EXIT_AGAIN])  # a browser's page reconnects
        if not self._closing:
            self.restarts.died(owner.index, f"session process {owner.index}", owner.started,
                               owner.start)


async def _first_message(sock: socket.socket, timeout: float) -> tuple[bytes | None,
                                                                       Message | None]:
    """(the bytes read, the first message) of a host's channel: the first frame
    only, whoever gets the channel reads on from there. (None, None) if it closed
    or stayed silent (a late Hello gets no answer, as from any relay). A frame
    that does not decode, or is longer than a Hello can be, gives (bytes, None):
    whoever gets the channel reads it (again) and answers as to any host."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    raw = bytearray()
    want = 4
    while len(raw) < want:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, want - len(raw)),
                                          max(deadline - time.monotonic(), 0.0))
        except (TimeoutError, OSError):
            return None, None
        if not data:
            return None, None
        raw += data
        if want == 4 and len(raw) == 4:
            (length,) = struct.unpack(">I", raw)
            if length > HELLO_MOST:
                return bytes(raw), None
            want = 4 + length
    try:
        msgs = MessageDecoder().feed(bytes(raw))
    except Exception:  # whoever gets the channel says what is wrong
        return bytes(raw), None
    return bytes(raw), (msgs[0] if msgs else None)
