"""The mirror layer: tmux state to events (``capture``) and events to tmux (``apply``).

Shared by every end that holds a tmux server: the host agent captures its
user's tmux, the relay's replica worker applies the log to a jailed tmux (and
will capture it for snapshots), and the join client will apply the log to a
mate's local tmux. ``apply`` decides without I/O; ``run_sync`` and
``run_async`` carry its decisions out. Nothing here is imported by this
package's ``__init__``: the jailed worker pays per session for every module.
"""
