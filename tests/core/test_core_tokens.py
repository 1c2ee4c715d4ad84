"""Session tokens: entropy, alphabet, shape, keyed lookup and redaction."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core import tokens
from tether.core.tokens import (
    ALPHABET,
    TOKEN_BITS,
    TOKEN_LEN,
    TokenKey,
    is_well_formed,
    new_token,
    redact,
    secrets_equal,
    token_entropy_bits,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
well_formed = st.text(alphabet=ALPHABET, min_size=TOKEN_LEN, max_size=TOKEN_LEN)


def test_entropy_is_at_least_150_bits() -> None:
    assert TOKEN_BITS >= 150
    assert token_entropy_bits() >= TOKEN_BITS
    assert token_entropy_bits() == TOKEN_LEN * math.log2(len(ALPHABET))
    assert len(new_token()) == TOKEN_LEN
    assert token_entropy_bits(TOKEN_LEN - 1) < TOKEN_BITS  # the length is the minimum


def test_alphabet_has_no_look_alikes() -> None:
    assert not set("01oil") & set(ALPHABET)
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert ALPHABET == ALPHABET.lower()
    assert all(c.isascii() and c.isalnum() for c in ALPHABET)


def test_tokens_are_distinct_and_use_the_whole_alphabet() -> None:
    drawn = [new_token() for _ in range(10_000)]
    assert len(set(drawn)) == len(drawn)
    assert all(is_well_formed(t) for t in drawn)
    used = set("".join(drawn[:200]))
    assert used == set(ALPHABET)  # 6600 draws: every symbol shows up


def test_tokens_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens.secrets, "choice", lambda seq: seq[0])
    assert new_token() == ALPHABET[0] * TOKEN_LEN


def test_is_well_formed() -> None:
    t = new_token()
    assert is_well_formed(t)
    assert not is_well_formed(t[:-1])
    assert not is_well_formed(t + "a")
    assert not is_well_formed("")
    assert not is_well_formed(t.upper())
    for bad in "01oil-_ A\n\x00é":
        assert not is_well_formed(bad + t[1:])
        assert not is_well_formed(t[:-1] + bad)


@SETTINGS
@given(token=st.text(max_size=TOKEN_LEN + 2))
def test_is_well_formed_matches_its_definition(token: str) -> None:
    assert is_well_formed(token) == (len(token) == TOKEN_LEN and all(c in ALPHABET for c in token))


@SETTINGS
@given(a=well_formed, b=well_formed)
def test_token_key_equal_iff_tokens_equal(a: str, b: str) -> None:
    key = TokenKey(b"k" * 32)
    assert key(a) == key(a)
    assert (key(a) == key(b)) == (a == b)
    assert len(key(a)) == 32
    assert a not in repr(key(a))


def test_token_keys_depend_on_the_key() -> None:
    t = new_token()
    assert TokenKey(b"a" * 32)(t) != TokenKey(b"b" * 32)(t)
    assert TokenKey()(t) != TokenKey()(t)  # a fresh random key each time
    k = TokenKey()
    assert k(t) == k(t)
    assert k(t) != k(new_token())


@SETTINGS
@given(token=st.text(max_size=60))
def test_redact_never_shows_more_than_4_chars(token: str) -> None:
    shown = redact(token)
    visible = shown.removesuffix("...")
    assert len(visible) <= 4
    assert token.startswith(visible)
    if len(token) <= 4:
        assert visible == ""  # a short secret is not shown at all


def test_redact_of_a_real_token() -> None:
    t = new_token()
    assert redact(t) == t[:4] + "..."
    assert t[4:8] not in redact(t)


def test_secrets_equal() -> None:
    assert secrets_equal(b"abc", b"abc")
    assert not secrets_equal(b"abc", b"abd")
    assert not secrets_equal(b"abc", b"ab")
