"""A browser mate's keystroke echo beside an ssh mate's, on loopback.

``python3 -m bench.web_echo [--quick]``: the echo benchmark's rig (a relay, a host
whose pane runs ``cat``, an OpenSSH mate, the plain-tmux floor) with the relay's
web front on, and a web mate in the join mate's place: a WebSocket client on a
pty of its own (``tether.testing.web_mate``: the page's protocol, without a
browser's rendering), each key timed in turn until it shows on that mate's
terminal. The same measurement as ``bench.echo``'s, so the figures compare.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import Relay, Workdir, harness_free_port, percentile
from bench.echo import _settle, echo_rig, measure_echo
from tether.testing.mate import PtyProc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 keys instead of 330")
    a = ap.parse_args(argv)
    samples = 40 if a.quick else 330

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with Workdir("web-echo") as wd:
        relay = Relay(wd, ("--web-port", str(harness_free_port())))
        host, host_term, mate, local = echo_rig(wd, relay, log)
        link = host.read_format("#{tether_web}")
        home = wd.path / "web-mate"
        home.mkdir()
        web = PtyProc([sys.executable, "-m", "tether.testing.web_mate", link], wd.env(home),
                      (100, 31))
        wd.on_close(web.close)
        for p in (mate, local):
            p.write(b"\r")
        _settle(mate, web, local, host_term)
        log(f"web echo: {samples} keystrokes each, ssh mate, web mate and floor interleaved")
        got = measure_echo(mate, host_term, local, samples, 10, budget=3600, join=web)
    print(f"keystroke echo on loopback, {samples} keys each, ms (median / p90 / p99):")
    for name, key in (("ssh mate", "mate"), ("web mate", "join"),
                      ("  web input: key -> host", "join_input"),
                      ("  web output: host -> screen", "join_output"),
                      ("  ssh output: host -> screen", "output"), ("plain tmux (floor)", "floor")):
        xs = got[key]
        print(f"  {name:30} " + " ".join(f"{percentile(xs, q):7.2f}" for q in (50, 90, 99))
              + f"   n {len(xs)}")
    ssh, webm = got["mate"], got["join"]
    if ssh and webm:
        print("  web / ssh: " + ", ".join(
            f"{q} {percentile(webm, p) / percentile(ssh, p):.2f}"
            for q, p in (("median", 50), ("p90", 90), ("p99", 99))))
    print(f"  lost keys: {got['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
