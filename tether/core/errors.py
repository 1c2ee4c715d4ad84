"""Error classes, split by who caused them (h11's habit).

A ``LocalProtocolError`` means our own code misused the protocol; a
``RemoteProtocolError`` means the peer sent something invalid, and the
connection to that peer (only that one) must be closed with a clear message.

Every exception class tether defines and raises on purpose derives from
``TetherError`` (``tests/core/test_core_errors.py`` checks it), so a caller can
tell tether's refusals from a bug with one ``except``. The classes stay next to
the code that raises them (``LinkClosed`` in ``transport/link.py``, ``JailError``
in ``relay/jail.py``...). ``tether.netsim`` imports nothing of tether and has its
own base, ``tether.netsim.errors.NetsimError``.
"""


class TetherError(Exception):
    """Base of every error tether raises on purpose."""


class ProtocolError(TetherError):
    """The protocol was violated; abstract: raise one of the subclasses."""

    def __new__(cls, *args: object, **kwargs: object) -> "ProtocolError":
        if cls is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        return super().__new__(cls, *args, **kwargs)


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class AuthError(TetherError):
    """Authentication or authorisation failed (bad token, key or fingerprint)."""
