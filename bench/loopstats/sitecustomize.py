"""CPU per event-loop callback, for ``python3 -m bench.profile echo --loop``.

On ``PYTHONPATH`` of the processes under test (with ``TETHER_LOOPSTATS`` naming
an output directory), this wraps asyncio's ``Handle._run`` and a few aioquic
calls, and adds their thread CPU time (not wall time: on a busy machine a
process is often descheduled inside a call) per callback. SIGUSR1 starts the
count afresh, SIGUSR2 writes it to ``loop-PID.json`` in that directory.
Deterministic, unlike sampling: every callback is counted, so rare expensive
ones and cheap frequent ones both show, per keystroke.
"""

from __future__ import annotations

import os

_OUT = os.environ.get("TETHER_LOOPSTATS")


def _install(out: str) -> None:
    import asyncio.events
    import collections
    import json
    import signal
    import sys
    import time

    cpu = time.thread_time
    total: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    started = [cpu()]

    def name(cb: object) -> str:
        fn = getattr(cb, "__func__", None) or cb
        label = getattr(fn, "__qualname__", None) or type(cb).__name__
        owner = getattr(cb, "__self__", None)
        get_coro = getattr(owner, "get_coro", None)
        if get_coro is not None:  # a task's step: name the coroutine it runs
            coro = get_coro()
            label = "task " + getattr(coro, "__qualname__", type(coro).__name__)
        return label

    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        t0 = cpu()
        try:
            run(self)
        finally:
            key = name(self._callback)
            total[key] += cpu() - t0
            calls[key] += 1

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]

    def wrap(cls: type, attr: str, label: str) -> None:
        inner = getattr(cls, attr)

        def timed(*args: object, **kwargs: object) -> object:
            t0 = cpu()
            try:
                return inner(*args, **kwargs)
            finally:
                total[label] += cpu() - t0
                calls[label] += 1

        setattr(cls, attr, timed)

    try:
        import asyncio.selector_events as selector_events

        from aioquic.quic.connection import QuicConnection

        wrap(QuicConnection, "receive_datagram", "  (in it) aioquic receive_datagram")
        wrap(QuicConnection, "datagrams_to_send", "  (in it) aioquic datagrams_to_send")
        wrap(QuicConnection, "handle_timer", "  (in it) aioquic handle_timer")
        wrap(selector_events._SelectorDatagramTransport, "sendto", "  (in it) UDP sendto")
    except ImportError:
        pass

    def reset(signum: int, frame: object) -> None:
        total.clear()
        calls.clear()
        started[0] = cpu()

    def dump(signum: int, frame: object) -> None:
        data = {"argv": sys.argv[:3], "cpu": cpu() - started[0],
                "callbacks": {k: [calls[k], total[k]] for k in total}}
        path = os.path.join(out, f"loop-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)


if _OUT:
    _install(_OUT)
