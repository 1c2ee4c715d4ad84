"""Names both ends of the SSH bootstrap must agree on, so they live in core.

The host's ``ssh`` logs in as ``HOST_USER`` and asks for ``SUBSYSTEM``; the relay's
SSH front tells hosts from mates by the same two names. Any other login name is a
mate's session token.
"""

from __future__ import annotations

HOST_USER = "tether-host"
"""The SSH user name a host logs in with (mates log in with a token)."""
SUBSYSTEM = "tether"
"""The SSH subsystem that carries replication frames."""
