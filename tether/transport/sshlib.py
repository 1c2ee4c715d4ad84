"""asyncssh, imported without its slow start-up probes.

Every tether module that uses asyncssh imports it from here
(``from .sshlib import asyncssh``), so whichever comes first skips the probes.
"""

from __future__ import annotations

import sys


def _import_asyncssh() -> None:
    """Import asyncssh without its liboqs probe.

    At import, asyncssh looks for liboqs (for the sntrup761 key exchange) with
    ``ctypes.util.find_library``, which runs ``ldconfig`` and costs every tether
    process ~30 ms of start-up. tether's peers agree on mlkem768x25519 or
    curve25519 (from ``cryptography``), so the probe is skipped.
    """
    import ctypes.util

    real = ctypes.util.find_library
    ctypes.util.find_library = lambda name: None if name in ("oqs", "liboqs") else real(name)
    # X.509 certificates in SSH are unused by tether; asyncssh's support for them
    # imports cryptography.x509 and pyOpenSSL (~35 ms), and goes without them
    blocked = "asyncssh.crypto.x509"
    had = blocked in sys.modules
    if not had:
        sys.modules[blocked] = None  # type: ignore[assignment]
    try:
        import asyncssh  # noqa: F401
    finally:
        ctypes.util.find_library = real
        if not had and sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]


_import_asyncssh()
import asyncssh  # noqa: E402

__all__ = ["asyncssh"]
