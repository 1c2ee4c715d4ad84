"""tether: instant terminal sharing over tmux that survives bad networks."""

__version__ = "0.1.0"
