"""Request-target classification: the allowlist, and the block on model mutations.

Rules for this module: every spelling in the tables is one some HTTP stack (hypercorn, a proxy,
Go net/http + gin, a C server truncating at NUL) could plausibly resolve; the properties use an
independent oracle (urllib's unquote + posixpath) rather than the code under test.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nzgw.core.paths import (
    BLOCKED_PATHS,
    CANONICAL_PATHS,
    Blocked,
    MethodNotAllowed,
    NotFound,
    Route,
    RouteId,
    classify,
)
from nzgw.core.surfaces import Surface

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")

# --- the blocked endpoints, spelled every way we could think of -------------------------

BLOCKED_SPELLINGS: list[tuple[str, str | bytes, str]] = [
    # (method, target, blocked path)
    ("POST", "/api/pull", "/api/pull"),
    ("GET", "/api/pull", "/api/pull"),
    ("HEAD", "/api/pull", "/api/pull"),
    ("OPTIONS", "/api/pull", "/api/pull"),
    ("DELETE", "/api/pull", "/api/pull"),
    ("post", "/api/pull", "/api/pull"),
    ("BREW", "/api/pull", "/api/pull"),
    ("POST", "/api/push", "/api/push"),
    ("POST", "/api/create", "/api/create"),
    ("POST", "/api/copy", "/api/copy"),
    ("DELETE", "/api/delete", "/api/delete"),
    ("GET", "/api/delete", "/api/delete"),
    ("HEAD", "/api/blobs/sha256:" + "a" * 64, "/api/blobs"),
    ("POST", "/api/blobs/sha256-" + "0" * 64, "/api/blobs"),
    ("GET", "/api/blobs", "/api/blobs"),
    ("PUT", "/api/blobs/", "/api/blobs"),
    # case
    ("POST", "/API/PULL", "/api/pull"),
    ("POST", "/Api/Push", "/api/push"),
    ("HEAD", "/aPi/BlObS/sha256:ab", "/api/blobs"),
    # slashes
    ("POST", "/api//pull", "/api/pull"),
    ("POST", "//api/pull", "/api/pull"),
    ("POST", "///api///create///", "/api/create"),
    ("POST", "/api/pull/", "/api/pull"),
    # dot segments
    ("POST", "/api/./pull", "/api/pull"),
    ("POST", "/./api/pull", "/api/pull"),
    ("POST", "/v1/../api/pull", "/api/pull"),
    ("POST", "/api/tags/../push", "/api/push"),
    ("POST", "/a/b/../../api/copy", "/api/copy"),
    ("POST", "/../../api/pull", "/api/pull"),
    ("POST", "/api/pull/..", "/api/pull"),
    ("POST", "/api/blobs/../tags", "/api/blobs"),
    # percent-encoding, once, twice, thrice
    ("POST", "/api/%70ull", "/api/pull"),
    ("POST", "/%61%70%69/%70%75%6C%6C", "/api/pull"),
    ("POST", "/api%2Fpull", "/api/pull"),
    ("POST", "/api%2fdelete", "/api/delete"),
    ("POST", "/api%252Fpull", "/api/pull"),
    ("POST", "/api/%2570ull", "/api/pull"),
    ("POST", "/api/%25%37%30ull", "/api/pull"),
    ("POST", "/api%25252fpush", "/api/push"),
    ("POST", "/%2e/api/pull", "/api/pull"),
    ("POST", "/v1/%2e%2e/api/pull", "/api/pull"),
    ("POST", "/v1/%2E%2E%2Fapi%2Fcreate", "/api/create"),
    ("POST", "/api%5Cpull", "/api/pull"),
    # ;params
    ("POST", "/api/pull;x", "/api/pull"),
    ("POST", "/api;v=1/pull", "/api/pull"),
    ("POST", "/api/blobs;jsessionid=1/sha256:ab", "/api/blobs"),
    ("POST", "/api/pull%3Bx", "/api/pull"),
    # backslashes
    ("POST", "\\api\\pull", "/api/pull"),
    ("POST", "/api\\push", "/api/push"),
    # query and fragment
    ("POST", "/api/pull?stream=false", "/api/pull"),
    ("POST", "/api/pull#top", "/api/pull"),
    ("POST", "/api/pull?", "/api/pull"),
    ("POST", "/api/copy?/api/tags", "/api/copy"),
    # absolute-form and other target forms
    ("POST", "http://localhost:11434/api/pull", "/api/pull"),
    ("POST", "HTTPS://example.com/API/PUSH?x=1", "/api/push"),
    ("POST", "http://user@host:1/api/%70ull", "/api/pull"),
    ("POST", "http://host\\api\\pull", "/api/pull"),
    ("POST", "http:/api/pull", "/api/pull"),
    ("POST", "api/pull", "/api/pull"),
    ("POST", "//evil.example/api/pull", "/api/pull"),
    ("POST", "/ollama/api/pull", "/api/pull"),
    # NUL, controls, whitespace
    ("POST", "/api/pull%00", "/api/pull"),
    ("POST", "/api/pu%00ll", "/api/pull"),
    ("POST", "/ap%00i/pull", "/api/pull"),
    ("POST", "/api/pull%0d%0a", "/api/pull"),
    ("POST", "/api/%20pull", "/api/pull"),
    ("POST", "/api/\tpull", "/api/pull"),
    ("POST", b"/api/pull\x00", "/api/pull"),
    # prefixes and suffixes of the blocked segment
    ("POST", "/api/pullx", "/api/pull"),
    ("POST", "/api/pull.json", "/api/pull"),
    ("POST", "/api/copy-model", "/api/copy"),
    # Unicode look-alikes (raw UTF-8 and %-encoded)
    ("POST", "/ａｐｉ/ｐｕｌｌ".encode(), "/api/pull"),
    ("POST", "/%EF%BD%81pi/pull", "/api/pull"),
    ("POST", "/api/pu%E2%80%8Bll", "/api/pull"),
    ("POST", "/ap%C4%B1/pull", "/api/pull"),
    ("POST", "/api／pull", "/api/pull"),
    ("POST", "/api/pu\u017fh".encode(), "/api/push"),
    # a decoded str path (ASGI `path`) is handled like the raw one
    ("POST", "/api/pull", "/api/pull"),
    ("POST", "/api/p\u00fcll/../pull", "/api/pull"),
]


@pytest.mark.parametrize(("method", "target", "blocked"), BLOCKED_SPELLINGS)
def test_blocked_spellings(method: str, target: str | bytes, blocked: str) -> None:
    decision = classify(method, target)
    assert decision == Blocked(blocked)
    assert isinstance(decision, Blocked)
    assert decision.surface is Surface.NATIVE


def test_enough_blocked_spellings() -> None:
    assert len(BLOCKED_SPELLINGS) >= 40
    assert {blocked for _, _, blocked in BLOCKED_SPELLINGS} == set(BLOCKED_PATHS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", BLOCKED_PATHS)
def test_every_blocked_path_every_method(method: str, path: str) -> None:
    assert classify(method, path) == Blocked(path)
    assert classify(method, path.encode()) == Blocked(path)


# --- the allowlist ----------------------------------------------------------------------

ROUTES: list[tuple[str, str | bytes, RouteId, Surface, str]] = [
    # (method, target, route, surface, canonical path)
    ("GET", "/", RouteId.ROOT, Surface.NATIVE, "/"),
    ("HEAD", "/", RouteId.ROOT, Surface.NATIVE, "/"),
    ("GET", "/api/version", RouteId.VERSION, Surface.NATIVE, "/api/version"),
    ("HEAD", "/api/version", RouteId.VERSION, Surface.NATIVE, "/api/version"),
    ("GET", "/api/tags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("HEAD", "/api/tags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api/ps", RouteId.PS, Surface.NATIVE, "/api/ps"),
    ("POST", "/api/show", RouteId.SHOW, Surface.NATIVE, "/api/show"),
    ("POST", "/api/generate", RouteId.GENERATE, Surface.NATIVE, "/api/generate"),
    ("POST", "/api/chat", RouteId.CHAT, Surface.NATIVE, "/api/chat"),
    ("POST", "/api/embed", RouteId.EMBED, Surface.NATIVE, "/api/embed"),
    ("POST", "/api/embeddings", RouteId.EMBEDDINGS, Surface.NATIVE, "/api/embeddings"),
    ("POST", "/v1/chat/completions", RouteId.V1_CHAT, Surface.OPENAI, "/v1/chat/completions"),
    ("POST", "/v1/completions", RouteId.V1_COMPLETIONS, Surface.OPENAI, "/v1/completions"),
    ("POST", "/v1/embeddings", RouteId.V1_EMBEDDINGS, Surface.OPENAI, "/v1/embeddings"),
    ("GET", "/v1/models", RouteId.V1_MODELS, Surface.OPENAI, "/v1/models"),
    ("POST", "/v1/responses", RouteId.V1_RESPONSES, Surface.OPENAI, "/v1/responses"),
    ("POST", "/v1/messages", RouteId.V1_MESSAGES, Surface.ANTHROPIC, "/v1/messages"),
    (
        "POST",
        "/v1/messages/count_tokens",
        RouteId.V1_COUNT_TOKENS,
        Surface.ANTHROPIC,
        "/v1/messages/count_tokens",
    ),
    ("GET", "/healthz", RouteId.HEALTHZ, Surface.GATEWAY, "/healthz"),
    ("GET", "/readyz", RouteId.READYZ, Surface.GATEWAY, "/readyz"),
    # harmless variants route to the same canonical path
    ("GET", b"/api/tags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/API/TAGS", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api/tags/", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api//tags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api/tags?x=1&y=/api/pull", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api/tags#frag", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "/api/%74ags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "http://gateway:8080/api/tags", RouteId.TAGS, Surface.NATIVE, "/api/tags"),
    ("GET", "https://gateway", RouteId.ROOT, Surface.NATIVE, "/"),
    ("GET", "/?x", RouteId.ROOT, Surface.NATIVE, "/"),
    ("POST", "/V1/Chat/Completions/", RouteId.V1_CHAT, Surface.OPENAI, "/v1/chat/completions"),
]


@pytest.mark.parametrize(("method", "target", "route", "surface", "path"), ROUTES)
def test_routes(
    method: str, target: str | bytes, route: RouteId, surface: Surface, path: str
) -> None:
    decision = classify(method, target)
    assert isinstance(decision, Route)
    assert (decision.route, decision.surface, decision.path) == (route, surface, path)
    assert decision.model is None
    assert dict(decision.params) == {}


@pytest.mark.parametrize(
    ("target", "model"),
    [
        ("/v1/models/llama3", "llama3"),
        ("/v1/models/llama3:latest", "llama3:latest"),
        ("/v1/models/llama3%3Alatest", "llama3:latest"),
        ("/v1/models/Llama3.2:3B-instruct", "Llama3.2:3B-instruct"),
        ("/V1/MODELS/qwen3_x-1.5", "qwen3_x-1.5"),
        ("/v1/models/gpt-oss:120b-cloud/", "gpt-oss:120b-cloud"),
        ("/v1/models/m?x=/a/b", "m"),
    ],
)
def test_v1_model_route_carries_the_model(target: str, model: str) -> None:
    decision = classify("GET", target)
    assert isinstance(decision, Route)
    assert decision.route is RouteId.V1_MODEL
    assert decision.surface is Surface.OPENAI
    assert decision.path == "/v1/models/" + model
    assert decision.model == model
    assert decision.params["model"] == model


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/ns/m",  # one segment only, as Ollama's router
        "/v1/models/ns%2Fm",  # a `/` after decoding
        "/v1/models/ns%252Fm",
        "/v1/models/..",
        "/v1/models/.",
        "/v1/models/%2e%2e",
        "/v1/models/a%20b",
        "/v1/models/a;b",
        "/v1/models/a%00",
        "/v1/models/a@b",
        "/v1/models/" + "m" * 257,
        "/v1/models/caf%C3%A9",
    ],
)
def test_v1_model_route_refuses_odd_models(target: str) -> None:
    assert classify("GET", target) == NotFound(Surface.OPENAI)


@pytest.mark.parametrize(
    ("method", "target", "route", "allowed"),
    [
        ("POST", "/", RouteId.ROOT, ("GET", "HEAD")),
        ("GET", "/api/chat", RouteId.CHAT, ("POST",)),
        ("HEAD", "/api/generate", RouteId.GENERATE, ("POST",)),
        ("HEAD", "/api/ps", RouteId.PS, ("GET",)),
        ("POST", "/api/tags", RouteId.TAGS, ("GET", "HEAD")),
        ("OPTIONS", "/v1/chat/completions", RouteId.V1_CHAT, ("POST",)),
        ("DELETE", "/v1/models/llama3", RouteId.V1_MODEL, ("GET",)),
        ("post", "/api/chat", RouteId.CHAT, ("POST",)),  # methods are case-sensitive
        ("POST", "/healthz", RouteId.HEALTHZ, ("GET",)),
        ("PUT", "/API/SHOW/", RouteId.SHOW, ("POST",)),
    ],
)
def test_method_not_allowed(
    method: str, target: str, route: RouteId, allowed: tuple[str, ...]
) -> None:
    decision = classify(method, target)
    assert isinstance(decision, MethodNotAllowed)
    assert decision.route is route
    assert decision.allowed == allowed


@pytest.mark.parametrize(
    ("target", "surface"),
    [
        # unknown routes, Ollama's included
        ("/api/unknown", Surface.NATIVE),
        ("/api/status", Surface.NATIVE),
        ("/api/me", Surface.NATIVE),
        ("/api/experimental/web_search", Surface.NATIVE),
        ("/api", Surface.NATIVE),
        ("/v1", Surface.OPENAI),
        ("/v1/audio/transcriptions", Surface.OPENAI),
        ("/v1/messages/count", Surface.ANTHROPIC),
        ("/healthz/x", Surface.GATEWAY),
        ("/favicon.ico", Surface.NATIVE),
        # ambiguous spellings of allowed routes are not routed
        ("/api/./tags", Surface.NATIVE),
        ("/x/../api/tags", Surface.NATIVE),
        ("/api/%2574ags", Surface.NATIVE),
        ("/api%2Ftags", Surface.NATIVE),
        ("/api;x/tags", Surface.NATIVE),
        ("/api/tags;x", Surface.NATIVE),
        ("\\api\\tags", Surface.NATIVE),
        ("/api\\tags", Surface.NATIVE),
        ("//api/tags", Surface.NATIVE),
        ("/api/tags%00", Surface.NATIVE),
        ("/api/tags%20", Surface.NATIVE),
        ("/api/tags%3Fx", Surface.NATIVE),
        ("/api/tags%", Surface.NATIVE),
        ("/api/tags%zz", Surface.NATIVE),
        ("/api/t\u00e4gs", Surface.NATIVE),
        ("api/tags", Surface.NATIVE),
        ("gateway:443", Surface.NATIVE),
        ("*", Surface.NATIVE),
        ("", Surface.NATIVE),
        ("/%25%25%25%25%25%25%25%2525", Surface.NATIVE),
        ("/api/tags" + "%2525" * 8, Surface.NATIVE),
    ],
)
def test_not_found(target: str, surface: Surface) -> None:
    assert classify("GET", target) == NotFound(surface)


def test_route_tables_cover_every_fixed_path() -> None:
    assert {path for _, _, _, _, path in ROUTES} == set(CANONICAL_PATHS)


def test_decisions_are_hashable_values() -> None:
    assert classify("GET", "/API/TAGS") == classify("GET", "/api/tags")
    assert hash(classify("GET", "/v1/models/x")) == hash(classify("GET", "/v1/models/x"))
    assert classify("GET", "/v1/models/x") != classify("GET", "/v1/models/y")


# --- properties -------------------------------------------------------------------------

_MODEL_PATH = re.compile(r"/v1/models/[A-Za-z0-9_.:\-]+")
_TABLE = {path: (route, surface) for _, _, route, surface, path in ROUTES}


def _check_route(decision: object) -> None:
    if isinstance(decision, Route):
        if decision.route is RouteId.V1_MODEL:
            assert _MODEL_PATH.fullmatch(decision.path)
            assert decision.path == "/v1/models/" + (decision.model or "")
            assert decision.model not in (".", "..")
        else:
            assert decision.path in CANONICAL_PATHS
            assert _TABLE[decision.path] == (decision.route, decision.surface)


methods = st.one_of(st.sampled_from(METHODS), st.text(max_size=8))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, target=st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_classify_never_raises_and_routes_are_canonical(method: str, target: str | bytes) -> None:
    decision = classify(method, target)
    assert isinstance(decision, Route | Blocked | NotFound | MethodNotAllowed)
    _check_route(decision)
    if isinstance(decision, Blocked):
        assert decision.path in BLOCKED_PATHS


# Tokens that make up paths an attacker would try.
_TOKENS = [
    "/", "//", "\\", ".", "..", "./", "../", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "%252f",
    "%25", "%", ";", ";x=1", "?", "#", "%3f", "%00", "%20", "api", "API", "Api", "%61pi",
    "pull", "PULL", "%70ull", "pu", "ll", "push", "create", "copy", "delete", "blobs", "tags",
    "v1", "models", "chat", "x", "a%2Fb", "\x00", " ",
    # bigger pieces, so that a fair share of targets resolves to a blocked path
    "/api/", "/api", "api/", "/pull", "/push", "/blobs/", "/delete", "/copy", "/create", "x/..",
]  # fmt: skip


def _oracle(target: str) -> str:
    """An independent canonicaliser: the path a lenient resolver would end up with."""
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    for _ in range(4):  # MAX_DECODE_ROUNDS
        path = unquote(path, encoding="latin-1")
    path = path.replace("\\", "/")
    segments = [s.split(";")[0].split("?")[0].split("#")[0] for s in path.split("/")]
    segments = [re.sub(r"[\x00-\x20\x7f]", "", s) for s in segments]
    normal = posixpath.normpath("/" + "/".join(segments))
    return re.sub("/+", "/", normal).lower()


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, tokens=st.lists(st.sampled_from(_TOKENS), max_size=14))
@example(method="GET", tokens=["/", "api", "/", ".", "/", "pull"])
@example(method="HEAD", tokens=["/", "x", "%2f", "..", "%2f", "API", "%2F", "%70ull"])
@example(method="GET", tokens=["%61pi", "/pull", "/api/", "push"])  # labelled by its prefix
def test_anything_resolving_to_a_blocked_path_is_blocked(method: str, tokens: list[str]) -> None:
    target = "/" + "".join(tokens)
    canonical = _oracle(target)
    for blocked in BLOCKED_PATHS:
        if canonical == blocked or canonical.startswith(blocked + "/"):
            assert classify(method, target) == Blocked(blocked)
    _check_route(classify(method, target))


@st.composite
def blocked_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """A random spelling of a random blocked path (plus a random suffix)."""
    name = draw(st.sampled_from(["pull", "push", "create", "copy", "delete", "blobs"]))

    def spell(word: str) -> str:
        out = []
        for char in word:
            how = draw(st.integers(0, 4))
            if how == 1:
                char = char.upper()
            elif how == 2:
                char = f"%{ord(char):02X}"
            elif how == 3:
                char = f"%25{ord(char):02x}"
            out.append(char)
        return "".join(out)

    separator = st.sampled_from(["/", "//", "\\", "%2F", "%2f", "%5C", "%252F", "/./", "/%2e/"])
    noise = st.sampled_from(["", "x/../", "a/b/../../", "%2e/", "./", "v1/..%2f"])
    params = st.sampled_from(["", ";", ";x=1", "%3Bjsessionid=2"])
    target = (
        draw(st.sampled_from(["/", "//", "http://host/", "HTTP://h:1/", "/v1/../"]))
        + draw(noise)
        + spell("api")
        + draw(params)
        + draw(separator)
        + draw(noise)
        + spell(name)
        + draw(params)
        + draw(st.sampled_from(["", "/", "/.", "/sha256:" + "f" * 64, "?stream=true", "#x"]))
    )
    return target, "/api/" + name


@settings(max_examples=600)
@given(method=methods, spelled=blocked_spellings(), as_bytes=st.booleans())
def test_random_spellings_of_blocked_paths_are_blocked(
    method: str, spelled: tuple[str, str], as_bytes: bool
) -> None:
    target, blocked = spelled
    assert classify(method, target.encode() if as_bytes else target) == Blocked(blocked)


@settings(max_examples=300)
@given(
    method=methods,
    spec=st.sampled_from([(m, t) for m, t, *_ in ROUTES if isinstance(t, str)]),
    upper=st.lists(st.booleans(), min_size=40, max_size=40),
    trailing=st.booleans(),
    query=st.sampled_from(["", "?", "?a=b", "#f", "?x=/api/pull"]),
)
def test_harmless_variants_route_identically(
    method: str, spec: tuple[str, str], upper: list[bool], trailing: bool, query: str
) -> None:
    _, target = spec
    path = re.split(r"[?#]", target)[0]
    if path.startswith("http"):
        return
    cased = "".join(c.upper() if flip else c for c, flip in zip(path, upper, strict=False))
    cased += path[len(upper) :]
    variant = cased + ("/" if trailing and path != "/" else "") + query
    assert classify(method, variant) == classify(method, path)


@settings(max_examples=300)
@given(method=methods, target=st.text(max_size=60))
def test_str_and_its_utf8_bytes_classify_alike(method: str, target: str) -> None:
    assert classify(method, target) == classify(method, target.encode())
