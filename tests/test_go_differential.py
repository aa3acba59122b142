"""Differential test against Go's encoding/json, the decoder Ollama binds request bodies with.

`tests/go/decode.go` (stdlib only, structs with Ollama's json tags for the model routes'
request types) is built once per session with `go build` into a temporary directory and runs as
one long-lived process answering one line per body. A hypothesis corpus of bodies (case variants
and Go folds of field names, duplicates, numeric edge cases for the caps, nesting) goes through
`core.requests.prepare`; for every body nzgw accepts, the bytes it would forward are decoded by
Go, and the model, the stream flag and the output cap Go sees must be exactly the ones nzgw
authorised and reserved; keep_alive and load-time options must not reach Go unless allowed.
Zero differentials. Without `go` the test is skipped with the reason; with `CI=true` it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nzgw.core.paths import RouteId
from nzgw.core.requests import LOAD_OPTIONS, BadRequestError, prepare
from tests.system_tools import require_tool

R = RouteId
DEFAULT_CAP = 100
SOURCE = Path(__file__).parent / "go" / "decode.go"


class GoDecoder:
    def __init__(self, binary: Path) -> None:
        self._process = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def view(self, route: RouteId, body: bytes) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        line = json.dumps({"route": route.value, "body": body.decode()})
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        assert answer, "the Go decoder exited"
        view: dict[str, Any] = json.loads(answer)
        return view

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        finally:
            if self._process.returncode is None:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()


@pytest.fixture(scope="session")
def go_decoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoDecoder]:
    go = require_tool("go", "golang-go", "the Go differential test")
    work = tmp_path_factory.mktemp("go")
    binary = work / "decode"
    env = {
        **os.environ,
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "path"),
        "GOFLAGS": "",
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
    }
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(SOURCE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    decoder = GoDecoder(binary)
    try:
        yield decoder
    finally:
        decoder.close()


USER = '[{"role":"user","content":"hi"}]'
BASE: dict[RouteId, list[tuple[str, str]]] = {
    R.GENERATE: [("prompt", '"hi"')],
    R.CHAT: [("messages", USER)],
    R.EMBED: [("input", '"x"')],
    R.EMBEDDINGS: [("prompt", '"x"')],
    R.SHOW: [],
    R.V1_CHAT: [("messages", USER)],
    R.V1_COMPLETIONS: [("prompt", '"x"')],
    R.V1_EMBEDDINGS: [("input", '"x"')],
    R.V1_RESPONSES: [("input", '"x"')],
    R.V1_MESSAGES: [("messages", USER)],
}
CAP_FIELD = {
    R.V1_CHAT: "max_tokens",
    R.V1_COMPLETIONS: "max_tokens",
    R.V1_RESPONSES: "max_output_tokens",
    R.V1_MESSAGES: "max_tokens",
}
NATIVE_CAPPED = (R.GENERATE, R.CHAT)
STREAMING = {R.GENERATE, R.CHAT, R.V1_CHAT, R.V1_COMPLETIONS, R.V1_RESPONSES, R.V1_MESSAGES}

NUMBERS = [
    "0.5", "0", "-0", "-1", "1", "5", "5.0", "7.9", "1e2", "1E2", "1e30", "1e400", "-1e400",
    "1e-400", "0.9999999999999999999", "2147483647", "2147483648", "4096",
    "9223372036854775807", "9223372036854775808", "18446744073709551616", "-9223372036854775809",
    "null", "true", '"5"', "[]", "{}", "NaN", "Infinity",
]  # fmt: skip
MODELS = ['"llama3"', '"qwen3"', '"Llama3:Latest"', '""', "null", "5", '["llama3"]']
STREAMS = ["true", "false", "null", '"true"', "1"]
KEEP_ALIVES = ["0", "-1", '"5m"', '"8760h"', "null", '"0"']


def spellings(field: str) -> st.SearchStrategy[str]:
    """The field's own spelling, case variants, and Go's non-ASCII folds of s and k."""
    variants = {field, field.upper(), field.title(), field.capitalize(), field.swapcase()}
    if "s" in field:
        variants.add(field.replace("s", "\u017f", 1))
    if "k" in field:
        variants.add(field.replace("k", "\u212a", 1))
    mixed = st.lists(st.booleans(), min_size=len(field), max_size=len(field)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(field, flips, strict=True))
    )
    return st.sampled_from(sorted(variants)) | mixed


@st.composite
def options_text(draw: st.DrawFn) -> str:
    pairs: list[str] = []
    if draw(st.booleans()):
        pairs.append(f'"num_predict":{draw(st.sampled_from(NUMBERS))}')
    for name in draw(st.lists(st.sampled_from(sorted(LOAD_OPTIONS)), max_size=3, unique=True)):
        pairs.append(f'"{name}":1')
    if draw(st.booleans()):
        pairs.append(f'"{draw(st.sampled_from(["NUM_PREDICT", "Num_Predict", "temperature"]))}":1')
    return "{" + ",".join(pairs) + "}"


@st.composite
def bodies(draw: st.DrawFn) -> tuple[RouteId, bytes, bool]:
    route = draw(st.sampled_from(list(BASE)))
    pairs: list[tuple[str, str]] = [("model", draw(st.sampled_from(MODELS[:3])))]
    pairs += BASE[route]
    fields: list[tuple[str, st.SearchStrategy[str]]] = [
        ("model", st.sampled_from(MODELS)),
        ("stream", st.sampled_from(STREAMS)),
        ("keep_alive", st.sampled_from(KEEP_ALIVES)),
        ("options", options_text()),
    ]
    if route in CAP_FIELD:
        fields.append((CAP_FIELD[route], st.sampled_from(NUMBERS)))
    if route is R.V1_CHAT:
        fields.append(("max_completion_tokens", st.sampled_from(NUMBERS)))
        fields.append(("stream_options", st.sampled_from(['{"include_usage":true}', "{}"])))
    if route is R.SHOW:
        fields.append(("name", st.sampled_from(MODELS)))
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f[0], max_size=5))
    for field, values in chosen:
        folded = draw(st.integers(0, 3)) == 3
        key = draw(spellings(field)) if folded else field
        if key == "model":
            pairs[0] = (key, draw(values))  # one model key, unless folded or duplicated below
        else:
            pairs.append((key, draw(values)))
    if draw(st.integers(0, 4)) == 4:
        pairs.append(draw(st.sampled_from(pairs)))  # an exact duplicate
    if draw(st.booleans()):
        depth = draw(st.integers(1, 140))
        pairs.append(("format", "[" * depth + "]" * depth))
    if draw(st.booleans()):
        draw(st.randoms()).shuffle(pairs)
    text = "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{v}" for k, v in pairs) + "}"
    return route, text.encode(), draw(st.booleans())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bodies())
def test_go_sees_what_nzgw_authorised_and_reserved(
    go_decoder: GoDecoder, case: tuple[RouteId, bytes, bool]
) -> None:
    route, body, allow = case
    try:
        prepared = prepare(route, body, default_cap=DEFAULT_CAP, allow_model_controls=allow)
    except BadRequestError:
        event("refused by nzgw")
        return  # refused: nothing reaches the backend
    view = go_decoder.view(route, prepared.body)
    event("forwarded, Go refuses" if view.get("err") else "forwarded, Go binds")
    if view.get("err"):
        # Ollama would refuse it (400); never a syntax error: nzgw's bytes are valid JSON.
        assert "cannot unmarshal" in view["err"], (view, prepared.body)
        return
    assert view["model"] == prepared.model, (body, prepared.body, view)
    if route in STREAMING:
        assert view["stream"] is prepared.stream, (body, prepared.body, view)
    if route in NATIVE_CAPPED or route in CAP_FIELD:
        cap = prepared.reservation.output_cap
        assert cap > 0 and view["cap"] == cap, (body, prepared.body, view)
    if not allow:
        assert not view["keep_alive"], (body, prepared.body)
        assert not set(view["options"]) & LOAD_OPTIONS, (body, prepared.body)


def test_the_go_decoder_shows_the_bypass_nzgw_refuses(go_decoder: GoDecoder) -> None:
    """The control: Go really binds the last folded key, so forwarding raw bytes would leak."""
    smuggled = b'{"model":"llama3","MODEL":"secretmodel","options":{"num_predict":0.5}}'
    view = go_decoder.view(R.GENERATE, smuggled)
    assert view["model"] == "secretmodel" and view["cap"] == 0
    assert go_decoder.view(R.GENERATE, b'{"\xc5\xbftream":false}')["stream"] is False
    with pytest.raises(BadRequestError):
        prepare(R.GENERATE, smuggled, default_cap=DEFAULT_CAP)
