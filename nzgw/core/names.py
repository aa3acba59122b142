"""Model names: parse, normalise, match against allow-list patterns. Sans-IO.

Ollama's rules (docs/OLLAMA-WIRE.md; Ollama's `types/model/name.go`, `modelref`):

* form `[host/][namespace/]model[:tag]`, defaults `registry.ollama.ai` / `library` / `latest`;
  the tag follows the last `:` only when it comes after the last `/` (`host:5000/ns/m`);
  a `scheme://` before the host is dropped;
* parts start with `[A-Za-z0-9_]`, then `[A-Za-z0-9_.-]` (namespace: no `.`; host: also `:`),
  host 1..350 chars, the others 1..80; comparison is case-insensitive;
* a source suffix is taken off first: `:cloud` or a `-cloud` tag (proxied to ollama.com) or
  `:local` (forced local); both at once is an error. A cloud name normalises to the name Ollama
  itself uses for it (`gpt-oss:120b:cloud` → `gpt-oss:120b-cloud`, `gpt-oss:cloud` stays);
  `:local` is dropped (`llama3:local` → `llama3:latest`, the same model).

The normalised form is the lowercase short form listings use: `model:tag`, `ns/model:tag` for a
non-library namespace, `host/ns/model:tag` for a non-default host. Budgets, allow-lists and the
audit use it; the client's own string is what gets forwarded.

Not supported: Ollama's newest "kinds" (`ns/skill/x`, `ns/agent/x`): a 3-part name is read as
`host/ns/model`, which normalises to the same string; a 4-part name is invalid. Digests
(`@sha256:…`) are invalid too.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable

import attrs

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "InvalidModelNameError",
    "ModelName",
    "ModelPatterns",
    "ModelSource",
    "allowed_models",
    "normalize_model_name",
    "parse_model_name",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_MISSING = "!"  # a part promised by a separator but empty: never valid

_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}")
_MODEL_OR_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")


class InvalidModelNameError(ValueError):
    """Not a valid model name (Ollama answers 400); `str()` is Ollama's message."""


class ModelSource(enum.StrEnum):
    DEFAULT = ""
    LOCAL = "local"
    CLOUD = "cloud"


@attrs.frozen
class ModelName:
    """A parsed model name; every part lowercase, defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str
    source: ModelSource = ModelSource.DEFAULT

    @property
    def is_cloud(self) -> bool:
        """Ollama proxies this model to ollama.com (`:cloud` or a `-cloud` tag)."""
        return self.source is ModelSource.CLOUD

    @property
    def normalized(self) -> str:
        """The lowercase short form with the tag: `llama3:latest`, `ns/m:7b`, `h/ns/m:7b`."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.normalized


def _split_source(raw: str) -> tuple[str, ModelSource, bool]:
    """Ollama's `parseSourceSuffix`: (name without the suffix, source, whether one was found)."""
    index = raw.rfind(":")
    if index >= 0:
        suffix_raw = raw[index + 1 :].strip()
        suffix = suffix_raw.lower()
        if suffix == "cloud":
            return raw[:index], ModelSource.CLOUD, True
        if suffix == "local":
            return raw[:index], ModelSource.LOCAL, True
        if "/" not in suffix_raw and suffix.endswith("-cloud"):
            return raw[: index + 1] + suffix_raw[: -len("-cloud")], ModelSource.CLOUD, True
    return raw, ModelSource.DEFAULT, False


def _cut_last(text: str, sep: str) -> tuple[str, str, bool]:
    """Ollama's `cutPromised`: split at the last `sep`; an empty side becomes `_MISSING`."""
    index = text.rfind(sep)
    if index < 0:
        return text, "", False
    return text[:index] or _MISSING, text[index + 1 :] or _MISSING, True


def _has_tag(text: str) -> bool:
    return text.rfind(":") > text.rfind("/")


def parse_model_name(name: str) -> ModelName:
    """Parse a client's model string; raises `InvalidModelNameError` if Ollama would refuse it."""
    raw = name.strip()
    if not raw:
        raise InvalidModelNameError("model is required")
    base, source, explicit = _split_source(raw)
    if explicit and _split_source(base)[2]:
        raise InvalidModelNameError("use either :local or :cloud, not both")
    text = base
    if source is ModelSource.CLOUD:
        text = base + "-cloud" if _has_tag(base) else base + ":cloud"

    host = namespace = tag = ""
    if _has_tag(text):
        text, tag, _ = _cut_last(text, ":")
    text, model, promised = _cut_last(text, "/")
    if not promised:
        model = text
    else:
        text, namespace, promised = _cut_last(text, "/")
        if not promised:
            namespace = text
        else:
            scheme, sep, after = text.partition("://")
            host = after if sep else scheme

    host = host or DEFAULT_HOST
    namespace = namespace or DEFAULT_NAMESPACE
    tag = tag or DEFAULT_TAG
    if not (
        _HOST.fullmatch(host)
        and _NAMESPACE.fullmatch(namespace)
        and _MODEL_OR_TAG.fullmatch(model)
        and _MODEL_OR_TAG.fullmatch(tag)
    ):
        raise InvalidModelNameError("invalid model name")
    return ModelName(host.lower(), namespace.lower(), model.lower(), tag.lower(), source)


def normalize_model_name(name: str) -> str:
    """`parse_model_name(name).normalized`: `Llama3` → `llama3:latest`."""
    return parse_model_name(name).normalized


_GLOB_CHARS = re.compile(r"[a-z0-9_.:/*?\-]+")


def _glob_regex(pattern: str) -> str:
    """A wildcard pattern as a regex over normalised names (`*`/`?` never cross a `/`)."""
    text = pattern.lower()
    if _GLOB_CHARS.fullmatch(text) is None:
        raise InvalidModelNameError(f"invalid model pattern {pattern!r}")
    parts = text.split("/")
    if len(parts) > 3 or not all(parts):
        raise InvalidModelNameError(f"invalid model pattern {pattern!r}")
    if len(parts) == 3 and parts[0] == DEFAULT_HOST:
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == DEFAULT_NAMESPACE:
        parts = parts[1:]
    last = parts[-1]
    if ":" not in last and "*" not in last and "?" not in last:
        parts[-1] = f"{last}:{DEFAULT_TAG}"
    regex = re.escape("/".join(parts))
    return regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")


class ModelPatterns:
    """Allow-list patterns over normalised names, compiled once.

    A pattern without a wildcard is a model name, normalised like one (`llama3` allows exactly
    `llama3:latest`; `Library/Llama3:8B` allows `llama3:8b`). A pattern with `*` / `?` is a glob
    over the normalised name in which wildcards never cross a `/`, and whose last part has no
    implied tag: `llama3:*` (every tag), `qwen*` (`qwen2:7b`, `qwen3-coder:30b`, but not
    `qwenfan/x:latest`), `myns/*` (everything in one namespace), `*/*` (every non-library
    namespace on the default host). `*` alone allows everything, as does an empty set.
    """

    __slots__ = ("_cache", "_exact", "_regex", "allow_all", "patterns")

    _CACHE_SIZE = 4096

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        exact: set[str] = set()
        globs: list[str] = []
        allow_all = not self.patterns
        for pattern in self.patterns:
            text = pattern.strip()
            if text == "*":
                allow_all = True
            elif "*" in text or "?" in text:
                globs.append(_glob_regex(text))
            else:
                exact.add(normalize_model_name(text))
        self.allow_all: bool = allow_all
        self._exact = frozenset(exact)
        self._regex = re.compile("|".join(f"(?:{g})" for g in globs)) if globs else None
        self._cache: dict[str, bool] = {}

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> ModelPatterns:
        """A shared compiled instance for these patterns (memoised: call it per request)."""
        return _compiled(tuple(patterns))

    def allows(self, normalized_name: str) -> bool:
        """Whether a NORMALISED name (see `normalize_model_name`) is allowed.

        A name that is not in normalised form is simply not matched (fail closed).
        """
        if self.allow_all:
            return True
        cached = self._cache.get(normalized_name)
        if cached is not None:
            return cached
        allowed = normalized_name in self._exact or (
            self._regex is not None and self._regex.fullmatch(normalized_name) is not None
        )
        if len(self._cache) >= self._CACHE_SIZE:
            self._cache.clear()  # names are client-chosen: never let the cache grow unbounded
        self._cache[normalized_name] = allowed
        return allowed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelPatterns) and other.patterns == self.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)

    def __repr__(self) -> str:
        return f"ModelPatterns({self.patterns!r})"


@functools.lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> ModelPatterns:
    return ModelPatterns(patterns)


def allowed_models(*pattern_lists: Iterable[str]) -> Callable[[str], bool]:
    """The one allowed-models check: a NORMALISED name is allowed when every list allows it
    (a key's and its tenant's: the intersection; an empty list allows all). The lists are
    compiled once (memoised), so call it per request."""
    restricting = [
        compiled for compiled in map(ModelPatterns.compile, pattern_lists) if not compiled.allow_all
    ]
    if not restricting:
        return _allows_any
    if len(restricting) == 1:
        return restricting[0].allows
    if len(restricting) == 2:  # a key's and its tenant's: the common case, without a loop
        first, second = restricting
        return lambda normalized_name: (
            first.allows(normalized_name) and second.allows(normalized_name)
        )
    return lambda normalized_name: all(p.allows(normalized_name) for p in restricting)


def _allows_any(_normalized_name: str) -> bool:
    return True
