"""Request-target classification: an allowlist of routes, model mutations always refused. Sans-IO.

`classify(method, target)` decides, before any I/O, what a request target is:

* `Route`: one of the allowed routes; carries the CANONICAL path, the only path the gateway
  ever forwards upstream (never the raw target, so no spelling can smuggle another path through).
* `Blocked`: the target is, or could be resolved by some HTTP stack to, one of Ollama's
  model-mutating endpoints (`/api/pull`, `push`, `create`, `copy`, `delete`, `blobs[/…]`):
  403, whatever the method.
* `MethodNotAllowed`: an allowed path with a method it does not accept (405).
* `NotFound`: anything else (404), including every target that does not canonicalise cleanly.

How the blocked check reads a target (it must hold for every spelling that hypercorn, a proxy in
front, or Ollama itself (Go net/http + gin: decodes `%`-escapes, cleans paths, may redirect
case-insensitively) could resolve to a blocked path):

1. bytes are read as latin-1 (one char per byte); absolute-form `scheme://authority` is cut;
   a target not starting with `/` is read as a path anyway;
2. the query and fragment are cut at the first raw `?` or `#`;
3. every `%`-decoding round (up to `MAX_DECODE_ROUNDS`) is examined, not only the last one;
4. in each round `\\` is `/`; non-ASCII text is read as UTF-8, NFKD-folded, case-folded, with
   marks, controls and separators dropped (so `／ａｐｉ／ｐｕｌｌ` and `/apı/pull` count);
5. each segment is cut at `;`, `?` or `#` and stripped of control characters and whitespace;
   empty and `.` segments are dropped; `..` is checked both resolved and as a literal segment;
6. Blocked if anywhere in the segments `api` is followed by a segment that STARTS WITH a blocked
   name (so `/api/pull`, `/x/../api/PULL;v=1`, `//host/api/pull`, `/api/pullx` are all refused).
   Nothing allowed can match this (no allowed path has `api` in a non-first segment, and the
   only free segment, the model of `/v1/models/{model}`, cannot contain `/`).

Routing (after the blocked check) is deliberately stricter than resolving: a target is AMBIGUOUS,
hence NotFound, when it needs more than one decoding round, keeps an undecodable `%`, has an
encoded `/` (`%2F`), a `\\`, `;`, a dot segment, a leading `//`, a control, space or non-ASCII
character, a `?`/`#` produced by decoding, or is not in origin- or absolute-form. Legitimate
clients (httpx, Go, curl) never send those. Harmless variants still route: letter case, repeated
inner slashes, a trailing slash, absolute-form, query strings and `%`-escapes of ordinary
characters (`/v1/models/llama3%3Alatest`).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from nzgw.core.surfaces import Surface

__all__ = [
    "BLOCKED_PATHS",
    "CANONICAL_PATHS",
    "MAX_DECODE_ROUNDS",
    "Blocked",
    "Decision",
    "MethodNotAllowed",
    "NotFound",
    "Route",
    "RouteId",
    "classify",
]

MAX_DECODE_ROUNDS = 4


class RouteId(enum.StrEnum):
    ROOT = "root"
    VERSION = "version"
    TAGS = "tags"
    PS = "ps"
    SHOW = "show"
    GENERATE = "generate"
    CHAT = "chat"
    EMBED = "embed"
    EMBEDDINGS = "embeddings"
    V1_CHAT = "v1.chat"
    V1_COMPLETIONS = "v1.completions"
    V1_EMBEDDINGS = "v1.embeddings"
    V1_MODELS = "v1.models"
    V1_MODEL = "v1.model"
    V1_RESPONSES = "v1.responses"
    V1_MESSAGES = "v1.messages"
    V1_COUNT_TOKENS = "v1.messages.count_tokens"
    HEALTHZ = "healthz"
    READYZ = "readyz"


_EMPTY: Mapping[str, str] = MappingProxyType({})


@attrs.frozen
class Route:
    """An allowed route. `path` is canonical: forward it, never the raw target."""

    route: RouteId
    surface: Surface
    path: str
    params: Mapping[str, str] = attrs.field(default=_EMPTY, eq=False, hash=False)

    @property
    def model(self) -> str | None:
        """The `{model}` of `/v1/models/{model}` (percent-decoded, case kept), else None."""
        return self.params.get("model")


@attrs.frozen
class Blocked:
    """A model-mutating endpoint (403 whatever the method). `path`: which one, e.g. `/api/pull`."""

    path: str

    @property
    def surface(self) -> Surface:
        return Surface.NATIVE


@attrs.frozen
class NotFound:
    """No such route (404). `surface`: best guess from the first segment, for the error shape."""

    surface: Surface = Surface.NATIVE


@attrs.frozen
class MethodNotAllowed:
    """An allowed path, another method (405). `allowed` is for the `Allow` header."""

    route: RouteId
    surface: Surface
    allowed: tuple[str, ...]


Decision = Route | Blocked | NotFound | MethodNotAllowed

_GET = ("GET",)
_GET_HEAD = ("GET", "HEAD")
_POST = ("POST",)

# canonical path -> (route id, surface, methods)
_TABLE: dict[str, tuple[RouteId, Surface, tuple[str, ...]]] = {
    "/": (RouteId.ROOT, Surface.NATIVE, _GET_HEAD),
    "/api/version": (RouteId.VERSION, Surface.NATIVE, _GET_HEAD),
    "/api/tags": (RouteId.TAGS, Surface.NATIVE, _GET_HEAD),
    "/api/ps": (RouteId.PS, Surface.NATIVE, _GET),
    "/api/show": (RouteId.SHOW, Surface.NATIVE, _POST),
    "/api/generate": (RouteId.GENERATE, Surface.NATIVE, _POST),
    "/api/chat": (RouteId.CHAT, Surface.NATIVE, _POST),
    "/api/embed": (RouteId.EMBED, Surface.NATIVE, _POST),
    "/api/embeddings": (RouteId.EMBEDDINGS, Surface.NATIVE, _POST),
    "/v1/chat/completions": (RouteId.V1_CHAT, Surface.OPENAI, _POST),
    "/v1/completions": (RouteId.V1_COMPLETIONS, Surface.OPENAI, _POST),
    "/v1/embeddings": (RouteId.V1_EMBEDDINGS, Surface.OPENAI, _POST),
    "/v1/models": (RouteId.V1_MODELS, Surface.OPENAI, _GET),
    "/v1/responses": (RouteId.V1_RESPONSES, Surface.OPENAI, _POST),
    "/v1/messages": (RouteId.V1_MESSAGES, Surface.ANTHROPIC, _POST),
    # Answered by nzgw itself (an estimate): Ollama has no such endpoint.
    "/v1/messages/count_tokens": (RouteId.V1_COUNT_TOKENS, Surface.ANTHROPIC, _POST),
    "/healthz": (RouteId.HEALTHZ, Surface.GATEWAY, _GET),
    "/readyz": (RouteId.READYZ, Surface.GATEWAY, _GET),
}
_MODEL_PREFIX = "/v1/models/"
_MODEL_ROUTE = (RouteId.V1_MODEL, Surface.OPENAI, _GET)

CANONICAL_PATHS: frozenset[str] = frozenset(_TABLE)
"""Every fixed canonical path; `/v1/models/{model}` adds one per model."""

_BLOCKED_NAMES = ("pull", "push", "create", "copy", "delete", "blobs")
BLOCKED_PATHS: tuple[str, ...] = tuple(f"/api/{name}" for name in _BLOCKED_NAMES)

_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\\]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# A model segment: Ollama's name characters (no `/`), bounded.
_MODEL_SEGMENT = re.compile(r"[A-Za-z0-9_.:\-]{1,256}")
# After decoding, any of these makes a target ambiguous (never routed).
_AMBIGUOUS_CHARS = re.compile(r"[^\x21-\x7e]|[\\;?#%]")
# Dropped from a segment before the blocked check: controls, DEL and ASCII whitespace.
_STRIP = re.compile(r"[\x00-\x20\x7f]+")
_SEGMENT_CUT = re.compile(r"[;?#]")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


def classify(method: str, target: str | bytes) -> Decision:
    """Classify a request: `method` as sent (case-sensitive), `target` as sent or as decoded.

    Prefer the raw request-target bytes (ASGI `raw_path`, with or without `?query`); an already
    decoded `str` path is classified the same way (decoding it again is part of the check).
    Never raises; does no I/O.
    """
    if isinstance(target, bytes):
        text = target.decode("latin-1")
    elif target.isascii():
        text = target
    else:
        # One char per byte, as if it had been received raw.
        text = target.encode("utf-8", "surrogatepass").decode("latin-1")

    spec = _TABLE.get(text)
    if spec is not None:  # fast path: the target already is a canonical path
        return _matched(spec, text, method, None)

    ambiguous = False
    if text.startswith("/"):
        rest = text
        if text.startswith("//"):
            ambiguous = True  # `//host/path` is a network-path reference to some parsers
    elif text == "*":
        return NotFound()
    else:
        absolute = _ABSOLUTE.match(text)
        if absolute is not None:
            rest = text[absolute.end() :]
        else:
            # authority-form, `http:/api/pull`, `api/pull`, …: read as a path, never routed.
            ambiguous = True
            rest = "/" + text

    cut = len(rest)
    for stop in "?#":
        index = rest.find(stop)
        if 0 <= index < cut:
            cut = index
    path = rest[:cut]

    rounds = [path]
    current = path
    while "%" in current:
        if len(rounds) > MAX_DECODE_ROUNDS:
            ambiguous = True  # still decoding after the bound: refuse to guess
            break
        decoded = _ESCAPE.sub(_unescape, current)
        if decoded == current:
            break  # only invalid escapes left; caught as ambiguous below
        rounds.append(decoded)
        current = decoded

    # Most decoded first, so that the label is the path a resolver would end up with.
    for candidate in reversed(rounds):
        blocked = _blocked(candidate)
        if blocked is not None:
            return Blocked(blocked)

    decoded = rounds[-1]
    if (
        ambiguous
        or len(rounds) > 2
        or _AMBIGUOUS_CHARS.search(decoded) is not None
        or decoded.count("/") != path.count("/")
    ):
        return NotFound(_guess_surface(decoded))

    segments = [segment for segment in decoded.split("/") if segment]
    if "." in segments or ".." in segments:
        return NotFound(_guess_surface(decoded))
    canonical = "/" + "/".join(segments).lower()

    spec = _TABLE.get(canonical)
    if spec is not None:
        return _matched(spec, canonical, method, None)
    if canonical.startswith(_MODEL_PREFIX) and len(segments) == 3:
        model = segments[2]
        if _MODEL_SEGMENT.fullmatch(model) is not None:
            return _matched(_MODEL_ROUTE, _MODEL_PREFIX + model, method, model)
    return NotFound(_guess_surface(canonical))


def _matched(
    spec: tuple[RouteId, Surface, tuple[str, ...]], path: str, method: str, model: str | None
) -> Decision:
    route_id, surface, methods = spec
    if method not in methods:
        return MethodNotAllowed(route_id, surface, methods)
    if model is None:
        return Route(route_id, surface, path)
    return Route(route_id, surface, path, MappingProxyType({"model": model}))


def _blocked(path: str) -> str | None:
    """The blocked endpoint `path` could resolve to, if any (see the module docstring)."""
    text = path.replace("\\", "/")
    if not text.isascii():
        text = _fold_unicode(text)
    text = _STRIP.sub("", text).lower()
    if "api" not in text:  # cheap exit for the common case
        return None
    literal: list[str] = []
    resolved: list[str] = []
    for raw in text.split("/"):
        segment = _SEGMENT_CUT.split(raw, 1)[0]
        if not segment or segment == ".":
            continue
        literal.append(segment)
        if segment == "..":
            if resolved:
                resolved.pop()
        else:
            resolved.append(segment)
    return _blocked_run(resolved) or _blocked_run(literal)


def _blocked_run(segments: list[str]) -> str | None:
    for index in range(len(segments) - 1):
        if segments[index] == "api":
            following = segments[index + 1]
            for name in _BLOCKED_NAMES:
                if following.startswith(name):
                    return "/api/" + name
    return None


_DOTLESS = str.maketrans({"ı": "i"})


def _fold_unicode(text: str) -> str:
    """Read latin-1 "bytes" as UTF-8 and fold look-alikes onto ASCII (blocked check only)."""
    text = text.encode("latin-1").decode("utf-8", "ignore")
    text = unicodedata.normalize("NFKD", text).casefold().translate(_DOTLESS)
    text = unicodedata.normalize("NFKD", text)
    # Marks (the dot of `İ` → `i̇`), controls, format characters (zero-width joiners) and
    # separators carry no meaning a router could act on.
    return "".join(c for c in text if unicodedata.category(c)[0] not in "MCZ")


def _guess_surface(path: str) -> Surface:
    segments = [s for s in path.lower().split("/") if s]
    if not segments:
        return Surface.NATIVE
    if segments[0] == "v1":
        if len(segments) > 1 and segments[1] == "messages":
            return Surface.ANTHROPIC
        return Surface.OPENAI
    if segments[0] in ("healthz", "readyz"):
        return Surface.GATEWAY
    return Surface.NATIVE
