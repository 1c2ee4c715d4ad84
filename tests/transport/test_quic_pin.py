"""The aioquic pin: transport/quic.py tunes aioquic through private attributes.

It caps the probe backoff (``_loss._pto_count``), shortens the ACK delay
(``_ack_delay``), bounds queued datagrams (``_datagrams_pending``), reads a
stream's unsent bytes (``_streams[id].sender._buffer``), pulls ACKs forward
(``_spaces[epoch].ack_at``), restarts the congestion controller after an outage
(``_loss._cc``, ``_loss._on_packets_lost``, ``_loss._pacer``, ``_max_datagram_size``,
NewReno's ``_congestion_recovery_start_time``), logs the path
(``_network_paths[0].addr``) and checks the relay's certificate
(``tls._peer_certificate``). quic.py degrades quietly where one is missing; this
test fails loudly instead, so an aioquic upgrade that moves them
is seen, and the pin in pyproject.toml is only widened once this passes.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

aioquic = pytest.importorskip("aioquic")

from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.congestion.reno import RenoCongestionControl  # noqa: E402
from aioquic.quic.connection import QuicConnection, QuicNetworkPath  # noqa: E402
from aioquic.quic.recovery import QuicPacketSpace  # noqa: E402
from aioquic.quic.stream import QuicStream  # noqa: E402
from aioquic.tls import Context  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _missing(obj: object, names: list[str]) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


def _hint(what: list[str]) -> str:
    return (f"aioquic {version('aioquic')} lacks {', '.join(what)}, which "
            "tether/transport/quic.py relies on: adapt quic.py or pin aioquic back "
            "(pyproject.toml)")


def test_installed_aioquic_is_within_the_pin() -> None:
    packaging = pytest.importorskip("packaging.requirements")
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (dep,) = [d for d in deps if re.match(r"aioquic\b", d)]
    req = packaging.Requirement(dep)
    assert req.specifier.contains(version("aioquic")), (
        f"aioquic {version('aioquic')} is installed, outside the pin {dep!r}; "
        "run this file against it before widening the pin")
    assert req.specifier.contains("1.7.2"), "the pin must keep the verified aioquic 1.7.2"


def test_aioquic_has_the_internals_quic_py_tunes() -> None:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    missing = _missing(quic, ["_loss", "_ack_delay", "_datagrams_pending", "_streams",
                              "_spaces", "_network_paths"])
    assert not missing, _hint([f"QuicConnection.{n}" for n in missing])
    missing = _missing(quic._loss, ["_pto_count", "on_loss_detection_timeout", "_cc",
                                    "_on_packets_lost", "_pacer", "_rtt_smoothed",
                                    "_rtt_initialized", "get_probe_timeout"])
    assert not missing, _hint([f"QuicConnection._loss.{n}" for n in missing])
    missing = _missing(quic, ["_max_datagram_size", "_probe_pending"])
    assert not missing, _hint([f"QuicConnection.{n}" for n in missing])
    reno = RenoCongestionControl(max_datagram_size=1200)
    missing = _missing(reno, ["_max_datagram_size", "_congestion_recovery_start_time",
                              "congestion_window", "ssthresh", "bytes_in_flight"])
    assert not missing, _hint([f"RenoCongestionControl.{n}" for n in missing])
    checks = {
        "QuicPacketSpace.ack_at": hasattr(QuicPacketSpace(), "ack_at"),
        "QuicStream.sender._buffer": hasattr(QuicStream(stream_id=0).sender, "_buffer"),
        "QuicNetworkPath.addr": hasattr(QuicNetworkPath(("127.0.0.1", 1)), "addr"),
        "tls.Context._peer_certificate": hasattr(Context(is_client=True),
                                                 "_peer_certificate"),
        "QuicConnection._spaces is a dict": isinstance(quic._spaces, dict),
    }
    missing = [name for name, ok in checks.items() if not ok]
    assert not missing, _hint(missing)
