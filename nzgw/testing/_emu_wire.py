"""Sans-IO wire pieces of the emulator: replies, Go-flavoured JSON and time, the error shapes."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Final

import attrs

from nzgw.testing._emu_config import Fault


@attrs.frozen
class TokenDue:
    """Yielded by a reply's chunk iterator when the next token is due: the server waits
    `first_token_delay` (first time) or `token_delay` before it asks for the next chunk."""


TOKEN_DUE: Final = TokenDue()

Chunk = bytes | TokenDue

NATIVE_JSON: Final = "application/json; charset=utf-8"
PLAIN_JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"
EVENT_STREAM: Final = "text/event-stream"
TEXT_UTF8: Final = "text/plain; charset=utf-8"
TEXT: Final = "text/plain"

#: Headers Ollama's /v1/responses and /v1/messages middlewares set before a stream starts.
STREAM_HEADERS: Final = (("Cache-Control", "no-cache"), ("Connection", "keep-alive"))


@attrs.frozen
class Reply:
    """What to answer. Either a complete `body`, or `chunks` produced lazily while the server
    paces them (`TOKEN_DUE` marks). With `streamed`, every bytes chunk goes out as its own HTTP
    chunk, flushed; otherwise the chunks are joined into one body once the generation is over."""

    status: int
    content_type: str | None = None
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    chunks: Iterator[Chunk] | None = None
    streamed: bool = False
    #: A transport-level misbehaviour to act out (CLOSE_BEFORE_FIRST_BYTE, STALL, DIE_MID_STREAM).
    fault: Fault | None = None


class Rejected(Exception):
    """Raised anywhere in a handler to answer with `reply` instead."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


# ------------------------------------------------------------------------------------------------
# JSON as Go's encoding/json writes it: compact, UTF-8, with <, > and & escaped.


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def ndjson_line(value: Any) -> bytes:
    return dumps(value) + b"\n"


def sse_data(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


def sse_event(event: str, value: Any, *, sort_keys: bool = False) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(value, sort_keys=sort_keys) + b"\n\n"


def go_quote(text: str) -> str:
    """Go's `%q` for the strings that occur here."""
    return json.dumps(text, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# Time as Go's time.Time marshals: RFC 3339 with nanoseconds, trailing zeros trimmed.


def rfc3339_nano(epoch_ns: int, utc_offset_seconds: int = 0) -> str:
    seconds, fraction = divmod(epoch_ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds + utc_offset_seconds))
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    if utc_offset_seconds == 0:
        return text + "Z"
    sign = "+" if utc_offset_seconds > 0 else "-"
    hours, minutes = divmod(abs(utc_offset_seconds) // 60, 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def datetime_ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def rfc3339_datetime(moment: datetime) -> str:
    offset = moment.utcoffset()
    return rfc3339_nano(datetime_ns(moment), int(offset.total_seconds()) if offset else 0)


# ------------------------------------------------------------------------------------------------
# Error shapes (docs/OLLAMA-WIRE.md).

BUSY_MESSAGE: Final = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_DIED_MESSAGE: Final = "llama runner process has terminated: exit status 2"

_OPENAI_ERROR_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def native_error(status: int, message: str, *, content_type: str = NATIVE_JSON) -> Reply:
    return Reply(status, content_type, dumps({"error": message}))


def openai_error(status: int, message: str, *, from_middleware: bool = False) -> Reply:
    """Errors raised by Ollama's compat middleware (request validation) are written by gin:
    `; charset=utf-8`, no newline. Errors from the handler pass through the response writer,
    which re-encodes them: `application/json` and a trailing newline."""
    body = dumps(
        {
            "error": {
                "message": message,
                "type": _OPENAI_ERROR_TYPES.get(status, "api_error"),
                "param": None,
                "code": None,
            }
        }
    )
    if from_middleware:
        return Reply(status, NATIVE_JSON, body)
    return Reply(status, PLAIN_JSON, body + b"\n")


def anthropic_error(
    status: int,
    message: str,
    *,
    from_middleware: bool = False,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    body = dumps(
        {
            "type": "error",
            "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_" + secrets.token_hex(12),
        }
    )
    if from_middleware:
        return Reply(status, NATIVE_JSON, body, headers=headers)
    return Reply(status, PLAIN_JSON, body + b"\n", headers=headers)


def router_not_found() -> Reply:
    return Reply(404, TEXT, b"404 page not found")


def router_method_not_allowed() -> Reply:
    return Reply(405, TEXT, b"405 method not allowed")


# ------------------------------------------------------------------------------------------------
# Go's json error texts for request bodies (encoding/json, approximated).


def go_json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def go_syntax_error(text: str, error: json.JSONDecodeError) -> str:
    rest = text[error.pos :].lstrip()
    if not rest:
        return "unexpected EOF"
    character = f"'{rest[0]}'"
    if error.msg.startswith("Extra data"):
        return f"invalid character {character} after top-level value"
    if error.msg.startswith("Expecting ',' delimiter"):
        return f"invalid character {character} after object key:value pair"
    if error.msg.startswith("Expecting ':' delimiter"):
        return f"invalid character {character} after object key"
    if error.msg.startswith("Expecting property name"):
        return f"invalid character {character} looking for beginning of object key string"
    return f"invalid character {character} looking for beginning of value"
