"""7. What an idle session costs while nothing happens: bytes on the host's link
and the relay's CPU.

N real hosts (``tether -S SOCK new-session -d``, default 20; ``--quick``: 4)
share idle sessions with one ``tether relay`` on loopback, each reaching it
through one counting proxy (TCP and UDP, ``CountingProxy``) on 127.0.0.2, so
the proxy counts every byte of their links: the SSH bootstrap, then QUIC.
Once every host is on QUIC and past its first pings (``SETTLE`` s), the
benchmark counts for ``WINDOW`` s (``--quick``: 20): bytes each way per host
per second (UDP and TCP payload), CPU of every relay-side process per session
per second (the relay, jails, workers, replica tmux servers and clients) and
of the hosts' agents. Nothing types and nothing is printed meanwhile; the
panes run ``sleep``, the host's status line is off (a clock in it would be
output).

Targets (issue 18): under 50 bytes a second each way per idle host, at most
0.3 ms of relay-side CPU a second per idle session. The floor is tmate's: an
idle tmate session sends nothing.

Run alone: ``python3 -m bench.idle [--quick]``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    TMUX_CONF,
    CountingProxy,
    Ctx,
    Figure,
    HostSession,
    Relay,
    Workdir,
    cpu_of,
    wait_for,
    write_host_home,
)

HOST_ADDR = "127.0.0.2"
SETTLE = 15.0
"""Seconds after the last host is on QUIC before counting: its first pings
(one a second until the path is proven) and the idle switch (5 s) are past."""
BYTES_TARGET = 50.0
CPU_TARGET = 0.3
PANE_CMD = ["sleep", "2147483647"]


def run(ctx: Ctx, hosts_n: int | None = None, window: float | None = None) -> list[Figure]:
    n = hosts_n or (4 if ctx.quick else 20)
    window = window or (20.0 if ctx.quick else 60.0)
    log = ctx.log
    with Workdir("idle") as wd:
        relay = Relay(wd)
        proxy = CountingProxy(relay.port, (HOST_ADDR, relay.port), udp=True)
        wd.on_close(proxy.close)
        home = wd.path / "host"
        conf = relay.conf().replace("tether-server-host 127.0.0.1",
                                    f"tether-server-host {HOST_ADDR}")
        write_host_home(home, conf, TMUX_CONF + "set -g status off\n")
        log(f"idle: starting {n} sessions")

        def start(i: int, wd: Workdir = wd, home: Path = home) -> HostSession:
            return HostSession(wd, home, f"i{i}", (80, 24), PANE_CMD)

        with ThreadPoolExecutor(8) as pool:
            hosts = list(pool.map(start, range(n)))

        def on_quic() -> bool:
            return all("quic" in h.display("#{@tether_status}") for h in hosts)

        wait_for(on_quic, 60 + n, "every host on QUIC")
        log(f"idle: all on QUIC; settling {SETTLE:.0f}s")
        time.sleep(SETTLE)
        groups = relay.parts()
        agents = [pid for h in hosts for pid in h.agent_pids()]
        groups_all = {**groups, "host agents": agents}
        up0, down0 = proxy.up, proxy.down
        cpu0, t0 = cpu_of(groups_all), time.monotonic()
        log(f"idle: counting for {window:.0f}s")
        time.sleep(window)
        up1, down1 = proxy.up, proxy.down
        cpu1, t1 = cpu_of(groups_all), time.monotonic()
        still = sum("quic" in h.display("#{@tether_status}") for h in hosts)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(HostSession.close, hosts))
    secs = t1 - t0
    up = (up1 - up0) / secs / n
    down = (down1 - down0) / secs / n
    cpu = {k: (cpu1[k] - cpu0[k]) / secs / n * 1000 for k in groups_all}
    relay_side = sum(v for k, v in cpu.items() if k != "host agents")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if v > 0 and k != "host agents")
    note = f"{n} idle hosts on QUIC, {secs:.0f} s counted; {still}/{n} still on QUIC at the end"
    return [
        Figure("idle", "host->relay bytes per idle session", "B/s", [up],
               target=f"< {BYTES_TARGET:.0f} B/s", met=up < BYTES_TARGET,
               note=note + "; tmate's idle session sends nothing"),
        Figure("idle", "relay->host bytes per idle session", "B/s", [down],
               target=f"< {BYTES_TARGET:.0f} B/s", met=down < BYTES_TARGET),
        Figure("idle", "relay-side CPU per idle session", "ms/s", [relay_side],
               target=f"<= {CPU_TARGET} ms/s", met=relay_side <= CPU_TARGET,
               note=f"by part: {parts or 'none'}",
               extra={"cpu_ms_per_s_per_session": cpu}),
        Figure("idle", "  host agent CPU per idle session", "ms/s", [cpu["host agents"]]),
    ]


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "idle", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
