"""Durations, sizes and password hashes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtprelay.config import Secret
from smtprelay.passwords import PasswordHash, check_password, hash_password, is_password_hash
from smtprelay.units import format_duration, parse_duration, parse_size


def test_durations():
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("4h") == 14400
    assert parse_duration("5d") == 432000
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    for bad in ("", "5", "m", "5 m", "-5m", "5y", 5):
        with pytest.raises(ValueError):
            parse_duration(bad)


@given(st.integers(0, 10**7))
def test_duration_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_sizes():
    assert parse_size("35MB") == 35_000_000
    assert parse_size("512KB") == 512_000
    assert parse_size("1MiB") == 1 << 20
    assert parse_size(1000) == 1000
    assert parse_size("100B") == 100
    for bad in ("lots", "-1MB", True, 1.5, -3):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_password_hash_round_trip():
    h = hash_password(b"correct horse", ln=4)
    assert is_password_hash(h) and h.startswith("$scrypt$ln=4,r=8,p=1$")
    parsed = PasswordHash.parse(h)
    assert parsed.verify(b"correct horse")
    assert not parsed.verify(b"correct horsE")
    assert str(parsed) == h
    assert "correct" not in repr(parsed)
    assert check_password(Secret("literal", None, "pw"), b"pw")
    assert not check_password(Secret("literal", None, "pw"), b"pw2")
    assert not check_password(Secret("env", "X", ""), b"")
    for bad in ("$scrypt$", "$scrypt$ln=99,r=8,p=1$AAAA$AAAA", "plain"):
        with pytest.raises(ValueError):
            PasswordHash.parse(bad)
