"""Error bodies per surface, checked against the real client SDKs where we have them.

Rules for this module: no network (the SDKs talk to an `httpx.MockTransport`), no retries
(`max_retries=0`), and every claim about what a client does is checked with that client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2  # openai-python's own HTTP client package
import ollama
import openai
import pytest

from nzgw.core.surfaces import (
    JSON,
    JSON_UTF8,
    StreamKind,
    Surface,
    error_response,
    stream_error_frame,
)


def _transport(status: int, body: bytes, content_type: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return httpx.MockTransport(handler)


def _openai(status: int, body: bytes, content_type: str) -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": content_type})

    return openai.OpenAI(
        api_key="nz_test",
        base_url="http://gateway.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


# --- native -----------------------------------------------------------------------------


def test_native_error_is_ollama_shape() -> None:
    body, content_type = error_response(Surface.NATIVE, 403, "model not available")
    assert body == b'{"error":"model not available"}'
    assert content_type == JSON_UTF8 == "application/json; charset=utf-8"


def test_native_error_drops_code() -> None:
    body, _ = error_response(Surface.NATIVE, 429, "slow down", code="rate_limit_exceeded")
    assert json.loads(body) == {"error": "slow down"}


def test_ollama_python_reads_native_error() -> None:
    body, content_type = error_response(Surface.NATIVE, 403, "model not available")
    client = ollama.Client(
        host="http://gateway.test", transport=_transport(403, body, content_type)
    )
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("llama3")
    assert caught.value.error == "model not available"
    assert caught.value.status_code == 403


def test_gateway_error_carries_code_when_given() -> None:
    body, content_type = error_response(Surface.GATEWAY, 503, "not ready", code="unavailable")
    assert json.loads(body) == {"error": "not ready", "code": "unavailable"}
    assert content_type == JSON_UTF8
    assert error_response(Surface.GATEWAY, 500, "oops")[0] == b'{"error":"oops"}'


def test_messages_are_json_escaped() -> None:
    message = 'quote " backslash \\ newline \n unicode é \ud800'
    for surface in Surface:
        body, _ = error_response(surface, 400, message)
        assert body.isascii()
        doc = json.loads(body)
        found = doc["error"] if isinstance(doc["error"], str) else doc["error"]["message"]
        assert found == message


# --- OpenAI -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", None),
        (404, "not_found_error", None),
        (405, "invalid_request_error", None),
        (413, "invalid_request_error", None),
        (422, "invalid_request_error", None),
        (429, "requests", "rate_limit_exceeded"),
        (500, "api_error", None),
        (502, "api_error", None),
        (503, "api_error", None),
    ],
)
def test_openai_error_type_and_code_by_status(
    status: int, error_type: str, code: str | None
) -> None:
    body, content_type = error_response(Surface.OPENAI, status, "nope")
    assert content_type == JSON
    assert body.endswith(b"\n")
    assert json.loads(body) == {
        "error": {"message": "nope", "type": error_type, "param": None, "code": code}
    }


def test_openai_overrides() -> None:
    body, _ = error_response(
        Surface.OPENAI,
        429,
        "budget spent",
        error_type="insufficient_quota",
        code="insufficient_quota",
    )
    assert json.loads(body)["error"] == {
        "message": "budget spent",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
def test_openai_python_reads_openai_error(status: int, exception: type[Exception]) -> None:
    body, content_type = error_response(Surface.OPENAI, status, "refused here", code="some_code")
    client = _openai(status, body, content_type)
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}])
    error = caught.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == status
    assert error.code == "some_code"
    assert "refused here" in error.message


# --- Anthropic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_type_by_status(status: int, error_type: str) -> None:
    body, content_type = error_response(
        Surface.ANTHROPIC, status, "nope", request_id="req_0123456789abcdef01234567"
    )
    assert content_type == JSON
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": error_type, "message": "nope"},
        "request_id": "req_0123456789abcdef01234567",
    }


def test_anthropic_error_without_request_id_omits_it() -> None:
    body, _ = error_response(Surface.ANTHROPIC, 404, "nope")
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "nope"},
    }


@pytest.mark.parametrize(
    ("status", "override", "error_type"),
    [
        # The OpenAI-shaped 429 types (TPM, budget) mean nothing to an Anthropic client.
        (429, "requests", "rate_limit_error"),
        (429, "tokens", "rate_limit_error"),
        (429, "insufficient_quota", "rate_limit_error"),
        (404, "custom", "not_found_error"),
        (504, None, "timeout_error"),
        # An Anthropic type given on purpose is kept.
        (503, "api_error", "api_error"),
        (400, "billing_error", "billing_error"),
    ],
)
def test_anthropic_error_type_override_is_only_an_anthropic_type(
    status: int, override: str | None, error_type: str
) -> None:
    body, _ = error_response(Surface.ANTHROPIC, status, "nope", error_type=override)
    assert json.loads(body)["error"]["type"] == error_type


# --- mid-stream frames ------------------------------------------------------------------


def test_ndjson_stream_error_frame_is_ollama_error_line() -> None:
    assert stream_error_frame(StreamKind.NDJSON, "boom") == b'{"error":"boom"}\n'


def test_ollama_python_raises_on_stream_error_frame() -> None:
    frames = (
        b'{"model":"llama3","created_at":"2026-08-21T10:00:00.1Z","response":"Hel","done":false}\n'
        + stream_error_frame(StreamKind.NDJSON, "upstream went away")
    )
    client = ollama.Client(
        host="http://gateway.test", transport=_transport(200, frames, "application/x-ndjson")
    )
    parts: Iterator[Any] = client.generate(model="llama3", prompt="hi", stream=True)
    assert next(parts).response == "Hel"
    with pytest.raises(ollama.ResponseError) as caught:
        next(parts)
    assert caught.value.error == "upstream went away"


def test_sse_openai_frame_shape() -> None:
    frame = stream_error_frame(StreamKind.SSE_OPENAI, "boom")
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {
        "error": {"message": "boom", "type": "api_error", "param": None, "code": None}
    }


def test_openai_python_raises_on_chat_stream_error_frame() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "llama3",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
    }
    stream = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    stream += stream_error_frame(StreamKind.SSE_OPENAI, "upstream went away")
    client = _openai(200, stream, "text/event-stream")
    events = iter(
        client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert next(events).choices[0].delta.content == "Hi"
    with pytest.raises(openai.APIError) as caught:
        next(events)
    assert caught.value.message == "upstream went away"


def test_sse_events_frame_serves_both_sdks() -> None:
    frame = stream_error_frame(StreamKind.SSE_EVENTS, "boom", error_type="overloaded_error")
    head, _, data = frame.partition(b"\n")
    assert head == b"event: error"
    assert data.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    doc = json.loads(data[6:])
    # The Anthropic SDK raises on `event: error` with this body ...
    assert doc["type"] == "error"
    assert doc["error"] == {"type": "overloaded_error", "message": "boom"}
    # ... and the Responses API's own error event has these top-level fields.
    assert doc["message"] == "boom"
    assert doc["code"] == "overloaded_error"


def test_openai_python_raises_on_responses_stream_error_frame() -> None:
    created = {
        "type": "response.created",
        "sequence_number": 0,
        "response": {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "in_progress",
            "model": "llama3",
            "output": [],
        },
    }
    stream = b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
    stream += stream_error_frame(StreamKind.SSE_EVENTS, "upstream went away")
    client = _openai(200, stream, "text/event-stream")
    events = iter(client.responses.create(model="llama3", input="hi", stream=True))
    assert next(events).type == "response.created"
    with pytest.raises(openai.APIError) as caught:
        next(events)
    assert caught.value.message == "upstream went away"
