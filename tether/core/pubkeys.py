"""authorized_keys lines, checked without a crypto library.

The host checks the keys it will ask the relay to require of mates before it
starts; the relay parses them for real. Checking the shape here keeps
asyncssh (~170 ms of imports) off the host's start-up path.
"""

from __future__ import annotations

import binascii
import re

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_KEYS = 256
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
"""An OpenSSH key fingerprint, as ``ssh-keygen -l`` prints it."""
MAX_LINE = 16 * 1024


def check_public_key_line(line: str) -> str:
    """``line`` stripped, or ValueError saying what is wrong with it."""
    line = line.strip()
    shown = line[:40] + ("..." if len(line) > 40 else "")
    if len(line) > MAX_LINE:
        raise ValueError(f"not a public key: {shown} (longer than {MAX_LINE} characters)")
    words = line.split()
    if len(words) < 2 or words[0] not in KEY_TYPES:
        raise ValueError(
            f"not a public key: {shown} (want `TYPE BASE64 [COMMENT]`; options are not supported)"
        )
    try:
        blob = binascii.a2b_base64(words[1], strict_mode=True)
    except binascii.Error:
        raise ValueError(f"not a public key: {shown} (bad base64)") from None
    n = int.from_bytes(blob[:4], "big")
    if len(blob) < 4 + n or blob[4 : 4 + n] != words[0].encode():
        raise ValueError(f"not a public key: {shown} (the key does not match its type)")
    return line


def check_public_key_lines(lines: list[str], limit: int = MAX_KEYS) -> list[str]:
    """The key lines of an authorized_keys file (blank lines and comments dropped)."""
    keys = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if len(keys) >= limit:
            raise ValueError(f"more than {limit} keys")
        keys.append(check_public_key_line(line))
    return keys
