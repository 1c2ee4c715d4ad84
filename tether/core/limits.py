"""Every bound the protocol enforces, in one place so they can be reviewed together."""

MAX_FRAME = 4 * 1024 * 1024
"""Largest encoded frame; a snapshot of a full session fits well under this."""

MAX_DATA = 1024 * 1024
"""Largest byte string in one field (pane output chunk, pane snapshot)."""

MAX_STR = 64 * 1024
"""Largest text field (layout string, window name, status line, command)."""

MAX_ITEMS = 1024
"""Largest list in one message (windows, panes, bindings)."""

MAX_WINDOWS = 256
MAX_PANES = 512
"""Per session, total panes across all windows."""

MAX_BINDINGS = 1024
MAX_INPUT_STREAMS = 64
"""Distinct input streams a host tracks at once; the oldest is forgotten beyond it."""

MAX_BACKLOG_BYTES = 8 * 1024 * 1024
"""Unacked replication bytes a sender buffers before it replaces them by a snapshot."""

MAX_BACKLOG_EVENTS = 65536

MAX_INPUT_BACKLOG = 4096
"""Unacked mate input chunks the relay keeps per stream; past it the oldest are dropped."""

MAX_DIMENSION = 10000
"""Largest window width or height tmux accepts."""
