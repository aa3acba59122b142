"""Sans-IO: what the emulator's handlers share: the request, gin-like body binding, and the steps
of Ollama's inference handlers up to the point where it asks for a runner."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

import attrs

from nzgw.testing._emu_config import (
    EmulatedModel,
    EmulatorSettings,
    Fault,
    ModelRef,
    parse_model_name,
)
from nzgw.testing._emu_render import (
    NO_REPLY,
    Clock,
    Generation,
    count_prompt_tokens,
    embedding,
    plan_reply,
)
from nzgw.testing._emu_wire import (
    BUSY_MESSAGE,
    RUNNER_DIED_MESSAGE,
    Rejected,
    Reply,
    go_json_type,
    go_quote,
    go_syntax_error,
    native_error,
    openai_error,
)


@attrs.frozen
class Request:
    method: str
    #: Decoded path, without the query string.
    path: str
    body: bytes
    #: The `Host` header ("" when absent).
    host: str = ""
    #: The raw query string, without the `?`.
    query: str = ""


@attrs.define
class Context:
    """What a handler sees besides the request. `fault` is set by a handler when the model's
    transport fault strikes (CLOSE_BEFORE_FIRST_BYTE, STALL, DIE_MID_STREAM)."""

    settings: EmulatorSettings
    clock: Clock
    #: Digests of blobs POSTed to /api/blobs during the emulator's life.
    blobs: set[str]
    #: `clock.now()` when the request head arrived.
    started_at: float
    bound_to_loopback: bool = True
    fault: Fault | None = None


ErrorFn = Callable[[int, str], Reply]

# ------------------------------------------------------------------------------------------------
# Binding request bodies the way gin's ShouldBindJSON does (Content-Type is not looked at).


class _GoObject(dict[str, Any]):
    """A decoded JSON object that remembers its keys in order, duplicates included."""

    pairs: list[tuple[str, Any]]


def _go_object(pairs: list[tuple[str, Any]]) -> _GoObject:
    obj = _GoObject(pairs)
    obj.pairs = pairs
    return obj


_GO_FOLD: Final = str.maketrans({"\u017f": "s", "\u212a": "k"})


def go_fold(key: str) -> str:
    """Go's struct-field matching: ASCII letter case, and U+017F / U+212A fold to s / k."""
    folded = key.translate(_GO_FOLD)
    return folded.lower() if folded.isascii() else folded


def go_struct_fields(value: dict[str, Any]) -> dict[str, Any]:
    """How encoding/json binds an object into a struct whose json tags are lower-case:
    every key matches its field case-insensitively, and the last matching key wins."""
    pairs = value.pairs if isinstance(value, _GoObject) else list(value.items())
    fields: dict[str, Any] = {}
    for key, item in pairs:
        fields[go_fold(key)] = item
    return fields


class Body:
    """A JSON object body with Go-typed accessors; a wrong type is Go's unmarshal error.

    Keys are bound as Go binds them into the request struct (`go_struct_fields`)."""

    def __init__(self, values: dict[str, Any], struct: str, error: ErrorFn) -> None:
        self.values = go_struct_fields(values)
        self.struct = struct
        self.error = error

    def type_error(self, field: str, value: Any, go_type: str) -> Rejected:
        return Rejected(
            self.error(
                400,
                f"json: cannot unmarshal {go_json_type(value)} into Go struct field "
                f"{self.struct}.{field} of type {go_type}",
            )
        )

    def raw(self, field: str) -> Any:
        return self.values.get(field)

    def string(self, field: str) -> str:
        value = self.values.get(field)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.type_error(field, value, "string")
        return value

    def optional_bool(self, field: str) -> bool | None:
        value = self.values.get(field)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.type_error(field, value, "bool")
        return value

    def boolean(self, field: str) -> bool:
        return bool(self.optional_bool(field))

    def integer(self, field: str) -> int | None:
        value = self.values.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.type_error(field, value, "int")
        if isinstance(value, float) and not value.is_integer():
            raise Rejected(
                self.error(
                    400,
                    f"json: cannot unmarshal number {value} into Go struct field "
                    f"{self.struct}.{field} of type int",
                )
            )
        return int(value)

    def number(self, field: str) -> float | None:
        value = self.values.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.type_error(field, value, "float64")
        return float(value)

    def array(self, field: str, go_type: str) -> list[Any]:
        value = self.values.get(field)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.type_error(field, value, go_type)
        return value

    def object(self, field: str, go_type: str) -> dict[str, Any]:
        value = self.values.get(field)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.type_error(field, value, go_type)
        return value


def bind(body: bytes, go_type: str, error: ErrorFn, *, on_empty: str) -> Body:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise Rejected(error(400, "invalid character looking for beginning of value")) from None
    if not text.strip():
        raise Rejected(error(400, on_empty))
    try:
        value = json.loads(text, object_pairs_hook=_go_object)
    except json.JSONDecodeError as exc:
        raise Rejected(error(400, go_syntax_error(text, exc))) from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Rejected(
            error(
                400,
                f"json: cannot unmarshal {go_json_type(value)} into Go value of type {go_type}",
            )
        )
    return Body(value, go_type.rpartition(".")[2], error)


def bind_native(body: bytes, go_type: str) -> Body:
    return bind(body, go_type, native_error, on_empty="missing request body")


def openai_middleware_error(status: int, message: str) -> Reply:
    return openai_error(status, message, from_middleware=True)


def bind_openai(body: bytes, go_type: str) -> Body:
    # The compat middleware binds with ShouldBindJSON and reports err.Error(): "EOF" when empty.
    return bind(body, go_type, openai_middleware_error, on_empty="EOF")


# ------------------------------------------------------------------------------------------------
# Shared pieces of the inference handlers.

_INT_OPTIONS: Final = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
    }
)
_FLOAT_OPTIONS: Final = frozenset(
    {
        "top_p",
        "min_p",
        "typical_p",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)


def check_options(options: dict[str, Any], error: ErrorFn) -> int | None:
    """Ollama's api.Options.FromMap: a wrong type is a 500. Returns the num_predict cap."""
    for key, value in options.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _INT_OPTIONS and not is_number:
            raise Rejected(error(500, f"option {go_quote(key)} must be of type integer"))
        if key in _FLOAT_OPTIONS and not is_number:
            raise Rejected(error(500, f"option {go_quote(key)} must be of type float32"))
        if key == "use_mmap" and not isinstance(value, bool):
            raise Rejected(error(500, f"option {go_quote(key)} must be of type boolean"))
    num_predict = options.get("num_predict")
    return int(num_predict) if num_predict is not None else None


def schedule(context: Context, model: EmulatedModel, error: ErrorFn) -> None:
    """Where Ollama asks the scheduler for a runner: the model's fault strikes here."""
    fault = context.settings.fault_for_model(model)
    if fault is Fault.HTTP_500:
        raise Rejected(error(500, RUNNER_DIED_MESSAGE))
    if fault is Fault.BUSY_503:
        raise Rejected(error(503, BUSY_MESSAGE))
    if fault is Fault.REFUSE:
        fault = Fault.CLOSE_BEFORE_FIRST_BYTE
    if fault is not Fault.NONE:
        context.fault = fault


_ZERO_DURATION: Final = re.compile(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?")


def keep_alive_is_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and _ZERO_DURATION.fullmatch(value) is not None


def _thinking_on(model: EmulatedModel, think: bool | None) -> bool:
    """Ollama turns thinking on by default for models that can think."""
    return "thinking" in model.capabilities and think is not False


def think_value(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value != ""
    return bool(value)


def new_generation(
    context: Context,
    *,
    model_echo: str,
    model: EmulatedModel,
    prompt_tokens: int,
    think: bool | None,
    cap: int | None,
) -> Generation:
    settings = context.settings
    thinking = settings.thinking_tokens if _thinking_on(model, think) else 0
    if settings.ignore_caps:
        cap = None
    plan = plan_reply(content_tokens=settings.tokens_per_reply, thinking_tokens=thinking, cap=cap)
    return Generation(
        model=model_echo,
        prompt_tokens=prompt_tokens,
        plan=plan,
        clock=context.clock,
        started_at=context.started_at,
    )


def load_generation(context: Context, model_echo: str) -> Generation:
    return Generation(
        model=model_echo,
        prompt_tokens=0,
        plan=NO_REPLY,
        clock=context.clock,
        started_at=context.started_at,
    )


def parse_ref(name: str) -> ModelRef | None:
    return parse_model_name(name) if name else None


def generate_model(context: Context, name: str, error: ErrorFn) -> EmulatedModel:
    """GenerateHandler's model lookup (shared by /v1/completions): a missing or unknown name
    is a 404 `model '<name>' not found`, a malformed one a 400."""
    if parse_ref(name) is None:
        if name:
            raise Rejected(error(400, "invalid model name"))
        raise Rejected(error(404, f"model '{name}' not found"))
    model = context.settings.find_model(name)
    if model is None:
        raise Rejected(error(404, f"model '{name}' not found"))
    return model


@attrs.frozen
class ChatInput:
    """A chat request reduced to what the emulator needs from it."""

    texts: list[str]
    messages: int

    @property
    def prompt_tokens(self) -> int:
        return count_prompt_tokens(self.texts, self.messages)


def chat_model_checks(
    context: Context,
    *,
    model_name: str,
    error: ErrorFn,
    tools: bool,
    think: bool | None,
    relax_thinking: bool = False,
) -> tuple[EmulatedModel, bool | None]:
    """ChatHandler up to its scheduling point (the /v1 chat surfaces share it)."""
    ref = parse_ref(model_name)
    if ref is None:
        raise Rejected(error(400, "invalid model name" if model_name else "model is required"))
    model = context.settings.find_model(model_name)
    if model is None:
        raise Rejected(error(404, f"model '{model_name}' not found"))
    if "thinking" not in model.capabilities and think:
        if not relax_thinking:
            raise Rejected(error(400, f"{go_quote(model_name)} does not support thinking"))
        think = None
    if "completion" not in model.capabilities:
        raise Rejected(error(400, f"{go_quote(model_name)} does not support chat"))
    if tools and "tools" not in model.capabilities:
        raise Rejected(error(400, f"{model.ref.full} does not support tools"))
    return model, think


def listed_models(context: Context) -> list[EmulatedModel]:
    # Newest first, by whole seconds, stable (Go: SortStableFunc on ModifiedAt.Unix()).
    return sorted(context.settings.models, key=lambda model: -int(model.modified_at.timestamp()))


def embed_inputs(value: Any, error: ErrorFn) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise Rejected(error(400, "invalid input type"))


def embed_core(
    context: Context,
    *,
    name: str,
    raw_input: Any,
    truncate: bool | None,
    dimensions: int,
    error: ErrorFn,
) -> tuple[EmulatedModel, list[list[float]], int] | None:
    """EmbedHandler (shared by /v1/embeddings); `None` for the load-only reply."""
    ref = parse_ref(name)
    if ref is None:
        if name:
            raise Rejected(error(400, "invalid model name"))
        raise Rejected(error(404, f"model '{name}' not found"))
    inputs = embed_inputs(raw_input, error)
    model = context.settings.find_model(name)
    if model is None:
        raise Rejected(error(404, f"model {go_quote(name)} not found, try pulling it first"))
    schedule(context, model, error)
    if not inputs:
        return None
    counts = [count_prompt_tokens([text], 0) + 1 for text in inputs]
    if truncate is False and max(counts) > model.context_length:
        raise Rejected(error(400, "the input length exceeds the context length"))
    vectors = [embedding(model, text, dimensions=dimensions) for text in inputs]
    return model, vectors, sum(counts)
