"""Stream watchers for the relay, usage from whole bodies, the stream kinds. Sans-IO, hot path.

The relay forwards upstream bytes as they arrive (whatever one socket read returned), never
re-encoded. A `StreamWatcher` looks at those bytes on the side to count frames, take the
reported usage, see the terminator (or its absence: a truncated upstream) and in-stream errors.

Cost model: per chunk, a `bytes.rfind` for the frame delimiter, a `bytes.count`, and a few
`bytes.find` for markers; `json.loads` runs only on the few frames a marker points at (the native
`"done":true` frame, an SSE frame with `"usage"`, `[DONE]`, the final event of
`/v1/responses` and `/v1/messages`, error frames). A marker can sit inside model text only as
part of a JSON string (a raw `"` or newline is always escaped there), so a false hit costs a
parse, never a wrong decision: every hit is confirmed on the parsed top-level object.

Framing (Ollama's wire format): NDJSON frames end with `\\n`; SSE events end with `\\n\\n` (Ollama
never sends `\\r\\n`; a stream using it would look truncated, which fails safe).

`/v1/completions` with `include_usage` carries a zero `usage` on every chunk; those placeholders
are recognised without parsing (`"total_tokens":0`) and ignored. With `strip_usage=True` only the
final `"choices":[]` usage chunk is removed: it is the one a client that did not ask for usage
would trip over (`chunk.choices[0]`), while the zero placeholders are valid, optional fields
of the chunk objects, and removing them would mean rewriting every frame of the stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from nzgw.core.paths import RouteId
from nzgw.core.surfaces import StreamKind

__all__ = [
    "MAX_FRAME_BYTES",
    "STREAM_KINDS",
    "StreamKind",
    "StreamWatcher",
    "Usage",
    "usage_from_body",
]

MAX_FRAME_BYTES = 8 * 1024 * 1024
"""A frame longer than this (Go's client limit for one NDJSON line) is relayed unparsed."""

_MAX_MESSAGE = 1000


@attrs.frozen
class Usage:
    """Token counts of one request. `reported=False`: estimated by the gateway."""

    prompt_tokens: int
    completion_tokens: int
    reported: bool = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: The framing of each route's streamed answers (routes absent here never stream).
STREAM_KINDS: Mapping[RouteId, StreamKind] = {
    RouteId.GENERATE: StreamKind.NDJSON,
    RouteId.CHAT: StreamKind.NDJSON,
    RouteId.V1_CHAT: StreamKind.SSE_OPENAI,
    RouteId.V1_COMPLETIONS: StreamKind.SSE_OPENAI,
    RouteId.V1_RESPONSES: StreamKind.SSE_EVENTS,
    RouteId.V1_MESSAGES: StreamKind.SSE_EVENTS,
}


def _loads(data: bytes | bytearray) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested tool arguments
        return None


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _message(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or json.dumps(error, separators=(",", ":"))
    text = error if isinstance(error, str) else json.dumps(error)
    return text[:_MAX_MESSAGE]


def _sse_fields(frame: bytes) -> tuple[bytes | None, bytes]:
    """The `event` name and the joined `data` of one SSE event."""
    event: bytes | None = None
    data: list[bytes] = []
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            value = line[6:]
            event = (value[1:] if value.startswith(b" ") else value).rstrip(b"\r")
    return event, b"\n".join(data)


_MARKERS: dict[StreamKind, tuple[bytes, ...]] = {
    StreamKind.NDJSON: (b'"done":true', b'"done": true', b'"error"'),
    StreamKind.SSE_OPENAI: (b"[DONE]", b'"usage"', b'"error"'),
    StreamKind.SSE_EVENTS: (
        b"response.completed",
        b"response.incomplete",
        b"response.failed",
        b"message_start",
        b"message_delta",
        b"message_stop",
        b"event: error",
        b'"type":"error"',
    ),
}


class StreamWatcher:
    """Watches one upstream stream; one instance per stream, fed every chunk in order.

    `feed(data)` returns the bytes to forward now: `data` itself, unless `strip_usage` is on
    (OpenAI SSE only), in which case complete frames are forwarded, the usage chunk the gateway
    asked for on the client's behalf is cut out, and an incomplete tail is held back until it
    completes or `flush()` is called at upstream EOF. Neither method raises on any input.

    Attributes: `frames` (complete frames seen, plus a non-blank unterminated one at EOF),
    `completed` (the terminator was seen: `"done":true`, `data: [DONE]`, `response.completed`
    or `response.incomplete`, `message_stop`), `upstream_error` (message of an in-stream
    error frame). `usage()` is the LAST reported usage, or None.

    Memory: at most one incomplete frame is buffered; a frame longer than `max_frame` bytes is
    relayed without being looked at (its usage, if any, is lost: the gateway then estimates).
    """

    __slots__ = (
        "_delim",
        "_input_estimate",
        "_markers",
        "_max_frame",
        "_prev_newline",
        "_skipping",
        "_strip",
        "_tail",
        "_usage",
        "completed",
        "frames",
        "kind",
        "upstream_error",
    )

    def __init__(
        self, kind: StreamKind, *, strip_usage: bool = False, max_frame: int = MAX_FRAME_BYTES
    ) -> None:
        if strip_usage and kind is not StreamKind.SSE_OPENAI:
            raise ValueError("strip_usage is only meaningful for StreamKind.SSE_OPENAI")
        self.kind = kind
        self.frames = 0
        self.completed = False
        self.upstream_error: str | None = None
        self._strip = strip_usage
        self._max_frame = max_frame
        self._delim = b"\n" if kind is StreamKind.NDJSON else b"\n\n"
        self._markers = _MARKERS[kind]
        self._tail = bytearray()  # the incomplete last frame
        self._usage: Usage | None = None
        self._input_estimate = 0  # /v1/messages: message_start's input estimate
        self._skipping = False  # inside an oversized frame: relay it without looking
        self._prev_newline = False  # (while skipping) the last byte seen was "\n"

    def usage(self) -> Usage | None:
        return self._usage

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._skipping:
            return self._skip(data)
        delim = self._delim
        width = len(delim)
        tail = self._tail
        buf: bytes | bytearray
        if tail:
            base = max(0, len(tail) - width + 1)  # a delimiter may straddle the two reads
            tail += data
            buf = tail
        else:
            base = 0
            buf = data
        last = buf.rfind(delim, base)
        if last < 0:  # no frame completed
            if buf is data:
                tail += data
            if len(tail) > self._max_frame:
                return self._overflow(data)
            return b"" if self._strip else data
        end = last + width
        if width == 2 and last > base and buf[last - 1] == 0x0A:
            end = _left_scan_end(buf, base)  # a run of 3+ newlines: match `count`'s pairing
        self.frames += buf.count(delim, base, end)

        cuts: list[tuple[int, int]] = []
        for marker in self._markers:
            if buf.find(marker, 0, end) >= 0:
                cuts = self._inspect(buf, end)
                break

        out = data
        if self._strip and (cuts or end != len(buf) or buf is not data):
            out = _without(buf, end, cuts)
        if buf is data:
            if end < len(data):
                tail += memoryview(data)[end:]
        else:
            del tail[:end]
        return out

    def flush(self) -> bytes:
        """At upstream EOF: inspect an unterminated last frame; return what was held back."""
        if self._skipping:
            self._skipping = False
            self.frames += 1
            return b""
        if not self._tail:
            return b""
        frame = bytes(self._tail)
        self._tail.clear()
        if frame.strip():
            self.frames += 1
            if any(marker in frame for marker in self._markers) and self._frame(frame):
                return b""
        return frame if self._strip else b""

    def _inspect(self, buf: bytes | bytearray, end: int) -> list[tuple[int, int]]:
        """Look at each complete frame in `buf[:end]` that holds a marker; return spans to cut."""
        delim = self._delim
        width = len(delim)
        markers = self._markers
        cuts: list[tuple[int, int]] = []
        pos = 0
        while pos < end:
            stop = buf.find(delim, pos, end)
            if stop < 0:  # cannot happen: buf[:end] ends with a delimiter
                break
            for marker in markers:
                if buf.find(marker, pos, stop) >= 0:
                    if self._frame(bytes(buf[pos:stop])):
                        cuts.append((pos, stop + width))
                    break
            pos = stop + width
        return cuts

    def _frame(self, frame: bytes) -> bool:
        """Act on one frame that holds a marker; True if it must not reach the client."""
        if self.kind is StreamKind.NDJSON:
            self._ndjson(frame)
            return False
        event, payload = _sse_fields(frame)
        if self.kind is StreamKind.SSE_OPENAI:
            return self._sse_openai(payload)
        self._sse_events(event, payload)
        return False

    def _ndjson(self, frame: bytes) -> None:
        doc = _loads(frame)
        if not isinstance(doc, dict):
            return
        if doc.get("done") is True:
            self.completed = True
            self._usage = Usage(_count(doc.get("prompt_eval_count")), _count(doc.get("eval_count")))
        error = doc.get("error")
        if error:
            self.upstream_error = _message(error)

    def _sse_openai(self, payload: bytes) -> bool:
        if payload == b"[DONE]":
            self.completed = True
            return False
        if (
            b'"choices":[]' not in payload
            and (b'"total_tokens":0,' in payload or b'"total_tokens":0}' in payload)
            and b'"error"' not in payload
        ):
            return False  # /v1/completions' zero usage placeholder on a content chunk
        doc = _loads(payload)
        if not isinstance(doc, dict):
            return False
        error = doc.get("error")
        if error:
            self.upstream_error = _message(error)
            return False
        usage = doc.get("usage")
        if not isinstance(usage, dict):
            return False
        found = Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
        if doc.get("choices") == []:
            self._usage = found
            return self._strip
        if found.total_tokens:
            self._usage = found  # usage riding on a content chunk (not Ollama's way)
        return False

    def _sse_events(self, event: bytes | None, payload: bytes) -> None:
        doc = _loads(payload)
        if not isinstance(doc, dict):
            return
        kind = event.decode("latin-1") if event else doc.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            response = doc.get("response")
            if isinstance(response, dict):
                usage = response.get("usage")
                if isinstance(usage, dict):
                    self._usage = Usage(
                        _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
                    )
                if kind == "response.failed":
                    self.upstream_error = _message(response.get("error") or "response failed")
                else:
                    self.completed = True
        elif kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._input_estimate = _count(usage.get("input_tokens"))
        elif kind == "message_delta":
            usage = doc.get("usage")
            if isinstance(usage, dict):
                prompt = usage.get("input_tokens")
                self._usage = Usage(
                    _count(prompt) if prompt is not None else self._input_estimate,
                    _count(usage.get("output_tokens")),
                )
        elif kind == "message_stop":
            self.completed = True
        elif kind == "error":
            error = doc.get("error") or doc.get("message") or "upstream error"
            self.upstream_error = _message(error)

    def _overflow(self, data: bytes) -> bytes:
        """The current frame outgrew `max_frame`: stop buffering it, relay it blind."""
        tail = self._tail
        held = bytes(tail) if self._strip else data
        self._prev_newline = tail.endswith(b"\n")
        tail.clear()
        self._skipping = True
        return held

    def _skip(self, data: bytes) -> bytes:
        """Relay the rest of an oversized frame; resume watching after its delimiter."""
        if len(self._delim) == 2 and self._prev_newline and data.startswith(b"\n"):
            end = 1
        else:
            index = data.find(self._delim)
            if index < 0:
                self._prev_newline = data.endswith(b"\n")
                return data
            end = index + len(self._delim)
        self._skipping = False
        self.frames += 1
        if end == len(data):
            return data
        return data[:end] + self.feed(data[end:])


def _left_scan_end(buf: bytes | bytearray, start: int) -> int:
    """End of the last `\\n\\n` as a left-to-right non-overlapping scan pairs them."""
    end = start
    index = buf.find(b"\n\n", start)
    while index >= 0:
        end = index + 2
        index = buf.find(b"\n\n", end)
    return end


def _without(buf: bytes | bytearray, end: int, cuts: list[tuple[int, int]]) -> bytes:
    """`buf[:end]` as bytes, minus the `cuts` spans (sorted, disjoint)."""
    if not cuts:
        return bytes(buf[:end])
    pieces: list[bytes] = []
    pos = 0
    for start, stop in cuts:
        pieces.append(bytes(buf[pos:start]))
        pos = stop
    pieces.append(bytes(buf[pos:end]))
    return b"".join(pieces)


# --- whole (non-streamed) bodies ---------------------------------------------------------

_PROMPT_EVAL = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


def usage_from_body(route: RouteId, body: bytes) -> Usage | None:
    """The usage a whole JSON answer of `route` reports (docs/OLLAMA-WIRE.md), or None.

    None for routes without usage (`/api/embeddings`, listings), error bodies and anything
    unparsable. Embedding answers are scanned, not parsed: they can be megabytes of floats and
    hold no free text (the echoed `model` is a validated name), so the one `"prompt_eval_count"`
    / `"usage"` key in them cannot be spoofed. Text answers are parsed and read at top level
    only, so a model that writes `"eval_count":0` into a tool call cannot lower its bill.
    """
    if route is RouteId.EMBED:
        if b'"embeddings"' not in body:
            return None
        index = body.rfind(b'"prompt_eval_count"')
        match = _PROMPT_EVAL.match(body, index) if index >= 0 else None
        return Usage(int(match.group(1)) if match else 0, 0)
    if route is RouteId.V1_EMBEDDINGS:
        index = body.rfind(b'"usage"')
        match = _USAGE_OBJECT.match(body, index) if index >= 0 else None
        usage = _loads(match.group(1)) if match else None
        if not isinstance(usage, dict):
            return None
        return Usage(_count(usage.get("prompt_tokens")), 0)
    if route not in _BODY_ROUTES:
        return None
    doc = _loads(body)
    if not isinstance(doc, dict):
        return None
    if route is RouteId.GENERATE or route is RouteId.CHAT:
        if doc.get("done") is not True:
            return None
        return Usage(_count(doc.get("prompt_eval_count")), _count(doc.get("eval_count")))
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    if route is RouteId.V1_CHAT or route is RouteId.V1_COMPLETIONS:
        return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
    return Usage(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")))


_BODY_ROUTES = frozenset(
    {
        RouteId.GENERATE,
        RouteId.CHAT,
        RouteId.V1_CHAT,
        RouteId.V1_COMPLETIONS,
        RouteId.V1_RESPONSES,
        RouteId.V1_MESSAGES,
    }
)
