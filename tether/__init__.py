"""tether: instant terminal sharing over tmux that survives bad networks."""

__version__ = "0.1.0"


def command(*args: str) -> list[str]:
    """argv that runs this tether's command line (``tether ARGS``) in a new process.

    Its ``__main__.py`` as a script, not ``python -m tether``: runpy's imports
    cost every process ~4 ms at start. ``-P``: the current directory (whatever
    the user ran tether in) is not put on the module path.
    """
    import os
    import sys

    main = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")
    return [sys.executable, "-P", main, *args]
