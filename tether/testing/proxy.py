"""Loopback proxies: one a test can cut (to drop a host's connection on demand), one that
counts the bytes each way (TCP, and UDP on the same port)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable

from .procs import HarnessError, free_port


class TcpProxy:
    """A loopback TCP proxy the test can cut, to drop the host's connection on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.accepting = True
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, uw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self._conns.discard(writer)
        self._conns.discard(uw)

    def cut(self) -> int:
        """Abort every proxied connection; returns how many were cut."""

        async def abort() -> int:
            n = len(self._conns)
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()
            return n

        return asyncio.run_coroutine_threadsafe(abort(), self._loop).result(5)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class CountingProxy:
    """Loopback proxy counting bytes each way: TCP, and optionally UDP on the same port.

    ``up`` counts bytes from the connecting side towards the target, ``down`` the
    bytes back (TCP payload and UDP datagram payload, in ``tcp_*``/``udp_*`` too).
    """

    def __init__(self, target_port: int, listen: tuple[str, int] | None = None,
                 target_host: str = "127.0.0.1", udp: bool = False) -> None:
        self.target = (target_host, target_port)
        self.listen = listen or ("127.0.0.1", free_port())
        self.tcp_up = self.tcp_down = self.udp_up = self.udp_down = 0
        self.last_activity = time.monotonic()
        self._udp = udp
        self._closers: list[Callable[[], None]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise HarnessError("proxy did not start")
        if self._error is not None:
            raise HarnessError(f"proxy: {self._error}")

    @property
    def host(self) -> str:
        return self.listen[0]

    @property
    def port(self) -> int:
        return self.listen[1]

    @property
    def up(self) -> int:
        return self.tcp_up + self.udp_up

    @property
    def down(self) -> int:
        return self.tcp_down + self.udp_down

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        server = await asyncio.start_server(self._handle, *self.listen)
        self._closers.append(server.close)
        if self._udp:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpFront(self), local_addr=self.listen)
            self._closers.append(transport.close)

    def _count(self, n: int, up: bool, udp: bool) -> None:
        if udp:
            if up:
                self.udp_up += n
            else:
                self.udp_down += n
        elif up:
            self.tcp_up += n
        else:
            self.tcp_down += n
        self.last_activity = time.monotonic()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for w in (writer, uw):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closers += [writer.close, uw.close]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(1 << 16):
                    self._count(len(data), up, False)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, uw, True), pipe(ur, writer, False))

    def reset(self) -> None:
        self.tcp_up = self.tcp_down = self.udp_up = self.udp_down = 0

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_activity

    def close(self) -> None:
        def stop() -> None:
            for fn in self._closers:
                with contextlib.suppress(Exception):
                    fn()
            self._loop.stop()

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(5)


class _UdpFront(asyncio.DatagramProtocol):
    """The proxy's UDP side: one upstream socket per client address."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._count(len(data), True, True)
        up = self.upstreams.get(addr)
        if up is not None:
            up.sendto(data)
            return
        if addr in self.pending:
            self.pending[addr].append(data)
            return
        self.pending[addr] = [data]
        task = asyncio.get_running_loop().create_task(self._open(addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        front = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _src: tuple[str, int]) -> None:
                front.proxy._count(len(data), False, True)
                if front.transport is not None:
                    front.transport.sendto(data, addr)

        transport, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=self.proxy.target)
        self.proxy._closers.append(transport.close)
        self.upstreams[addr] = transport
        for data in self.pending.pop(addr, []):
            transport.sendto(data)
