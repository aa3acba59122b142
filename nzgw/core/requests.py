"""One view of every request: the document nzgw checks is the one the backend receives. Sans-IO.

Ollama binds a body into Go structs: keys match fields case-insensitively (`gojson.fold_key`) and
the last matching key wins. If nzgw forwarded the client's bytes, `{"model":"a","MODEL":"b"}`
would be checked as `a` and run as `b`. So `prepare` re-serialises the request from the document
it validated, and the client's bytes are never forwarded:

* only the fields the Ollama reference documents for the route, in their one canonical spelling;
  other unknown fields are dropped (Ollama ignores them too);
* a key that Go would bind to a known field under another spelling (`MODEL`, `ſtream`, `Options`)
  is refused with 400, never dropped: the client must learn its request was not what it meant
  (duplicate keys were already refused by `gojson.loads`); the same holds inside chat messages;
* `model` is a string, `stream` a boolean written out explicitly, `options` holds only the
  documented option names;
* shared-model controls (`keep_alive`, load-time options such as `num_ctx`, `num_gpu`) steer a
  model every tenant shares: they are stripped unless the tenant is allowed them;
* `/v1/completions` takes one prompt string (Ollama refuses lists);
* the output cap is normalised and reserved by `nzgw.core.reserve`.
"""

from __future__ import annotations

from typing import Any

import attrs

from nzgw.core import gojson
from nzgw.core.paths import RouteId
from nzgw.core.reserve import CapTypeError, Reservation, reserve

__all__ = [
    "FIELDS",
    "LOAD_OPTIONS",
    "OPTIONS",
    "BadRequestError",
    "Prepared",
    "prepare",
]

R = RouteId


class BadRequestError(ValueError):
    """The client's body cannot be forwarded as checked; the message is safe to show it."""


_NATIVE_COMMON = ("model", "stream", "format", "options", "keep_alive", "think")
# What /v1/chat/completions and /v1/completions share.
_OPENAI_COMMON = (
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
)
_NATIVE_TAIL = ("truncate", "shift", "logprobs", "top_logprobs")

FIELDS: dict[RouteId, frozenset[str]] = {
    R.GENERATE: frozenset(
        {
            *_NATIVE_COMMON,
            *_NATIVE_TAIL,
            "prompt",
            "suffix",
            "system",
            "template",
            "context",
            "raw",
            "images",
        }
    ),
    R.CHAT: frozenset({*_NATIVE_COMMON, *_NATIVE_TAIL, "messages", "tools"}),
    R.EMBED: frozenset({"model", "input", "truncate", "dimensions", "keep_alive", "options"}),
    R.EMBEDDINGS: frozenset({"model", "prompt", "keep_alive", "options"}),
    R.SHOW: frozenset({"model", "name", "verbose", "system", "options"}),
    R.V1_CHAT: frozenset(
        {
            *_OPENAI_COMMON,
            "messages",
            "max_completion_tokens",  # folded into max_tokens by reserve(), never forwarded
            "response_format",
            "tools",
            "top_logprobs",
            "reasoning_effort",
            "reasoning",
        }
    ),
    R.V1_COMPLETIONS: frozenset({*_OPENAI_COMMON, "prompt", "suffix"}),
    R.V1_EMBEDDINGS: frozenset({"model", "input", "dimensions", "encoding_format"}),
    R.V1_RESPONSES: frozenset(
        {
            "model",
            "input",
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "text",
            "tools",
            "reasoning",
            "stream",
        }
    ),
    R.V1_MESSAGES: frozenset(
        {
            "model",
            "max_tokens",
            "messages",
            "system",
            "stream",
            "temperature",
            "top_p",
            "top_k",
            "stop_sequences",
            "tools",
            "thinking",
            "output_config",
        }
    ),
}

# Fields of one chat message (Go structs too: their keys fold like the top level's).
_MESSAGE_FIELDS: dict[RouteId, frozenset[str]] = {
    R.CHAT: frozenset(
        {"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"}
    ),
    R.V1_CHAT: frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning"}),
    R.V1_MESSAGES: frozenset({"role", "content"}),
}

# api.Options as the reference documents it. `FromMap` matches these names exactly.
OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "use_mmap",
        "num_thread",
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "stop",
    }
)
# Options that decide how a (shared) model is loaded: a change reloads it for every tenant.
LOAD_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread"})

# Streaming routes and their default when `stream` is absent or null.
_STREAM_DEFAULT: dict[RouteId, bool] = {
    R.GENERATE: True,
    R.CHAT: True,
    R.V1_CHAT: False,
    R.V1_COMPLETIONS: False,
    R.V1_RESPONSES: False,
    R.V1_MESSAGES: False,
}


@attrs.frozen
class Prepared:
    """A checked request: what to authorise, what to reserve, and the exact bytes to forward."""

    model: str  # as the client spelt it (forwarded verbatim; the caller normalises to check)
    stream: bool
    body: bytes  # the canonical document nzgw forwards, and nothing else
    reservation: Reservation
    strip_usage: bool  # nzgw asked for stream usage on the client's behalf: remove it again
    stripped_controls: tuple[str, ...]  # shared-model controls removed by the tenant policy


def prepare(
    route: RouteId,
    body: bytes,
    *,
    default_cap: int,
    allow_model_controls: bool = False,
) -> Prepared:
    """Decode, check and canonicalise a model route's body; `BadRequestError` when it cannot be.

    CPU-bound and linear in the body size; safe to run in a worker thread (no shared state).
    """
    if not body.strip():
        raise BadRequestError("missing request body")
    try:
        doc = gojson.loads(body)
    except gojson.JSONBodyError as exc:
        raise BadRequestError(str(exc)) from None
    if not isinstance(doc, dict):
        raise BadRequestError("request body must be a JSON object")
    canonical = _canonical_fields(doc, FIELDS[route], where="request body")
    message_fields = _MESSAGE_FIELDS.get(route)
    if message_fields is not None:
        _check_messages(canonical.get("messages"), message_fields)

    model = _model(route, canonical)
    stream = _stream(route, canonical)
    stripped = _apply_controls_policy(route, canonical, allow=allow_model_controls)
    if route is R.V1_COMPLETIONS:
        prompt = canonical.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequestError("prompt must be one string: only one prompt is accepted")

    strip_usage = False
    options = canonical.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequestError("stream_options must be an object")
        include = _canonical_fields(options, frozenset({"include_usage"}), where="stream_options")
        options = include if include.get("include_usage") is not None else None
    if options is None:
        canonical.pop("stream_options", None)
    else:
        canonical["stream_options"] = options
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if stream and route in (R.V1_CHAT, R.V1_COMPLETIONS) and not wants_usage:
        # Ask the backend for usage on the client's behalf; the relay removes it again.
        canonical["stream_options"] = {"include_usage": True}
        strip_usage = True

    try:
        output_cap, image_bytes = reserve(route, canonical, default_cap=default_cap)
    except CapTypeError as exc:
        raise BadRequestError(str(exc)) from None
    forwarded = gojson.dumps(canonical)
    prompt_estimate = (max(len(forwarded) - image_bytes, 0) + 3) // 4
    return Prepared(
        model=model,
        stream=stream,
        body=forwarded,
        reservation=Reservation(prompt_estimate, output_cap),
        strip_usage=strip_usage,
        stripped_controls=stripped,
    )


def _canonical_fields(doc: dict[str, Any], known: frozenset[str], *, where: str) -> dict[str, Any]:
    """The known fields of a Go-struct object; a folded spelling of one is a `BadRequestError`."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in known:
            out[key] = value
            continue
        folded = gojson.fold_key(key)
        if folded in known:
            raise BadRequestError(
                f'{where} has a key that differs from "{folded}" only in letter case; '
                f'spell it "{folded}"'
            )
    return out


def _check_messages(messages: Any, fields: frozenset[str]) -> None:
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, dict):
            for key in message:
                if key not in fields and gojson.fold_key(key) in fields:
                    _canonical_fields(message, fields, where="a message")


def _model(route: RouteId, doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if route is R.SHOW:
        # api.ShowRequest: `model`, or the legacy `name` when `model` is empty. Forward one.
        name = doc.pop("name", None)
        if model is None or model == "":
            model = name
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise BadRequestError("model must be a string")
    doc["model"] = model
    return model


def _stream(route: RouteId, doc: dict[str, Any]) -> bool:
    default = _STREAM_DEFAULT.get(route)
    value = doc.pop("stream", None)
    if default is None:
        return False  # embeddings and show never stream
    if value is None:
        value = default
    if not isinstance(value, bool):
        raise BadRequestError("stream must be true or false")
    doc["stream"] = value  # explicit: the backend's default can never differ from nzgw's
    return value


def _apply_controls_policy(route: RouteId, doc: dict[str, Any], *, allow: bool) -> tuple[str, ...]:
    stripped: list[str] = []
    if "keep_alive" in doc and not allow:
        del doc["keep_alive"]
        stripped.append("keep_alive")
    if "options" not in doc:
        return tuple(stripped)
    options = doc["options"]
    if options is None:
        del doc["options"]
        return tuple(stripped)
    if not isinstance(options, dict):
        raise BadRequestError("options must be an object")
    kept: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTIONS:
            continue  # Ollama ignores names it does not know
        if key in LOAD_OPTIONS and not allow:
            stripped.append(f"options.{key}")
            continue
        kept[key] = value
    doc["options"] = kept
    return tuple(stripped)
