"""Scripted timelines (TOML) of impairment and host events, replayed against a Network.

Example::

    seed = 7                      # optional, like --seed
    [[at]]
    t = 5
    move = {host = "a", link = "lte"}
    [[at]]
    t = 10
    blackout = {link = "a", seconds = 3}
    set = {link = "a.eth0", delay = "100ms", loss = "20%"}

A file is validated completely before any namespace is created, so a typo
fails fast instead of half-way through a long run.
"""

from __future__ import annotations

import heapq
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .network import Link, Network, Topology, normalize_params
from .units import parse_duration

# action -> (required keys, optional keys); impairment keys are extra for set.
ACTIONS: dict[str, tuple[set[str], set[str]]] = {
    "move": ({"host", "link"}, set()),
    "readdress": ({"host"}, set()),
    "blackout": ({"link", "seconds"}, {"direction"}),
    "set": ({"link"}, {"direction", "seed"}),
    "clear": ({"link"}, {"direction"}),
    "block_udp": ({"host"}, {"on"}),
    "nat": ({"host"}, {"on"}),
    "nat_rebind": ({"host"}, set()),
    "suspend": (set(), {"target", "seconds"}),
    "resume": (set(), {"target"}),
}
_IMPAIR_KEYS = {
    "delay",
    "jitter",
    "loss",
    "burst_loss",
    "burst_bad_loss",
    "reorder",
    "reorder_delay",
    "duplicate",
    "rate",
    "limit",
}


@dataclass(order=True)
class Action:
    t: float
    order: int
    kind: str = field(compare=False)
    args: dict[str, Any] = field(compare=False)


@dataclass
class Scenario:
    actions: list[Action]
    seed: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scenario:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        try:
            return cls.parse(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Scenario:
        unknown = set(data) - {"seed", "at"}
        if unknown:
            raise ValueError(f"unknown top-level key(s) {sorted(unknown)}; use seed and [[at]]")
        seed = data.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        actions: list[Action] = []
        for i, step in enumerate(data.get("at", [])):
            if not isinstance(step, dict) or "t" not in step:
                raise ValueError(f"[[at]] #{i + 1} needs t = SECONDS")
            t = parse_duration(step["t"])
            for kind, args in step.items():
                if kind == "t":
                    continue
                if kind not in ACTIONS:
                    raise ValueError(f"t={t}: unknown action {kind!r}; known: {sorted(ACTIONS)}")
                if not isinstance(args, dict):
                    raise ValueError(f"t={t}: {kind} needs a table, e.g. {kind} = {{...}}")
                _check_args(t, kind, args)
                actions.append(Action(t, len(actions), kind, dict(args)))
        return cls(sorted(actions), seed)

    def check(self, topology: Topology) -> None:
        """Fail before starting if the timeline names hosts or links the topology lacks."""
        for a in self.actions:
            if "host" in a.args and a.args["host"] not in topology.hosts:
                raise ValueError(f"t={a.t}: {a.kind}: unknown host {a.args['host']!r}")
            if a.kind == "move" and a.args["link"] not in topology.hosts[a.args["host"]]:
                raise ValueError(f"t={a.t}: move: host has no link {a.args['link']!r}")
            if "link" in a.args and a.kind != "move":
                resolve_links(topology, a.args["link"])


def _check_args(t: float, kind: str, args: dict[str, Any]) -> None:
    required, optional = ACTIONS[kind]
    missing = required - set(args)
    if missing:
        raise ValueError(f"t={t}: {kind} is missing {sorted(missing)}")
    extra = set(args) - required - optional - (_IMPAIR_KEYS if kind == "set" else set())
    if extra:
        raise ValueError(f"t={t}: {kind} does not take {sorted(extra)}")
    if kind == "set":
        normalize_params(**{k: v for k, v in args.items() if k in _IMPAIR_KEYS})
    if "seconds" in args:
        parse_duration(args["seconds"])
    if args.get("direction", "both") not in ("up", "down", "both"):
        raise ValueError(f"t={t}: direction must be up, down or both")


def resolve_links(topology: Topology, spec: str) -> list[str]:
    """``"host.link"`` -> that link; ``"host"`` -> all its links; ``"*"`` -> every link."""
    if spec == "*":
        return [f"{h}.{ln}" for h, ls in topology.hosts.items() for ln in ls]
    host, _, link = spec.partition(".")
    if host not in topology.hosts:
        raise ValueError(f"unknown host in link {spec!r}")
    if not link:
        return [f"{host}.{ln}" for ln in topology.hosts[host]]
    if link not in topology.hosts[host]:
        raise ValueError(f"host {host!r} has no link {link!r}")
    return [spec]


class ScenarioRunner:
    """Plays a Scenario on a thread, relative to ``start()``; errors are logged, not fatal."""

    def __init__(
        self,
        net: Network,
        scenario: Scenario,
        targets: dict[str, int] | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.net = net
        self.queue = list(scenario.actions)
        heapq.heapify(self.queue)
        self.targets = targets or {}  # name -> pid for suspend/resume (e.g. "cmd")
        self.report = report or (lambda msg: print(msg, file=sys.stderr))
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netsim-scenario", daemon=True)
        self._t0 = 0.0

    def start(self) -> ScenarioRunner:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def _links(self, spec: str) -> list[Link]:
        return [self.net.link(k) for k in resolve_links(self.net.topology, spec)]

    def _pid(self, args: dict[str, Any]) -> int:
        target = args.get("target", "cmd")
        if isinstance(target, int):
            return target
        if target not in self.targets:
            raise ValueError(f"unknown suspend target {target!r}; known: {sorted(self.targets)}")
        return self.targets[target]

    def _run(self) -> None:
        while self.queue and not self._stop.is_set():
            action = self.queue[0]
            if self._stop.wait(max(0.0, self._t0 + action.t - time.monotonic())):
                return
            heapq.heappop(self.queue)
            try:
                self.apply(action)
            except Exception as e:  # a bad step must not kill the run
                msg = f"netsim: scenario t={action.t}: {action.kind} failed: {e}"
                self.errors.append(msg)
                self.net.log("scenario_error", action=action.kind, error=str(e))
                self.report(msg)

    def apply(self, action: Action) -> None:
        a, net = action.args, self.net
        if action.kind == "move":
            net.move(a["host"], a["link"])
        elif action.kind == "readdress":
            net.readdress(a["host"])
        elif action.kind == "blackout":
            for link in self._links(a["link"]):
                link.blackout(a["seconds"], a.get("direction", "both"))
        elif action.kind == "set":
            params = {k: v for k, v in a.items() if k in _IMPAIR_KEYS}
            for link in self._links(a["link"]):
                link.set(direction=a.get("direction", "both"), seed=a.get("seed"), **params)
        elif action.kind == "clear":
            for link in self._links(a["link"]):
                link.clear(a.get("direction", "both"))
        elif action.kind == "block_udp":
            net.block_udp(a["host"], bool(a.get("on", True)))
        elif action.kind == "nat":
            net.nat(a["host"], bool(a.get("on", True)))
        elif action.kind == "nat_rebind":
            net.nat_rebind(a["host"])
        elif action.kind == "suspend":
            pid = self._pid(a)
            net.suspend(pid)
            if "seconds" in a:
                at = action.t + parse_duration(a["seconds"])
                resume = {"target": a.get("target", "cmd")}
                heapq.heappush(self.queue, Action(at, -1, "resume", resume))
        elif action.kind == "resume":
            net.resume(self._pid(a))
        else:  # pragma: no cover - parse() rejects unknown kinds
            raise ValueError(action.kind)


def resume_all(pids: list[int]) -> None:
    """SIGCONT everything we may have stopped so teardown can terminate it."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
