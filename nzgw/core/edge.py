"""What the public listener refuses before routing: framing it will not interpret. Sans-IO.

`check_request(http_version, headers)` looks at a parsed request head and says whether the
gateway must refuse it whatever its target (README "Security", "The edge"):

* a version other than HTTP/1.0 or 1.1 (an HTTP/2 prior-knowledge preface `PRI * HTTP/2.0`
  parsed as HTTP/1): 505, and the connection closes (what follows is binary frames);
* both `Content-Length` and `Transfer-Encoding`: 400, and the connection closes (RFC 9112
  §6.1: the framing is ambiguous, so a request hidden in the body must never be answered);
* an `Upgrade` to anything but `h2c` (WebSocket, TLS, ...): 404, the gateway has no such
  endpoint. `Upgrade: h2c` alone is ignored and the request answered as plain HTTP/1.1.

The same verdict is used twice: by the HTTP/1 protocol (`nzgw.http.edge`), which forces
`Connection: close` on the answer even if the application forgot, and by the application,
which answers in the caller's error shape and audits the refusal.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["HTTP_VERSIONS", "EdgeRefusal", "check_request"]

HTTP_VERSIONS = frozenset({"1.0", "1.1"})


@attrs.frozen
class EdgeRefusal:
    status: int
    message: str
    refusal: str  # the audit's refusal reason
    close: bool  # the connection must close after the answer


_HTTP_VERSION = EdgeRefusal(505, "only HTTP/1.1 is served here", "http_version", close=True)
_AMBIGUOUS_LENGTH = EdgeRefusal(
    400,
    "a request must not carry both Content-Length and Transfer-Encoding",
    "bad_framing",
    close=True,
)
_UPGRADE = EdgeRefusal(404, "not found", "upgrade", close=False)


def check_request(
    http_version: str | bytes, headers: Iterable[tuple[bytes, bytes]]
) -> EdgeRefusal | None:
    """The refusal for a request head, or None when it may be routed."""
    version = http_version.decode("latin-1") if isinstance(http_version, bytes) else http_version
    if version not in HTTP_VERSIONS:
        return _HTTP_VERSION
    has_length = has_encoding = False
    upgrade: list[str] = []
    for raw_name, value in headers:
        name = raw_name.strip().lower()
        if name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            has_encoding = True
        elif name == b"upgrade":
            upgrade += [t.strip().lower() for t in value.decode("latin-1").split(",")]
    if has_length and has_encoding:
        return _AMBIGUOUS_LENGTH
    if any(token and token != "h2c" for token in upgrade):
        return _UPGRADE
    return None
