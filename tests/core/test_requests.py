"""`core.requests.prepare`: the canonical document nzgw forwards, per route, and what it refuses."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from nzgw.core.paths import RouteId
from nzgw.core.requests import FIELDS, LOAD_OPTIONS, BadRequestError, prepare
from nzgw.core.reserve import MAX_CAP, image_bytes

R = RouteId
CAP = 100

MINIMAL: dict[RouteId, dict[str, Any]] = {
    R.GENERATE: {"model": "llama3", "prompt": "hi"},
    R.CHAT: {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
    R.SHOW: {"model": "llama3"},
    R.EMBED: {"model": "llama3", "input": "x"},
    R.EMBEDDINGS: {"model": "llama3", "prompt": "x"},
    R.V1_CHAT: {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
    R.V1_COMPLETIONS: {"model": "llama3", "prompt": "x"},
    R.V1_EMBEDDINGS: {"model": "llama3", "input": "x"},
    R.V1_RESPONSES: {"model": "llama3", "input": "x"},
    R.V1_MESSAGES: {
        "model": "llama3",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


def _prep(route: RouteId, doc: Any, **kw: Any) -> tuple[dict[str, Any], Any]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    prepared = prepare(route, body, default_cap=CAP, **kw)
    return json.loads(prepared.body), prepared


@pytest.mark.parametrize("route", list(MINIMAL))
@pytest.mark.parametrize("spelling", ["MODEL", "Model", "mOdEl"])
def test_a_folded_model_key_is_refused_on_every_route(route: RouteId, spelling: str) -> None:
    doc = {**MINIMAL[route], spelling: "secretmodel"}
    with pytest.raises(BadRequestError, match='"model"'):
        _prep(route, doc)


def test_show_legacy_name_folds_too() -> None:
    with pytest.raises(BadRequestError):
        _prep(R.SHOW, {"name": "llama3", "NAME": "secret"})
    forwarded, prepared = _prep(R.SHOW, {"name": "llama3"})
    assert forwarded == {"model": "llama3"} and prepared.model == "llama3"
    forwarded, _ = _prep(R.SHOW, {"model": "llama3", "name": "other"})
    assert forwarded == {"model": "llama3"}


@pytest.mark.parametrize(
    ("route", "extra"),
    [
        (R.GENERATE, {"stream": False, "Stream": True}),
        (R.GENERATE, {"\u017ftream": True}),
        (R.GENERATE, {"options": {"num_predict": 5}, "Options": {"num_predict": -1}}),
        (R.CHAT, {"Keep_Alive": 0}),
        (R.V1_CHAT, {"max_tokens": 5, "MAX_TOKENS": None}),
        (R.V1_CHAT, {"max_to\u212aens": 5}),
        (R.V1_CHAT, {"stream_options": {"Include_Usage": False}}),
        (R.V1_RESPONSES, {"max_output_tokens": 5, "Max_Output_Tokens": None}),
        (R.V1_MESSAGES, {"Max_tokens": 9}),
    ],
)
def test_folded_caps_and_flags_are_refused(route: RouteId, extra: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError, match="letter case"):
        _prep(route, {**MINIMAL[route], **extra})


def test_a_folded_key_inside_a_chat_message_is_refused() -> None:
    for route in (R.CHAT, R.V1_CHAT, R.V1_MESSAGES):
        messages = [{"role": "user", "content": "a", "Content": "b"}]
        with pytest.raises(BadRequestError, match="message"):
            _prep(route, {**MINIMAL[route], "messages": messages})


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(BadRequestError, match="duplicate"):
        _prep(R.GENERATE, b'{"model":"llama3","stream":false,"stream":true}')


@pytest.mark.parametrize("route", list(MINIMAL))
def test_only_documented_fields_are_forwarded(route: RouteId) -> None:
    doc = {**MINIMAL[route], "unknown_field": 1, "n": 3, "user": "u", "tool_choice": "auto"}
    forwarded, _ = _prep(route, doc, allow_model_controls=True)
    assert set(forwarded) <= FIELDS[route]
    assert "unknown_field" not in forwarded


@pytest.mark.parametrize(
    ("route", "default"),
    [(R.GENERATE, True), (R.CHAT, True), (R.V1_CHAT, False), (R.V1_MESSAGES, False)],
)
def test_stream_is_written_explicitly(route: RouteId, default: bool) -> None:
    forwarded, prepared = _prep(route, MINIMAL[route])
    assert forwarded["stream"] is default and prepared.stream is default
    forwarded, prepared = _prep(route, {**MINIMAL[route], "stream": None})
    assert forwarded["stream"] is default
    with pytest.raises(BadRequestError):
        _prep(route, {**MINIMAL[route], "stream": "yes"})


def test_embeddings_and_show_never_stream() -> None:
    forwarded, prepared = _prep(R.EMBED, {**MINIMAL[R.EMBED], "stream": True})
    assert "stream" not in forwarded and not prepared.stream


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (5.0, 5),
        (0.5, CAP),
        (7.9, CAP),
        (0, CAP),
        (-1, CAP),
        (None, CAP),
        (1e30, CAP),
        (MAX_CAP + 1, CAP),
        (10**25, CAP),
        ("absent", CAP),
    ],
)
def test_caps_are_normalised_as_the_backend_reads_them(value: Any, expected: int) -> None:
    cases: list[tuple[RouteId, str, dict[str, Any]]] = [
        (R.GENERATE, "num_predict", {}),
        (R.CHAT, "num_predict", {}),
        (R.V1_CHAT, "max_tokens", {}),
        (R.V1_COMPLETIONS, "max_tokens", {}),
        (R.V1_RESPONSES, "max_output_tokens", {}),
        (R.V1_MESSAGES, "max_tokens", {}),
    ]
    for route, field, _ in cases:
        doc = dict(MINIMAL[route])
        native = route in (R.GENERATE, R.CHAT)
        if value != "absent":
            if native:
                doc["options"] = {field: value}
            else:
                doc[field] = value
        elif not native:
            doc.pop(field, None)
        forwarded, prepared = _prep(route, doc)
        seen = forwarded["options"][field] if native else forwarded[field]
        assert seen == expected and type(seen) is int, (route, value)
        assert prepared.reservation.output_cap == expected


def test_max_completion_tokens_becomes_max_tokens() -> None:
    forwarded, prepared = _prep(R.V1_CHAT, {**MINIMAL[R.V1_CHAT], "max_completion_tokens": 7})
    assert forwarded["max_tokens"] == 7 and "max_completion_tokens" not in forwarded
    assert prepared.reservation.output_cap == 7


def test_a_cap_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(BadRequestError, match="max_tokens"):
        _prep(R.V1_CHAT, {**MINIMAL[R.V1_CHAT], "max_tokens": "5"})
    with pytest.raises(BadRequestError, match="num_predict"):
        _prep(R.GENERATE, {**MINIMAL[R.GENERATE], "options": {"num_predict": True}})


def test_shared_model_controls_are_stripped_unless_allowed() -> None:
    options = {"num_ctx": 131072, "num_gpu": 0, "temperature": 0.1, "use_mlock": True}
    doc = {**MINIMAL[R.GENERATE], "keep_alive": 0, "options": options}
    forwarded, prepared = _prep(R.GENERATE, doc)
    assert "keep_alive" not in forwarded
    assert forwarded["options"] == {"temperature": 0.1, "num_predict": CAP}
    assert set(prepared.stripped_controls) == {"keep_alive", "options.num_ctx", "options.num_gpu"}
    forwarded, prepared = _prep(R.GENERATE, doc, allow_model_controls=True)
    assert forwarded["keep_alive"] == 0
    assert forwarded["options"] == {
        "num_ctx": 131072,
        "num_gpu": 0,
        "temperature": 0.1,
        "num_predict": CAP,
    }
    assert prepared.stripped_controls == ()
    assert {"num_ctx", "num_gpu", "num_batch", "main_gpu", "use_mmap"} <= LOAD_OPTIONS


def test_v1_completions_accepts_one_prompt_string_only() -> None:
    for prompt in (["a", "b"], [1, 2, 3], {"x": 1}):
        with pytest.raises(BadRequestError, match="one prompt"):
            _prep(R.V1_COMPLETIONS, {"model": "llama3", "prompt": prompt})


def test_stream_usage_is_requested_on_the_clients_behalf() -> None:
    forwarded, prepared = _prep(R.V1_CHAT, {**MINIMAL[R.V1_CHAT], "stream": True})
    assert forwarded["stream_options"] == {"include_usage": True} and prepared.strip_usage
    doc = {**MINIMAL[R.V1_CHAT], "stream": True, "stream_options": {"include_usage": True}}
    forwarded, prepared = _prep(R.V1_CHAT, doc)
    assert forwarded["stream_options"] == {"include_usage": True} and not prepared.strip_usage


PNG = base64.b64encode(b"\x89PNG" + bytes(30_000)).decode()


def test_images_are_discounted_only_where_images_are_carried() -> None:
    text = "data:" + "a" * 40_000
    _, as_prompt = _prep(R.GENERATE, {"model": "llama3", "prompt": text})
    assert as_prompt.reservation.prompt_estimate >= 10_000
    _, as_image = _prep(R.GENERATE, {"model": "llama3", "prompt": "x", "images": [PNG]})
    assert as_image.reservation.prompt_estimate < 100
    # a prompt hidden in `images` that is not base64 is not an image
    _, fake = _prep(R.GENERATE, {"model": "llama3", "images": ["not base64! " * 4000]})
    assert fake.reservation.prompt_estimate >= 10_000
    url = f"data:image/png;base64,{PNG}"
    part = {"type": "image_url", "image_url": {"url": url}}
    v1 = {"model": "llama3", "messages": [{"role": "user", "content": [part]}]}
    assert image_bytes(R.V1_CHAT, v1) == len(url)
    wrong_place = {"model": "llama3", "messages": [{"role": "user", "content": url}]}
    assert image_bytes(R.V1_CHAT, wrong_place) == 0
    block = {"type": "image", "source": {"type": "base64", "data": PNG}}
    anthropic = {"model": "m", "messages": [{"role": "user", "content": [block]}]}
    assert image_bytes(R.V1_MESSAGES, anthropic) == len(PNG)
    item = {"type": "message", "content": [{"type": "input_image", "image_url": url}]}
    assert image_bytes(R.V1_RESPONSES, {"input": [item]}) == len(url)
    chat = {"messages": [{"role": "user", "images": [PNG]}]}
    assert image_bytes(R.CHAT, chat) == len(PNG)


def test_model_must_be_a_string() -> None:
    with pytest.raises(BadRequestError, match="model"):
        _prep(R.GENERATE, {"model": ["llama3"]})
    with pytest.raises(BadRequestError, match="JSON object"):
        _prep(R.GENERATE, [1])
    with pytest.raises(BadRequestError, match="missing"):
        _prep(R.GENERATE, b"  ")
