"""The host agent: replicates the user's tmux session to a relay.

It attaches to the session's tmux server in control mode, turns what tmux
reports into replication events (pane bytes, structure, status line, key
bindings, pane images), and applies what mates do (keys into panes, the
host's own key bindings run at the mate's pane). The connection to the relay
comes and goes; the log (``LogSender``) replays what the relay missed, or a
snapshot replaces it when the relay is too far behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from tether.core.codec import compress
from tether.core.control import Notification, PaneOutput, Reply, layout_panes, quote
from tether.core.errors import AuthError, RemoteProtocolError
from tether.core.inputs import InputReceiver
from tether.core.limits import MAX_DATA
from tether.core.messages import (
    PROTOCOL_VERSION,
    STATUS_OPTIONS,
    Ack,
    Binding,
    Bindings,
    End,
    Error,
    Event,
    Frame,
    Hello,
    Input,
    InputAck,
    Message,
    Notice,
    Output,
    PaneImage,
    PaneReset,
    Ping,
    Pong,
    Resize,
    Snapshot,
    Status,
    Structure,
    Welcome,
    Window,
)
from tether.core.replog import LogSender
from tether.core.screen import PANE_FORMAT, parse_pane_state, render_pane
from tether.transport.link import Link, LinkClosed
from tether.transport.reconnect import Connector
from tether.transport.tmux import TmuxControl, TmuxError, tmux_cmd

log = logging.getLogger("tether.host")

HISTORY_LINES = 2000
"""Scrollback lines a pane image carries."""

LOCAL_COMMANDS = {
    "detach-client",
    "copy-mode",
    "choose-tree",
    "choose-client",
    "choose-buffer",
    "command-prompt",
    "display-panes",
    "clock-mode",
    "customize-mode",
    "show-messages",
    "list-keys",
    "refresh-client",
    "suspend-client",
    "switch-client",
    "list-buffers",
    "display-message",
    "display-menu",
    "display-popup",
    "send-prefix",
    "paste-buffer",
    "choose-window",
    "choose-session",
    "show-buffer",
}
"""Bindings that act on the mate's own client, so the replica keeps its own."""

STATUS_FORMAT = "\x1f".join(
    ["#{prefix}"]
    + [
        f"#{{T:{name}}}" if name in ("status-left", "status-right") else f"#{{{name}}}"
        for name in STATUS_OPTIONS
    ]
)
"""One ``display -p`` for the prefix and every replicated status option, left and
right rendered as the host renders them."""
WINDOW_FORMAT = "\x1f".join(
    [
        "#{window_id}",
        "#{window_index}",
        "#{window_active}",
        "#{window_layout}",
        "#{pane_id}",
        "#{window_name}",
    ]
)
_BIND = re.compile(r"^bind-key\s+(?:-r\s+)?-T\s+(\S+)\s+(\S+)\s+(.*)$")


@dataclass
class Shared:
    """What the relay told us: published to tmux options for `display -p`."""

    session: str
    secret: bytes
    rw_token: str
    ro_token: str
    ssh_rw: str
    ssh_ro: str


Publish = Callable[[str, bool], None]
"""(text, show): log a message; ``show`` also displays it on the host's clients."""
PING_EVERY = 0.5
PING_IDLE = 1.0
"""After IDLE_AFTER seconds without typing or output: a ping costs the relay about
1.5 ms of CPU, which decides how many idle sessions one relay holds."""
IDLE_AFTER = 5.0
DEAD_AFTER = 8.0
"""Seconds without a word from the relay before the link is given up and replaced."""
ACK_EVERY = 0.03
"""Input acks are coalesced: the relay needs them only to trim its resend buffer."""
FLOOD_WINDOW = 0.1
FLOOD_BYTES = 64 * 1024
"""A pane printing more than this within FLOOD_WINDOW is sent as frames instead of
bytes: mates see its screen every FRAME_EVERY, mosh-style, instead of replaying
every byte a `cat` of a big file or a fast redraw printed. Typing and ordinary
output stay far below it."""
FRAME_EVERY = 0.05


def _split_output(pane: int, data: bytes) -> list[Output]:
    step = MAX_DATA // 2
    return [Output(pane, data[i : i + step]) for i in range(0, len(data), step)]


def parse_bindings(lines: list[str]) -> dict[tuple[str, str], str]:
    """``list-keys`` output to {(table, key): command}, keeping forwardable ones."""
    out: dict[tuple[str, str], str] = {}
    for line in lines:
        m = _BIND.match(line.strip())
        if not m:
            continue
        table, key, command = m.groups()
        if table not in ("prefix", "root"):
            continue
        if table == "root" and (key.startswith(("Mouse", "Wheel", "Double", "Triple"))):
            continue
        first = command.split(None, 1)[0] if command else ""
        if first in LOCAL_COMMANDS or not first:
            continue
        out[(table, key)] = command
    return out


def split_confirm(command: str) -> tuple[str, str]:
    """``confirm-before -p "kill? (y/n)" kill-pane`` -> (``kill-pane``, ``kill? (y/n)``).

    The mate's replica client asks the question; the host then runs the command."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command, ""
    if not words or words[0] != "confirm-before":
        return command, ""
    i, prompt = 1, ""
    while i < len(words) and words[i].startswith("-"):
        if words[i] == "-p" and i + 1 < len(words):
            prompt = words[i + 1]
        i += 2 if words[i] in ("-p", "-t", "-c") else 1
    inner = " ".join(words[i:])
    return inner, prompt or f"{inner.split(' ', 1)[0]}? (y/n)"


def strip_confirm(command: str) -> str:
    return split_confirm(command)[0]


def discard_link(task: asyncio.Task[Link]) -> None:
    """Cancel a connection attempt, closing its link if it already made one."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


class HostAgent:
    def __init__(
        self,
        socket: str,
        session: str,
        connector: Connector,
        publish: Publish | None = None,
        mate_keys: tuple[str, ...] = (),
    ) -> None:
        self.mate_keys = mate_keys
        self.socket = socket
        self.session_name = session
        self.connector = connector
        self._next_link: Link | None = None
        self.early: asyncio.Task[Link] | None = None
        """A first connection started before the agent knew its session (the
        SSH handshake then overlaps tmux starting)."""
        self.publish = publish or (lambda text, show: None)
        self.log = LogSender()
        self.inputs = InputReceiver()
        self._muted: set[int] = set()  # panes sent as frames: their output is skipped unread
        self.tmux = TmuxControl(socket, self._on_tmux, muted=self._muted)
        self.shared: Shared | None = None
        self.link: Link | None = None
        self.wake = asyncio.Event()
        self.structure: Structure | None = None
        self.pane_window: dict[int, int] = {}
        self.bindings: dict[tuple[str, str], str] = {}
        self.prefix = "C-b"
        self.status: Status | None = None
        self._capturing = False
        self._captured: set[int] | None = None
        self._stash: list[Output] = []
        self._structure_query = False
        self.exited = asyncio.Event()
        self.exit_reason = ""
        self.state_changed = asyncio.Event()
        self.rtt: float | None = None
        self._shown_rtt: float | None = None
        self.last_busy = 0.0  # last typing or output, for the ping rate
        self._pings: dict[int, float] = {}
        self._rate: dict[int, tuple[float, int]] = {}
        self._framing: dict[int, asyncio.Task[None]] = {}
        self.frames_sent = 0
        self._input_ack: InputAck | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self.ready = asyncio.Event()
        self.transport = "connecting"
        self.last_contact = 0.0
        self.last_error = ""

    # --- tmux side -----------------------------------------------------------

    async def start(self) -> None:
        await self.tmux.start(["attach", "-t", self.session_name])
        await self.tmux.run("refresh-client -f pause-after=4,ignore-size")
        with contextlib.suppress(TmuxError):
            await self.tmux.run(f"set -t {quote(self.session_name)} window-size smallest")
        await self._refresh_bindings()

    def _on_tmux(self, item: PaneOutput | Notification) -> None:
        if isinstance(item, PaneOutput):
            self._output(item.pane, item.data)
            return
        name, args = item.name, item.args.decode("utf-8", "replace")
        if name == "layout-change":
            parts = args.split(" ")
            if len(parts) >= 2 and self.structure is not None:
                wid = int(parts[0][1:])
                self._update_window(wid, layout=parts[1])
        elif name == "window-renamed":
            wid_s, _, new = args.partition(" ")
            if self.structure is not None:
                self._update_window(int(wid_s[1:]), name=new)
        elif name == "window-pane-changed":
            w, p = args.split(" ")[:2]
            if self.structure is not None:
                self._update_window(int(w[1:]), active_pane=int(p[1:]))
        elif name in (
            "window-add",
            "window-close",
            "unlinked-window-close",
            "session-window-changed",
            "linked-window-add",
            "unlinked-window-add",
        ):
            self.query_structure()
        elif name == "pause":
            pane = int(args.strip()[1:])
            if pane not in self._framing:  # a framed pane is paused on purpose
                self._capture_pane(pane, resume=True)
        elif name == "exit":
            self.exit_reason = args.strip()

    def _output(self, pane: int, data: bytes) -> None:
        self.last_busy = time.monotonic()
        if pane in self._framing:
            return  # frames carry this pane's screen for now
        now = time.monotonic()
        start, count = self._rate.get(pane, (now, 0))
        if now - start > FLOOD_WINDOW:
            start, count = now, 0
        count += len(data)
        self._rate[pane] = (start, count)
        if count > FLOOD_BYTES:
            self._start_frames(pane)
        if self._captured is not None:  # a snapshot capture is under way
            if pane in self._captured:
                self._stash.extend(_split_output(pane, data))
            return  # panes not captured yet: the capture will include this
        for out in _split_output(pane, data):
            self._append(out)

    def _append(self, body: Output | Structure | PaneReset | Status | Bindings) -> None:
        self.log.append(body)
        if self.log.need_snapshot and self.link is not None:
            self.request_snapshot()
        self.wake.set()

    def _update_window(self, wid: int, **changes: object) -> None:
        assert self.structure is not None
        windows = list(self.structure.windows)
        for i, w in enumerate(windows):
            if w.id == wid:
                new = Window(
                    w.id,
                    w.index,
                    str(changes.get("name", w.name)),
                    str(changes.get("layout", w.layout)),
                    int(changes.get("active_pane", w.active_pane)),  # type: ignore[call-overload]
                )
                if new == w:
                    return
                windows[i] = new
                self._set_structure(Structure(tuple(windows), self.structure.active_window))
                return
        self.query_structure()  # a window we do not know yet

    def _set_structure(self, st: Structure) -> None:
        if st == self.structure:
            return
        self.structure = st
        fresh: list[int] = []
        for w in st.windows:
            for p in layout_panes(w.layout):
                if self.pane_window.get(p) != w.id:
                    fresh.append(p)
                self.pane_window[p] = w.id
        alive = {p for w in st.windows for p in layout_panes(w.layout)}
        for p in [p for p in self.pane_window if p not in alive]:
            del self.pane_window[p]
        if self._captured is None:
            self._append(st)
            for p in fresh:
                self._capture_pane(p)

    def query_structure(self) -> None:
        if self._structure_query:
            return
        self._structure_query = True

        def done(reply: Reply) -> None:
            self._structure_query = False
            if reply.ok:
                self._set_structure(self._parse_windows(reply.lines))

        self.tmux.send(
            f"list-windows -t {quote(self.session_name)} -F {quote(WINDOW_FORMAT)}", done
        )

    @staticmethod
    def _parse_windows(lines: list[bytes]) -> Structure:
        windows = []
        active = -1
        for raw in lines:
            f = raw.decode("utf-8", "replace").split("\x1f", 5)
            if len(f) < 6:
                continue
            wid = int(f[0][1:])
            windows.append(Window(wid, int(f[1]), f[5], f[3], int(f[4][1:])))
            if f[2] == "1":
                active = wid
        return Structure(tuple(windows), active)

    def _capture_cmds(self, pane: int, history: bool = True) -> list[str]:
        # -N: trailing spaces can carry a background colour (htop's, vim's bars)
        t = f"%{pane}"
        return [
            f"display -p -t {t} {quote(PANE_FORMAT)}",
            f"capture-pane -p -e -N -t {t}" + (f" -S -{HISTORY_LINES}" if history else ""),
            f"capture-pane -p -e -N -a -q -t {t}",
        ]

    # --- frames: a flooding pane is sent as its screen, not its bytes ----------

    def _start_frames(self, pane: int) -> None:
        # tmux stops sending us the pane's output (formatting it for a control
        # client costs the host's tmux more than drawing it); "pause", not "off":
        # with no terminal attached, "off" makes tmux 3.3a stop reading the pane
        # (stalling the host's program) and can crash it. What still arrives
        # before the pause is skipped unread; frames poll the screen.
        log.info("pane %%%d floods: sending its screen every %.0f ms", pane, FRAME_EVERY * 1000)
        self._muted.add(pane)
        self.tmux.send(f"refresh-client -A {quote(f'%{pane}:pause')}")
        self._framing[pane] = asyncio.get_running_loop().create_task(self._frames(pane))
        self._rate.pop(pane, None)

    async def _frames(self, pane: int) -> None:
        last: bytes | None = None
        for _ in range(10_000_000):
            await asyncio.sleep(FRAME_EVERY)
            if pane not in self.pane_window:
                break
            frame = await self._frame(pane)
            if frame is None:
                break
            if frame == last:
                break  # a whole interval without change: back to the byte stream
            last = frame
            self._send_frame(pane, frame)
        self._end_frames(pane)

    def _stop_frames(self) -> None:
        for task in self._framing.values():
            task.cancel()
        self._framing.clear()
        self._muted.clear()

    async def _frame(self, pane: int) -> bytes | None:
        parts: list[Reply] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def got(reply: Reply) -> None:
            parts.append(reply)
            if len(parts) == 3 and not done.done():
                done.set_result(None)

        for cmd in self._capture_cmds(pane, history=False):
            self.tmux.send(cmd, got)
        await done
        image = self._image(pane, parts)
        return image.data if image is not None else None

    def _send_frame(self, pane: int, frame: bytes) -> None:
        self.frames_sent += 1
        packed = compress(frame)
        if len(packed) <= MAX_DATA:
            self._append(Frame(pane, packed))
        else:  # incompressible and huge: as plain bytes
            for out in _split_output(pane, frame):
                self._append(out)

    def _end_frames(self, pane: int) -> None:
        """One exact frame, then bytes again: tmux answers the capture in order
        with the output, so what it printed before the reply is in the frame and
        what follows is sent as bytes."""
        self.tmux.send(f"refresh-client -A {quote(f'%{pane}:continue')}")
        parts: list[Reply] = []

        def got(reply: Reply) -> None:
            parts.append(reply)
            if len(parts) < 3:
                return
            if self._captured is not None:
                # a snapshot is being taken and may supersede this frame: keep framing
                self._start_frames(pane)
                return
            self._framing.pop(pane, None)
            self._muted.discard(pane)
            log.info("pane %%%d calm again: sending its output", pane)
            image = self._image(pane, parts)
            if image is not None:
                self._send_frame(pane, image.data)

        for cmd in self._capture_cmds(pane, history=False):
            self.tmux.send(cmd, got)

    def _capture_pane(self, pane: int, resume: bool = False) -> None:
        """Queue a capture; the image enters the log exactly where tmux took it."""
        parts: list[Reply] = []

        def got(reply: Reply) -> None:
            parts.append(reply)
            if len(parts) < 3:
                return
            image = self._image(pane, parts)
            if image is not None and self._captured is None and not self.log.need_snapshot:
                self._append(PaneReset(image))

        for cmd in self._capture_cmds(pane):
            self.tmux.send(cmd, got)
        if resume:
            self.tmux.send(f"refresh-client -A {quote(f'%{pane}:continue')}")

    @staticmethod
    def _image(pane: int, parts: list[Reply]) -> PaneImage | None:
        info, content, normal = parts
        if not info.ok or not content.ok or not info.lines:
            return None
        state = parse_pane_state(info.lines[0].decode("ascii", "replace"))
        lines = content.lines
        height = state.height
        history, screen = lines[:-height] if height else lines, lines[-height:] if height else []
        normal_lines = normal.lines if normal.ok and state.alternate else None
        data = render_pane(state, history, screen, normal_lines)
        while len(data) > MAX_DATA and history:
            history = history[len(history) // 4 + 1 :]
            data = render_pane(state, history, screen, normal_lines)
        return PaneImage(pane, data[-MAX_DATA:])

    def request_snapshot(self) -> None:
        """Capture everything and put a snapshot in the log at the capture point."""
        if self._capturing:
            return
        self._capturing = True
        asyncio.get_running_loop().create_task(self._snapshot())

    async def _snapshot(self) -> None:
        try:
            lines = await self.tmux.run(
                f"list-panes -s -t {quote(self.session_name)} -F '#{{pane_id}}'"
            )
            panes = [int(x.strip()[1:]) for x in lines if x.strip().startswith("%")]
            await self._refresh_bindings()
            status = await self._read_status()
            images: dict[int, PaneImage] = {}
            self._captured = set()
            self._stash = []
            finished = asyncio.get_running_loop().create_future()
            pending = len(panes)

            def per_pane(pane: int) -> Callable[[Reply], None]:
                parts: list[Reply] = []

                def got(reply: Reply) -> None:
                    nonlocal pending
                    parts.append(reply)
                    if len(parts) < 3:
                        return
                    assert self._captured is not None
                    self._captured.add(pane)
                    image = self._image(pane, parts)
                    if image is not None:
                        images[pane] = image
                    pending -= 1

                return got

            for p in panes:
                cb = per_pane(p)
                for cmd in self._capture_cmds(p):
                    self.tmux.send(cmd, cb)

            def structure_done(reply: Reply) -> None:
                # Runs synchronously at this point of tmux's stream: every output
                # before it is in the images, every output after it follows them.
                st = self._parse_windows(reply.lines) if reply.ok else Structure((), -1)
                self.structure = st
                self.pane_window = {p: w.id for w in st.windows for p in layout_panes(w.layout)}
                self.log.push_snapshot(
                    Snapshot(st, status, Bindings(self.prefix, self._binding_list()))
                )
                for p in panes:
                    if p in images:
                        self.log.append(PaneReset(images[p]))
                stash, self._stash, self._captured = self._stash, [], None
                for out in stash:
                    self.log.append(out)
                self.wake.set()
                if not finished.done():
                    finished.set_result(None)

            self.tmux.send(
                f"list-windows -t {quote(self.session_name)} -F {quote(WINDOW_FORMAT)}",
                structure_done,
            )
            await finished
        except TmuxError as exc:
            log.warning("snapshot failed: %s", exc)
            self._captured = None
        finally:
            self._capturing = False

    def _binding_list(self) -> tuple[Binding, ...]:
        return tuple(
            Binding(t, k, split_confirm(command)[1]) for (t, k), command in self.bindings.items()
        )

    async def _refresh_bindings(self) -> bool:
        lines = await self.tmux.run("list-keys")
        bindings = parse_bindings(lines)
        prefix = (await self.tmux.run("show -gv prefix"))[0].strip() or "C-b"
        changed = bindings != self.bindings or prefix != self.prefix
        self.bindings, self.prefix = bindings, prefix
        return changed

    async def _read_status(self) -> Status:
        line = await self.tmux.run(
            f"display -p -t {quote(self.session_name)} {quote(STATUS_FORMAT)}"
        )
        values = (line[0] if line else "").split("\x1f")[1:]
        values += [""] * (len(STATUS_OPTIONS) - len(values))
        return Status(tuple(zip(STATUS_OPTIONS, values, strict=False)))

    async def poll(self) -> None:
        """Status line every second, key bindings every few seconds, when changed."""
        tick = 0
        while not self.exited.is_set():
            await asyncio.sleep(1)
            tick += 1
            if self.log.need_snapshot or self._captured is not None:
                continue
            try:
                status = await self._read_status()
                if status != self.status:
                    self.status = status
                    self._append(status)
                if tick % 5 == 0 and await self._refresh_bindings():
                    self._append(Bindings(self.prefix, self._binding_list()))
            except TmuxError:
                return

    # --- mate input -------------------------------------------------------------

    async def apply_input(self, msg: Input) -> None:
        self.last_busy = time.monotonic()
        if not self.inputs.accept(msg):
            return  # a resend of input already typed
        target = f"%{msg.pane}"
        if msg.pane not in self.pane_window:
            return
        if msg.binding is not None:
            command = self.bindings.get((msg.binding.table, msg.binding.key))
            if command is not None:
                await self._run_binding(target, command)
            return
        data = msg.keys
        for i in range(0, len(data), 2048):
            hexes = " ".join(f"{b:02x}" for b in data[i : i + 2048])
            self.tmux.send(f"send-keys -t {target} -H {hexes}")

    async def _run_binding(self, target: str, command: str) -> None:
        wid = self.pane_window.get(int(target[1:]))
        self.tmux.send(f"select-window -t @{wid}")
        self.tmux.send(f"select-pane -t {target}")
        await self.tmux.send("display -p ''")  # flush: the selection is in place
        # source-file parses the command exactly as tmux's config parser would
        # (command lists, braces, quoting), in a client of its own
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
            f.write(strip_confirm(command) + "\n")
        try:
            with contextlib.suppress(TmuxError):
                await tmux_cmd(self.socket, "source-file", f.name, check=False)
        finally:
            os.unlink(f.name)

    async def apply_resize(self, msg: Resize) -> None:
        if msg.cols <= 0 or msg.rows <= 0:
            self.tmux.send("refresh-client -f ignore-size")
        else:
            self.tmux.send("refresh-client -f !ignore-size")
            self.tmux.send(f"refresh-client -C {min(msg.cols, 10000)}x{min(msg.rows, 10000)}")

    # --- relay side ---------------------------------------------------------------

    async def _handshake(self, link: Link) -> Welcome:
        s = self.shared
        await link.send(
            Hello(
                PROTOCOL_VERSION,
                "tether-host",
                s.session if s else None,
                s.secret if s else None,
                s.rw_token if s else None,
                s.ro_token if s else None,
                self.mate_keys,
            )
        )
        msg = await asyncio.wait_for(link.recv(), 20)
        if isinstance(msg, Error):
            raise RemoteProtocolError(f"relay: {msg.message}")
        if not isinstance(msg, Welcome):
            raise RemoteProtocolError(f"expected Welcome, got {type(msg).__name__}")
        if msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"relay speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}"
            )
        return msg

    async def _session(self, link: Link) -> None:
        welcome = await self._handshake(link)
        first = self.shared is None
        new_session = self.shared is not None and self.shared.session != welcome.session
        self.shared = Shared(
            welcome.session,
            welcome.secret,
            welcome.rw_token,
            welcome.ro_token,
            welcome.ssh_rw,
            welcome.ssh_ro,
        )
        if new_session:
            self.log.on_connect(None)
        elif not self.log.on_connect(welcome.next_seq):
            pass
        if self.log.need_snapshot:
            self.request_snapshot()
        self.connector.learn(welcome)
        self.link = link
        self.state_changed.set()
        self.transport = link.description
        self.last_contact = time.monotonic()
        await self._publish(first or new_session)
        self.publish(f"connected to the relay over {link.description}", False)
        self.wake.set()
        tasks = [
            asyncio.create_task(self._send_loop(link)),
            asyncio.create_task(self._liveness(link)),
        ]
        if link.kind != "quic" and self.connector.quic is not None:
            tasks.append(asyncio.create_task(self._upgrade(link)))
        try:
            while True:
                msg = await link.recv()
                self.last_contact = time.monotonic()
                await self._handle(link, msg)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, LinkClosed):
                    await t
            self.link = None
            self.state_changed.set()
            self.log.on_disconnect()

    async def _liveness(self, link: Link) -> None:
        """Ping often; a link silent for DEAD_AFTER seconds is replaced (mosh-style)."""
        token = 0
        self.rtt = None
        while True:
            idle = time.monotonic() - self.last_busy > IDLE_AFTER
            await asyncio.sleep(PING_IDLE if idle else PING_EVERY)
            token += 1
            self._pings[token] = time.monotonic()
            self._pings.pop(token - 20, None)
            if link.kind == "quic":
                link.send_datagram(Ping(token))  # type: ignore[attr-defined]
            else:
                link.send_nowait(Ping(token))
            heard = max(self.last_contact, getattr(link, "last_activity", 0.0))
            if time.monotonic() - heard > DEAD_AFTER:
                self.publish(f"no word from the relay for {DEAD_AFTER:.0f}s; reconnecting", False)
                link.close()
                return

    async def _upgrade(self, link: Link) -> None:
        """On the SSH channel: move to QUIC as soon as it gets through."""
        first = True
        while True:
            if not first:
                await asyncio.sleep(PING_EVERY * 20)
            first = False
            if not self.connector.quic_preferred():
                continue
            quic = await self.connector.try_quic()
            if self.connector.cert_error:
                self._report(self.connector.cert_error)
            if quic is not None:
                self._next_link = quic
                link.close()  # the session loop ends; the connect loop takes the QUIC link
                return

    async def _handle(self, link: Link, msg: Message) -> None:
        if isinstance(msg, Ack):
            self.log.on_ack(msg.seq)
        elif isinstance(msg, Input):
            await self.apply_input(msg)
            self._input_ack = InputAck(msg.stream, msg.seq)
            if self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(
                    ACK_EVERY, self._flush_input_ack, link
                )
        elif isinstance(msg, Resize):
            await self.apply_resize(msg)
        elif isinstance(msg, Ping):
            link.send_nowait(Pong(msg.token))
        elif isinstance(msg, Pong):
            sent = self._pings.pop(msg.token, None)
            if sent is not None:
                sample = time.monotonic() - sent
                self.rtt = sample if self.rtt is None else 0.8 * self.rtt + 0.2 * sample
        elif isinstance(msg, Notice):
            pass
        elif isinstance(msg, Error):
            raise LinkClosed(f"relay: {msg.message}")
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the relay")

    def _flush_input_ack(self, link: Link) -> None:
        self._ack_timer = None
        ack, self._input_ack = self._input_ack, None
        if ack is not None and link is self.link:
            with contextlib.suppress(LinkClosed):
                link.send_ack(ack)

    async def _send_loop(self, link: Link) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                events: list[Event] = self.log.to_send(limit_bytes=256 * 1024)
                if not events:
                    break
                for ev in events:
                    link.send_nowait(ev)
                await link.drain()

    async def _publish(self, announce: bool) -> None:
        s = self.shared
        assert s is not None
        t = self.tmux
        for name, value in (
            ("@tether_ssh", s.ssh_rw),
            ("@tether_ssh_ro", s.ssh_ro),
            ("@tether_session", s.session),
        ):
            t.send(f"set -g {name} {quote(value)}")
        if announce:
            self.publish(f"ssh session read only: {s.ssh_ro}", True)
            self.publish(f"ssh session: {s.ssh_rw}", True)
            t.send("wait-for -S tether-ready")
            self.ready.set()

    async def run(self) -> None:
        """Replicate until the tmux session ends; reconnect with backoff forever."""
        await self.start()
        poller = asyncio.create_task(self.poll())
        connector = asyncio.create_task(self._connect_loop())
        shower = asyncio.create_task(self._show_state())
        try:
            await self._watch_control()
            self.exited.set()
            if self.link is not None:
                # let the relay end the session now rather than wait for us
                with contextlib.suppress(LinkClosed, TimeoutError):
                    await asyncio.wait_for(self.link.send(End("the host's tmux session ended")), 2)
        finally:
            poller.cancel()
            connector.cancel()
            shower.cancel()
            if self.early is not None:
                discard_link(self.early)
            self._stop_frames()
            if self.link is not None:
                self.link.close()
            await self.tmux.close()

    async def _watch_control(self) -> None:
        """Return when the session is gone; reattach if only our control client was."""
        for _ in range(1000):
            assert self.tmux.closed is not None
            await self.tmux.closed
            alive = await self._session_alive()
            if not alive:
                return
            log.warning(
                "tmux dropped our control client (%s); reattaching",
                self.exit_reason or "no reason given",
            )
            self.exit_reason = ""
            self._stop_frames()  # a new control client gets every pane's output
            self.tmux = TmuxControl(self.socket, self._on_tmux, muted=self._muted)
            try:
                await self.start()
            except (TmuxError, TimeoutError):
                return
            self.log.resync()
            if self.link is not None:
                self.request_snapshot()

    async def _session_alive(self) -> bool:
        proc = await asyncio.create_subprocess_exec(
            "tmux",
            "-S",
            self.socket,
            "has-session",
            "-t",
            self.session_name,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait() == 0

    async def _connect_loop(self) -> None:
        delay = 0.2
        while not self.exited.is_set():
            try:
                if self.early is not None:
                    early, self.early = self.early, None
                    link = await early
                else:
                    link = self._next_link or await self.connector.connect()
                self._next_link = None
                if self.connector.cert_error:
                    self._report(self.connector.cert_error)
            except AuthError as exc:
                self._report(str(exc))
                delay = 30.0
            except Exception as exc:
                self._report(f"cannot reach the relay: {str(exc) or type(exc).__name__}")
            else:
                start = time.monotonic()
                try:
                    await self._session(link)
                except (LinkClosed, TimeoutError, ConnectionError, OSError) as exc:
                    if self._next_link is None:  # not our own move to QUIC
                        self._report(f"connection to the relay lost: {exc}")
                except RemoteProtocolError as exc:
                    self._report(str(exc))
                    if link.kind == "quic":
                        # e.g. a restarted relay that no longer knows us: bootstrap over
                        # SSH, where it can re-create the session with the same tokens
                        self.connector.quic_failed_at = time.monotonic()
                except Exception as exc:  # a bug must cost a reconnect, never the session
                    log.exception("replication failed")
                    self._report(f"replication failed ({type(exc).__name__}: {exc}); reconnecting")
                finally:
                    link.close()
                if time.monotonic() - start > 10 or self._next_link is not None:
                    delay = 0.2
            if self._next_link is not None:
                continue
            self.transport = "reconnecting"
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def state_text(self) -> str:
        """What the status line says about the link, mosh-style."""
        if self.link is not None:
            kind = self.link.kind
            quiet = time.monotonic() - self.last_contact
            if quiet > 2.5:
                return f"[tether {kind}: last contact {quiet:.0f}s ago]"
            if self.rtt is None:
                return f"[tether {kind}]"
            ms = self.rtt * 1000
            # hysteresis: the status line is replicated to every mate, so a figure
            # that flickers between 1 and 2 ms would cost each session an update a
            # second; it changes once the RTT moved by a quarter (or 5 ms)
            old = self._shown_rtt
            if old is None or abs(ms - old) > max(5.0, old / 4):
                self._shown_rtt = old = ms
            shown = f"{old:.0f}" if old < 10 else f"{round(old, -len(str(int(old))) + 2):.0f}"
            return f"[tether {kind} {shown}ms]"
        if not self.last_contact:
            return "[tether: connecting]"
        ago = time.monotonic() - self.last_contact
        return f"[tether: reconnecting, last contact {ago:.0f}s ago]"

    async def _show_state(self) -> None:
        """Keep ``@tether_status`` (shown at the left of status-right) current."""
        with contextlib.suppress(TmuxError):
            right = await self.tmux.run("show -gv status-right")
            value = "#{?@tether_status,#{@tether_status} ,}" + (right[0] if right else "")
            await self.tmux.run(f"set -t {quote(self.session_name)} status-right {quote(value)}")
        shown = ""
        while True:
            text = self.state_text()
            if text != shown:
                shown = text
                self.tmux.send(f"set -g @tether_status {quote(text)}")
            self.state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state_changed.wait(), 1)

    def _report(self, text: str) -> None:
        if text != self.last_error:
            self.last_error = text
            log.warning("%s", text)
            self.publish(text, True)
