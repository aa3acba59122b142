"""Sans-IO: one deterministic generation, rendered in the format of each API surface.

A rendered reply is a lazy iterator: it yields `TOKEN_DUE` before every token, and builds each
frame only when the server asks for it, so `created_at` and the durations are those of the moment
the frame is sent. Frame layouts follow reference/ollama-api.md (Go field order, omitempty).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import secrets
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import attrs

from nzgw.testing._emu_config import EmulatedModel
from nzgw.testing._emu_wire import (
    EVENT_STREAM,
    NATIVE_JSON,
    NDJSON,
    PLAIN_JSON,
    STREAM_HEADERS,
    TOKEN_DUE,
    Chunk,
    Reply,
    dumps,
    ndjson_line,
    rfc3339_nano,
    sse_data,
    sse_event,
)

#: Stands in for the time Ollama spends scheduling an already loaded runner.
LOAD_DURATION_NS = 1_000_000
#: Prompt tokens a chat template adds around every message.
TOKENS_PER_MESSAGE = 4


@attrs.frozen
class Clock:
    """`now`: monotonic seconds (the server passes `trio.current_time`); `wall_ns`: the epoch."""

    now: Callable[[], float]
    wall_ns: Callable[[], int]


@attrs.frozen
class Piece:
    text: str
    thinking: bool


def count_prompt_tokens(texts: Sequence[str], messages: int) -> int:
    """Deterministic stand-in for the tokenizer: whitespace words plus a per-message overhead."""
    return sum(len(text.split()) for text in texts) + TOKENS_PER_MESSAGE * messages


@attrs.frozen
class Plan:
    """What the model is going to say: thinking tokens, then content tokens. Pieces are made on
    demand, so a reply of millions of tokens costs nothing up front."""

    thinking_tokens: int
    content_tokens: int
    done_reason: str

    @property
    def count(self) -> int:
        return self.thinking_tokens + self.content_tokens

    def pieces(self) -> Iterator[Piece]:
        for i in range(self.thinking_tokens):
            yield Piece(f"think{i} ", thinking=True)
        for i in range(self.content_tokens):
            yield Piece(f"tok{i} ", thinking=False)


def plan_reply(*, content_tokens: int, thinking_tokens: int, cap: int | None) -> Plan:
    """The cap counts thinking too (Ollama's num_predict does), and reaching it is `length` even
    when the reply would have ended there (the runner checks the limit before it samples the
    end-of-generation token)."""
    if cap is not None and 0 < cap <= thinking_tokens + content_tokens:
        thinking = min(cap, thinking_tokens)
        return Plan(thinking, cap - thinking, "length")
    return Plan(thinking_tokens, content_tokens, "stop")


NO_REPLY: Final = Plan(0, 0, "load")


@attrs.define
class Generation:
    """One model reply in progress; renderers call `token_sent` after each TOKEN_DUE."""

    model: str
    prompt_tokens: int
    plan: Plan
    clock: Clock
    started_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def pieces(self) -> Iterator[Piece]:
        return self.plan.pieces()

    @property
    def done_reason(self) -> str:
        return self.plan.done_reason

    def token_sent(self) -> None:
        now = self.clock.now()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def stamp(self) -> str:
        return rfc3339_nano(self.clock.wall_ns())

    def unix(self) -> int:
        return self.clock.wall_ns() // 1_000_000_000

    @property
    def eval_count(self) -> int:
        return self.plan.count

    @property
    def content(self) -> str:
        return "".join(f"tok{i} " for i in range(self.plan.content_tokens))

    @property
    def thinking(self) -> str:
        return "".join(f"think{i} " for i in range(self.plan.thinking_tokens))

    def metrics(self) -> dict[str, int]:
        """Native metrics, `omitempty` like Ollama's (a zero count is left out)."""
        now = self.clock.now()
        first = self.first_token_at if self.first_token_at is not None else now
        last = self.last_token_at if self.last_token_at is not None else first
        prompt_eval_ns = max(1, round((first - self.started_at) * 1e9))
        eval_ns = max(1, round((last - first) * 1e9))
        total_ns = max(
            round((now - self.started_at) * 1e9), LOAD_DURATION_NS + prompt_eval_ns + eval_ns
        )
        metrics = {"total_duration": total_ns, "load_duration": LOAD_DURATION_NS}
        if self.prompt_tokens:
            metrics["prompt_eval_count"] = self.prompt_tokens
        metrics["prompt_eval_duration"] = prompt_eval_ns
        if self.eval_count:
            metrics["eval_count"] = self.eval_count
        metrics["eval_duration"] = eval_ns
        return metrics

    def context_ids(self) -> list[int]:
        """`/api/generate`'s deprecated `context`: token ids of prompt and reply."""
        return [(7919 * i + 128_000) % 128_256 for i in range(self.prompt_tokens + self.eval_count)]


# ------------------------------------------------------------------------------------------------
# Native /api/generate and /api/chat.


def native_load_reply(model: str, reason: str, clock: Clock, *, chat: bool) -> Reply:
    """Empty prompt / messages: one JSON object even when a stream was asked for."""
    reply: dict[str, Any] = {"model": model, "created_at": rfc3339_nano(clock.wall_ns())}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    reply |= {"done": True, "done_reason": reason}
    return Reply(200, NATIVE_JSON, dumps(reply))


def native_generate(generation: Generation, *, stream: bool, raw: bool) -> Reply:
    if stream:
        return Reply(200, NDJSON, chunks=_generate_frames(generation, raw=raw), streamed=True)
    return Reply(200, NATIVE_JSON, chunks=_generate_body(generation, raw=raw))


def _generate_frames(generation: Generation, *, raw: bool) -> Iterator[Chunk]:
    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        frame: dict[str, Any] = {
            "model": generation.model,
            "created_at": generation.stamp(),
            "response": "" if piece.thinking else piece.text,
        }
        if piece.thinking:
            frame["thinking"] = piece.text
        frame["done"] = False
        yield ndjson_line(frame)
    yield ndjson_line(_generate_final(generation, response="", thinking="", raw=raw))


def _generate_body(generation: Generation, *, raw: bool) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    yield dumps(
        _generate_final(
            generation, response=generation.content, thinking=generation.thinking, raw=raw
        )
    )


def _generate_final(
    generation: Generation, *, response: str, thinking: str, raw: bool
) -> dict[str, Any]:
    final: dict[str, Any] = {
        "model": generation.model,
        "created_at": generation.stamp(),
        "response": response,
    }
    if thinking:
        final["thinking"] = thinking
    final |= {"done": True, "done_reason": generation.done_reason}
    if not raw:
        final["context"] = generation.context_ids()
    return final | generation.metrics()


def native_chat(generation: Generation, *, stream: bool) -> Reply:
    if stream:
        return Reply(200, NDJSON, chunks=_chat_frames(generation), streamed=True)
    return Reply(200, NATIVE_JSON, chunks=_chat_body(generation))


def _chat_message(content: str, thinking: str) -> dict[str, str]:
    message = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    return message


def _chat_frames(generation: Generation) -> Iterator[Chunk]:
    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        message = _chat_message("", piece.text) if piece.thinking else _chat_message(piece.text, "")
        yield ndjson_line(
            {
                "model": generation.model,
                "created_at": generation.stamp(),
                "message": message,
                "done": False,
            }
        )
    yield ndjson_line(_chat_final(generation, _chat_message("", "")))


def _chat_body(generation: Generation) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    yield dumps(_chat_final(generation, _chat_message(generation.content, generation.thinking)))


def _chat_final(generation: Generation, message: dict[str, str]) -> dict[str, Any]:
    final = {
        "model": generation.model,
        "created_at": generation.stamp(),
        "message": message,
        "done": True,
        "done_reason": generation.done_reason,
    }
    return final | generation.metrics()


# ------------------------------------------------------------------------------------------------
# OpenAI-compatible /v1/chat/completions and /v1/completions.


def _openai_usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.eval_count,
        "total_tokens": generation.prompt_tokens + generation.eval_count,
    }


def openai_chat(generation: Generation, *, stream: bool, include_usage: bool) -> Reply:
    completion_id = f"chatcmpl-{random.randrange(999)}"
    if stream:
        created = generation.unix()
        frames = _openai_chat_frames(generation, completion_id, created, include_usage)
        return Reply(200, EVENT_STREAM, chunks=frames, streamed=True)
    return Reply(200, PLAIN_JSON, chunks=_openai_chat_body(generation, completion_id))


def _openai_chat_frames(
    generation: Generation, completion_id: str, created: int, include_usage: bool
) -> Iterator[Chunk]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": generation.model,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }

    role_sent = False
    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        delta: dict[str, str] = {}
        if not role_sent:
            delta["role"] = "assistant"
            role_sent = True
        delta["content"] = "" if piece.thinking else piece.text
        if piece.thinking:
            delta["reasoning"] = piece.text
        yield sse_data(chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
    finish = sse_data(chunk([{"index": 0, "delta": {}, "finish_reason": generation.done_reason}]))
    if include_usage:
        finish += sse_data(chunk([]) | {"usage": _openai_usage(generation)})
    yield finish + b"data: [DONE]\n\n"


def _openai_chat_body(generation: Generation, completion_id: str) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    message = {"role": "assistant", "content": generation.content}
    if generation.thinking:
        message["reasoning"] = generation.thinking
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": generation.unix(),
        "model": generation.model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": message, "finish_reason": generation.done_reason}],
        "usage": _openai_usage(generation),
    }
    yield dumps(body) + b"\n"


def openai_completion(generation: Generation, *, stream: bool, include_usage: bool) -> Reply:
    completion_id = f"cmpl-{random.randrange(999)}"
    if stream:
        frames = _openai_completion_frames(generation, completion_id, include_usage)
        return Reply(200, EVENT_STREAM, chunks=frames, streamed=True)
    return Reply(200, PLAIN_JSON, chunks=_openai_completion_body(generation, completion_id))


def _openai_completion_frames(
    generation: Generation, completion_id: str, include_usage: bool
) -> Iterator[Chunk]:
    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": generation.unix(),
            "choices": [{"text": text, "index": 0, "finish_reason": finish_reason}],
            "model": generation.model,
            "system_fingerprint": "fp_ollama",
        }
        if include_usage:
            payload["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return payload

    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        # Thinking reaches the compat layer as an empty `response`: the chunk is sent, text-less.
        yield sse_data(chunk("" if piece.thinking else piece.text, None))
    last = chunk("", generation.done_reason)
    frame = sse_data(last)
    if include_usage:
        frame += sse_data(last | {"choices": [], "usage": _openai_usage(generation)})
    yield frame + b"data: [DONE]\n\n"


def _openai_completion_body(generation: Generation, completion_id: str) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    body = {
        "id": completion_id,
        "object": "text_completion",
        "created": generation.unix(),
        "model": generation.model,
        "system_fingerprint": "fp_ollama",
        "choices": [
            {"text": generation.content, "index": 0, "finish_reason": generation.done_reason}
        ],
        "usage": _openai_usage(generation),
    }
    yield dumps(body) + b"\n"


# ------------------------------------------------------------------------------------------------
# /v1/responses.


def go_number(value: float) -> float | int:
    """Go prints an integral float64 without a decimal point."""
    return int(value) if value == int(value) else value


@attrs.frozen
class ResponsesEcho:
    """Request parameters a Response object echoes back."""

    instructions: str | None
    tools: list[dict[str, Any]]
    text_format: dict[str, Any]
    reasoning: dict[str, str] | None
    temperature: float
    top_p: float
    max_output_tokens: int | None
    truncation: str
    background: bool


def _responses_usage(generation: Generation) -> dict[str, Any]:
    return {
        "input_tokens": generation.prompt_tokens,
        "output_tokens": generation.eval_count,
        "total_tokens": generation.prompt_tokens + generation.eval_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _responses_object(
    generation: Generation,
    echo: ResponsesEcho,
    response_id: str,
    *,
    status: str,
    output: list[Any],
    usage: dict[str, Any] | None,
    completed_at: int | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": generation.unix(),
        "completed_at": completed_at,
        "status": status,
        "incomplete_details": None,
        "model": generation.model,
        "previous_response_id": None,
        "instructions": echo.instructions,
        "output": output,
        "error": None,
        "tools": echo.tools,
        "tool_choice": "auto",
        "truncation": echo.truncation,
        "parallel_tool_calls": True,
        "text": {"format": echo.text_format},
        "top_p": go_number(echo.top_p),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": go_number(echo.temperature),
        "reasoning": echo.reasoning,
        "usage": usage,
        "max_output_tokens": echo.max_output_tokens,
        "max_tool_calls": None,
        "store": False,
        "background": echo.background,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def responses(generation: Generation, echo: ResponsesEcho, *, stream: bool) -> Reply:
    response_id = f"resp_{random.randrange(999_999)}"
    message_id = f"msg_{random.randrange(999_999)}"
    if stream:
        frames = _responses_events(generation, echo, response_id, message_id)
        return Reply(200, EVENT_STREAM, headers=STREAM_HEADERS, chunks=frames, streamed=True)
    return Reply(200, PLAIN_JSON, chunks=_responses_body(generation, echo, response_id, message_id))


def _responses_body(
    generation: Generation, echo: ResponsesEcho, response_id: str, message_id: str
) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    output: list[Any] = []
    if generation.thinking:
        output.append(
            {
                "id": f"rs_{response_id}",
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": generation.thinking}],
                "encrypted_content": generation.thinking,
            }
        )
    output.append(
        {
            "id": message_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [_output_text(generation.content)],
        }
    )
    body = _responses_object(
        generation,
        echo,
        response_id,
        status="completed",
        output=output,
        usage=_responses_usage(generation),
        completed_at=generation.unix(),
    )
    yield dumps(body) + b"\n"


def _responses_events(
    generation: Generation, echo: ResponsesEcho, response_id: str, message_id: str
) -> Iterator[Chunk]:
    # Ollama builds these payloads as Go maps: the keys go out sorted.
    sequence = 0

    def event(kind: str, data: dict[str, Any]) -> bytes:
        nonlocal sequence
        data |= {"type": kind, "sequence_number": sequence}
        sequence += 1
        return sse_event(kind, data, sort_keys=True)

    def in_progress() -> dict[str, Any]:
        return _responses_object(
            generation,
            echo,
            response_id,
            status="in_progress",
            output=[],
            usage=None,
            completed_at=None,
        )

    reasoning_id = f"rs_{random.randrange(999_999)}"
    output_index = 0
    thinking = ""
    text = ""
    reasoning_open = False
    reasoning_done = False
    text_started = False

    def finish_reasoning() -> bytes:
        nonlocal reasoning_done, output_index
        if not reasoning_open or reasoning_done:
            return b""
        reasoning_done = True
        summary = [{"type": "summary_text", "text": thinking}]
        frame = event(
            "response.reasoning_summary_text.done",
            {"item_id": reasoning_id, "output_index": output_index, "summary_index": 0}
            | {"text": thinking},
        ) + event(
            "response.output_item.done",
            {
                "output_index": output_index,
                "item": {
                    "id": reasoning_id,
                    "type": "reasoning",
                    "summary": summary,
                    "encrypted_content": thinking,
                },
            },
        )
        output_index += 1
        return frame

    def opening() -> bytes:
        return event("response.created", {"response": in_progress()}) + event(
            "response.in_progress", {"response": in_progress()}
        )

    first = True
    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        frame = opening() if first else b""
        first = False
        if piece.thinking:
            if not reasoning_open:
                reasoning_open = True
                frame += event(
                    "response.output_item.added",
                    {
                        "output_index": output_index,
                        "item": {"id": reasoning_id, "type": "reasoning", "summary": []},
                    },
                )
            thinking += piece.text
            frame += event(
                "response.reasoning_summary_text.delta",
                {"item_id": reasoning_id, "output_index": output_index, "summary_index": 0}
                | {"delta": piece.text},
            )
        else:
            frame += finish_reasoning()
            if not text_started:
                text_started = True
                frame += event(
                    "response.output_item.added",
                    {
                        "output_index": output_index,
                        "item": {
                            "id": message_id,
                            "type": "message",
                            "status": "in_progress",
                            "role": "assistant",
                            "content": [],
                        },
                    },
                ) + event(
                    "response.content_part.added",
                    {
                        "item_id": message_id,
                        "output_index": output_index,
                        "content_index": 0,
                        "part": _output_text(""),
                    },
                )
            text += piece.text
            frame += event(
                "response.output_text.delta",
                {"item_id": message_id, "output_index": output_index, "content_index": 0}
                | {"delta": piece.text, "logprobs": []},
            )
        yield frame

    frame = opening() if first else b""
    frame += finish_reasoning()
    final_output: list[Any] = []
    if reasoning_open:
        final_output.append(
            {
                "id": reasoning_id,
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": thinking}],
                "encrypted_content": thinking,
            }
        )
    if text_started:
        message = {
            "id": message_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [_output_text(text)],
        }
        final_output.append(message)
        frame += (
            event(
                "response.output_text.done",
                {"item_id": message_id, "output_index": output_index, "content_index": 0}
                | {"text": text, "logprobs": []},
            )
            + event(
                "response.content_part.done",
                {
                    "item_id": message_id,
                    "output_index": output_index,
                    "content_index": 0,
                    "part": _output_text(text),
                },
            )
            + event("response.output_item.done", {"output_index": output_index, "item": message})
        )
    completed = _responses_object(
        generation,
        echo,
        response_id,
        status="completed",
        output=final_output,
        usage=_responses_usage(generation),
        completed_at=generation.unix(),
    )
    yield frame + event("response.completed", {"response": completed})


# ------------------------------------------------------------------------------------------------
# Anthropic-compatible /v1/messages.


def anthropic_stop_reason(done_reason: str) -> str:
    return {"stop": "end_turn", "length": "max_tokens"}.get(done_reason, "stop_sequence")


def anthropic(generation: Generation, *, stream: bool, estimated_input_tokens: int) -> Reply:
    message_id = "msg_" + secrets.token_hex(12)
    if stream:
        frames = _anthropic_events(generation, message_id, estimated_input_tokens)
        return Reply(200, EVENT_STREAM, headers=STREAM_HEADERS, chunks=frames, streamed=True)
    return Reply(200, PLAIN_JSON, chunks=_anthropic_body(generation, message_id))


def _anthropic_body(generation: Generation, message_id: str) -> Iterator[Chunk]:
    for _ in range(generation.eval_count):
        yield TOKEN_DUE
        generation.token_sent()
    content: list[dict[str, str]] = []
    if generation.thinking:
        content.append({"type": "thinking", "thinking": generation.thinking})
    if generation.content:
        content.append({"type": "text", "text": generation.content})
    body = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": generation.model,
        "content": content or None,
        "stop_reason": anthropic_stop_reason(generation.done_reason),
        "usage": {"input_tokens": generation.prompt_tokens, "output_tokens": generation.eval_count},
    }
    yield dumps(body) + b"\n"


def _anthropic_events(
    generation: Generation, message_id: str, estimated_input_tokens: int
) -> Iterator[Chunk]:
    def block_stop(index: int) -> bytes:
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def message_start() -> bytes:
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": generation.model,
            "content": [],
            "usage": {"input_tokens": estimated_input_tokens, "output_tokens": 0},
        }
        return sse_event("message_start", {"type": "message_start", "message": message})

    index = 0
    thinking_open = False
    text_open = False
    first = True
    for piece in generation.pieces:
        yield TOKEN_DUE
        generation.token_sent()
        frame = message_start() if first else b""
        first = False
        if piece.thinking:
            if not thinking_open:
                thinking_open = True
                frame += sse_event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "thinking", "thinking": ""},
                    },
                )
            delta = {"type": "thinking_delta", "thinking": piece.text}
        else:
            if thinking_open:
                thinking_open = False
                frame += block_stop(index)
                index += 1
            if not text_open:
                text_open = True
                frame += sse_event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            delta = {"type": "text_delta", "text": piece.text}
        frame += sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
        yield frame

    frame = message_start() if first else b""
    if text_open or thinking_open:
        frame += block_stop(index)
    frame += sse_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": anthropic_stop_reason(generation.done_reason)},
            "usage": {
                "input_tokens": generation.prompt_tokens,
                "output_tokens": generation.eval_count,
            },
        },
    )
    yield frame + sse_event("message_stop", {"type": "message_stop"})


# ------------------------------------------------------------------------------------------------
# Embeddings.


def _as_float32(value: float) -> float:
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


def _shortest_float32(value: float) -> float:
    """The float64 whose repr is what Go prints for this float32 (the shortest round-trip)."""
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _as_float32(candidate) == value:
            return candidate
    return value


def _normalised(vector: Sequence[float]) -> list[float]:
    norm = max(math.sqrt(sum(v * v for v in vector)), 1e-12)
    return [_as_float32(v / norm) for v in vector]


def embedding(model: EmulatedModel, text: str, *, dimensions: int = 0) -> list[float]:
    """A deterministic, L2-normalised float32 vector (as Python floats) for (model, text)."""
    size = model.embedding_length
    seed = "\0".join((*model.ref.key, text)).encode()
    raw = hashlib.shake_256(seed).digest(4 * size)
    values = [
        int.from_bytes(raw[i : i + 4], "little", signed=True) / 2**31 for i in range(0, 4 * size, 4)
    ]
    vector = _normalised(values)
    if 0 < dimensions < len(vector):
        vector = _normalised(vector[:dimensions])
    return vector


def float32_json(vector: Sequence[float]) -> list[float]:
    """For bodies Go writes from []float32: each number as short as a float32 allows."""
    return [_shortest_float32(v) for v in vector]


def float32_base64(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
