"""API key format and the operator's duration syntax. Sans-IO: no hashing, no storage.

A key is `nz_<prefix><secret>`:

- `prefix`: `PREFIX_LEN` characters of `[a-z0-9]`, the public lookup id. The stored and displayed
  prefix includes the `nz_` marker (`nz_k3x9a2mq`), so an operator can paste it as printed.
- `secret`: `SECRET_LEN` characters of lowercase RFC 4648 base32 (`[a-z2-7]`), the encoding of
  `SECRET_BYTES` bytes from `secrets.token_bytes`: 200 bits.

Every key has the same length and alphabet, so `parse_key` rejects garbage by shape alone,
before the caller spends any I/O or Argon2id work on it.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple

KEY_MARKER = "nz_"
PREFIX_LEN = 8
PREFIX_ALPHABET = string.ascii_lowercase + string.digits
SECRET_BYTES = 25
SECRET_LEN = 40  # base32 of 25 bytes, no padding
SECRET_BITS = SECRET_BYTES * 8
KEY_LEN = len(KEY_MARKER) + PREFIX_LEN + SECRET_LEN
PUBLIC_PREFIX_LEN = len(KEY_MARKER) + PREFIX_LEN

_KEY_RE = re.compile(rf"nz_[a-z0-9]{{{PREFIX_LEN}}}[a-z2-7]{{{SECRET_LEN}}}")
_PREFIX_RE = re.compile(rf"nz_[a-z0-9]{{{PREFIX_LEN}}}")


class ParsedKey(NamedTuple):
    prefix: str  # "nz_" + PREFIX_LEN characters: the public lookup id
    key: str  # the whole presented key, unchanged


def generate_key() -> tuple[str, str]:
    """A new random key and its public prefix: `(full_key, prefix)`."""
    prefix = KEY_MARKER + "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LEN))
    secret = base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").lower()
    assert len(secret) == SECRET_LEN
    return prefix + secret, prefix


def parse_key(presented: str) -> ParsedKey | None:
    """The prefix of a well-formed key, or None. Cheap: length and alphabet only."""
    if len(presented) != KEY_LEN or _KEY_RE.fullmatch(presented) is None:
        return None
    return ParsedKey(presented[:PUBLIC_PREFIX_LEN], presented)


def is_prefix(text: str) -> bool:
    """True for a well-formed public prefix (`nz_` + PREFIX_LEN characters)."""
    return len(text) == PUBLIC_PREFIX_LEN and _PREFIX_RE.fullmatch(text) is not None


# --- durations and expiry, as an operator types them -------------------------------------------

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"(?:(\d+)([dhms]))+")
_DURATION_PART_RE = re.compile(r"(\d+)([dhms])")


def parse_duration(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `90s` or a sum such as `1d12h`. Raises ValueError."""
    raw = text.strip().lower()
    if not raw or _DURATION_RE.fullmatch(raw) is None:
        raise ValueError(f"expected a duration like 7d, 12h, 30m or 90s, got {text!r}")
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART_RE.findall(raw))
    if seconds <= 0:
        raise ValueError(f"a duration must be longer than zero, got {text!r}")
    if seconds > 100 * 366 * 86400:
        raise ValueError(f"a duration must be shorter than 100 years, got {text!r}")
    return timedelta(seconds=seconds)


def parse_expiry(text: str, now: datetime) -> datetime:
    """An absolute expiry: a duration from `now` (`30d`) or an ISO date / date-time.

    A date alone means its start, midnight UTC; a date-time without an offset is UTC. The result
    is timezone-aware UTC and must lie after `now`. Raises ValueError.
    """
    raw = text.strip()
    if raw and raw[0].isdigit() and raw[-1].lower() in _UNIT_SECONDS and "-" not in raw:
        return now + parse_duration(raw)
    try:
        if len(raw) == 10:
            when = datetime.combine(date.fromisoformat(raw), time(), UTC)
        else:
            when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected a duration like 30d or an ISO date like 2030-01-31, got {text!r}"
        ) from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when <= now:
        raise ValueError(f"the expiry {text!r} is not in the future")
    return when
