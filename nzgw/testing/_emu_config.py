"""What the emulated Ollama serves: its models, its knobs, its faults, and how it reads model names.

Everything here is plain data. `EmulatorSettings` is deliberately mutable: tests change it while the
emulator runs and every new request sees the change.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import attrs
import trio


class Fault(enum.Enum):
    """How the emulator misbehaves. Set `EmulatorSettings.fault` (every request) or an entry of
    `EmulatorSettings.model_faults` (inference requests for one model) at runtime."""

    NONE = "none"
    #: Stop listening: new connections are refused, idle keep-alive connections are closed, and a
    #: request arriving on a surviving connection gets the connection closed. Clearing it listens
    #: again on the same port. As a per-model fault it behaves like CLOSE_BEFORE_FIRST_BYTE.
    REFUSE = "refuse"
    #: 500 in the error shape of the surface called (the router still answers 404 and 405).
    HTTP_500 = "http_500"
    #: 503 `server busy, please try again.  maximum pending requests exceeded` (queue full).
    BUSY_503 = "busy_503"
    #: Read the whole request, then close the connection without a byte of response.
    CLOSE_BEFORE_FIRST_BYTE = "close_before_first_byte"
    #: Send the status line, headers and `die_after_frames` body chunks (half the body when the
    #: reply is not a stream), then close: no terminator.
    DIE_MID_STREAM = "die_mid_stream"
    #: Read the request and never answer, until the peer leaves or the emulator stops.
    STALL = "stall"


# ------------------------------------------------------------------------------------------------
# Model names: `[host/][namespace/]model[:tag]`, case-insensitive, defaults filled in.

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_TAG_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


@attrs.frozen
class ModelRef:
    """A parsed model name, parts as written (defaults filled in)."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity for lookups: Ollama compares every part case-insensitively."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def short(self) -> str:
        """The form listings use: the tag always, `host/namespace/` only when not the default."""
        if self.host.lower() != DEFAULT_HOST:
            return self.full
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


@functools.lru_cache(maxsize=4096)
def parse_model_name(raw: str) -> ModelRef | None:
    """`None` when the name is not a valid Ollama model name (the empty name included)."""
    name, _, _digest = raw.partition("@")
    tag = DEFAULT_TAG
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    if not (
        _HOST_PART.fullmatch(host)
        and _NAMESPACE_PART.fullmatch(namespace)
        and _MODEL_PART.fullmatch(model)
        and _TAG_PART.fullmatch(tag)
    ):
        return None
    return ModelRef(host=host, namespace=namespace, model=model, tag=tag)


# ------------------------------------------------------------------------------------------------
# Models.


def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _digest_of_name(model: EmulatedModel) -> str:
    return hashlib.sha256(model.name.lower().encode()).hexdigest()


def _check_name(_: EmulatedModel, __: attrs.Attribute[str], name: str) -> None:
    if parse_model_name(name) is None:
        raise ValueError(f"invalid model name {name!r}")


def _check_digest(_: EmulatedModel, __: attrs.Attribute[str], digest: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"digest must be 64 lowercase hex digits, got {digest!r}")


@attrs.frozen
class EmulatedModel:
    """One model the emulator has "pulled". `capabilities` decide what it can do: `completion`
    (generate/chat), `embedding`, `tools`, `thinking`, `insert`, `vision`…"""

    name: str = attrs.field(validator=_check_name)
    family: str = "llama"
    parameter_size: str = "8.0B"
    quantization_level: str = "Q4_K_M"
    capabilities: tuple[str, ...] = attrs.field(default=("completion",), converter=_as_tuple)
    size: int = 4_683_075_271
    digest: str = attrs.field(
        default=attrs.Factory(_digest_of_name, takes_self=True), validator=_check_digest
    )
    modified_at: datetime = datetime(2026, 5, 10, 15, 6, 48, 630_000, tzinfo=UTC)
    #: Listed by /api/ps.
    loaded: bool = False
    #: Dimensions of the embeddings it returns (kept small: tests read them).
    embedding_length: int = 8
    context_length: int = 8192

    @property
    def ref(self) -> ModelRef:
        ref = parse_model_name(self.name)
        assert ref is not None  # checked by the validator
        return ref

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities


def default_models() -> list[EmulatedModel]:
    """A chat model with tools, a thinking model and an embedding model, newest first."""
    return [
        EmulatedModel(
            name="llama3:latest",
            family="llama",
            parameter_size="8.0B",
            quantization_level="Q4_K_M",
            capabilities=("completion", "tools"),
            size=4_661_224_676,
            modified_at=datetime(2026, 5, 10, 15, 6, 48, 630_000, tzinfo=UTC),
            loaded=True,
            context_length=8192,
        ),
        EmulatedModel(
            name="qwen3:latest",
            family="qwen3",
            parameter_size="8.2B",
            quantization_level="Q4_K_M",
            capabilities=("completion", "thinking"),
            size=5_225_388_164,
            modified_at=datetime(2026, 5, 8, 9, 12, 3, 250_000, tzinfo=UTC),
            context_length=40960,
        ),
        EmulatedModel(
            name="all-minilm:latest",
            family="bert",
            parameter_size="23M",
            quantization_level="F16",
            capabilities=("embedding",),
            size=45_960_996,
            modified_at=datetime(2026, 4, 1, 7, 0, 0, tzinfo=UTC),
            context_length=512,
        ),
    ]


def model_named(name: str) -> EmulatedModel:
    """The default model of that name, or a plain one (an embedding model when the name says so)."""
    ref = parse_model_name(name)
    if ref is None:
        raise ValueError(f"invalid model name {name!r}")
    for model in default_models():
        if model.ref.key == ref.key:
            return model
    lowered = ref.model.lower()
    embedding = "embed" in lowered or "minilm" in lowered
    return EmulatedModel(
        name=ref.short,
        family=lowered.split("-")[0].split(".")[0] or "llama",
        capabilities=("embedding",) if embedding else ("completion",),
    )


# ------------------------------------------------------------------------------------------------
# Settings.


def _announce_fault(settings: EmulatorSettings, _: attrs.Attribute[Fault], new: Fault) -> Fault:
    # Runs in the task that assigns `settings.fault`, before the assignment: listeners act at once
    # (REFUSE closes the listening socket synchronously) so the very next connect is refused.
    old = settings.fault
    for listener in list(settings._fault_listeners):
        listener(old, new)
    return new


@attrs.define(eq=False)
class EmulatorSettings:
    """The emulator's knobs. Mutable on purpose: change any of them while it runs."""

    models: list[EmulatedModel] = attrs.Factory(default_models)
    #: Content tokens per reply ("tok0 ", "tok1 ", …), one per stream frame.
    tokens_per_reply: int = 8
    #: Thinking tokens ("think0 ", …) sent before the content by thinking-capable models when
    #: thinking is on (Ollama's default for them). They count in `eval_count` and in the caps.
    thinking_tokens: int = 3
    #: A misbehaving backend that generates past every output cap (num_predict, max_tokens).
    ignore_caps: bool = False
    #: Seconds before the first token of a generation (status and headers wait for it too, as in
    #: Ollama, which writes nothing before the first frame). Applies to non-streamed replies too.
    first_token_delay: float = 0.0
    #: Seconds between tokens. A non-streamed reply waits for the whole generation.
    token_delay: float = 0.0
    version: str = "0.33.0-rc2"
    fault: Fault = attrs.field(default=Fault.NONE, on_setattr=_announce_fault)
    #: Faults for inference requests that resolve to one model (names normalised, `"*"`: any
    #: model). They strike where Ollama schedules a runner: after validation, model lookup and
    #: capability checks.
    model_faults: dict[str, Fault] = attrs.Factory(dict)
    #: Body chunks DIE_MID_STREAM sends before it closes the connection.
    die_after_frames: int = 2
    #: Ollama on loopback answers 403 (empty body) unless `Host` is local (docs/OLLAMA-WIRE.md).
    check_host: bool = True
    #: Generations running at once, like OLLAMA_NUM_PARALLEL (0: unlimited); more wait first
    #: come, first served, like Ollama's queue. Read when the emulator starts.
    num_parallel: int = 0
    #: When set, every generation waits for this event before its first token (tests hold
    #: requests in flight with it, then let them all go).
    hold: trio.Event | None = None
    _fault_listeners: list[Callable[[Fault, Fault], None]] = attrs.field(
        factory=list, init=False, repr=False
    )

    def find_model(self, name: str) -> EmulatedModel | None:
        ref = parse_model_name(name)
        if ref is None:
            return None
        for model in self.models:
            if model.ref.key == ref.key:
                return model
        return None

    def fault_for_model(self, model: EmulatedModel) -> Fault:
        key = model.ref.key
        for name, fault in self.model_faults.items():
            if name == "*":
                continue
            ref = parse_model_name(name)
            if ref is not None and ref.key == key:
                return fault
        return self.model_faults.get("*", Fault.NONE)

    def _add_fault_listener(self, listener: Callable[[Fault, Fault], None]) -> None:
        self._fault_listeners.append(listener)

    def _remove_fault_listener(self, listener: Callable[[Fault, Fault], None]) -> None:
        self._fault_listeners.remove(listener)
