"""authorized_keys lines, checked for shape without a crypto library."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.pubkeys import MAX_LINE, check_public_key_line, check_public_key_lines

ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBb11tAo67gm109wE4yXDJZBTx5gg9yM8NpHTM6lY02K "
           "mate@example")
ECDSA = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBD5g3Fhm29Ew7sN"
         "GD11NHfbZpTtZfMf1GzFzEFDf4vLsI2PE9zBTC36zlHpBGnYx76V4Di0Mp25Vs9iQcPJx6/Q= e")


def test_real_keys_pass_and_comments_and_blanks_are_dropped() -> None:
    lines = ["# mates", "", f"  {ED25519}\n", ECDSA, "   "]
    assert check_public_key_lines(lines) == [ED25519, ECDSA]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not a key", "TYPE BASE64"),
        ('from="10.0.0.1" ' + ED25519, "options are not supported"),
        ("ssh-ed25519", "TYPE BASE64"),
        ("ssh-ed25519 AAAA!!!!", "bad base64"),
        ("ssh-rsa " + ED25519.split()[1], "does not match its type"),
        ("ssh-ed25519 " + "A" * MAX_LINE, "longer than"),
    ],
)
def test_malformed_lines_say_what_is_wrong(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_public_key_line(line)


def test_the_number_of_keys_is_bounded() -> None:
    with pytest.raises(ValueError, match="more than 3 keys"):
        check_public_key_lines([ED25519] * 4, limit=3)


@given(st.text(max_size=300))
def test_any_text_is_either_a_key_or_a_value_error(text: str) -> None:
    try:
        line = check_public_key_line(text)
    except ValueError:
        return
    assert line.split()[0].startswith(("ssh-", "ecdsa-", "sk-"))
