"""The strict request-body decoder: every body Go and Python would read differently is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nzgw.core import gojson


@pytest.mark.parametrize(
    ("body", "marker"),
    [
        (b'{"prompt":"\\ud800"}', "surrogate"),
        (b'{"prompt":"a\\udfffb"}', "surrogate"),
        (b'{"\\ud800":1}', "surrogate"),
        (b'{"options":{"num_predict":1e400}}', "out of range"),
        (b'{"x":-1e400}', "out of range"),
        (b'{"x":' + b"9" * 400 + b"}", "out of range"),
        (b'{"x":NaN}', "NaN"),
        (b'{"x":Infinity}', "Infinity"),
        (b'{"x":-Infinity}', "-Infinity"),
        (b'{"model":"a","model":"b"}', "duplicate"),
        (b'{"options":{"seed":1,"seed":2}}', "duplicate"),
        (b'{"x":' + b"[" * (gojson.MAX_DEPTH + 1) + b"]" * (gojson.MAX_DEPTH + 1) + b"}", "deeper"),
        (b"[" * 100_000 + b"]" * 100_000, "deeper"),
        (b'{"x":"\xff"}', "UTF-8"),
        (b'{"x":1', "offset"),
    ],
)
def test_malformed_bodies_are_refused_with_a_safe_message(body: bytes, marker: str) -> None:
    with pytest.raises(gojson.JSONBodyError) as caught:
        gojson.loads(body)
    assert marker in str(caught.value)


def test_depth_bound_is_exact() -> None:
    depth = gojson.MAX_DEPTH
    ok = b"[" * depth + b"]" * depth
    assert gojson.loads(ok) is not None
    with pytest.raises(gojson.JSONBodyError):
        gojson.loads(b"[" + ok + b"]")


def test_paired_surrogates_and_big_ints_within_float64_are_fine() -> None:
    assert gojson.loads(b'{"x":"\\ud83d\\ude00"}') == {"x": "\U0001f600"}
    big = 123456789012345678901234567890
    assert gojson.loads(b'{"x":%d}' % big)["x"] == big


def test_fold_key_is_go_field_matching() -> None:
    assert gojson.fold_key("MODEL") == "model"
    assert gojson.fold_key("\u017ftream") == "stream"  # ſ
    assert gojson.fold_key("max_to\u212aens") == "max_tokens"  # Kelvin sign
    assert gojson.fold_key("mod\u00e9l") != "model"
    assert gojson.fold_key("\u0130d") != "id"  # dotted capital I does not fold to i in Go


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_round_trip_of_valid_documents(value: object) -> None:
    encoded = gojson.dumps(value)
    assert gojson.loads(encoded) == value
    assert json.loads(encoded) == value
