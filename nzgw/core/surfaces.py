"""Error bodies and mid-stream error frames in the shape of each API surface. Sans-IO.

A client must be able to parse our refusals with the SDK it already uses, so every error takes
the shape of the surface it called (docs/OLLAMA-WIRE.md):

* native `/api/*`: `{"error":"…"}`, `application/json; charset=utf-8`;
* OpenAI `/v1/*`: `{"error":{"message","type","param":null,"code"}}`, `application/json`;
* Anthropic `/v1/messages`: `{"type":"error","error":{"type","message"},"request_id"}`;
* the gateway's own endpoints: the native shape, plus `"code"` when there is one.

OpenAI error types, by status (`error_type=` overrides, `code=` sets the code):

| status | type | default code | why |
|---|---|---|---|
| 400, 405, 409, 413, 422 and other 4xx | `invalid_request_error` | – | Ollama and OpenAI |
| 401 | `invalid_request_error` | `invalid_api_key` | what OpenAI itself sends |
| 403 | `permission_error` | – | OpenAI has no stable type; SDKs branch on the status |
| 404 | `not_found_error` | – | what Ollama sends |
| 429 | `requests` | `rate_limit_exceeded` | OpenAI's own (RPM); see below |
| 5xx | `api_error` | – | Ollama and OpenAI |

For 429 pass `error_type="tokens"` for a tokens-per-minute refusal and
`error_type="insufficient_quota", code="insufficient_quota"` for an exhausted budget (as OpenAI).

Anthropic types follow Anthropic's documented ones (and the reference): 400
`invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404
`not_found_error`, 413 `request_too_large`, 429 `rate_limit_error` (also for an exhausted budget),
500 `api_error`, 503/529 `overloaded_error`, 504 `timeout_error`; other 4xx
`invalid_request_error`, other 5xx `api_error`. An `error_type=` meant for the OpenAI shape
(`tokens`, `insufficient_quota`) is not an Anthropic type and is ignored there.

`StreamKind` lives here (not in `framing`) because stream error frames are a surface shape and
this module is the leaf of `nzgw.core`'s import graph (`paths` and `framing` import it).
"""

from __future__ import annotations

import enum
import json
from typing import Any

__all__ = [
    "JSON",
    "JSON_UTF8",
    "StreamKind",
    "Surface",
    "error_response",
    "stream_error_frame",
]

JSON_UTF8 = "application/json; charset=utf-8"
JSON = "application/json"


class Surface(enum.StrEnum):
    """Which API a request target belongs to; decides the shape of its errors."""

    NATIVE = "native"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GATEWAY = "gateway"


class StreamKind(enum.StrEnum):
    """The wire framing of a streamed answer."""

    NDJSON = "ndjson"  # /api/generate, /api/chat: one JSON object + "\n" per frame
    SSE_OPENAI = "sse_openai"  # /v1/chat/completions, /v1/completions: `data: …\n\n`, `[DONE]`
    SSE_EVENTS = "sse_events"  # /v1/responses, /v1/messages: `event: …\ndata: …\n\n`


def _dumps(doc: Any) -> bytes:
    # ASCII-only output: a message relayed from upstream may hold lone surrogates (a JSON
    # `\ud800` escape decodes to one), which a UTF-8 encode would refuse mid-stream.
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _openai_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "requests"
    if status >= 500 or status < 400:
        return "api_error"
    return "invalid_request_error"


_OPENAI_DEFAULT_CODE = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_TYPE_NAMES = frozenset({*_ANTHROPIC_TYPES.values(), "billing_error"})


def _anthropic_type(status: int) -> str:
    known = _ANTHROPIC_TYPES.get(status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _anthropic_error_type(status: int, override: str | None) -> str:
    if override is not None and override in _ANTHROPIC_TYPE_NAMES:
        return override
    return _anthropic_type(status)


def error_response(
    surface: Surface,
    status: int,
    message: str,
    *,
    code: str | None = None,
    error_type: str | None = None,
    request_id: str | None = None,
) -> tuple[bytes, str]:
    """The body and Content-Type of an error answer with `status` on `surface`.

    `code` is the machine-readable code (OpenAI `error.code`, gateway `code`; ignored on the
    native and Anthropic shapes, which have none). `error_type` overrides the type derived from
    `status` (OpenAI and Anthropic). `request_id` fills Anthropic's `request_id` (left out
    when None). OpenAI and Anthropic bodies end with a newline, as Ollama's `/v1/*` ones do.
    """
    if surface is Surface.OPENAI:
        error = {
            "message": message,
            "type": error_type or _openai_type(status),
            "param": None,
            "code": code if code is not None else _OPENAI_DEFAULT_CODE.get(status),
        }
        return _dumps({"error": error}) + b"\n", JSON
    if surface is Surface.ANTHROPIC:
        doc: dict[str, Any] = {
            "type": "error",
            "error": {"type": _anthropic_error_type(status, error_type), "message": message},
        }
        if request_id is not None:
            doc["request_id"] = request_id
        return _dumps(doc) + b"\n", JSON
    if surface is Surface.GATEWAY and code is not None:
        return _dumps({"error": message, "code": code}), JSON_UTF8
    return _dumps({"error": message}), JSON_UTF8


def stream_error_frame(kind: StreamKind, message: str, *, error_type: str = "api_error") -> bytes:
    """One frame that makes the client's SDK raise `message`, for a stream already under way.

    * NDJSON: `{"error":"…"}\\n`, Ollama's own mid-stream error line (ollama-python raises
      `ResponseError`).
    * SSE_OPENAI: `data: {"error":{…}}\\n\\n`; openai-python raises `APIError` on any event
      whose data has a truthy `"error"`.
    * SSE_EVENTS: `event: error` whose data is Anthropic's error event and also carries the
      OpenAI Responses `error` event's top-level `code`/`message`: the Anthropic SDK raises on
      `event: error`, openai-python on the truthy `"error"`, so one frame serves both
      `/v1/responses` and `/v1/messages`.
    """
    if kind is StreamKind.NDJSON:
        return _dumps({"error": message}) + b"\n"
    if kind is StreamKind.SSE_OPENAI:
        error = {"message": message, "type": error_type, "param": None, "code": None}
        return b"data: " + _dumps({"error": error}) + b"\n\n"
    doc = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "code": error_type,
        "message": message,
        "param": None,
    }
    return b"event: error\ndata: " + _dumps(doc) + b"\n\n"
