"""The base of netsim's own exception classes.

netsim imports nothing of tether (``tests/test_layers.py``), so it cannot
derive from ``tether.core.errors.TetherError``: its classes derive from
``NetsimError`` instead. Bad input is still reported with the builtin
``ValueError``, as its callers expect.
"""

from __future__ import annotations


class NetsimError(Exception):
    """Base of every exception class netsim defines."""
