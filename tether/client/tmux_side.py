"""The host agent's tmux side: the user's tmux to log events, mate input to tmux.

``TmuxSide`` reads the session's tmux server in control mode and turns what it
reports into replication events (pane bytes, structure, status line, key
bindings, pane images, frames of a flooding pane), appended to the host
endpoint's log at exactly the point tmux produced them. It knows nothing of
links: the relay side asks it for a snapshot and hands it mate input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable

from tether.core.codec import compress
from tether.core.control import Notification, PaneOutput, Reply, layout_panes, quote
from tether.core.host_endpoint import HostEndpoint
from tether.core.limits import MAX_DATA
from tether.core.messages import (
    Bindings,
    EventBody,
    Frame,
    Input,
    Output,
    PaneImage,
    PaneReset,
    Snapshot,
    Status,
    Structure,
    Window,
)
from tether.mirror.capture import (
    binding_list,
    capture_cmds,
    pane_image,
    parse_bindings,
    parse_status,
    parse_windows,
    status_cmd,
    strip_confirm,
    windows_cmd,
)
from tether.transport.tmux import TmuxControl, TmuxError, tmux_cmd

from .status import without_own

log = logging.getLogger("tether.host")

FLOOD_WINDOW = 0.1
FLOOD_BYTES = 64 * 1024
"""A pane printing more than this within FLOOD_WINDOW is sent as frames instead of
bytes: mates see its screen every FRAME_EVERY, mosh-style, instead of replaying
every byte a `cat` of a big file or a fast redraw printed. Typing and ordinary
output stay far below it."""
FRAME_EVERY = 0.05
SNAPSHOT_RETRY = 1.0
"""After a failed capture, wait this long before asking again (tmux may be gone)."""

_WINDOW_SET = (
    "window-add",
    "window-close",
    "unlinked-window-close",
    "session-window-changed",
    "linked-window-add",
    "unlinked-window-add",
)


def split_output(pane: int, data: bytes) -> list[Output]:
    """Pane bytes as Output events that each fit a message."""
    step = MAX_DATA // 2
    return [Output(pane, data[i : i + step]) for i in range(0, len(data), step)]


class TmuxSide:
    """The user's tmux, as seen by the agent's control-mode client."""

    def __init__(
        self, socket: str, session: str, endpoint: HostEndpoint, changed: Callable[[], None]
    ) -> None:
        self.socket = socket
        self.session_name = session
        self.ep = endpoint
        self.changed = changed
        """Called after the log grew or the endpoint may have news (wake the sender)."""
        self._muted: set[int] = set()  # panes sent as frames: their output is skipped unread
        self.tmux = TmuxControl(socket, self._on_tmux, muted=self._muted)
        self.structure: Structure | None = None
        self.pane_window: dict[int, int] = {}
        self.bindings: dict[tuple[str, str], str] = {}
        self.prefix = "C-b"
        self.status: Status | None = None
        self._capturing = False
        self._captured: set[int] | None = None
        self._stash: list[Output] = []
        self._structure_query = False
        self.exit_reason = ""
        self._rate: dict[int, tuple[float, int]] = {}
        self._framing: dict[int, asyncio.Task[None]] = {}
        self.frames_sent = 0

    async def start(self, tmux: TmuxControl | None = None) -> None:
        """Attach ``tmux`` (or the first control client); it becomes ``self.tmux``
        once attached, so users of ``self.tmux`` never meet one that is not."""
        tmux = tmux or self.tmux
        await tmux.start(["attach", "-t", self.session_name])
        self.tmux = tmux
        # sent at once and answered in order: one round trip to tmux, not four
        # (this is on the way to a new session's Hello)
        flags, size, bindings = await asyncio.gather(
            tmux.run("refresh-client -f pause-after=4,ignore-size"),
            tmux.run(f"set -t {quote(self.session_name)} window-size smallest"),
            self._refresh_bindings(),
            return_exceptions=True,
        )
        for result in (flags, bindings):
            if isinstance(result, BaseException):
                raise result
        if isinstance(size, BaseException) and not isinstance(size, TmuxError):
            raise size

    async def reattach(self) -> None:
        """A new control client after tmux dropped ours. It gets every pane's output
        from now on, but what the panes printed in between is lost: the log must
        start over from a snapshot (``HostEndpoint.resync``)."""
        self.stop_frames()
        await self.start(TmuxControl(self.socket, self._on_tmux, muted=self._muted))
        self.ep.resync(time.monotonic())
        self.changed()

    # --- tmux to events -------------------------------------------------------

    def _on_tmux(self, item: PaneOutput | Notification) -> None:
        if isinstance(item, PaneOutput):
            self._output(item.pane, item.data)
            return
        name, args = item.name, item.args.decode("utf-8", "replace")
        if name == "layout-change":
            parts = args.split(" ")
            if len(parts) >= 2 and self.structure is not None:
                self._update_window(int(parts[0][1:]), layout=parts[1])
        elif name == "window-renamed":
            wid_s, _, new = args.partition(" ")
            if self.structure is not None:
                self._update_window(int(wid_s[1:]), name=new)
        elif name == "window-pane-changed":
            w, p = args.split(" ")[:2]
            if self.structure is not None:
                self._update_window(int(w[1:]), active_pane=int(p[1:]))
        elif name in _WINDOW_SET:
            self.query_structure()
        elif name == "pause":
            pane = int(args.strip()[1:])
            if pane not in self._framing:  # a framed pane is paused on purpose
                self._capture_pane(pane, resume=True)
        elif name == "exit":
            self.exit_reason = args.strip()

    def _output(self, pane: int, data: bytes) -> None:
        now = time.monotonic()
        self.ep.note_busy(now)
        if pane in self._framing:
            return  # frames carry this pane's screen for now
        start, count = self._rate.get(pane, (now, 0))
        if now - start > FLOOD_WINDOW:
            start, count = now, 0
        count += len(data)
        self._rate[pane] = (start, count)
        if count > FLOOD_BYTES:
            self._start_frames(pane)
        if self._captured is not None:  # a snapshot capture is under way
            if pane in self._captured:
                self._stash.extend(split_output(pane, data))
            return  # panes not captured yet: the capture will include this
        for out in split_output(pane, data):
            self.append(out)

    def append(self, body: EventBody) -> None:
        self.ep.append(body, time.monotonic())
        self.changed()

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
            self.append(st)
            for p in fresh:
                self._capture_pane(p)

    def query_structure(self) -> None:
        if self._structure_query:
            return
        self._structure_query = True

        def done(reply: Reply) -> None:
            self._structure_query = False
            if reply.ok:
                self._set_structure(parse_windows(reply.lines))

        self.tmux.send(windows_cmd(self.session_name), done)

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

    def stop_frames(self) -> None:
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

        for cmd in capture_cmds(pane, history=False):
            self.tmux.send(cmd, got)
        await done
        image = pane_image(pane, parts)
        return image.data if image is not None else None

    def _send_frame(self, pane: int, frame: bytes) -> None:
        self.frames_sent += 1
        packed = compress(frame)
        if len(packed) <= MAX_DATA:
            self.append(Frame(pane, packed))
        else:  # incompressible and huge: as plain bytes
            for out in split_output(pane, frame):
                self.append(out)

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
            image = pane_image(pane, parts)
            if image is not None:
                self._send_frame(pane, image.data)

        for cmd in capture_cmds(pane, history=False):
            self.tmux.send(cmd, got)

    # --- captures and snapshots -------------------------------------------------

    def _capture_pane(self, pane: int, resume: bool = False) -> None:
        """Queue a capture; the image enters the log exactly where tmux took it."""
        parts: list[Reply] = []

        def got(reply: Reply) -> None:
            parts.append(reply)
            if len(parts) < 3:
                return
            image = pane_image(pane, parts)
            if image is not None and self._captured is None and not self.ep.need_snapshot:
                self.append(PaneReset(image))

        for cmd in capture_cmds(pane):
            self.tmux.send(cmd, got)
        if resume:
            self.tmux.send(f"refresh-client -A {quote(f'%{pane}:continue')}")

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
            self._captured = set()
            self._stash = []
            await self._capture_all(panes, status)
        except TmuxError as exc:
            log.warning("snapshot failed: %s", exc)
            self._captured = None
            asyncio.get_running_loop().call_later(SNAPSHOT_RETRY, self._retry_snapshot)
        finally:
            self._capturing = False

    def _retry_snapshot(self) -> None:
        self.ep.snapshot_failed()
        self.changed()

    async def _capture_all(self, panes: list[int], status: Status) -> None:
        """Every pane's image, then the structure: the snapshot enters the log at
        the structure's reply, with what panes printed after their capture."""
        images: dict[int, PaneImage] = {}

        def per_pane(pane: int) -> Callable[[Reply], None]:
            parts: list[Reply] = []

            def got(reply: Reply) -> None:
                parts.append(reply)
                if len(parts) < 3:
                    return
                assert self._captured is not None
                self._captured.add(pane)
                image = pane_image(pane, parts)
                if image is not None:
                    images[pane] = image

            return got

        for p in panes:
            cb = per_pane(p)
            for cmd in capture_cmds(p):
                self.tmux.send(cmd, cb)

        def structure_done(reply: Reply) -> None:
            # Runs synchronously at this point of tmux's stream: every output
            # before it is in the images, every output after it follows them.
            st = parse_windows(reply.lines) if reply.ok else Structure((), -1)
            self.structure = st
            self.pane_window = {p: w.id for w in st.windows for p in layout_panes(w.layout)}
            now = time.monotonic()
            bindings = Bindings(self.prefix, binding_list(self.bindings))
            self.ep.push_snapshot(Snapshot(st, status, bindings), now)
            for p in panes:
                if p in images:
                    self.ep.append(PaneReset(images[p]), now)
            stash, self._stash, self._captured = self._stash, [], None
            for out in stash:
                self.ep.append(out, now)
            self.changed()

        # the reply's future fails if tmux drops us: a snapshot never hangs
        await self.tmux.send(windows_cmd(self.session_name), structure_done)

    async def _refresh_bindings(self) -> bool:
        keys, shown = await asyncio.gather(
            self.tmux.run("list-keys"), self.tmux.run("show -gv prefix"), return_exceptions=True
        )
        for result in (keys, shown):
            if isinstance(result, BaseException):
                raise result
        assert isinstance(keys, list) and isinstance(shown, list)
        bindings = parse_bindings(keys)
        prefix = (shown[0].strip() if shown else "") or "C-b"
        changed = bindings != self.bindings or prefix != self.prefix
        self.bindings, self.prefix = bindings, prefix
        return changed

    async def _read_status(self) -> Status:
        status = parse_status(await self.tmux.run(status_cmd(self.session_name)))
        return Status(tuple((k, without_own(v) if k == "status-right" else v)
                            for k, v in status.options))

    async def poll(self, exited: asyncio.Event) -> None:
        """Status line every second, key bindings every few seconds, when changed."""
        tick = 0
        while not exited.is_set():
            await asyncio.sleep(1)
            tick += 1
            if self.ep.need_snapshot or self._captured is not None:
                continue
            try:
                status = await self._read_status()
                if status != self.status:
                    self.status = status
                    self.append(status)
                if tick % 5 == 0 and await self._refresh_bindings():
                    self.append(Bindings(self.prefix, binding_list(self.bindings)))
            except TmuxError:
                continue  # tmux dropped our control client: the watcher reattaches

    # --- mate input (the endpoint already dropped resends) -----------------------

    async def apply_input(self, msg: Input) -> None:
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

    def apply_resize(self, cols: int, rows: int) -> None:
        if cols <= 0 or rows <= 0:
            self.tmux.send("refresh-client -f ignore-size")
        else:
            self.tmux.send("refresh-client -f !ignore-size")
            self.tmux.send(f"refresh-client -C {min(cols, 10000)}x{min(rows, 10000)}")
