"""``tether netsim``: run a command on a faulty network, open a shell in one, or clean up."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from . import nsutil
from .errors import NetsimError
from .network import PARAM_HELP, Network, Topology, normalize_params
from .scenario import Scenario, ScenarioRunner, resolve_links, resume_all

EPILOG = """\
examples:
  tether netsim run --delay 100ms --jitter 10ms --loss 2% -- ping -c 5 $OTHER
  tether netsim run --bg 'b:python3 -m http.server 8000' --rate 1mbit \\
      -- sh -c 'curl -s http://$NETSIM_ADDR_B:8000/ >/dev/null'
  tether netsim run --topology topo.toml --scenario roam.toml --pcap /tmp/pcap -- ./client
  tether netsim shell --delay 50ms b
  tether netsim cleanup

Hosts a and b (link eth0 each) are joined by a router unless --topology is
given.  Commands see NETSIM_ADDR_<HOST> / NETSIM_ADDR6_<HOST> and NETSIM_SEED.
Impairment flags apply to every link of --host unless --link is given; the
delay is added in each direction, so the round trip grows by twice --delay.
"""


def _impair_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("impairments (per link and direction, see --link/--direction)")
    g.add_argument("--delay", metavar="DUR", help="one-way delay, e.g. 100ms")
    g.add_argument("--jitter", metavar="DUR", help="uniform +/- spread around the delay")
    g.add_argument("--loss", metavar="P", help="i.i.d. loss, e.g. 20%% or 0.2")
    g.add_argument(
        "--burst-loss",
        metavar="P_ENTER,P_EXIT",
        help="Gilbert-Elliott bursty loss: per-packet chance to enter / leave the lossy state",
    )
    g.add_argument("--reorder", metavar="P", help="share of packets held back and overtaken")
    g.add_argument("--reorder-delay", metavar="DUR", help="hold time of reordered packets (20ms)")
    g.add_argument("--duplicate", metavar="P", help="share of packets delivered twice")
    g.add_argument("--rate", metavar="RATE", help="bandwidth cap, tc units: 1mbit, 500kbit")
    g.add_argument("--limit", metavar="N", type=int, help="queue limit in packets (1000)")
    g.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="HOST[.LINK]",
        help="link(s) the flags apply to (repeatable; default: every link of --host)",
    )
    g.add_argument(
        "--direction",
        choices=("up", "down", "both"),
        default="both",
        help="up = host to router, down = router to host (default both)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", metavar="FILE", help="TOML topology (default: hosts a and b)")
    p.add_argument("--seed", type=int, help="seed for every random decision (printed if omitted)")
    p.add_argument("--scenario", metavar="FILE", help="TOML timeline of events, see docs")
    p.add_argument("--pcap", metavar="DIR", help="write HOST.LINK.pcap per link (LINKTYPE_RAW)")
    p.add_argument(
        "--bg",
        action="append",
        default=[],
        metavar="HOST:CMD",
        help="start a background command in HOST first (repeatable; killed at the end)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no counters / event log at exit")
    _impair_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether netsim",
        description="Network-fault harness: namespaces joined by a router, with impairable "
        "links (delay, loss, bursts, reordering, duplication, rate, blackouts), roaming, "
        "NAT rebinding and UDP blocking.  Needs root and /dev/net/tun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run CMD in a host of the faulty network, exit with its status",
        description="Build the network, apply impairments, run CMD in --host, print the "
        "seed and per-link counters, tear everything down, exit with CMD's status.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--host", default=None, help="host to run CMD in (default: first host)")
    run.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SEC",
        help="kill CMD after SEC seconds (default: no limit)",
    )
    _common(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    shell = sub.add_parser(
        "shell",
        help="open $SHELL in a host; the network lives until the shell exits",
        description="Like run, with CMD = $SHELL (or /bin/sh).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shell.add_argument("host", nargs="?", default=None, help="host (default: first host)")
    _common(shell)
    clean = sub.add_parser(
        "cleanup",
        help="remove namespaces and processes left by killed runs",
        description="Removes namespaces named <prefix>-<pid>-... whose pid is dead, and the "
        "processes inside them.  Never touches other namespaces or live runs.",
    )
    clean.add_argument("--prefix", default=nsutil.DEFAULT_PREFIX, help=argparse.SUPPRESS)
    return parser


def _err(msg: str) -> None:
    print(f"netsim: {msg}", file=sys.stderr, flush=True)


def _impairment_args(args: argparse.Namespace) -> dict[str, Any]:
    raw = {
        "delay": args.delay,
        "jitter": args.jitter,
        "loss": args.loss,
        "burst_loss": args.burst_loss,
        "reorder": args.reorder,
        "reorder_delay": args.reorder_delay,
        "duplicate": args.duplicate,
        "rate": args.rate,
        "limit": args.limit,
    }
    params = {k: v for k, v in raw.items() if v is not None}
    normalize_params(**params)  # validate before building anything
    return params


class _Interrupted(NetsimError):
    """A terminating signal arrived: tear the network down, then exit 128+signal."""


class _Plan:
    """What ``run`` and ``shell`` were asked for, checked before anything is built."""

    def __init__(self, args: argparse.Namespace, host: str | None) -> None:
        self.topology = Topology.load(args.topology) if args.topology else Topology.default()
        self.scenario = Scenario.load(args.scenario) if args.scenario else None
        if self.scenario:
            self.scenario.check(self.topology)
        hosts = self.topology.hosts
        self.host = host or next(iter(hosts))
        if self.host not in hosts:
            raise ValueError(f"unknown host {self.host!r}; hosts: {', '.join(hosts)}")
        self.params = _impairment_args(args)
        self.link_keys = [
            k for spec in (args.link or [self.host]) for k in resolve_links(self.topology, spec)
        ]
        self.bg: list[tuple[str, list[str]]] = []
        for spec in args.bg:
            h, sep, c = spec.partition(":")
            if not sep or h not in hosts or not c.strip():
                raise ValueError(f"--bg wants HOST:CMD with a known host, got {spec!r}")
            self.bg.append((h, shlex.split(c)))
        scenario_seed = self.scenario.seed if self.scenario else None
        self.seed = args.seed if args.seed is not None else scenario_seed


class _Signals:
    """SIGINT counted (the command got it too: we wait for it, to report its
    counters and status); SIGTERM and SIGHUP raise ``_Interrupted``."""

    def __init__(self) -> None:
        self.count = 0
        self.at = 0.0
        self.forwarded = False
        self._old: dict[int, Any] = {}

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.at = time.monotonic()

    @staticmethod
    def _on_term(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    def install(self) -> None:
        for sig, fn in (
            (signal.SIGINT, self._on_sigint),
            (signal.SIGTERM, self._on_term),
            (signal.SIGHUP, self._on_term),
        ):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, fn)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, cmd: list[str], host: str | None, interactive: bool) -> int:
    plan = _Plan(args, host)
    signals = _Signals()
    signals.install()
    net = Network(plan.topology, seed=plan.seed, pcap_dir=args.pcap)
    status = 1
    runner: ScenarioRunner | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        _err(f"seed {net.seed} (replay with --seed {net.seed})")
        net.start()
        for key in plan.link_keys:
            if plan.params:
                net.link(key).set(direction=args.direction, **plan.params)
        env = {**os.environ, **net.env(), "NETSIM_HOST": plan.host}
        for h, c in plan.bg:
            net.popen(h, c, env=env)
        addrs = " ".join(f"{h}={net.addr(h)}" for h in net.hosts)
        _err(f"run {net.run_id}: {addrs}; CMD in {plan.host}")
        proc = net.popen(plan.host, cmd, env=env)
        if plan.scenario:
            runner = ScenarioRunner(net, plan.scenario, {"cmd": proc.pid}, report=_err).start()
        rc = _wait(proc, args, signals, interactive)
        status = 128 - rc if rc < 0 else rc
    except _Interrupted as e:
        status = 128 + int(e.args[0])
        _err(f"terminated by signal {e.args[0]}")
    finally:
        if runner is not None:
            runner.stop()
        if proc is not None:
            resume_all([proc.pid])
        net.close()
        signals.restore()
    if not args.quiet:
        _report(net)
    return status


def _wait(
    proc: subprocess.Popen[bytes], args: argparse.Namespace, signals: _Signals, interactive: bool
) -> int:
    """Wait for the command; end it at ``--timeout``, or on Ctrl-C if it ignores one."""
    deadline = time.monotonic() + args.timeout if getattr(args, "timeout", 0) else None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if deadline is not None and time.monotonic() > deadline:
            _err(f"timeout after {args.timeout:g}s, killing CMD")
            proc.terminate()
        if signals.count and not interactive:
            if signals.count > 1 or time.monotonic() - signals.at > 5.0:
                proc.kill()  # second Ctrl-C, or CMD ignores it
            elif not signals.forwarded:
                signals.forwarded = True
                proc.send_signal(signal.SIGINT)  # in case CMD is not in our group


def _report(net: Network) -> None:
    """The seed, the final counters and the event log, on stderr."""
    print(f"netsim: seed {net.seed}", file=sys.stderr)
    if net.final_stats:
        print(net.format_stats(net.final_stats), file=sys.stderr)
    print("netsim: events", file=sys.stderr)
    for ev in net.events:
        print(f"  {ev}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``tether netsim ...``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        reason = nsutil.unavailable_reason()
        if reason and os.geteuid() != 0:
            _err(reason)
            return 2
        removed = nsutil.cleanup_stale(args.prefix)
        for name in removed:
            print(f"removed {name}")
        _err(f"cleanup: {len(removed)} stale namespace(s) removed")
        return 0
    reason = nsutil.unavailable_reason()
    if reason:
        _err(reason)
        return 2
    try:
        if args.command == "run":
            cmd = list(args.cmd)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            if not cmd:
                parser.error("run needs a command after --")
            return _run(args, cmd, args.host, interactive=False)
        shell = os.environ.get("SHELL") or "/bin/sh"
        return _run(args, [shell], args.host, interactive=True)
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip()
        _err(f"{' '.join(map(str, e.cmd))} failed: {detail or e.returncode}")
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        _err(str(e))
        return 2


__all__ = ["PARAM_HELP", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
