"""Unit parsing shared by CLI, scenario files and the Python API."""

import pytest

from tether.netsim.network import normalize_params
from tether.netsim.units import parse_burst, parse_duration, parse_probability, parse_rate


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("1.5s", 1.5), ("250us", 250e-6), ("2", 2.0), (0.05, 0.05), ("1m", 60.0)],
)
def test_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "p"), [("20%", 0.2), ("0.2", 0.2), (0.5, 0.5), ("100%", 1.0), ("0", 0.0)]
)
def test_probability(text: str | float, p: float) -> None:
    assert parse_probability(text) == pytest.approx(p)


@pytest.mark.parametrize(
    ("text", "bps"),
    [("1mbit", 1e6), ("500kbit", 5e5), ("125kbps", 1e6), (2e6, 2e6), ("1Gbit", 1e9)],
)
def test_rate(text: str | float, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("bad", ["fast", "-1ms", "10 parsecs", True])
def test_bad_duration(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["120%", "-0.1", "lots", 1.5])
def test_bad_probability(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_probability(bad)  # type: ignore[arg-type]


def test_burst_and_normalize() -> None:
    assert parse_burst("5%,30%") == pytest.approx((0.05, 0.3))
    with pytest.raises(ValueError):
        parse_burst("5%,0")
    got = normalize_params(delay="10ms", loss="1%", burst_loss=(0.1, 0.5), rate="1mbit", limit=5)
    assert got == pytest.approx(
        {
            "delay": 0.01,
            "loss": 0.01,
            "burst_enter": 0.1,
            "burst_exit": 0.5,
            "rate": 1e6,
            "limit": 5,
        }
    )
    with pytest.raises(ValueError, match="unknown impairment"):
        normalize_params(latency="10ms")
