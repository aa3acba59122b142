"""The Ollama emulator (`nzgw.testing`) against reference/ollama-api.md.

Rules for this module:
- Real clients where they exist: the `ollama` and `openai` packages run their sync clients in a
  worker thread (`trio.to_thread.run_sync`) against the in-process emulator. Raw httpx or a raw
  Trio socket where the exact bytes or the exact moment matter.
- No sleeping to synchronise. Wait on the emulator's log (`wait_until`, `wait_connection_closed`)
  under `trio.fail_after`. The only timeouts that expire on purpose prove a STALL stalls.
- Each test opens its own emulator (it costs a few milliseconds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import click
import httpx
import ollama
import openai
import pytest
import trio
import trio.testing
from openai.types.chat import ChatCompletionMessageParam

from nzgw.cli.emulate import emulate_ollama, settings_from_options
from nzgw.testing import (
    EmulatedModel,
    Emulator,
    EmulatorSettings,
    Fault,
    default_models,
    open_emulator,
)
from nzgw.testing._emu_config import parse_model_name
from nzgw.testing._emu_render import plan_reply
from nzgw.testing._emu_wire import rfc3339_nano

T = TypeVar("T")

CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
BUSY_BODY = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
REPLY = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
HELLO = [{"role": "user", "content": "hello there"}]
OPENAI_HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
#: "hello there": 2 words + 4 per message.
HELLO_PROMPT_TOKENS = 6


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with open_emulator() as emulator:
        yield emulator


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as client:
        yield client


async def in_thread(function: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(function)


def ollama_client(emulator: Emulator) -> ollama.Client:
    return ollama.Client(host=emulator.url)


def openai_client(emulator: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.url + "/v1", api_key="unused", max_retries=0)


def ndjson(body: str) -> list[dict[str, Any]]:
    assert body.endswith("\n") and "\n\n" not in body
    return [json.loads(line) for line in body.splitlines()]


def sse(body: str) -> list[tuple[str | None, str]]:
    """(event, data) per SSE event; asserts nothing but `event:` and `data:` lines is sent."""
    assert body.endswith("\n\n")
    events = []
    for block in body[:-2].split("\n\n"):
        event = None
        data = None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            else:
                assert field == "data", line
                data = value
        assert data is not None
        events.append((event, data))
    return events


# --------------------------------------------------------------------------------------------------
# Sans-IO pieces.


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        ("llama3", "llama3:latest"),
        ("LLAMA3:Latest", "LLAMA3:Latest"),
        ("user/model:7b", "user/model:7b"),
        ("registry.ollama.ai/library/llama3:latest", "llama3:latest"),
        ("example.com:5000/team/m", "example.com:5000/team/m:latest"),
        ("host:5000/m", None),  # the tag follows the last ':' only after the last '/'
        ("", None),
        ("bad name", None),
        ("a/b/c/d", None),
        ("llama3:", None),
    ],
)
def test_model_names_parse_like_ollama(raw: str, short: str | None) -> None:
    ref = parse_model_name(raw)
    assert (ref.short if ref else None) == short


def test_model_names_compare_case_insensitively_with_defaults_filled_in() -> None:
    settings = EmulatorSettings()
    for spelling in ("llama3", "LLAMA3", "llama3:latest", "registry.ollama.ai/library/Llama3"):
        model = settings.find_model(spelling)
        assert model is not None and model.name == "llama3:latest"
    assert settings.find_model("llama3:8b") is None


def test_times_are_rfc3339_with_nanoseconds_trimmed_like_go() -> None:
    assert rfc3339_nano(1_755_800_000_123_456_789) == "2025-08-21T18:13:20.123456789Z"
    assert rfc3339_nano(1_755_800_000_100_000_000) == "2025-08-21T18:13:20.1Z"
    assert rfc3339_nano(1_755_800_000_000_000_000) == "2025-08-21T18:13:20Z"
    assert rfc3339_nano(1_755_800_000_000_000_000, -7 * 3600) == "2025-08-21T11:13:20-07:00"


@pytest.mark.parametrize(
    ("cap", "count", "done_reason"),
    [(None, 11, "stop"), (0, 11, "stop"), (12, 11, "stop"), (11, 11, "length"), (2, 2, "length")],
)
def test_caps_count_thinking_and_reaching_them_is_length(
    cap: int | None, count: int, done_reason: str
) -> None:
    plan = plan_reply(content_tokens=8, thinking_tokens=3, cap=cap)
    pieces = list(plan.pieces())
    assert (len(pieces), plan.count, plan.done_reason) == (count, count, done_reason)
    assert [piece.thinking for piece in pieces] == [True, True, True, *[False] * 8][:count]


# --------------------------------------------------------------------------------------------------
# Router, health, host check.


async def test_health_version_and_router_errors(client: httpx.AsyncClient) -> None:
    root = await client.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["content-type"] == "text/plain; charset=utf-8"
    head = await client.head("/")
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "17")

    version = await client.get("/api/version")
    assert version.headers["content-type"] == "application/json; charset=utf-8"
    assert version.content == b'{"version":"0.33.0-rc2"}'
    assert (await client.head("/api/tags")).status_code == 200

    missing = await client.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert missing.headers["content-type"] == "text/plain"
    for method, path in [("GET", "/api/chat"), ("POST", "/"), ("HEAD", "/api/ps")]:
        wrong = await client.request(method, path)
        assert wrong.status_code == 405
        assert wrong.headers["content-type"] == "text/plain"
        if method != "HEAD":
            assert wrong.text == "405 method not allowed"
    assert (await client.get("/v1/models/library/llama3")).status_code == 404  # one segment only

    slash = await client.get("/api/tags/?x=1")  # gin redirects a trailing slash away
    assert (slash.status_code, slash.headers["location"]) == (301, "/api/tags?x=1")
    slash = await client.post("/api/chat/", json={})
    assert (slash.status_code, slash.headers["location"], slash.content) == (307, "/api/chat", b"")


async def test_host_check_like_ollama_bound_to_loopback(client: httpx.AsyncClient) -> None:
    foreign = await client.get("/api/tags", headers={"Host": "gateway.example.com"})
    assert (foreign.status_code, foreign.content) == (403, b"")
    for host in ("localhost:11434", "127.0.0.1", "10.1.2.3:80", "ollama.internal"):
        assert (await client.get("/api/tags", headers={"Host": host})).status_code == 200


# --------------------------------------------------------------------------------------------------
# Native API.


async def test_ollama_client_chat_and_generate(emulator: Emulator) -> None:
    def talk() -> tuple[ollama.ChatResponse, str, ollama.GenerateResponse]:
        with ollama_client(emulator) as client:
            chat = client.chat(model="llama3", messages=HELLO)
            streamed = "".join(
                part.response for part in client.generate(model="llama3", prompt="hi", stream=True)
            )
            generated = client.generate(model="llama3", prompt="hi", options={"num_predict": 3})
            return chat, streamed, generated

    chat, streamed, generated = await in_thread(talk)
    assert chat.model == "llama3"  # echoed verbatim
    assert chat.message.role == "assistant" and chat.message.content == REPLY
    assert (chat.done, chat.done_reason) == (True, "stop")
    assert (chat.prompt_eval_count, chat.eval_count) == (HELLO_PROMPT_TOKENS, 8)
    assert chat.total_duration and chat.eval_duration and chat.prompt_eval_duration
    assert chat.created_at and CREATED_AT.fullmatch(chat.created_at)
    assert streamed == REPLY
    assert (generated.response, generated.done_reason, generated.eval_count) == (
        "tok0 tok1 tok2 ",
        "length",
        3,
    )
    assert generated.context  # not raw: the token ids come back


async def test_native_stream_is_ndjson_one_frame_per_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={"model": "llama3", "messages": HELLO})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["transfer-encoding"] == "chunked"
    frames = ndjson(response.text)
    assert len(frames) == 9
    for index, frame in enumerate(frames[:-1]):
        assert list(frame) == ["model", "created_at", "message", "done"]
        assert frame["message"] == {"role": "assistant", "content": f"tok{index} "}
        assert frame["done"] is False and CREATED_AT.fullmatch(frame["created_at"])
    final = frames[-1]
    assert list(final) == [
        "model",
        "created_at",
        "message",
        "done",
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["prompt_eval_count"], final["eval_count"]) == (HELLO_PROMPT_TOKENS, 8)
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


async def test_load_and_unload_replies_are_one_object_even_when_streaming(
    client: httpx.AsyncClient,
) -> None:
    load = await client.post("/api/generate", json={"model": "llama3", "prompt": ""})
    assert load.headers["content-type"] == "application/json; charset=utf-8"
    body = load.json()
    assert list(body) == ["model", "created_at", "response", "done", "done_reason"]
    assert (body["response"], body["done"], body["done_reason"]) == ("", True, "load")

    chat_load = await client.post("/api/chat", json={"model": "llama3", "messages": []})
    assert chat_load.json()["message"] == {"role": "assistant", "content": ""}
    assert chat_load.json()["done_reason"] == "load"
    unload = await client.post("/api/chat", json={"model": "llama3", "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    unload = await client.post("/api/generate", json={"model": "llama3", "keep_alive": "0s"})
    assert unload.json()["done_reason"] == "unload"


async def test_thinking_models_think_by_default_and_it_counts(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={"model": "qwen3", "messages": HELLO})
    frames = ndjson(response.text)
    thinking = [frame["message"]["thinking"] for frame in frames if "thinking" in frame["message"]]
    assert thinking == ["think0 ", "think1 ", "think2 "]
    assert frames[3]["message"] == {"role": "assistant", "content": "tok0 "}
    assert frames[-1]["eval_count"] == 3 + 8

    plain = await client.post(
        "/api/chat",
        json={"model": "qwen3", "messages": HELLO, "think": False, "stream": False},
    )
    assert "thinking" not in plain.json()["message"] and plain.json()["eval_count"] == 8
    capped = await client.post(
        "/api/generate",
        json={"model": "qwen3", "prompt": "x", "stream": False, "options": {"num_predict": 5}},
    )
    assert (capped.json()["thinking"], capped.json()["response"]) == (
        "think0 think1 think2 ",
        "tok0 tok1 ",
    )

    refused = await client.post(
        "/api/chat", json={"model": "llama3", "messages": HELLO, "think": True}
    )
    assert (refused.status_code, refused.json()) == (
        400,
        {"error": '"llama3" does not support thinking'},
    )


async def test_capabilities_are_checked(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    cases = [
        ("/api/chat", {"model": "qwen3", "messages": HELLO, "tools": tools}),
        ("/api/chat", {"model": "all-minilm", "messages": HELLO}),
        ("/api/generate", {"model": "all-minilm", "prompt": "x"}),
        ("/api/generate", {"model": "llama3", "prompt": "x", "suffix": "y"}),
    ]
    errors = [(await client.post(path, json=body)).json()["error"] for path, body in cases]
    assert errors == [
        "registry.ollama.ai/library/qwen3:latest does not support tools",
        '"all-minilm" does not support chat',
        '"all-minilm" does not support generate',
        "registry.ollama.ai/library/llama3:latest does not support insert",
    ]


async def test_names_are_case_insensitive_and_echoed_verbatim(client: httpx.AsyncClient) -> None:
    for spelling in ("LLAMA3", "llama3:latest", "Llama3:LATEST"):
        response = await client.post(
            "/api/chat", json={"model": spelling, "messages": HELLO, "stream": False}
        )
        assert (response.status_code, response.json()["model"]) == (200, spelling)
    listed = (await client.get("/api/tags")).json()["models"]
    assert [model["name"] for model in listed] == [
        "llama3:latest",
        "qwen3:latest",
        "all-minilm:latest",
    ]  # newest first, short form with the tag
    assert all(re.fullmatch(r"[0-9a-f]{64}", model["digest"]) for model in listed)


async def test_ollama_client_listings(emulator: Emulator) -> None:
    def look() -> tuple[ollama.ListResponse, ollama.ShowResponse, ollama.ProcessResponse]:
        with ollama_client(emulator) as client:
            return client.list(), client.show("llama3"), client.ps()

    listed, shown, running = await in_thread(look)
    assert [model.model for model in listed.models] == [
        "llama3:latest",
        "qwen3:latest",
        "all-minilm:latest",
    ]
    assert listed.models[0].details and listed.models[0].details.family == "llama"
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo and shown.modelinfo["llama.context_length"] == 8192
    assert [model.name for model in running.models] == ["llama3:latest"]


# A row per surface (docs/OLLAMA-WIRE.md, "Error shapes").
NOT_FOUND = [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, {"error": "model 'nope' not found"}),
    ("/api/chat", {"model": "nope", "messages": HELLO}, 404, {"error": "model 'nope' not found"}),
    ("/api/delete", {"model": "nope"}, 404, {"error": "model 'nope' not found"}),
    (
        "/api/embed",
        {"model": "nope", "input": "x"},
        404,
        {"error": 'model "nope" not found, try pulling it first'},
    ),
    (
        "/api/embeddings",
        {"model": "nope", "prompt": "x"},
        404,
        {"error": 'model "nope" not found, try pulling it first'},
    ),
    ("/api/show", {"model": "nope"}, 404, {"error": "model 'nope:latest' not found"}),
    ("/api/copy", {"source": "nope", "destination": "x"}, 404, {"error": 'model "nope" not found'}),
    (
        "/api/pull",
        {"model": "nope", "stream": False},
        500,
        {"error": "pull model manifest: file does not exist"},
    ),
]
OPENAI_NOT_FOUND = [
    ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, "model 'nope' not found"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, "model 'nope' not found"),
    ("/v1/responses", {"model": "nope", "input": "x"}, "model 'nope' not found"),
    (
        "/v1/embeddings",
        {"model": "nope", "input": "x"},
        'model "nope" not found, try pulling it first',
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "error"), NOT_FOUND)
async def test_native_model_not_found(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, error: dict[str, str]
) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    response = await client.request(method, path, json=body)
    assert (response.status_code, response.json()) == (status, error)


@pytest.mark.parametrize(("path", "body", "message"), OPENAI_NOT_FOUND)
async def test_openai_model_not_found(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], message: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    expected = {"message": message, "type": "not_found_error", "param": None, "code": None}
    assert (
        response.content == json.dumps({"error": expected}, separators=(",", ":")).encode() + b"\n"
    )
    retrieve = await client.get("/v1/models/nope")
    assert retrieve.json()["error"]["message"] == "model 'nope:latest' not found"


async def test_anthropic_model_not_found(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": HELLO}
    )
    assert response.status_code == 404
    body = response.json()
    assert body["type"] == "error"
    assert body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    assert re.fullmatch(r"req_[0-9a-f]{24}", body["request_id"])


async def test_bad_bodies_and_missing_models(client: httpx.AsyncClient) -> None:
    async def error_of(path: str, content: bytes) -> tuple[int, Any]:
        response = await client.post(path, content=content)
        return response.status_code, response.json()

    assert await error_of("/api/chat", b"") == (400, {"error": "missing request body"})
    assert await error_of("/api/generate", b"  \n") == (400, {"error": "missing request body"})
    assert await error_of("/api/chat", b"{") == (400, {"error": "unexpected EOF"})
    assert await error_of("/api/chat", b"[1]") == (
        400,
        {"error": "json: cannot unmarshal array into Go value of type api.ChatRequest"},
    )
    assert await error_of("/api/chat", b'{"model": 3}') == (
        400,
        {
            "error": "json: cannot unmarshal number into Go struct field ChatRequest.model of type "
            "string"
        },
    )
    assert await error_of("/api/chat", b"{}") == (400, {"error": "model is required"})
    assert await error_of("/api/generate", b"{}") == (404, {"error": "model '' not found"})
    assert await error_of("/api/embed", b"{}") == (404, {"error": "model '' not found"})
    assert await error_of("/api/generate", b'{"model": "bad name"}') == (
        400,
        {"error": "invalid model name"},
    )
    options = b'{"model":"llama3","prompt":"x","options":{"temperature":"hot"}}'
    assert await error_of("/api/generate", options) == (
        500,
        {"error": 'option "temperature" must be of type float32'},
    )

    empty_v1 = await client.post("/v1/chat/completions", content=b"")
    assert empty_v1.headers["content-type"] == "application/json; charset=utf-8"  # middleware
    assert empty_v1.json()["error"]["message"] == "EOF"
    no_messages = await client.post("/v1/chat/completions", json={"model": "llama3"})
    assert no_messages.json()["error"] == {
        "message": "[] is too short - 'messages'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    no_model = await client.post("/v1/chat/completions", json={"messages": HELLO})
    assert no_model.headers["content-type"] == "application/json"  # handler, through the writer
    assert (no_model.status_code, no_model.json()["error"]["message"]) == (
        400,
        "model is required",
    )
    no_model = await client.post("/v1/completions", json={"prompt": "x"})
    assert (no_model.status_code, no_model.json()["error"]["message"]) == (
        404,
        "model '' not found",
    )
    for body, message in [
        ({"max_tokens": 5, "messages": HELLO}, "model is required"),
        ({"model": "llama3", "messages": HELLO}, "max_tokens is required and must be positive"),
        ({"model": "llama3", "max_tokens": 5}, "messages is required"),
    ]:
        response = await client.post("/v1/messages", json=body)
        assert response.status_code == 400
        assert response.json()["error"] == {"type": "invalid_request_error", "message": message}


# --------------------------------------------------------------------------------------------------
# Embeddings.


async def test_embeddings_are_deterministic_and_normalised(emulator: Emulator) -> None:
    def embed() -> tuple[Any, ...]:
        with ollama_client(emulator) as client:
            first = client.embed(model="all-minilm", input=["alpha", "beta gamma"])
            again = client.embed(model="all-minilm", input="alpha")
            cut = client.embed(model="all-minilm", input="alpha", dimensions=4)
            legacy = client.embeddings(model="all-minilm", prompt="alpha")
        with openai_client(emulator) as client:
            floats = client.embeddings.create(model="all-minilm", input=["alpha"])
            packed = client.embeddings.create(
                model="all-minilm", input="alpha", encoding_format="base64"
            )
        return first, again, cut, legacy, floats, packed

    first, again, cut, legacy, floats, packed = await in_thread(embed)
    alpha, beta = first.embeddings
    assert len(alpha) == len(beta) == 8 and alpha != beta
    assert again.embeddings[0] == alpha
    assert first.prompt_eval_count == (1 + 1) + (2 + 1)
    for vector in (alpha, beta, cut.embeddings[0], legacy.embedding):
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert len(cut.embeddings[0]) == 4
    assert legacy.embedding == pytest.approx(alpha, abs=1e-7)
    # openai-python asks for base64 unless told otherwise, and decodes the float32s itself.
    (v1_request,) = [r for r in emulator.requests if r.path == "/v1/embeddings"][:1]
    assert json.loads(v1_request.body)["encoding_format"] == "base64"
    assert floats.data[0].embedding == pytest.approx(alpha, abs=1e-7)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2
    assert isinstance(packed.data[0].embedding, str)  # asked for explicitly: left as sent
    decoded = struct.unpack("<8f", base64.b64decode(packed.data[0].embedding))
    assert list(decoded) == pytest.approx(alpha, abs=1e-7)


async def test_v1_embeddings_input_rules(client: httpx.AsyncClient) -> None:
    bad: list[str] | None
    for bad in (None, []):
        response = await client.post("/v1/embeddings", json={"model": "all-minilm", "input": bad})
        assert (response.status_code, response.json()["error"]["message"]) == (400, "invalid input")
    empty = await client.post("/v1/embeddings", json={"model": "all-minilm", "input": ""})
    assert len(empty.json()["data"]) == 1  # "" counts as [""]
    raw = await client.post(
        "/v1/embeddings",
        json={"model": "all-minilm", "input": "alpha", "encoding_format": "base64"},
    )
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert len(struct.unpack("<8f", packed)) == 8


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible API.


async def test_openai_client_chat_completions(emulator: Emulator) -> None:
    def talk() -> tuple[Any, list[Any]]:
        with openai_client(emulator) as client:
            completion = client.chat.completions.create(model="llama3", messages=OPENAI_HELLO)
            chunks = list(
                client.chat.completions.create(
                    model="qwen3",
                    messages=OPENAI_HELLO,
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=6,
                )
            )
        return completion, chunks

    completion, chunks = await in_thread(talk)
    assert completion.model == "llama3" and completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6, 8)

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 6
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert content == "tok0 tok1 tok2 "


async def test_v1_chat_stream_framing(client: httpx.AsyncClient) -> None:
    body = {"model": "llama3", "messages": HELLO, "stream": True, "max_tokens": 2}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"] == "text/event-stream"
    events = sse(response.text)
    assert all(event is None for event, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": "tok0 "},
        {"content": "tok1 "},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)  # not asked for: none at all
    assert (
        len({chunk["id"] for chunk in chunks}) == len({chunk["created"] for chunk in chunks}) == 1
    )


async def test_v1_completions_usage_on_every_chunk(emulator: Emulator) -> None:
    def complete() -> list[Any]:
        with openai_client(emulator) as client:
            return list(
                client.completions.create(
                    model="llama3",
                    prompt="hello there",
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=3,
                )
            )

    chunks = await in_thread(complete)
    assert [chunk.choices[0].text for chunk in chunks[:-1]] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * 3 + ["length"]
    assert all(chunk.usage.total_tokens == 0 for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 3)


async def test_v1_models(emulator: Emulator, client: httpx.AsyncClient) -> None:
    def look() -> tuple[list[str], Any]:
        with openai_client(emulator) as client:
            return [model.id for model in client.models.list()], client.models.retrieve("LLAMA3")

    ids, retrieved = await in_thread(look)
    assert ids == ["llama3:latest", "qwen3:latest", "all-minilm:latest"]
    assert (retrieved.id, retrieved.owned_by) == ("LLAMA3", "library")
    emulator.settings.models = []
    assert (await client.get("/v1/models")).content == b'{"object":"list","data":null}\n'
    assert (await client.get("/api/tags")).content == b'{"models":[]}'


async def test_v1_responses(emulator: Emulator, client: httpx.AsyncClient) -> None:
    def respond() -> tuple[Any, list[Any]]:
        with openai_client(emulator) as client:
            response = client.responses.create(model="llama3", input="hello there")
            events = list(
                client.responses.create(
                    model="qwen3", input="hello there", stream=True, max_output_tokens=5
                )
            )
        return response, events

    response, events = await in_thread(respond)
    assert (response.status, response.output_text) == ("completed", REPLY)
    assert (response.usage.input_tokens, response.usage.output_tokens) == (6, 8)
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (6, 5)
    assert completed.output_text == "tok0 tok1 "

    raw = await client.post("/v1/responses", json={"model": "llama3", "input": "x", "stream": True})
    assert raw.headers["cache-control"] == "no-cache"
    framed = sse(raw.text)
    assert all(event is not None for event, _ in framed)
    assert framed[-1][0] == "response.completed" and "[DONE]" not in raw.text
    assert json.loads(framed[-1][1])["response"]["usage"]["output_tokens"] == 8


# --------------------------------------------------------------------------------------------------
# Anthropic-compatible API.


async def test_v1_messages_stream_and_body(client: httpx.AsyncClient) -> None:
    request = {"model": "qwen3", "max_tokens": 5, "messages": HELLO, "stream": True}
    response = await client.post("/v1/messages", json=request)
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["connection"] == "keep-alive"
    events = [(event, json.loads(data)) for event, data in sse(response.text)]
    assert all(event == data["type"] for event, data in events)
    assert [event for event, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 2,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": len("userhello there") // 4, "output_tokens": 0}
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens"}
    assert events[-2][1]["usage"] == {"input_tokens": 6, "output_tokens": 5}

    body = (await client.post("/v1/messages", json=request | {"stream": False})).json()
    assert re.fullmatch(r"msg_[0-9a-f]{24}", body["id"])
    assert body["content"] == [
        {"type": "thinking", "thinking": "think0 think1 think2 "},
        {"type": "text", "text": "tok0 tok1 "},
    ]
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"] == {"input_tokens": 6, "output_tokens": 5}
    relaxed = await client.post(
        "/v1/messages",
        json={**request, "model": "llama3", "stream": False, "thinking": {"type": "enabled"}},
    )
    assert relaxed.status_code == 200  # thinking on a model without it is silently dropped


# --------------------------------------------------------------------------------------------------
# Model management endpoints: present, Ollama-like, recorded.


async def test_mutating_endpoints_answer_and_are_recorded(
    emulator: Emulator, client: httpx.AsyncClient
) -> None:
    def pull() -> list[str | None]:
        with ollama_client(emulator) as ollama_api:
            return [progress.status for progress in ollama_api.pull("llama3", stream=True)]

    statuses = await in_thread(pull)
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    missing = ndjson((await client.post("/api/pull", json={"model": "nope"})).text)
    assert missing[-1] == {"error": "pull model manifest: file does not exist"}

    push = ndjson((await client.post("/api/push", json={"model": "llama3"})).text)
    assert push[-1] == {"status": "success"}
    create = await client.post("/api/create", json={"model": "mine", "from": "llama3"})
    assert ndjson(create.text)[-1] == {"status": "success"}
    copy = await client.post("/api/copy", json={"source": "llama3", "destination": "mine"})
    assert (copy.status_code, copy.content, "content-type" in copy.headers) == (200, b"", False)
    delete = await client.request("DELETE", "/api/delete", json={"model": "llama3"})
    assert (delete.status_code, delete.content) == (200, b"")

    blob = b"some bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert (await client.head(f"/api/blobs/{digest}")).status_code == 404
    assert (await client.post(f"/api/blobs/{digest}", content=blob)).status_code == 201
    assert (await client.post(f"/api/blobs/{digest}", content=blob)).status_code == 200
    assert (await client.head(f"/api/blobs/{digest}")).status_code == 200
    bad = await client.post("/api/blobs/sha256:" + "0" * 64, content=blob)
    assert bad.status_code == 400 and bad.json()["error"].startswith("digest mismatch")
    assert (await client.head("/api/blobs/nothex")).status_code == 400

    assert [(r.method, r.path) for r in emulator.requests if r.path != "/api/pull"] == [
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        *[("HEAD", f"/api/blobs/{digest}"), ("POST", f"/api/blobs/{digest}")],
        *[("POST", f"/api/blobs/{digest}"), ("HEAD", f"/api/blobs/{digest}")],
        ("POST", "/api/blobs/sha256:" + "0" * 64),
        ("HEAD", "/api/blobs/nothex"),
    ]
    assert sum(r.path == "/api/pull" for r in emulator.requests) == 2
    (delete_request,) = [r for r in emulator.requests if r.method == "DELETE"]
    assert json.loads(delete_request.body) == {"model": "llama3"}


# --------------------------------------------------------------------------------------------------
# Faults.


async def test_refuse_stops_listening_and_comes_back_on_the_same_port(
    emulator: Emulator, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/")).status_code == 200
    assert emulator.open_connections == 1  # idle, kept alive
    port = emulator.port

    emulator.settings.fault = Fault.REFUSE
    with trio.fail_after(2):
        await emulator.wait_until(lambda: emulator.open_connections == 0)
    with pytest.raises(httpx.ConnectError):
        await client.get("/")
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)

    emulator.settings.fault = Fault.NONE
    assert emulator.port == port
    assert (await client.get("/")).status_code == 200
    assert emulator.connections[0].closed_by_peer is False


async def test_http_faults_in_each_surface_shape(
    emulator: Emulator, client: httpx.AsyncClient
) -> None:
    emulator.settings.fault = Fault.BUSY_503
    busy = await client.post("/api/chat", json={"model": "llama3", "messages": HELLO})
    assert (busy.status_code, busy.content) == (503, BUSY_BODY)
    assert busy.headers["content-type"] == "application/json; charset=utf-8"
    busy_v1 = await client.post("/v1/chat/completions", json={"model": "x", "messages": HELLO})
    assert busy_v1.json()["error"]["type"] == "api_error"
    busy_messages = await client.post("/v1/messages", json={})
    assert busy_messages.json()["error"]["type"] == "overloaded_error"

    emulator.settings.fault = Fault.HTTP_500
    broken = await client.get("/api/tags")
    assert broken.status_code == 500 and "error" in broken.json()
    assert (await client.get("/nowhere")).status_code == 404  # the router still routes

    emulator.settings.fault = Fault.NONE
    assert (await client.get("/api/tags")).status_code == 200


async def test_close_before_first_byte(emulator: Emulator, client: httpx.AsyncClient) -> None:
    emulator.settings.fault = Fault.CLOSE_BEFORE_FIRST_BYTE
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/api/chat", json={"model": "llama3", "messages": HELLO})
    (request,) = emulator.requests
    assert json.loads(request.body)["model"] == "llama3"  # read whole before closing
    assert (request.status, request.completed) == (None, False)
    assert emulator.connections[0].closed_by_peer is False


async def test_die_mid_stream(emulator: Emulator, client: httpx.AsyncClient) -> None:
    emulator.settings.fault = Fault.DIE_MID_STREAM
    lines = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST", "/api/chat", json={"model": "llama3", "messages": HELLO}
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
    assert [line["message"]["content"] for line in lines] == ["tok0 ", "tok1 "]
    with pytest.raises(httpx.RemoteProtocolError):  # a whole body is cut too
        await client.post("/api/chat", json={"model": "llama3", "messages": HELLO, "stream": False})
    assert all(request.status == 200 and not request.completed for request in emulator.requests)


async def test_stall_answers_nothing_and_notices_the_peer_leaving(emulator: Emulator) -> None:
    emulator.settings.fault = Fault.STALL
    async with httpx.AsyncClient(base_url=emulator.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/api/version")
    with trio.fail_after(2):
        record = await emulator.wait_connection_closed(emulator.connections[0].id)
    assert record.closed_by_peer and emulator.requests[0].status is None


async def test_model_faults_and_vanishing_models(
    emulator: Emulator, client: httpx.AsyncClient
) -> None:
    emulator.settings.model_faults["LLAMA3:latest"] = Fault.BUSY_503
    busy = await client.post("/api/chat", json={"model": "llama3", "messages": HELLO})
    assert (busy.status_code, busy.content) == (503, BUSY_BODY)
    assert (await client.get("/api/tags")).status_code == 200  # listings are unaffected
    fine = await client.post("/api/chat", json={"model": "qwen3", "messages": HELLO})
    assert fine.status_code == 200

    emulator.settings.model_faults = {"*": Fault.CLOSE_BEFORE_FIRST_BYTE}
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/api/embed", json={"model": "all-minilm", "input": "x"})

    emulator.settings.model_faults = {}
    emulator.settings.models = [m for m in emulator.settings.models if m.name != "qwen3:latest"]
    gone = await client.post("/api/chat", json={"model": "qwen3", "messages": HELLO})
    assert (gone.status_code, gone.json()) == (404, {"error": "model 'qwen3' not found"})


# --------------------------------------------------------------------------------------------------
# Connection log, disconnects, keep-alive.

CHAT_BODY = b'{"model":"llama3","messages":[{"role":"user","content":"hi"}]}'
CHAT_REQUEST = (
    b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(CHAT_BODY), CHAT_BODY)
)


async def test_peer_leaving_mid_stream_is_noticed_at_once(emulator: Emulator) -> None:
    emulator.settings.token_delay = 60  # the emulator sleeps between tokens when we leave
    async with await trio.open_tcp_stream("127.0.0.1", emulator.port) as stream:
        await stream.send_all(CHAT_REQUEST)
        received = b""
        with trio.fail_after(2):  # frames are flushed one by one, or this would wait 60 s
            while b'"tok0 "' not in received:
                received += await stream.receive_some()
        assert b"Transfer-Encoding: chunked" in received
        left_at = trio.current_time()

    with trio.fail_after(1):
        record = await emulator.wait_connection_closed(emulator.connections[0].id)
    assert record.closed_at is not None and record.closed_at - left_at < 0.05
    assert record.closed_by_peer
    (request,) = record.requests
    assert (request.status, request.completed) == (200, False)
    assert request.finished_at is not None and request.finished_at - left_at < 0.05
    assert emulator.open_connections == 0


async def test_peer_leaving_before_the_first_token_is_noticed_at_once(emulator: Emulator) -> None:
    emulator.settings.first_token_delay = 60
    async with await trio.open_tcp_stream("127.0.0.1", emulator.port) as stream:
        await stream.send_all(CHAT_REQUEST)
        with trio.fail_after(2):
            await emulator.wait_until(lambda: bool(emulator.requests and emulator.requests[0].body))
        left_at = trio.current_time()
    with trio.fail_after(1):
        record = await emulator.wait_connection_closed(emulator.connections[0].id)
    assert record.closed_at is not None and record.closed_at - left_at < 0.05


async def test_a_peer_reset_mid_pace_never_crashes_the_emulator(emulator: Emulator) -> None:
    # Paced (the peer watcher runs beside the sender), no delay after the first token, and a
    # reply far larger than the socket buffers: when the reset comes the sender is blocked in
    # `send_all`, and the reset wakes it and the watcher together, in either order. Sender
    # first used to raise ExceptionGroup[BrokenResourceError] out of the emulator.
    emulator.settings.first_token_delay = 0.001
    emulator.settings.token_delay = 0
    emulator.settings.tokens_per_reply = 200_000
    for attempt in range(12):
        stream = await trio.open_tcp_stream("127.0.0.1", emulator.port)
        await stream.send_all(CHAT_REQUEST)
        received = b""
        with trio.fail_after(10):
            while b'"tok0 "' not in received:
                received += await stream.receive_some()
        # An abortive close: RST, not FIN (SO_LINGER on, timeout 0).
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        with trio.fail_after(10):
            record = await emulator.wait_connection_closed(emulator.connections[attempt].id)
        assert record.closed_by_peer, attempt
    emulator.settings.tokens_per_reply = 2
    async with httpx.AsyncClient(base_url=emulator.url, timeout=10) as client:
        assert (await client.get("/api/version")).status_code == 200


async def test_keep_alive_and_chunked_request_bodies(
    emulator: Emulator, client: httpx.AsyncClient
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model":"llama3",'
        yield b'"messages":[{"role":"user","content":"hello there"}],"stream":false}'

    first = await client.post("/api/chat", content=body())
    second = await client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    third = await client.get("/api/tags")
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert first.json()["prompt_eval_count"] == HELLO_PROMPT_TOKENS
    (connection,) = emulator.connections
    assert [request.path for request in connection.requests] == [
        "/api/chat",
        "/api/generate",
        "/api/tags",
    ]
    chunked = connection.requests[0]
    assert chunked.header("transfer-encoding") == "chunked"
    assert json.loads(chunked.body)["model"] == "llama3"
    assert all(request.completed and request.status == 200 for request in connection.requests)
    assert connection.closed_at is None and emulator.open_connections == 1


async def test_pipelined_requests_are_answered_in_order(emulator: Emulator) -> None:
    emulator.settings.token_delay = 0.001  # the peer watcher reads the second request early
    async with await trio.open_tcp_stream("127.0.0.1", emulator.port) as stream:
        await stream.send_all(
            CHAT_REQUEST + b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        received = b""
        with trio.fail_after(5):
            while b'"version"' not in received:
                received += await stream.receive_some()
    assert received.index(b'"done":true') < received.index(b'"version"')
    (connection,) = emulator.connections
    assert [request.path for request in connection.requests] == ["/api/chat", "/api/version"]


async def test_settings_change_while_running(emulator: Emulator, client: httpx.AsyncClient) -> None:
    emulator.settings.tokens_per_reply = 2
    emulator.settings.models.append(EmulatedModel(name="tiny:1b", capabilities=("completion",)))
    response = await client.post(
        "/api/generate", json={"model": "tiny:1b", "prompt": "x", "stream": False}
    )
    assert (response.json()["response"], response.json()["eval_count"]) == ("tok0 tok1 ", 2)


async def test_tokens_are_paced_on_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    # Gateway tests can run on virtual time: a 75 s generation takes no wall time.
    settings = EmulatorSettings(first_token_delay=5, token_delay=10)
    async with (
        open_emulator(settings) as emulator,
        httpx.AsyncClient(base_url=emulator.url, timeout=None) as client,
    ):
        started = trio.current_time()
        body = {"model": "llama3", "messages": HELLO, "stream": False}
        reply = (await client.post("/api/chat", json=body)).json()
        assert trio.current_time() - started == pytest.approx(75)
    assert (reply["prompt_eval_duration"], reply["eval_duration"]) == (5 * 10**9, 70 * 10**9)


async def test_emulator_started_refusing_holds_its_port() -> None:
    async with open_emulator(EmulatorSettings(fault=Fault.REFUSE)) as emulator:
        assert emulator.port != 0
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", emulator.port)
        emulator.settings.fault = Fault.NONE
        async with httpx.AsyncClient(base_url=emulator.url) as client:
            assert (await client.get("/")).status_code == 200


# --------------------------------------------------------------------------------------------------
# CLI.


def test_cli_options_build_settings() -> None:
    settings = settings_from_options(
        tokens=3, token_delay=0.1, first_token_delay=0.2, models="llama3, nomic-embed-text"
    )
    assert [model.name for model in settings.models] == ["llama3:latest", "nomic-embed-text:latest"]
    assert settings.models[1].is_embedding
    assert (settings.tokens_per_reply, settings.token_delay, settings.first_token_delay) == (
        3,
        0.1,
        0.2,
    )
    assert (
        settings_from_options(tokens=8, token_delay=0, first_token_delay=0, models=None).models
        == default_models()
    )


def test_cli_registers_the_command() -> None:
    from nzgw.cli import main

    assert isinstance(main, click.Group)
    assert main.get_command(click.Context(main), "emulate-ollama") is emulate_ollama


async def test_cli_serves_until_sigterm() -> None:
    # The command alone (`bin/nzgw` would also import every other command of the tool).
    run_command = "from nzgw.cli.emulate import emulate_ollama; emulate_ollama()"
    command = [sys.executable, "-c", run_command, "--port", "0", "--tokens", "2"]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    try:
        banner = b""
        with trio.fail_after(10):
            while b"\n" not in banner:
                chunk = await process.stderr.receive_some()
                assert chunk, banner
                banner += chunk
        match = re.search(rb"at (http://\S+) ", banner)
        assert match, banner
        async with httpx.AsyncClient(base_url=match[1].decode()) as client:
            body = {"model": "llama3", "prompt": "x", "stream": False}
            assert (await client.post("/api/generate", json=body)).json()[
                "response"
            ] == "tok0 tok1 "
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        await process.stderr.aclose()
