"""Key format and operator durations (sans-IO, synchronous)."""

from __future__ import annotations

import math
import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nzgw.core.keys import (
    KEY_LEN,
    PREFIX_LEN,
    PUBLIC_PREFIX_LEN,
    SECRET_BITS,
    SECRET_LEN,
    generate_key,
    is_prefix,
    parse_duration,
    parse_expiry,
    parse_key,
)

NOW = datetime(2030, 6, 15, 12, 0, tzinfo=UTC)


def test_generated_keys_have_the_documented_shape() -> None:
    key, prefix = generate_key()
    assert len(key) == KEY_LEN == 3 + PREFIX_LEN + SECRET_LEN
    assert key.startswith("nz_") and key.startswith(prefix)
    assert len(prefix) == PUBLIC_PREFIX_LEN and is_prefix(prefix)
    assert set(prefix[3:]) <= set(string.ascii_lowercase + string.digits)
    assert set(key[PUBLIC_PREFIX_LEN:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert parse_key(key) == (prefix, key)


def test_the_secret_has_at_least_192_bits() -> None:
    assert SECRET_BITS >= 192
    assert SECRET_LEN * math.log2(32) >= SECRET_BITS


def test_keys_and_prefixes_are_unique() -> None:
    pairs = [generate_key() for _ in range(2000)]
    assert len({k for k, _ in pairs}) == 2000
    assert len({p for _, p in pairs}) == 2000


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "nz_",
        "Bearer nz_abcdefgh" + "a" * 40,
        "nz_abcdefgh" + "a" * 39,  # short
        "nz_abcdefgh" + "a" * 41,  # long
        "NZ_abcdefgh" + "a" * 40,
        "nz_ABCDEFGH" + "a" * 40,  # uppercase prefix
        "nz_abcdefgh" + "A" * 40,  # uppercase secret
        "nz_abcdefgh" + "1" * 40,  # not base32 (0, 1, 8, 9)
        "nz_abc-efgh" + "a" * 40,
        "nz_abcdefgh" + "a" * 39 + "\n",
        " nz_abcdefgh" + "a" * 39,
        "nz_abcdefgh" + "é" * 40,
        "xx_abcdefgh" + "a" * 40,
    ],
)
def test_malformed_keys_are_rejected(presented: str) -> None:
    assert parse_key(presented) is None


@given(st.text(max_size=80))
def test_parse_key_never_raises(text: str) -> None:
    parsed = parse_key(text)
    assert parsed is None or (parsed.key == text and text.startswith(parsed.prefix))


def test_is_prefix() -> None:
    assert is_prefix("nz_k3x9a2mq")
    assert not is_prefix("nz_k3x9a2m")
    assert not is_prefix("nz_K3X9A2MQ")
    assert not is_prefix(generate_key()[0])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86400),
        ("12h", 43200),
        ("30m", 1800),
        ("90s", 90),
        ("1d12h", 129600),
        ("2H", 7200),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["", "7", "d", "7w", "-1d", "1.5h", "0s", "7 d", "1d 2h", "99999999d"]
)
def test_malformed_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_expiry_from_a_duration_or_an_iso_date() -> None:
    assert parse_expiry("30d", NOW) == NOW + timedelta(days=30)
    assert parse_expiry("2031-01-31", NOW) == datetime(2031, 1, 31, tzinfo=UTC)
    assert parse_expiry("2031-01-31T10:00:00", NOW) == datetime(2031, 1, 31, 10, tzinfo=UTC)
    assert parse_expiry("2031-01-31T10:00:00Z", NOW) == datetime(2031, 1, 31, 10, tzinfo=UTC)
    assert parse_expiry("2031-01-31T12:00:00+02:00", NOW) == datetime(2031, 1, 31, 10, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2020-01-01", "yesterday", "2031-13-01", "30x", ""])
def test_bad_expiries(text: str) -> None:
    with pytest.raises(ValueError):
        parse_expiry(text, NOW)
