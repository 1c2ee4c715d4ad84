"""Parse human units ("100ms", "20%", "1mbit") so CLI, scenario files and API agree."""

from __future__ import annotations

import re

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "m": 60.0, "min": 60.0}

# tc(8) conventions: "bit" suffixes are bits/s, "bps" suffixes are *bytes*/s.
_RATE_UNITS = {
    "": 1.0,
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``0.1``, ``"100ms"``, ``"250us"``, ``"2s"`` or ``"1m"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    m = re.fullmatch(_NUM + r"\s*([a-zµ]*)", value.strip().lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {value!r} (use e.g. 100ms, 1.5s, 250us)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_probability(value: str | float | int) -> float:
    """Fraction in [0, 1] from ``0.2`` or ``"20%"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a probability: {value!r}")
    if isinstance(value, str):
        s = value.strip()
        try:
            p = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"not a probability: {value!r} (use e.g. 20% or 0.2)") from None
    else:
        p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability out of range [0, 1]: {value!r}")
    return p


def parse_rate(value: str | float | int) -> float:
    """Bits per second from ``1e6``, ``"1mbit"``, ``"500kbit"`` or ``"125kbps"`` (bytes, as tc)."""
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r}")
    if isinstance(value, int | float):
        r = float(value)
    else:
        m = re.fullmatch(_NUM + r"\s*([a-z]*)", value.strip().lower())
        if not m or m.group(2) not in _RATE_UNITS:
            raise ValueError(f"not a rate: {value!r} (use e.g. 1mbit, 500kbit)")
        r = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if r < 0:
        raise ValueError(f"negative rate: {value!r}")
    return r


def parse_burst(value: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """Gilbert-Elliott ``(p_enter, p_exit)`` from ``"5%,30%"`` or a pair."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 2:
        raise ValueError(f"burst loss needs P_ENTER,P_EXIT: {value!r}")
    p_enter, p_exit = (parse_probability(p) for p in parts)
    if p_exit <= 0.0:
        raise ValueError("burst loss P_EXIT must be > 0 or the link never recovers")
    return p_enter, p_exit


def format_duration(seconds: float) -> str:
    """Short human form used in logs and counters."""
    if seconds >= 1.0:
        return f"{seconds:g}s"
    return f"{seconds * 1e3:g}ms"
