"""Stream watchers and body usage: what the relay and settlement rely on.

Rules for this module: streams are built from frames shaped exactly like Ollama's (reference
§2-§4), with model text chosen to contain every marker the watcher searches for; the expected
frames, usage, completion and error come from how the stream was built; properties split the
bytes at arbitrary points, since one socket read can end anywhere.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nzgw.core.framing import (
    MAX_FRAME_BYTES,
    STREAM_KINDS,
    StreamKind,
    StreamWatcher,
    Usage,
    usage_from_body,
)
from nzgw.core.paths import RouteId


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _sse(doc: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(doc) + b"\n\n"


DONE = b"data: [DONE]\n\n"

# Model text that contains every marker the watcher looks for (JSON escapes it in frames).
TRICKY = [
    '"done":true',
    '"done": true',
    '{"error":"fake"}',
    "error",
    "data: [DONE]",
    "[DONE]",
    "\n\n",
    "\n",
    "event: message_stop\n\n",
    '"usage":{"prompt_tokens":1,"completion_tokens":1}',
    '"choices":[]',
    '"total_tokens":0}',
    "response.completed",
    "message_delta",
    "event: error",
    '"type":"error"',
    "é中🙂",
    "\\",
    '"',
]
texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
messages = texts.filter(bool)  # an empty error is falsy to every client SDK, and to us
counts = st.integers(0, 100_000)


@attrs.frozen
class Stream:
    kind: StreamKind
    frames: list[bytes]
    completed: bool
    usage: Usage | None
    error: str | None = None
    usage_frame: bytes | None = None  # the `choices:[]` chunk strip_usage must cut

    @property
    def raw(self) -> bytes:
        return b"".join(self.frames)


def _native_frame(text: str, done: bool = False, **extra: Any) -> bytes:
    doc = {"model": "llama3", "created_at": "2026-08-21T10:00:00.1Z", "response": text}
    return _dumps({**doc, "done": done, **extra}) + b"\n"


def _chat_frame(message: dict[str, Any], done: bool = False, **extra: Any) -> bytes:
    doc = {"model": "qwen3", "created_at": "2026-08-21T10:00:00.1Z", "message": message}
    return _dumps({**doc, "done": done, **extra}) + b"\n"


@st.composite
def native_streams(draw: st.DrawFn) -> Stream:
    frames: list[bytes] = []
    for text in draw(st.lists(texts, max_size=6)):
        if draw(st.booleans()):
            frames.append(_native_frame(text))
        else:
            frames.append(_chat_frame({"role": "assistant", "content": text}))
    if draw(st.booleans()):
        # A tool call whose arguments spell the top-level fields the watcher reads.
        arguments = {"done": True, "eval_count": 0, "prompt_eval_count": 0, "error": "no"}
        call = {
            "id": "call_k3j9x0aa",
            "function": {"index": 0, "name": "f", "arguments": arguments},
        }
        frames.append(_chat_frame({"role": "assistant", "content": "", "tool_calls": [call]}))
    end = draw(st.sampled_from(["done", "error", "cut"]))
    prompt, completion = draw(counts), draw(counts)
    if end == "done":
        final = _native_frame(
            draw(texts),
            True,
            done_reason="stop",
            context=[128006, 882],
            total_duration=412000000,
            prompt_eval_count=prompt,
            prompt_eval_duration=31000000,
            eval_count=completion,
            eval_duration=61000000,
        )
        frames.append(final)
        return Stream(StreamKind.NDJSON, frames, True, Usage(prompt, completion))
    if end == "error":
        message = draw(messages)
        frames.append(_dumps({"error": message}) + b"\n")
        return Stream(StreamKind.NDJSON, frames, False, None, message)
    return Stream(StreamKind.NDJSON, frames, False, None)


def _chat_chunk(choices: list[Any], **extra: Any) -> bytes:
    doc = {
        "id": "chatcmpl-417",
        "object": "chat.completion.chunk",
        "created": 1755800000,
        "model": "llama3",
        "system_fingerprint": "fp_ollama",
        "choices": choices,
    }
    return _sse({**doc, **extra})


@st.composite
def chat_streams(draw: st.DrawFn) -> Stream:
    frames = [_chat_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    for text in draw(st.lists(texts, max_size=6)):
        frames.append(
            _chat_chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
        )
    end = draw(st.sampled_from(["usage", "no_usage", "cut", "error"]))
    if end == "cut":
        return Stream(StreamKind.SSE_OPENAI, frames, False, None)
    if end == "error":
        message = draw(messages)
        frames.append(_sse({"error": {"message": message, "type": "api_error"}}))
        return Stream(StreamKind.SSE_OPENAI, frames, False, None, message)
    frames.append(_chat_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    usage = None
    usage_frame = None
    if end == "usage":
        prompt, completion = draw(counts), draw(counts)
        usage = Usage(prompt, completion)
        total = prompt + completion
        tokens = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
        usage_frame = _chat_chunk([], usage=tokens)
        frames.append(usage_frame)
    frames.append(DONE)
    return Stream(StreamKind.SSE_OPENAI, frames, True, usage, usage_frame=usage_frame)


_ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@st.composite
def completion_streams(draw: st.DrawFn) -> Stream:
    """/v1/completions with include_usage: a zero usage on every chunk, the real one last."""
    frames = []
    for text in [*draw(st.lists(texts, max_size=6)), ""]:
        choice = {"text": text, "index": 0, "finish_reason": "stop" if text == "" else None}
        frames.append(
            _sse(
                {
                    "id": "cmpl-5",
                    "object": "text_completion",
                    "created": 1755800000,
                    "choices": [choice],
                    "model": "llama3",
                    "system_fingerprint": "fp_ollama",
                    "usage": _ZERO,
                }
            )
        )
    if draw(st.booleans()):
        return Stream(StreamKind.SSE_OPENAI, frames, False, None)
    prompt, completion = draw(counts), draw(counts)
    tokens = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage_frame = _sse(
        {
            "id": "cmpl-5",
            "object": "text_completion",
            "created": 1755800001,
            "choices": [],
            "model": "llama3",
            "system_fingerprint": "fp_ollama",
            "usage": {**tokens, "total_tokens": prompt + completion},
        }
    )
    frames += [usage_frame, DONE]
    return Stream(StreamKind.SSE_OPENAI, frames, True, Usage(prompt, completion), None, usage_frame)


def _response(status: str, usage: Any, text: str = "") -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1755800000,
        "status": status,
        "model": "llama3",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
        "usage": usage,
    }


@st.composite
def responses_streams(draw: st.DrawFn) -> Stream:
    seq = iter(range(1000))

    def event(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    frames = [
        event("response.created", response=_response("in_progress", None)),
        event("response.in_progress", response=_response("in_progress", None)),
        event("response.output_item.added", output_index=0, item={"type": "message"}),
    ]
    pieces = draw(st.lists(texts, max_size=6))
    for piece in pieces:
        frames.append(event("response.output_text.delta", output_index=0, delta=piece))
    frames.append(event("response.output_text.done", text="".join(pieces)))
    end = draw(st.sampled_from(["completed", "cut", "failed"]))
    if end == "cut":
        return Stream(StreamKind.SSE_EVENTS, frames, False, None)
    prompt, completion = draw(counts), draw(counts)
    tokens = {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if end == "failed":
        response = {**_response("failed", tokens), "error": {"code": "x", "message": "it broke"}}
        frames.append(event("response.failed", response=response))
        return Stream(StreamKind.SSE_EVENTS, frames, False, Usage(prompt, completion), "it broke")
    frames.append(
        event("response.completed", response=_response("completed", tokens, "".join(pieces)))
    )
    return Stream(StreamKind.SSE_EVENTS, frames, True, Usage(prompt, completion))


@st.composite
def messages_streams(draw: st.DrawFn) -> Stream:
    def event(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, **fields}, kind)

    estimate = draw(counts)
    start = {
        "id": "msg_9f2c",
        "type": "message",
        "role": "assistant",
        "model": "qwen3-coder",
        "content": [],
        "usage": {"input_tokens": estimate, "output_tokens": 0},
    }
    frames = [
        event("message_start", message=start),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ]
    for piece in draw(st.lists(texts, max_size=6)):
        frames.append(
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        )
    frames.append(event("content_block_stop", index=0))
    end = draw(st.sampled_from(["stop", "cut_before_delta", "cut_after_delta", "error"]))
    if end == "cut_before_delta":
        return Stream(StreamKind.SSE_EVENTS, frames, False, None)
    if end == "error":
        frames.append(event("error", error={"type": "overloaded_error", "message": "busy"}))
        return Stream(StreamKind.SSE_EVENTS, frames, False, None, "busy")
    prompt, completion = draw(counts), draw(counts)
    usage = {"input_tokens": prompt, "output_tokens": completion}
    frames.append(event("message_delta", delta={"stop_reason": "end_turn"}, usage=usage))
    if end == "cut_after_delta":
        return Stream(StreamKind.SSE_EVENTS, frames, False, Usage(prompt, completion))
    frames.append(event("message_stop"))
    return Stream(StreamKind.SSE_EVENTS, frames, True, Usage(prompt, completion))


streams = st.one_of(
    native_streams(), chat_streams(), completion_streams(), responses_streams(), messages_streams()
)


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def _run(watcher: StreamWatcher, chunks: list[bytes]) -> bytes:
    return b"".join(watcher.feed(chunk) for chunk in chunks) + watcher.flush()


def _completed(watcher: StreamWatcher) -> bool:
    """Read through a call: mypy keeps `watcher.completed` narrowed across a `feed()`."""
    return watcher.completed


def _check(watcher: StreamWatcher, stream: Stream) -> None:
    assert watcher.frames == len(stream.frames)
    assert watcher.completed is stream.completed
    assert watcher.usage() == stream.usage
    assert watcher.upstream_error == stream.error


# --- properties -------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(stream=streams, data=st.data())
def test_any_split_gives_the_same_observations_and_output(
    stream: Stream, data: st.DataObject
) -> None:
    raw = stream.raw
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    chunks = _split(raw, cuts)
    watcher = StreamWatcher(stream.kind)
    forwarded = [watcher.feed(chunk) for chunk in chunks]
    assert forwarded == chunks  # relayed exactly as read, read by read
    assert watcher.flush() == b""
    _check(watcher, stream)


@settings(max_examples=300, deadline=None)
@given(stream=st.one_of(chat_streams(), completion_streams()), data=st.data())
def test_strip_usage_removes_exactly_the_usage_chunk(stream: Stream, data: st.DataObject) -> None:
    raw = stream.raw
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    watcher = StreamWatcher(stream.kind, strip_usage=True)
    out = _run(watcher, _split(raw, cuts))
    expected = b"".join(frame for frame in stream.frames if frame != stream.usage_frame)
    assert out == expected
    _check(watcher, stream)


@settings(max_examples=100, deadline=None)
@given(stream=st.one_of(chat_streams(), completion_streams()), data=st.data())
def test_strip_usage_holds_back_only_incomplete_frames(stream: Stream, data: st.DataObject) -> None:
    raw = stream.raw
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    watcher = StreamWatcher(stream.kind, strip_usage=True)
    fed = b""
    out = b""
    for chunk in _split(raw, cuts):
        fed += chunk
        out += watcher.feed(chunk)
        complete = fed[: fed.rfind(b"\n\n") + 2] if b"\n\n" in fed else b""
        assert out == complete.replace(stream.usage_frame or b"\x00", b"")


@settings(max_examples=300)
@given(
    kind=st.sampled_from(list(StreamKind)),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"\n", b"\n\n", b"data: ", b"[DONE]", b'"done":true', b"{", b"}"]),
        ),
        max_size=12,
    ),
)
def test_arbitrary_bytes_pass_through_untouched(kind: StreamKind, chunks: list[bytes]) -> None:
    watcher = StreamWatcher(kind)
    for chunk in chunks:
        assert watcher.feed(chunk) == chunk
    assert watcher.flush() == b""
    assert watcher.frames >= 0


@settings(max_examples=300)
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=40), st.sampled_from([b"\n\n", b"data: ", b"[DONE]"])),
        max_size=12,
    )
)
def test_strip_usage_never_loses_bytes_without_a_usage_chunk(chunks: list[bytes]) -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI, strip_usage=True)
    assert _run(watcher, chunks) == b"".join(chunks)


# --- NDJSON -----------------------------------------------------------------------------


def test_native_done_frame_gives_usage_and_completion() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    watcher.feed(_native_frame("Hel"))
    assert watcher.frames == 1
    assert not _completed(watcher)
    assert watcher.usage() is None
    watcher.feed(_native_frame("", True, done_reason="stop", prompt_eval_count=12, eval_count=2))
    assert watcher.completed
    usage = watcher.usage()
    assert usage == Usage(12, 2, reported=True)
    assert usage is not None and usage.total_tokens == 14


def test_native_load_reply_has_zero_usage() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    watcher.feed(_native_frame("", True, done_reason="load"))
    assert watcher.completed
    assert watcher.usage() == Usage(0, 0)


def test_native_single_object_without_newline_is_read_at_flush() -> None:
    # Errors before the first frame and load replies come as one JSON object, no "\n".
    watcher = StreamWatcher(StreamKind.NDJSON)
    body = _native_frame("", True, done_reason="unload").rstrip(b"\n")
    assert watcher.feed(body) == body
    assert not _completed(watcher)
    assert watcher.flush() == b""
    assert watcher.completed
    assert watcher.frames == 1


def test_native_error_line() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    watcher.feed(_native_frame("x") + b'{"error":"pull model manifest: file does not exist"}\n')
    assert watcher.upstream_error == "pull model manifest: file does not exist"
    assert not watcher.completed
    assert watcher.frames == 2


def test_native_done_with_spaces() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    watcher.feed(b'{"done": true, "prompt_eval_count": 3, "eval_count": 4}\n')
    assert watcher.completed
    assert watcher.usage() == Usage(3, 4)


def test_native_counts_of_the_wrong_type_count_as_zero() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    watcher.feed(b'{"done":true,"prompt_eval_count":"12","eval_count":-1}\n')
    assert watcher.usage() == Usage(0, 0)


def test_native_absurdly_nested_frame_does_not_raise() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON)
    frame = b'{"done":true,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    assert watcher.feed(frame) == frame
    assert watcher.frames == 1


# --- SSE (OpenAI) -----------------------------------------------------------------------


def test_sse_done_marks_completion() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI)
    watcher.feed(_chat_chunk([{"index": 0, "delta": {"content": "Hi"}}]))
    assert not _completed(watcher)
    watcher.feed(DONE)
    assert watcher.completed
    assert watcher.frames == 2
    assert watcher.usage() is None


def test_sse_last_usage_wins() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI)
    watcher.feed(_chat_chunk([], usage={"prompt_tokens": 1, "completion_tokens": 1}))
    watcher.feed(_chat_chunk([], usage={"prompt_tokens": 26, "completion_tokens": 3}))
    assert watcher.usage() == Usage(26, 3)


def test_sse_zero_usage_placeholders_are_ignored() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI)
    chunk = _sse({"choices": [{"text": "a", "index": 0}], "usage": _ZERO})
    watcher.feed(chunk * 3)
    assert watcher.usage() is None


def test_sse_usage_on_a_content_chunk_is_taken_when_nonzero() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI, strip_usage=True)
    chunk = _sse(
        {"choices": [{"text": "a"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    )
    assert watcher.feed(chunk) == chunk  # never cut: it carries content
    assert watcher.usage() == Usage(5, 1)


def test_sse_error_frame() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI)
    watcher.feed(_sse({"error": {"message": "boom", "type": "api_error"}}))
    assert watcher.upstream_error == "boom"
    watcher2 = StreamWatcher(StreamKind.SSE_OPENAI)
    watcher2.feed(_sse({"error": "plain"}))
    assert watcher2.upstream_error == "plain"


def test_sse_ollama_mid_stream_failure_is_a_truncation() -> None:
    # Ollama's /v1 mid-stream error: a stray empty delta, then EOF (no finish, no [DONE]).
    watcher = StreamWatcher(StreamKind.SSE_OPENAI)
    watcher.feed(_chat_chunk([{"index": 0, "delta": {"content": "Hi"}}]))
    watcher.feed(_chat_chunk([{"index": 0, "delta": {"content": ""}}]))
    watcher.flush()
    assert not watcher.completed
    assert watcher.upstream_error is None


def test_strip_usage_cuts_the_chunk_even_unterminated_at_eof() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI, strip_usage=True)
    usage = _chat_chunk([], usage={"prompt_tokens": 2, "completion_tokens": 3})
    assert watcher.feed(usage[:-2]) == b""
    assert watcher.flush() == b""
    assert watcher.usage() == Usage(2, 3)


def test_strip_usage_returns_held_tail_at_flush() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI, strip_usage=True)
    assert watcher.feed(b"data: {") == b""
    assert watcher.flush() == b"data: {"
    assert watcher.flush() == b""


def test_strip_usage_is_for_openai_sse_only() -> None:
    for kind in (StreamKind.NDJSON, StreamKind.SSE_EVENTS):
        with pytest.raises(ValueError):
            StreamWatcher(kind, strip_usage=True)


def test_feed_empty_is_a_no_op() -> None:
    watcher = StreamWatcher(StreamKind.SSE_OPENAI, strip_usage=True)
    assert watcher.feed(b"") == b""
    assert watcher.frames == 0


# --- SSE events (/v1/responses, /v1/messages) -------------------------------------------


def test_responses_incomplete_is_a_normal_end() -> None:
    watcher = StreamWatcher(StreamKind.SSE_EVENTS)
    tokens = {"input_tokens": 4, "output_tokens": 9}
    watcher.feed(
        _sse(
            {"type": "response.incomplete", "response": _response("incomplete", tokens)},
            "response.incomplete",
        )
    )
    assert watcher.completed
    assert watcher.usage() == Usage(4, 9)


def test_responses_error_event() -> None:
    watcher = StreamWatcher(StreamKind.SSE_EVENTS)
    watcher.feed(_sse({"type": "error", "code": "server_error", "message": "down"}, "error"))
    assert watcher.upstream_error == "down"
    assert not watcher.completed


def test_event_type_is_read_from_data_without_an_event_line() -> None:
    watcher = StreamWatcher(StreamKind.SSE_EVENTS)
    watcher.feed(_sse({"type": "message_delta", "usage": {"input_tokens": 1, "output_tokens": 2}}))
    watcher.feed(_sse({"type": "message_stop"}))
    assert watcher.usage() == Usage(1, 2)
    assert watcher.completed


def test_messages_delta_without_input_tokens_falls_back_to_start_estimate() -> None:
    watcher = StreamWatcher(StreamKind.SSE_EVENTS)
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 21, "output_tokens": 0}},
    }
    watcher.feed(_sse(start, "message_start"))
    assert watcher.usage() is None  # an estimate is not reported usage
    watcher.feed(_sse({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"))
    assert watcher.usage() == Usage(21, 9)


def test_delta_text_naming_a_terminator_is_not_one() -> None:
    watcher = StreamWatcher(StreamKind.SSE_EVENTS)
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "message_stop"}}
    watcher.feed(_sse(delta, "content_block_delta"))
    watcher.feed(b"data: event: message_stop\n\n")  # not even JSON
    assert not watcher.completed
    assert watcher.frames == 2


# --- oversized frames -------------------------------------------------------------------


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("piece", [1, 7, 64, 1000])
def test_oversized_frame_is_relayed_blind_then_watching_resumes(strip: bool, piece: int) -> None:
    kind = StreamKind.SSE_OPENAI
    big = _chat_chunk([{"index": 0, "delta": {"content": "x" * 500}}])  # > max_frame
    usage = _chat_chunk([], usage={"prompt_tokens": 7, "completion_tokens": 8})
    raw = _chat_chunk([{"index": 0, "delta": {"content": "a"}}]) + big + usage + DONE
    watcher = StreamWatcher(kind, strip_usage=strip, max_frame=300)
    out = _run(watcher, [raw[i : i + piece] for i in range(0, len(raw), piece)])
    assert out == (raw.replace(usage, b"") if strip else raw)
    assert watcher.frames == 4
    assert watcher.completed
    assert watcher.usage() == Usage(7, 8)


def test_oversized_native_frame() -> None:
    watcher = StreamWatcher(StreamKind.NDJSON, max_frame=50)
    big = _native_frame("y" * 200)
    done = _native_frame("", True, prompt_eval_count=1, eval_count=2)
    for i in range(0, len(big), 10):
        watcher.feed(big[i : i + 10])
    watcher.feed(done)
    assert watcher.frames == 2
    assert watcher.usage() == Usage(1, 2)


def test_default_frame_limit_matches_go_client() -> None:
    assert MAX_FRAME_BYTES == 8 * 1024 * 1024


# --- whole bodies -----------------------------------------------------------------------

GENERATE_BODY = _dumps(
    {
        "model": "llama3",
        "created_at": "2026-08-21T10:00:00.3Z",
        "response": 'said "eval_count":0',
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 12,
        "eval_count": 7,
        "tool_calls": [{"function": {"name": "f", "arguments": {"eval_count": 0}}}],
    }
)


@pytest.mark.parametrize(
    ("route", "body", "usage"),
    [
        (RouteId.GENERATE, GENERATE_BODY, Usage(12, 7)),
        (RouteId.CHAT, b'{"message":{"role":"assistant","content":"x"},"done":true}', Usage(0, 0)),
        (RouteId.CHAT, b'{"error":"model \'x\' not found"}', None),
        (RouteId.GENERATE, b'{"done":false,"eval_count":3}', None),
        (
            RouteId.EMBED,
            b'{"model":"all-minilm","embeddings":[[0.0101,-0.0017]],"total_duration":1,'
            b'"load_duration":1,"prompt_eval_count":8}',
            Usage(8, 0),
        ),
        (RouteId.EMBED, b'{"model":"all-minilm","embeddings":[]}', Usage(0, 0)),
        (RouteId.EMBED, b'{"error":"model \\"x\\" not found, try pulling it first"}', None),
        (RouteId.EMBEDDINGS, b'{"embedding":[0.56,0.009]}', None),
        (
            RouteId.V1_CHAT,
            b'{"id":"chatcmpl-417","object":"chat.completion","choices":[{"index":0,"message":'
            b'{"role":"assistant","content":"\\"usage\\":{}"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":26,"completion_tokens":3,"total_tokens":29}}\n',
            Usage(26, 3),
        ),
        (
            RouteId.V1_COMPLETIONS,
            b'{"choices":[{"text":"x"}],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
            Usage(5, 6),
        ),
        (
            RouteId.V1_EMBEDDINGS,
            b'{"object":"list","data":[{"object":"embedding","embedding":[0.1,0.2],"index":0}],'
            b'"model":"all-minilm","usage":{"prompt_tokens":8,"total_tokens":8}}\n',
            Usage(8, 0),
        ),
        (RouteId.V1_EMBEDDINGS, b'{"error":{"message":"invalid input"}}', None),
        (
            RouteId.V1_RESPONSES,
            _dumps(_response("completed", {"input_tokens": 10, "output_tokens": 20})),
            Usage(10, 20),
        ),
        (
            RouteId.V1_MESSAGES,
            b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"Hello!"}],'
            b'"stop_reason":"end_turn","usage":{"input_tokens":21,"output_tokens":9}}',
            Usage(21, 9),
        ),
        (RouteId.V1_MESSAGES, b'{"type":"error","error":{"type":"x","message":"y"}}', None),
        (RouteId.V1_CHAT, b"not json", None),
        (RouteId.V1_CHAT, b"[1,2]", None),
        (RouteId.TAGS, b'{"models":[]}', None),
        (RouteId.SHOW, b'{"modelfile":"","prompt_eval_count":3}', None),
    ],
)
def test_usage_from_body(route: RouteId, body: bytes, usage: Usage | None) -> None:
    assert usage_from_body(route, body) == usage


def test_usage_from_a_large_embedding_body_is_cheap_and_right() -> None:
    vectors = [[0.001 * i for i in range(384)] for _ in range(200)]
    body = _dumps({"model": "all-minilm", "embeddings": vectors, "prompt_eval_count": 1234})
    assert usage_from_body(RouteId.EMBED, body) == Usage(1234, 0)


def test_stream_kinds() -> None:
    assert STREAM_KINDS[RouteId.GENERATE] is StreamKind.NDJSON
    assert STREAM_KINDS[RouteId.CHAT] is StreamKind.NDJSON
    assert STREAM_KINDS[RouteId.V1_CHAT] is StreamKind.SSE_OPENAI
    assert STREAM_KINDS[RouteId.V1_COMPLETIONS] is StreamKind.SSE_OPENAI
    assert STREAM_KINDS[RouteId.V1_RESPONSES] is StreamKind.SSE_EVENTS
    assert STREAM_KINDS[RouteId.V1_MESSAGES] is StreamKind.SSE_EVENTS
    for route in (RouteId.EMBED, RouteId.EMBEDDINGS, RouteId.TAGS, RouteId.V1_EMBEDDINGS):
        assert route not in STREAM_KINDS
