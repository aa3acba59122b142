"""Secrets out of text: URL userinfo, token-like query parameters and JSON fields, bearer
credentials and API keys are replaced by `***` before a string is shown or logged.

Used by configuration errors (`nzgw.config`) and by every log line (`nzgw.logs`). Pure: no I/O.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ — keep a user name, hide everything after its colon (or all of it when
# there is no colon: `redis://S3cret@host` puts the password there).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"<>]*)@")
_SECRET_NAMES = (
    r"password|passwd|pwd|pass|token|access_token|auth_token|authtoken|secret|api_key|apikey"
    r"|sslpassword|key"
)
_QUERY = re.compile(rf"(?i)(?P<head>[?&;](?:{_SECRET_NAMES})=)[^&#\s'\"]+")
_JSON = re.compile(rf"(?i)(?P<head>[\"'](?:{_SECRET_NAMES})\\?[\"']\s*:\s*\\?[\"'])[^\"'\\]+")
_DSN = re.compile(rf"(?i)(?P<head>\b(?:{_SECRET_NAMES})=)[^\s&'\"]+")
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)[^\s'\",]+")
# nz_ + 8-character public prefix, then the secret: keep the prefix (it is public).
_API_KEY = re.compile(r"(?P<head>\bnz_[a-z0-9]{8})[a-z2-7]{8,}")


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    kept = f"{user}:{MASK}" if colon and user else MASK
    return f"{match['scheme']}{kept}@"


def redact(text: str) -> str:
    """`text` with every recognised secret replaced by `***` (idempotent)."""
    if "@" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _QUERY.sub(rf"\g<head>{MASK}", text)
        text = _DSN.sub(rf"\g<head>{MASK}", text)
    if ":" in text:
        text = _JSON.sub(rf"\g<head>{MASK}", text)
    text = _BEARER.sub(rf"\g<head>{MASK}", text)
    if "nz_" in text:
        text = _API_KEY.sub(rf"\g<head>{MASK}", text)
    return text
