"""5. Wire bytes during a scrolling workload.

The host pane ``cat``s 2,000 full 200x50 frames of coloured text (scrolling
lines, about 50 MB raw; ``--quick``: 20 frames). Counting proxies sit between
host and relay (TCP for the SSH bootstrap and UDP for QUIC, on the address
the host is configured with) and between the mate's ``ssh`` and the relay.

Floors: host->relay is compared with the raw bytes the pane printed (the
ratio is the target's); relay->mate with what a plain tmux client attached
locally receives for the same workload (its pty bytes). Rounds alternate
tether and floor.

Run alone: ``python3 -m bench.wire [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import (
    TMUX_CONF,
    BenchError,
    CountingProxy,
    Ctx,
    Figure,
    HostSession,
    PlainTmux,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    remote_peers,
    write_host_home,
)

COLS, ROWS = 200, 50
TARGET = 0.032
HOST_ADDR = "127.0.0.2"
"""hosts reach the relay here: a proxy on the relay's port number (TCP and UDP)"""


def make_frames(path: Path, frames: int) -> int:
    """``frames`` screens of 50 scrolling lines, 200 coloured columns each."""
    text = b"the quick brown fox jumps over the lazy dog 0123456789 " * 8
    total = 0
    with open(path, "wb") as f:
        for fr in range(frames):
            lines = []
            for row in range(ROWS):
                k = fr * ROWS + row
                segs = []
                for seg in range(COLS // 8):
                    colour = 16 + (k * 7 + seg * 13) % 216
                    start = (k * 3 + seg * 8) % 200
                    segs.append(b"\x1b[38;5;%dm" % colour + text[start : start + 8])
                lines.append(b"".join(segs) + b"\x1b[0m\n")
            data = b"".join(lines)
            f.write(data)
            total += len(data)
    return total


def wait_steady(*proxies: CountingProxy, window: float = 0.6, slack: int = 2048,
                timeout: float = 60) -> None:
    """Until no link moved more than ``slack`` bytes in ``window`` seconds (an idle QUIC
    link still sends a keep-alive every half second or so)."""
    deadline = time.monotonic() + timeout
    while True:
        before = [(p.up, p.down) for p in proxies]
        time.sleep(window)
        after = [(p.up, p.down) for p in proxies]
        if all(a[0] - b[0] <= slack and a[1] - b[1] <= slack
               for a, b in zip(after, before, strict=True)):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"links still busy after {timeout:.0f}s")


def run(ctx: Ctx) -> list[Figure]:
    frames = 20 if ctx.quick else 2000
    rounds = 1 if ctx.quick else 2
    log = ctx.log
    up: list[float] = []
    ack: list[float] = []
    to_mate: list[float] = []
    from_mate: list[float] = []
    floor_client: list[float] = []
    secs: list[float] = []
    floor_secs: list[float] = []
    notes: list[str] = []
    with Workdir("wire") as wd:
        data = wd.path / "frames.txt"
        raw = make_frames(data, frames)
        relay = Relay(wd)
        host_proxy = CountingProxy(relay.port, (HOST_ADDR, relay.port), udp=True)
        wd.on_close(host_proxy.close)
        mate_proxy = CountingProxy(relay.port)
        wd.on_close(mate_proxy.close)
        home = wd.path / "host"
        conf = relay.conf().replace("tether-server-host 127.0.0.1",
                                    f"tether-server-host {HOST_ADDR}")
        write_host_home(home, conf, TMUX_CONF)
        env = wd.env(home)
        host = HostSession(wd, home, "host", (COLS, ROWS), ["env", "PS1=$ ", "/bin/sh"])
        ssh = host.ssh()
        ssh[ssh.index("-p") + 1] = str(mate_proxy.port)
        mate = PtyProc(ssh, env, (COLS, ROWS + 1))
        wd.on_close(mate.close)
        floor = PlainTmux(wd, home, "floor", (COLS, ROWS), ["env", "PS1=$ ", "/bin/sh"])
        local = PtyProc(attach_argv(floor.sock), env, (COLS, ROWS + 1))
        wd.on_close(local.close)
        host.tmux("send-keys", "echo READY-$((1+1))", "Enter")
        mate.wait_visible(b"READY-2", 30)
        floor.tmux("send-keys", "echo READY-$((1+1))", "Enter")
        local.wait_visible(b"READY-2", 10)
        # whatever the transport (SSH, QUIC), the host must talk to the relay via the proxy
        agent = host.agent_pids()
        direct = [p for pid in agent for p in remote_peers(pid)
                  if p[1] == "127.0.0.1" and p[2] == relay.port]
        if direct:
            raise BenchError(f"the host reaches the relay around the proxy: {direct}")
        if host_proxy.udp_up:
            notes.append("host link: QUIC (UDP) after the SSH bootstrap")

        def tether_run(n: int) -> None:
            mate.wait_quiet(0.3, 30)
            wait_steady(host_proxy, mate_proxy, timeout=30)
            host_proxy.reset()
            mate_proxy.reset()
            t0 = time.perf_counter()
            host.tmux("send-keys", f"cat {data}; echo WIRE-DONE-$((40+{n}))", "Enter")
            t1 = mate.wait_visible(f"WIRE-DONE-{40 + n}".encode(), 900)
            mate.wait_quiet(0.5, 120)
            wait_steady(host_proxy, mate_proxy)
            up.append(host_proxy.up)
            ack.append(host_proxy.down)
            to_mate.append(mate_proxy.down)
            from_mate.append(mate_proxy.up)
            secs.append(t1 - t0)
            log(f"wire: host->relay {host_proxy.up / 1e6:.2f} MB, relay->mate "
                f"{mate_proxy.down / 1e6:.2f} MB in {t1 - t0:.1f}s")

        def floor_run(n: int) -> None:
            local.wait_quiet(0.3, 30)
            before = local.received
            t0 = time.perf_counter()
            floor.tmux("send-keys", f"cat {data}; echo WIRE-DONE-$((40+{n}))", "Enter")
            t1 = local.wait_visible(f"WIRE-DONE-{40 + n}".encode(), 900)
            local.wait_quiet(0.5, 120)
            floor_client.append(local.received - before)
            floor_secs.append(t1 - t0)
            log(f"wire: plain tmux client {floor_client[-1] / 1e6:.2f} MB in {t1 - t0:.1f}s")

        log(f"wire: {frames} frames, {raw / 1e6:.1f} MB raw, {rounds} rounds")
        for r in range(rounds):
            order = (tether_run, floor_run) if r % 2 == 0 else (floor_run, tether_run)
            for fn in order:
                fn(2 * r + (fn is floor_run))

    if up and max(up) < raw / 1000:
        notes.append("suspiciously few host bytes: does the host's link still go through "
                     f"{HOST_ADDR}:{{relay port}}?")
    raws = [float(raw)] * len(up)
    rnd = [[x] for x in up]
    note = f"{frames} frames {COLS}x{ROWS}, {raw / 1e6:.1f} MB raw"
    return [
        Figure("wire", "host->relay bytes", "B", up, raws, "raw pane output",
               f"< {TARGET}x raw", bool(up) and sorted(up)[len(up) // 2] < TARGET * raw, rnd,
               note="; ".join([note, *notes])),
        Figure("wire", "  relay->host bytes", "B", ack, raws, "raw pane output",
               rounds=[[x] for x in ack]),
        Figure("wire", "relay->mate bytes", "B", to_mate, floor_client,
               "plain tmux client's pty bytes", rounds=[[x] for x in to_mate],
               floor_rounds=[[x] for x in floor_client],
               note=f"ratio to raw {sorted(to_mate)[len(to_mate) // 2] / raw:.3f}"
               if to_mate else ""),
        Figure("wire", "  mate->relay bytes", "B", from_mate, rounds=[[x] for x in from_mate]),
        Figure("wire", "  workload: until the mate shows the end", "s", secs, floor_secs,
               "plain tmux local client", rounds=[[x] for x in secs],
               floor_rounds=[[x] for x in floor_secs]),
    ]


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--only", "wire", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
