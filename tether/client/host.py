"""The host agent: replicates the user's tmux session to a relay.

It attaches to the session's tmux server in control mode, turns what tmux
reports into replication events (pane bytes, structure, status line, key
bindings, pane images), and applies what mates do (keys into panes, the
host's own key bindings run at the mate's pane). The connection to the relay
comes and goes; the log replays what the relay missed, or a snapshot replaces
it when the relay is too far behind.

The parts: ``tmux_side`` (tmux to events, input to tmux), ``relay_side`` (links,
an adapter over the sans-I/O ``HostEndpoint`` that holds the protocol) and
``status`` (the link on the status line). ``HostAgent`` wires them together and
watches the tmux session for its end.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess

from tether.core.host_endpoint import HostEndpoint
from tether.mirror.capture import (  # re-exported: they lived here (bench uses them)
    STATUS_FORMAT,
    WINDOW_FORMAT,
    parse_bindings,
    split_confirm,
)
from tether.transport.children import Child
from tether.transport.link import Link
from tether.transport.netwatch import NetWatch
from tether.transport.reconnect import Connector
from tether.transport.tmux import TmuxControl, TmuxError

from .relay_side import Publish, RelaySide, discard_link
from .status import StatusLine
from .tmux_side import TmuxSide

__all__ = [
    "STATUS_FORMAT",
    "WINDOW_FORMAT",
    "HostAgent",
    "Publish",
    "discard_link",
    "parse_bindings",
    "split_confirm",
]

log = logging.getLogger("tether.host")

END_TEXT = "the host's tmux session ended"
END_WITHIN = 8.0
"""How long an ended host keeps trying to tell the relay (a QUIC handshake, or
an SSH login, may be under way)."""
REATTACH_MAX = 1000
"""How often tmux may drop the agent's control client before the agent gives up."""


class HostAgent:
    """One shared tmux session: its tmux side, its relay side, its status line."""

    def __init__(
        self,
        socket: str,
        session: str,
        connector: Connector,
        publish: Publish | None = None,
        mate_keys: tuple[str, ...] = (),
    ) -> None:
        self.socket = socket
        self.session_name = session
        self.publish: Publish = publish or (lambda text, show: None)
        self.exited = asyncio.Event()
        self.endpoint = HostEndpoint(mate_keys=mate_keys)
        self.side = TmuxSide(socket, session, self.endpoint, self._changed)
        self.relay = RelaySide(self.endpoint, connector, self.side, self.publish, self.exited)
        self.status_line = StatusLine()

    def _changed(self) -> None:
        self.relay.changed()

    @property
    def tmux(self) -> TmuxControl:
        """The current control client (a new one after tmux dropped ours)."""
        return self.side.tmux

    @property
    def early(self) -> asyncio.Task[Link] | None:
        return self.relay.early

    @early.setter
    def early(self, task: asyncio.Task[Link] | None) -> None:
        self.relay.early = task

    @property
    def ready(self) -> asyncio.Event:
        """Set once the connection strings are published (``tether-ready``)."""
        return self.relay.ready

    @property
    def link(self) -> Link | None:
        return self.relay.link

    def state_text(self) -> str:
        """What the status line says about the link, mosh-style."""
        link = self.relay.link
        return self.status_line.text(
            link.kind if link is not None else None, self.endpoint.last_contact,
            self.endpoint.rtt, self.relay.back, self.endpoint.unanswered_since,
        )

    async def run(self) -> None:
        """Replicate until the tmux session ends; reconnect with backoff forever."""
        await self.side.start()
        netwatch = NetWatch(self.relay.network_changed)
        netwatch.start()
        poller = asyncio.create_task(self.side.poll(self.exited))
        connector = asyncio.create_task(self.relay.connect_loop())
        shower = asyncio.create_task(
            self.status_line.show(
                lambda: self.side.tmux,
                self.session_name,
                self.state_text,
                self.relay.state_changed,
            )
        )
        try:
            await self._watch_control()
            self.exited.set()
            await self._end()
        finally:
            netwatch.close()
            poller.cancel()
            connector.cancel()
            shower.cancel()
            self.relay.close()
            self.side.stop_frames()
            await self.side.tmux.close()

    async def stop(self, why: str) -> None:
        """Asked to stop (a signal): nobody replicates the session any more, so
        end it at the relay too (``run`` is still running its connect loop)."""
        await self._end(why)

    async def _end(self, why: str = END_TEXT) -> None:
        """End the session at the relay before the agent exits, on whatever link
        comes (the connect loop runs on), and wait until the relay has it: a
        session left behind lingers for ``--host-away-timeout``."""
        try:
            async with asyncio.timeout(END_WITHIN):
                await self.relay.end(why)
                await self.relay.ended.wait()
        except TimeoutError:
            log.warning("could not tell the relay within %.0fs that the session ended",
                        END_WITHIN)

    async def _watch_control(self) -> None:
        """Return when the session is gone; reattach if only our control client was."""
        for _ in range(REATTACH_MAX):
            closed = self.side.tmux.closed
            assert closed is not None
            await closed
            if not await self._session_alive():
                return
            log.warning(
                "tmux dropped our control client (%s); reattaching",
                self.side.exit_reason or "no reason given",
            )
            self.side.exit_reason = ""
            try:
                await self.side.reattach()  # a snapshot then replaces the backlog
            except (TmuxError, TimeoutError):
                return

    async def _session_alive(self) -> bool:
        proc = Child(subprocess.Popen(
            ["tmux", "-S", self.socket, "has-session", "-t", self.session_name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return await proc.wait() == 0
