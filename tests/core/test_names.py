"""Model names: parsing and normalisation as Ollama does it, and allow-list patterns.

Rules for this module: expected values come from Ollama's rules (docs/OLLAMA-WIRE.md,
`types/model/name.go`, `modelref`), never from running the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nzgw.core.names import (
    DEFAULT_HOST,
    DEFAULT_NAMESPACE,
    InvalidModelNameError,
    ModelName,
    ModelPatterns,
    ModelSource,
    allowed_models,
    normalize_model_name,
    parse_model_name,
)


@pytest.mark.parametrize(
    ("name", "parsed", "normalized"),
    [
        ("llama3", ModelName(DEFAULT_HOST, "library", "llama3", "latest"), "llama3:latest"),
        ("llama3:latest", ModelName(DEFAULT_HOST, "library", "llama3", "latest"), "llama3:latest"),
        ("library/llama3", ModelName(DEFAULT_HOST, "library", "llama3", "latest"), "llama3:latest"),
        (
            "registry.ollama.ai/library/llama3:latest",
            ModelName(DEFAULT_HOST, "library", "llama3", "latest"),
            "llama3:latest",
        ),
        (
            "Registry.Ollama.AI/Library/LLAMA3:Latest",
            ModelName(DEFAULT_HOST, "library", "llama3", "latest"),
            "llama3:latest",
        ),
        ("  llama3  ", ModelName(DEFAULT_HOST, "library", "llama3", "latest"), "llama3:latest"),
        ("user/m:7b", ModelName(DEFAULT_HOST, "user", "m", "7b"), "user/m:7b"),
        (
            "registry.ollama.ai/user/m",
            ModelName(DEFAULT_HOST, "user", "m", "latest"),
            "user/m:latest",
        ),
        (
            "example.com/ns/m:tag",
            ModelName("example.com", "ns", "m", "tag"),
            "example.com/ns/m:tag",
        ),
        (
            "example.com/library/m",
            ModelName("example.com", "library", "m", "latest"),
            "example.com/library/m:latest",
        ),
        (
            # the `:` of a port is before the last `/`: not a tag
            "localhost:5000/ns/m",
            ModelName("localhost:5000", "ns", "m", "latest"),
            "localhost:5000/ns/m:latest",
        ),
        (
            "https://example.com/ns/m:1",
            ModelName("example.com", "ns", "m", "1"),
            "example.com/ns/m:1",
        ),
        (
            "llama3.2:3b-Instruct-Q4_K_M",
            ModelName(DEFAULT_HOST, "library", "llama3.2", "3b-instruct-q4_k_m"),
            "llama3.2:3b-instruct-q4_k_m",
        ),
        ("_m:_t", ModelName(DEFAULT_HOST, "library", "_m", "_t"), "_m:_t"),
        ("a..b:c..d", ModelName(DEFAULT_HOST, "library", "a..b", "c..d"), "a..b:c..d"),
        # cloud and local source suffixes
        (
            "gpt-oss:120b-cloud",
            ModelName(DEFAULT_HOST, "library", "gpt-oss", "120b-cloud", ModelSource.CLOUD),
            "gpt-oss:120b-cloud",
        ),
        (
            "gpt-oss:120b:cloud",
            ModelName(DEFAULT_HOST, "library", "gpt-oss", "120b-cloud", ModelSource.CLOUD),
            "gpt-oss:120b-cloud",
        ),
        (
            "GPT-OSS:120B-CLOUD",
            ModelName(DEFAULT_HOST, "library", "gpt-oss", "120b-cloud", ModelSource.CLOUD),
            "gpt-oss:120b-cloud",
        ),
        (
            "gpt-oss:cloud",
            ModelName(DEFAULT_HOST, "library", "gpt-oss", "cloud", ModelSource.CLOUD),
            "gpt-oss:cloud",
        ),
        (
            "me/m:Cloud",
            ModelName(DEFAULT_HOST, "me", "m", "cloud", ModelSource.CLOUD),
            "me/m:cloud",
        ),
        (
            "llama3:local",
            ModelName(DEFAULT_HOST, "library", "llama3", "latest", ModelSource.LOCAL),
            "llama3:latest",
        ),
        (
            "llama3:8b:LOCAL",
            ModelName(DEFAULT_HOST, "library", "llama3", "8b", ModelSource.LOCAL),
            "llama3:8b",
        ),
    ],
)
def test_parse_and_normalize(name: str, parsed: ModelName, normalized: str) -> None:
    assert parse_model_name(name) == parsed
    assert normalize_model_name(name) == normalized
    assert str(parsed) == normalized


def test_is_cloud() -> None:
    assert parse_model_name("gpt-oss:120b-cloud").is_cloud
    assert parse_model_name("gpt-oss:cloud").is_cloud
    assert parse_model_name("kimi-k3:1t:cloud").is_cloud
    assert not parse_model_name("gpt-oss:120b").is_cloud
    assert not parse_model_name("cloud").is_cloud  # a model called "cloud" is local
    assert not parse_model_name("llama3:local").is_cloud


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "model is required"),
        ("   ", "model is required"),
        ("x:cloud:local", "use either :local or :cloud, not both"),
        ("x:local:cloud", "use either :local or :cloud, not both"),
        ("x:120b-cloud:local", "use either :local or :cloud, not both"),
        (":tag", "invalid model name"),
        ("llama3:", "invalid model name"),
        ("/m", "invalid model name"),
        ("ns/", "invalid model name"),
        ("a//m", "invalid model name"),
        ("-m", "invalid model name"),
        (".m", "invalid model name"),
        ("m:-t", "invalid model name"),
        ("m:.t", "invalid model name"),
        ("m:t:x", "invalid model name"),
        ("ns.x/m", "invalid model name"),  # no `.` in a namespace
        ("localhost:5000/m", "invalid model name"),  # `host:port/m`: the host is a namespace
        ("a/b/c/d", "invalid model name"),
        ("m@sha256:" + "0" * 64, "invalid model name"),
        ("m m", "invalid model name"),
        ("m\x00", "invalid model name"),
        ("mödel", "invalid model name"),
        ("m/../../etc", "invalid model name"),
        ("x:-cloud", "invalid model name"),
        ("m" * 81, "invalid model name"),
        ("m:" + "t" * 81, "invalid model name"),
        ("n" * 81 + "/m", "invalid model name"),
        ("h" * 351 + "/n/m", "invalid model name"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    with pytest.raises(InvalidModelNameError) as caught:
        parse_model_name(name)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_longest_valid_parts() -> None:
    name = "h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80
    assert normalize_model_name(name) == name


# --- properties -------------------------------------------------------------------------

_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_REST = _FIRST + "-."


def _part(rest: str, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.builds(
        lambda first, tail: first + tail,
        st.sampled_from(_FIRST),
        st.text(alphabet=rest, max_size=max_size),
    )


models = _part(_REST)
tags = _part(_REST).filter(lambda t: t.lower() not in ("cloud", "local"))
namespaces = _part(_FIRST + "-")
hosts = _part(_REST + ":")


@st.composite
def names(draw: st.DrawFn) -> tuple[str, tuple[str, str, str, str]]:
    """A valid name string and its expected (host, namespace, model, tag), lowercase."""
    model = draw(models)
    tag = draw(st.none() | tags)
    namespace = draw(st.none() | namespaces)
    host = draw(st.none() | hosts) if namespace is not None else None
    text = model + (f":{tag}" if tag is not None else "")
    if namespace is not None:
        text = f"{namespace}/{text}"
    if host is not None:
        text = f"{host}/{text}"
    expected = (
        (host or DEFAULT_HOST).lower(),
        (namespace or DEFAULT_NAMESPACE).lower(),
        model.lower(),
        (tag or "latest").lower(),  # a `-cloud` tag stays as it is: Ollama's name for it
    )
    return text, expected


@settings(max_examples=300)
@given(names())
def test_parse_finds_the_parts(case: tuple[str, tuple[str, str, str, str]]) -> None:
    text, expected = case
    parsed = parse_model_name(text)
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == expected


@settings(max_examples=300)
@given(names())
def test_normalize_is_idempotent_and_case_insensitive(
    case: tuple[str, tuple[str, str, str, str]],
) -> None:
    text, _ = case
    normalized = normalize_model_name(text)
    assert normalize_model_name(normalized) == normalized
    assert normalize_model_name(text.upper()) == normalized
    assert normalize_model_name(text.lower()) == normalized
    assert normalized == normalized.lower()


@settings(max_examples=200)
@given(model=models)
def test_default_parts_are_equivalent(model: str) -> None:
    short = normalize_model_name(model)
    assert short == model.lower() + ":latest"
    assert normalize_model_name(model + ":latest") == short
    assert normalize_model_name("library/" + model) == short
    assert normalize_model_name("registry.ollama.ai/library/" + model + ":latest") == short
    assert normalize_model_name(model + ":local") == short


# --- patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "allowed", "refused"),
    [
        ((), ["llama3:latest", "h.com/ns/m:t", "ns/m:t"], []),
        (("*",), ["llama3:latest", "h.com/ns/m:t", "ns/m:t"], []),
        (("llama3",), ["llama3:latest"], ["llama3:8b", "llama3.1:latest", "ns/llama3:latest"]),
        (("LLAMA3:8B",), ["llama3:8b"], ["llama3:latest"]),
        (("registry.ollama.ai/library/llama3",), ["llama3:latest"], ["llama3:8b"]),
        (
            ("llama3:*",),
            ["llama3:8b", "llama3:latest", "llama3:70b-instruct"],
            ["llama3.1:8b", "ns/llama3:8b", "llama3x:8b"],
        ),
        (
            ("qwen*",),
            ["qwen2:7b", "qwen3-coder:30b", "qwen:latest"],
            ["qwenfan/x:latest", "myqwen:1", "h/qwen/x:1"],
        ),
        (("library/qwen*",), ["qwen2:7b"], ["ns/qwen2:7b"]),
        (("registry.ollama.ai/library/qwen*",), ["qwen2:7b"], ["ns/qwen2:7b"]),
        (("myns/*",), ["myns/a:b", "myns/x:latest"], ["myns2/a:b", "a:b", "h/myns/a:b"]),
        (("*/*",), ["ns/m:t"], ["m:t", "h.com/ns/m:t"]),
        (("*/*/*",), ["h.com/ns/m:t"], ["m:t", "ns/m:t"]),
        (("*:cloud", "*:*-cloud"), ["gpt-oss:cloud", "gpt-oss:120b-cloud"], ["gpt-oss:120b"]),
        (("llama3:?b",), ["llama3:8b"], ["llama3:70b", "llama3:latest"]),
        (("*/llama3",), ["ns/llama3:latest"], ["ns/llama3:8b", "llama3:latest"]),
        (("a", "b:*", "c*"), ["a:latest", "b:1", "cx:2"], ["a:1", "bb:1", "x:1"]),
        (("gpt-oss:120b:cloud",), ["gpt-oss:120b-cloud"], ["gpt-oss:120b"]),
        (("llama3:local",), ["llama3:latest"], []),
    ],
)
def test_patterns(patterns: tuple[str, ...], allowed: list[str], refused: list[str]) -> None:
    compiled = ModelPatterns(patterns)
    for name in allowed:
        assert compiled.allows(name), name
        assert compiled.allows(name), name  # the cached answer is the same
    for name in refused:
        assert not compiled.allows(name), name
        assert not compiled.allows(name), name


def test_allow_all() -> None:
    assert ModelPatterns(()).allow_all
    assert ModelPatterns(["x", "*"]).allow_all
    assert not ModelPatterns(["x"]).allow_all


def test_names_must_be_normalised_before_matching() -> None:
    compiled = ModelPatterns(["llama3"])
    assert not compiled.allows("llama3")  # fail closed on a raw client string
    assert not compiled.allows("LLAMA3:LATEST")
    assert compiled.allows(normalize_model_name("LLAMA3"))


@pytest.mark.parametrize(
    "pattern",
    ["", "bad pattern", "a//*", "a/b/c/*", "qw%n*", "-m", "m:", "ns.x/m", "x:cloud:local"],
)
def test_invalid_patterns_raise(pattern: str) -> None:
    with pytest.raises(InvalidModelNameError):
        ModelPatterns([pattern])


def test_compile_memoises() -> None:
    first = ModelPatterns.compile(("llama3", "qwen*"))
    assert ModelPatterns.compile(["llama3", "qwen*"]) is first
    assert first == ModelPatterns(("llama3", "qwen*"))
    assert hash(first) == hash(ModelPatterns(("llama3", "qwen*")))
    assert first != ModelPatterns(("llama3",))


def test_cache_is_bounded() -> None:
    compiled = ModelPatterns(["qwen*"])
    for i in range(10_000):
        compiled.allows(f"m{i}:latest")
    assert compiled.allows("qwen2:7b")
    assert len(compiled._cache) <= ModelPatterns._CACHE_SIZE


def test_allowed_models_is_an_intersection() -> None:
    allowed = allowed_models(["llama3:*", "qwen2:7b"], ["*:8b", "qwen*"])  # key, tenant
    assert allowed("llama3:8b")
    assert allowed("qwen2:7b")
    assert not allowed("llama3:latest")  # key yes, tenant no
    assert not allowed("mistral:8b")  # tenant yes, key no
    assert allowed_models((), ["*"])("anything:1")
    assert allowed_models((), ())("anything:1")  # no restriction at all
    assert not allowed_models(["llama3"])("Llama3:latest")  # not normalised: fail closed
    three = allowed_models(["*:8b", "qwen*"], ["llama3:*", "qwen*"], ["*"])
    assert three("llama3:8b") and not three("mistral:8b") and not three("llama3:latest")


@settings(max_examples=200)
@given(a=names(), b=names())
def test_exact_pattern_allows_exactly_its_name(
    a: tuple[str, tuple[str, str, str, str]], b: tuple[str, tuple[str, str, str, str]]
) -> None:
    compiled = ModelPatterns([a[0]])
    assert compiled.allows(normalize_model_name(a[0]))
    assert compiled.allows(normalize_model_name(b[0])) == (
        normalize_model_name(a[0]) == normalize_model_name(b[0])
    )


@settings(max_examples=300)
@given(case=names(), data=st.data())
def test_a_wildcard_in_the_last_part_still_allows_the_name(
    case: tuple[str, tuple[str, str, str, str]], data: st.DataObject
) -> None:
    normalized = normalize_model_name(case[0])
    head, _, last = normalized.rpartition("/")
    start = data.draw(st.integers(0, len(last)))
    stop = data.draw(st.integers(start, len(last)))
    pattern = (head + "/" if head else "") + last[:start] + "*" + last[stop:]
    compiled = ModelPatterns([pattern])
    assert compiled.allows(normalized)
    if pattern != "*" and head != "zz-other-ns":
        # ... and a wildcard never reaches into another namespace.
        assert not compiled.allows("zz-other-ns/" + last)
