"""`tether relay` as a user runs it, on loopback (or in a namespace through ``prefix``)."""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .env import tether_cmd, tether_env
from .procs import HarnessError, descendants, free_port, processes


class KeyCache:
    """One set of relay host keys reused by every relay of a run: RSA-3072
    generation takes seconds, and benchmarks start many relays."""

    def __init__(self) -> None:
        self._keys: Path | None = None

    def restore(self, keys: Path) -> None:
        """Put the cached keys at ``keys`` (nothing yet: the relay makes them)."""
        if self._keys is not None and self._keys.is_dir():
            shutil.copytree(self._keys, keys)

    def save(self, keys: Path) -> None:
        if self._keys is not None and self._keys.is_dir():
            return
        cache = Path(tempfile.mkdtemp(prefix="tb-keys-"))
        shutil.copytree(keys, cache / "keys")
        self._keys = cache / "keys"
        atexit.register(shutil.rmtree, cache, True)


def _sock(argv: list[str]) -> str | None:
    """The ``-S`` socket of a tmux command line (None: none given)."""
    i = argv.index("-S") if "-S" in argv else -1
    return argv[i + 1] if 0 <= i < len(argv) - 1 else None


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class RelayProcess:
    """`tether relay` in ``workdir`` (keys, log), waited for until it printed its config.

    Without ``env``, the relay gets a home in ``workdir`` and a short TMPDIR of its
    own, where a test can look at the replicas' directories (short: the tmux sockets
    in them have 108 bytes at most). ``public=None`` leaves -h to the relay's default.
    """

    def __init__(self, workdir: Path, port: int | None = None, *extra: str,
                 prefix: Sequence[str] = (), bind: str = "127.0.0.1",
                 public: str | None = "127.0.0.1", env: dict[str, str] | None = None,
                 verbose: bool = True, keys: KeyCache | None = None,
                 keep_output: bool = True, stop_timeout: float = 10.0,
                 cwd: Path | None = None) -> None:
        self.workdir = self.dir = workdir
        self.public = public or "127.0.0.1"
        self.stop_timeout = stop_timeout
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = workdir / "relay.log"
        self._own_tmp = env is None
        if env is None:
            env = tether_env(workdir)
            env["TMPDIR"] = tempfile.mkdtemp(prefix="tether-test-")
        self.tmp = Path(env.get("TMPDIR") or tempfile.gettempdir())
        if keys is not None:
            keys.restore(workdir / "keys")
        argv = tether_cmd("relay", "-k", str(workdir / "keys"), "-b", bind)
        argv += ["-h", public] if public else []
        # TETHER_TEST_RELAY_ARGS: more flags for every test's relay, e.g. the
        # whole suite's mates through SSH front processes ("--ssh-procs 2")
        more = shlex.split(os.environ.get("TETHER_TEST_RELAY_ARGS", ""))
        argv += ["-p", str(self.port), "-l", str(self.log), *(["-v"] if verbose else []),
                 *more, *extra]
        self.proc = subprocess.Popen(
            [*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=cwd,
        )
        self.banner = self._read_banner()
        self.config_lines = [ln.strip() for ln in self.banner if ln.strip().startswith("set -g")]
        self.fingerprint = next(
            (ln.split()[-1] for ln in self.config_lines if "ed25519" in ln), "")
        self.web_base = next((ln.split("links ", 1)[1].strip().removesuffix("/t/TOKEN")
                              for ln in self.banner if ln.startswith("Browser mates:")), "")
        """The web front's base URL (``--web-port``), e.g. ``http://127.0.0.1:8080``."""
        if not keep_output:
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        if keys is not None:
            keys.save(workdir / "keys")

    def _read_banner(self) -> list[str]:
        """Its output up to the last fingerprint: then it listens."""
        assert self.proc.stdout is not None
        banner: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise HarnessError(f"relay exited: {''.join(banner)}")
            banner.append(line)
            if "fingerprint" in line and "rsa" in line:
                break
        return banner

    @property
    def pid(self) -> int:
        return self.proc.pid

    def replica_dirs(self) -> list[Path]:
        """The session directories of this relay's replicas (jailed or not)."""
        return sorted(self.tmp.glob("tether-relay-*/tether-replica-*")) + sorted(
            self.tmp.glob("tether-replica-*")
        )

    def conf(self, port: int | None = None) -> str:
        """A host's ~/.tether.conf for this relay (``port``: e.g. a proxy's)."""
        lines = []
        for ln in self.config_lines:
            if "tether-server-host" in ln:
                ln = f"set -g tether-server-host {self.public}"
            elif "tether-server-port" in ln and port is not None:
                ln = f"set -g tether-server-port {port}"
            lines.append(ln)
        return "\n".join(lines) + "\n"

    def parts(self) -> dict[str, list[int]]:
        """The relay's processes by role: the relay, its SSH front processes
        (``--ssh-procs``), its session processes (``--session-procs``), jail wrappers (bwrap) if the
        workers are jailed, replica workers, replica tmux servers and their pane
        processes, replica tmux clients (the workers' control clients and mates')."""
        procs = processes()
        below = descendants(self.pid, procs)
        workers = [p for p in below
                   if any("tether.relay.worker" in a for a in p.argv)
                   and _base(p.argv[0]) != "bwrap"]
        socks = {os.path.join(p.argv[-1], "tmux.sock") for p in workers}
        # replicas fed by the relay itself: their tmux runs below the relay (jailed)
        # or, daemonised, anywhere (unjailed), named by the socket in its command line
        socks |= {s for p in below if _base(p.argv[0]) == "tmux" and (s := _sock(p.argv))}
        tmuxes = [p for p in procs if _base(p.argv[0]) == "tmux" and _sock(p.argv) in socks]
        ids = {p.pid for p in tmuxes}
        servers, clients, panes = [], [], []
        for p in tmuxes:
            under = descendants(p.pid, procs)
            # a server runs in the foreground (-D, the relay's own replicas) or has
            # panes (a worker's control client, started by new-session, has none)
            if "-D" in p.argv or ("new-session" in p.argv and under):
                servers.append(p.pid)
                panes += [d.pid for d in under if d.pid not in ids]
            else:
                clients.append(p.pid)
        fronts = [p.pid for p in below if any("tether.relay.front" in a for a in p.argv)]
        owners = [p.pid for p in below if any("tether.relay.owner" in a for a in p.argv)]
        known = {self.pid, *servers, *clients, *panes, *(p.pid for p in workers), *fronts,
                 *owners}
        jail = [p.pid for p in below if _base(p.argv[0]) == "bwrap"]
        other = [p.pid for p in below if p.pid not in known and p.pid not in jail]
        return {
            "relay": [self.pid],
            "ssh fronts": fronts,
            "session processes": owners,
            "jail (bwrap)": jail,
            "workers": [p.pid for p in workers],
            "replica tmux servers": servers,
            "replica panes": panes,
            "replica tmux clients": clients,
            "other": other,
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
