"""Who is connected to the shared session, as the host agent sees it.

The relay lists the session's mates (``Mates``, through ``HostEndpoint``'s
``MatesChanged``) on every join and leave; ``Presence`` keeps the list, says
who came and went (a tmux message on the host's clients, a line in
``tether show-messages``) and serves ``tether list-mates`` and
``tether kick-mate`` (``agent.py``'s control socket).

Every string in the list comes from the relay, and the host does not let the
relay run anything on it: fields are cut to ``MAX_FIELD`` characters and
control characters (a newline would end a tmux command line in control mode)
become ``?`` before they go anywhere; the tmux message escapes ``#`` and quotes
its argument on top (``agent._display_all``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence

from tether.core.messages import MateInfo

MAX_FIELD = 100
"""Longest address, fingerprint or kind shown (a fingerprint is 50, an IPv6
address with its port 47)."""
MORE = "more"
"""The kind of the relay's last entry when it cut a long list (id 0, no mate):
its address says how many were left out (``relay.session.MORE``)."""
MAX_SHOWN = 3
"""Changes in one update shown each on the host's screen; past it, one line
sums them up (each is still logged), so a crowd arriving is one message."""

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
Publish = Callable[[str, bool], None]


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` from the relay, safe on one line: no control characters, bounded."""
    text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cleaned(m: MateInfo) -> MateInfo:
    return MateInfo(m.id, clean(m.kind, 20), m.readonly, clean(m.address), clean(m.fingerprint))


def describe(m: MateInfo) -> str:
    """``web, read-only, 192.0.2.7:5000`` (and the key, when the mate proved one)."""
    parts = [m.kind, "read-only" if m.readonly else "read-write"]
    if m.address:
        parts.append(m.address)
    if m.fingerprint:
        parts.append(f"key {m.fingerprint}")
    return ", ".join(parts)


class Presence:
    """The session's mates as the relay last listed them."""

    def __init__(self, publish: Publish) -> None:
        self.publish = publish
        self.mates: dict[int, MateInfo] = {}
        self.more = ""
        """The relay cut the list: how many it left out ("": none)."""
        self.changed = asyncio.Event()
        """Set on every update (a kick waits for its mate to be gone)."""

    def update(self, mates: Sequence[MateInfo]) -> list[str]:
        """The relay's new list: say who joined and left (returned, for tests)."""
        new: dict[int, MateInfo] = {}
        more = ""
        for m in mates:
            if m.id == 0 and m.kind == MORE:
                more = clean(m.address)
            else:
                new[m.id] = cleaned(m)
        said: list[tuple[str, bool]] = []
        for mid, m in new.items():
            old = self.mates.get(mid)
            if old is None:
                said.append((f"mate {mid} joined ({describe(m)})", True))
            elif old != m:  # a join client's link went down or came back, or it moved
                said.append((f"mate {mid} is now {describe(m)}", False))
        for mid, m in self.mates.items():
            if mid not in new:
                said.append((f"mate {mid} left ({describe(m)})", True))
        if more and more != self.more:
            said.append((f"the relay lists only some mates: {more}", False))
        self.mates, self.more = new, more
        shown = [text for text, show in said if show]
        for text, show in said:
            self.publish(text, show and len(shown) <= MAX_SHOWN)
        if len(shown) > MAX_SHOWN:
            came = sum(1 for t in shown if " joined " in t)
            self.publish(f"{came} mates joined and {len(shown) - came} left "
                         f"({len(new)} connected; tether list-mates)", True)
        self.changed.set()
        return [text for text, _ in said]

    def rows(self) -> list[dict[str, object]]:
        """The list for ``tether list-mates``, by id."""
        return [
            {"id": m.id, "kind": m.kind, "readonly": m.readonly, "address": m.address,
             "fingerprint": m.fingerprint}
            for m in sorted(self.mates.values(), key=lambda m: m.id)
        ]

    async def gone(self, mate: int, timeout: float) -> bool:
        """Wait until the relay no longer lists ``mate`` (False: not within ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while mate in self.mates:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return mate not in self.mates
        return True
