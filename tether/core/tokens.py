"""Session tokens: random, unambiguous to read aloud, and looked up without timing leaks."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets

ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
"""Lower-case letters and digits without look-alikes (0/o, 1/l/i)."""

TOKEN_BITS = 160
TOKEN_LEN = math.ceil(TOKEN_BITS / math.log2(len(ALPHABET)))


def new_token(length: int = TOKEN_LEN) -> str:
    """A fresh token from ``secrets``: at least ``TOKEN_BITS`` bits of entropy."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def token_entropy_bits(length: int = TOKEN_LEN) -> float:
    return length * math.log2(len(ALPHABET))


def is_well_formed(token: str) -> bool:
    """Shape check only (length and alphabet); says nothing about validity."""
    return len(token) == TOKEN_LEN and all(c in ALPHABET for c in token)


class TokenKey:
    """Keys a registry by HMAC(token), so dict lookups never compare secrets directly."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def __call__(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()


def redact(token: str) -> str:
    """What logs may show of a token."""
    return token[:4] + "..." if len(token) > 4 else "..."


def secrets_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


_TOKEN_RE = re.compile(
    rf"(?<![{ALPHABET}])([{ALPHABET}]{{4}})[{ALPHABET}]{{{TOKEN_LEN - 4}}}(?![{ALPHABET}])"
)


def redact_all(text: str) -> str:
    """``text`` with every token-shaped word cut to its first four characters."""
    return _TOKEN_RE.sub(r"\1...", text)


class RedactTokens(logging.Filter):
    """Keeps whole tokens out of every log line (asyncssh logs user names: our tokens)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_all(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _token_from(digest: bytes) -> str:
    n = int.from_bytes(digest, "big")
    chars = []
    for _ in range(TOKEN_LEN):
        n, r = divmod(n, len(ALPHABET))
        chars.append(ALPHABET[r])
    return "".join(chars)


def derive_session(secret: bytes) -> tuple[str, str, str]:
    """(session id, read-write token, read-only token), all derived from the
    session's resume secret.

    Whoever re-creates a session (its host, after a relay restart or once the
    relay forgot it) gets its tokens back only by knowing the secret: nobody who
    knows a token can register it first and show its viewers another screen, and
    the relay needs to remember nothing across a restart. Each is an HMAC of the
    32-byte secret, so none reveals the secret or another.
    """

    def mac(label: bytes) -> bytes:
        return hmac.new(secret, b"tether " + label, hashlib.sha256).digest()

    return mac(b"session").hex()[:16], _token_from(mac(b"rw")), _token_from(mac(b"ro"))
