"""Length-prefixed msgpack frames, decoded incrementally with hard bounds.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
The length is checked before any allocation, so a peer can never make us
buffer more than ``MAX_FRAME`` bytes.
"""

from __future__ import annotations

import struct
import zlib

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .limits import MAX_DATA, MAX_FRAME, MAX_ITEMS, MAX_STR

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_LEN = struct.Struct(">I")


def pack(obj: Any) -> bytes:
    """Encode one object as a frame."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """Decode one frame body with msgpack's own bounds set to ours."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_DATA,
            max_str_len=MAX_STR,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"undecodable frame: {exc}") from None


class FrameDecoder:
    """Feed bytes in, pull decoded objects out; no I/O."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Any]:
        """Add received bytes; return every object now complete."""
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise RemoteProtocolError(f"frame of {n} bytes exceeds {self._max}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            out.append(unpack_body(body))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def compress(data: bytes) -> bytes:
    """zlib at a fast level: a coloured 200x50 screen shrinks about fivefold."""
    return zlib.compress(data, 1)


def decompress(data: bytes, limit: int = MAX_DATA) -> bytes:
    """Inflate at most ``limit`` bytes: a peer's zip bomb is refused, not expanded."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise RemoteProtocolError(f"bad compressed data: {exc}") from None
    if d.unconsumed_tail or not d.eof:
        raise RemoteProtocolError(f"compressed data is truncated or inflates past {limit} bytes")
    return out
