"""Where the time goes: py-spy on the agent, the relay and a replica worker.

    python3 -m bench.profile echo  [--keys N]       # mates typing, one key every 20 ms
    python3 -m bench.profile echo --syscalls        # system calls per process (strace -c)
    python3 -m bench.profile echo --loop            # CPU per event-loop callback, per key
    python3 -m bench.profile flood [--mb N]         # the host pane cats a text file
    python3 -m bench.profile startup                # the agent from exec to ready

For each process: how busy it was, its own time by package (tether, asyncio,
asyncssh, aioquic, msgpack, ...), the hottest functions (self time) and the
hottest tether functions (inclusive time). Needs ``py-spy`` (``pip install
py-spy``) and root (ptrace). Not part of ``bench/run.py``: sampling slows the
processes it watches.

``--loop`` needs neither: the relay and the agent run with
``bench/loopstats`` on their ``PYTHONPATH``, which adds up the thread CPU time
of every asyncio callback (and of aioquic's packet calls within them), and
the report gives each callback's calls and CPU per keystroke.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    TMUX_CONF,
    BenchError,
    HostSession,
    PtyProc,
    Relay,
    Workdir,
    attach_argv,
    cpu_of,
    tmux,
    wait_visible_all,
    write_host_home,
)
from bench.flood import make_text

IDLE = ("EpollSelector.select", "select (selectors", "_run_once (asyncio/base_events.py:18")


def _frame_package(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> the package the code belongs to."""
    _, _, where = frame.rpartition(" (")
    path = where.split(":")[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    parts = path.split("/")
    if parts[0] in ("<frozen runpy>", "<string>") or len(parts) == 1:
        return parts[0].removesuffix(".py")
    return parts[0]


def summarize(raw: Path, top: int = 12) -> str:
    """A report of one py-spy ``--format raw`` file (collapsed stacks)."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        # the event loop's thread only: helper threads mostly wait (getaddrinfo, waitpid)
        if stack and n.isdigit() and "_bootstrap (threading.py" not in stack:
            stacks.append((stack.split(";"), int(n)))
    total = sum(n for _, n in stacks)
    if not total:
        return "  (no samples)"
    idle = sum(n for frames, n in stacks if any(frames[-1].startswith(i) for i in IDLE))
    own: collections.Counter[str] = collections.Counter()
    by_pkg: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        if any(frames[-1].startswith(i) for i in IDLE):
            continue
        own[frames[-1]] += n
        by_pkg[_frame_package(frames[-1])] += n
        for f in set(frames):
            if "tether/" in f and "__main__" not in f and " main (" not in f:
                incl[f] += n
    busy = total - idle

    def pct(n: int) -> str:
        return f"{100 * n / busy:5.1f}%"

    out = [f"  {total} samples, {100 * busy / total:.0f}% busy (shares below are of busy time)"]
    out.append("  own time by package: " + ", ".join(
        f"{k} {100 * v / busy:.0f}%" for k, v in by_pkg.most_common(8)))
    out.append("  hottest functions (self):")
    out += [f"    {pct(n)} {f}" for f, n in own.most_common(top)]
    out.append("  hottest tether functions (inclusive):")
    out += [f"    {pct(n)} {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def _spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["py-spy", "record", "-r", "250", "-d", str(max(1, round(seconds))),
         "--format", "raw", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


LOOPSTATS = Path(__file__).resolve().parent / "loopstats"


def loop_report(path: Path, keys: int, top: int = 16) -> str:
    """A ``loopstats`` dump as a table: the costliest callbacks per keystroke."""
    data = json.loads(path.read_text())
    rows = sorted(data["callbacks"].items(), key=lambda kv: -kv[1][1])
    inside = sum(t for k, (_, t) in data["callbacks"].items() if not k.startswith(" "))
    lines = [f"  main thread {1000 * data['cpu'] / keys:.2f} ms per key, of which "
             f"{1000 * inside / keys:.2f} in callbacks (the rest: the loop itself, epoll)",
             f"  {'ms/key':>7} {'calls/key':>9} {'us/call':>8}  callback"]
    for name, (n, t) in rows[:top]:
        lines.append(f"  {1000 * t / keys:7.3f} {n / keys:9.2f} {1e6 * t / n:8.1f}  {name}")
    return "\n".join(lines)


def profile_running(scenario: str, args: argparse.Namespace) -> None:
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "TETHER_LOOPSTATS")}
    with Workdir("profile") as wd:
        if args.loop:  # inherited by the relay and the agent started below
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(LOOPSTATS), saved["PYTHONPATH"]) if p)
            os.environ["TETHER_LOOPSTATS"] = str(wd.path)
        try:
            _profile_in(wd, scenario, args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _profile_in(wd: Workdir, scenario: str, args: argparse.Namespace) -> None:
    relay = Relay(wd)
    home = wd.path / "host"
    extra = "set -g status off\n" if scenario == "echo" else ""
    write_host_home(home, relay.conf(), TMUX_CONF + extra)
    env = wd.env(home)
    cmd = ["cat"] if scenario == "echo" else ["env", "PS1=$ ", "/bin/sh"]
    host = HostSession(wd, home, "host", (120, 40), cmd)
    host_term = PtyProc(attach_argv(host.sock), env, (120, 41))
    wd.on_close(host_term.close)
    mate = PtyProc(host.ssh(), env, (120, 41))
    wd.on_close(mate.close)
    probe = b"!" if scenario == "echo" else b"READY-2"
    deadline = time.monotonic() + 30
    while True:
        if scenario == "echo":
            mate.write(b"!")
        else:
            host_term.write(b"echo READY-$((1+1))\r")
        try:
            wait_visible_all([(mate, probe), (host_term, probe)], 5)
            break
        except BenchError:
            if time.monotonic() > deadline:
                raise
    for p in (mate, host_term):
        p.wait_quiet(0.3, 30)
    groups = {**host.pids(), **relay.parts(), "mate ssh": [mate.pid]}
    watched = {"agent": groups["agent"][0], "relay": groups["relay"][0]}
    if groups["workers"]:  # --replica worker (TETHER_BENCH_RELAY_ARGS)
        watched["worker"] = groups["workers"][0]
    if scenario == "echo":
        seconds = args.keys * 0.03
    else:
        text = wd.path / "flood.txt"
        make_text(text, args.mb * 1000 * 1000)
        seconds = 3600.0
    outs = {name: wd.path / f"{name}.txt" for name in watched}
    if args.loop:
        outs = {name: wd.path / f"loop-{pid}.json" for name, pid in watched.items()}
        spies = []
        for pid in watched.values():
            os.kill(pid, signal.SIGUSR1)  # count from here
    else:
        tool = _strace if args.syscalls else (lambda pid, out: _spy(pid, out, seconds))
        spies = [tool(pid, outs[name]) for name, pid in watched.items()]
        time.sleep(1.0)  # py-spy attached
    cpu0 = cpu_of(groups)
    t0 = time.perf_counter()
    if scenario == "echo":
        for i in range(args.keys):
            ch = b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36 : i % 36 + 1]
            mate.drain()
            host_term.drain()
            mate.write(ch)
            wait_visible_all([(mate, ch), (host_term, ch)], 5)
            if i % 36 == 35:
                mate.write(b"\r")
                mate.wait_quiet(0.1)
                host_term.wait_quiet(0.1)
            time.sleep(0.02)
    else:
        host_term.write(f"cat {text}; echo PROFILE-DONE-$((40+2))\r".encode())
        wait_visible_all([(host_term, b"PROFILE-DONE-42"), (mate, b"PROFILE-DONE-42")], 1800)
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_of(groups)
    for name, pid in watched.items() if args.loop else ():
        os.kill(pid, signal.SIGUSR2)  # write the count
        deadline = time.monotonic() + 10
        while not outs[name].exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    for s in spies:
        s.send_signal(2)  # py-spy writes its file on SIGINT
    for s in spies:
        try:
            s.wait(30)
        except subprocess.TimeoutExpired:
            s.kill()
            s.wait()
    tool_name = ("loopstats" if args.loop else "strace" if args.syscalls
                 else "py-spy (250 Hz)")
    print(f"{scenario}: {elapsed:.1f}s under {tool_name}")
    print("CPU seconds: " + ", ".join(
        f"{k} {cpu1[k] - cpu0[k]:.2f}" for k in groups if cpu1[k] - cpu0[k] > 0))
    for name, out in outs.items():
        print(f"\n== {name} (pid {watched[name]})")
        if args.loop:
            print(loop_report(out, args.keys) if out.exists() else "  (nothing written)")
        elif args.syscalls:
            print(out.read_text() if out.exists() else "  (strace wrote nothing)")
        else:
            print(summarize(out) if out.exists() else "  (py-spy wrote nothing)")


def profile_startup() -> None:
    """The agent under py-spy from its first instruction until the session is shared."""
    with Workdir("profile") as wd:
        relay = Relay(wd)
        home = wd.path / "host"
        write_host_home(home, relay.conf(), TMUX_CONF)
        env = wd.env(home)
        sock = str(home / "s.sock")
        subprocess.run(["tmux", "-S", sock, "-f", str(home / ".tmux.conf"), "new-session", "-d",
                        "-x", "80", "-y", "24"], check=True, env=env)
        wd.on_close(lambda: tmux(sock, "kill-server", check=False))
        session = tmux(sock, "display", "-p", "#{session_id}").strip()
        out = wd.path / "agent.txt"
        t0 = time.perf_counter()
        spy = subprocess.Popen(
            ["py-spy", "record", "-r", "1000", "--format", "raw", "-o", str(out), "--",
             sys.executable, "-m", "tether", "_agent", "--socket", sock, "--session", session],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["tmux", "-S", sock, "wait-for", "tether-ready"], env=env, timeout=60,
                       check=True)
        ready = time.perf_counter() - t0
        tmux(sock, "kill-server", check=False)
        spy.wait(30)
        print(f"startup: agent ready {ready * 1000:.0f} ms after exec (under py-spy, 1 kHz)")
        print(summarize(out, 20))
        stacks = collections.Counter[str]()
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                frames = stack.split(";")
                imp = next((f for f in frames if f.startswith("<module> (")), None)
                if any("_find_and_load" in f for f in frames):
                    stacks["imports"] += int(n)
                elif imp is not None:
                    stacks["module-level code"] += int(n)
                else:
                    stacks["running"] += int(n)
        total = sum(stacks.values()) or 1
        print("  phases: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in
                                       stacks.most_common()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["echo", "flood", "startup"])
    ap.add_argument("--keys", type=int, default=300, help="keystrokes (echo)")
    ap.add_argument("--mb", type=int, default=5, help="file size in MB (flood)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count system calls with strace -c instead of sampling with py-spy")
    ap.add_argument("--loop", action="store_true",
                    help="CPU per event-loop callback per key (bench/loopstats), no py-spy")
    a = ap.parse_args(argv)
    if a.loop and a.scenario != "echo":
        ap.error("--loop goes with echo (its figures are per keystroke)")
    if shutil.which("py-spy") is None and not (a.loop or a.syscalls):
        print("bench.profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    if a.scenario == "startup":
        profile_startup()
    else:
        profile_running(a.scenario, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
