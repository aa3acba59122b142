"""Request-body JSON read strictly, so that nzgw and Go's `encoding/json` see one document. Sans-IO.

Ollama binds bodies with Go's `encoding/json`; Python's `json` accepts things Go reads
differently or refuses. Every such body is refused here (`JSONBodyError`, a 400 for the client)
instead of being forwarded as something the gateway did not check:

* bytes that are not UTF-8 (Go would silently replace them with U+FFFD);
* lone UTF-16 surrogates in `\\u` escapes (`"\\ud800"`; Go replaces them, Python keeps them);
* `NaN`, `Infinity`, `-Infinity` (not JSON; Python accepts them);
* numbers beyond float64 (`1e400`: Go refuses, Python reads `inf`);
* duplicate keys in any object (Go keeps the last one, so two readers may pick different ones);
* nesting deeper than `MAX_DEPTH` (Go's own limit is 10000; no request needs more than a few
  dozen levels, and a bound keeps the decoder's recursion far from Python's stack limit).

`fold_key` is Go's case-insensitive field matching (`EqualFold` plus the two non-ASCII runes
that fold onto ASCII letters: U+017F `ſ` → `s`, U+212A Kelvin sign → `k`), used by the request
schema to refuse keys that Go would bind to a field under another spelling.

`dumps` is the one serialisation of a checked document that goes upstream.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_DEPTH", "JSONBodyError", "dumps", "fold_key", "loads"]

MAX_DEPTH = 128

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_FOLD = str.maketrans({"\u017f": "s", "\u212a": "k"})


class JSONBodyError(ValueError):
    """The body is not a JSON document nzgw and the backend would read the same way."""


def _constant(name: str) -> Any:
    raise JSONBodyError(f"invalid JSON in request body: {name} is not a JSON value")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONBodyError("invalid JSON in request body: number out of range")
    return value


def _int(text: str) -> int:
    try:
        value = int(text)
        float(value)  # Go reads untyped numbers as float64: beyond it is an error there
    except (ValueError, OverflowError):
        raise JSONBodyError("invalid JSON in request body: number out of range") from None
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise JSONBodyError("invalid JSON in request body: duplicate key in an object")
    return doc


def loads(body: bytes) -> Any:
    """The JSON value of `body`, or `JSONBodyError` (with a message safe to show the client)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONBodyError("request body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except RecursionError:
        raise JSONBodyError(_too_deep()) from None
    except json.JSONDecodeError as exc:
        raise JSONBodyError(f"invalid JSON in request body at offset {exc.pos}") from None
    _check_tree(value, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _too_deep() -> str:
    return f"invalid JSON in request body: nested deeper than {MAX_DEPTH} levels"


def _check_tree(value: Any, *, strings: bool) -> None:
    """Depth bound; with `strings`, also refuse lone surrogates (keys and values)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth >= MAX_DEPTH:
                raise JSONBodyError(_too_deep())
            for key, item in node.items():
                if strings:
                    _check_string(key)
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
                elif strings and isinstance(item, str):
                    _check_string(item)
        elif isinstance(node, list):
            if depth >= MAX_DEPTH:
                raise JSONBodyError(_too_deep())
            for item in node:
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
                elif strings and isinstance(item, str):
                    _check_string(item)
        elif strings and isinstance(node, str):
            _check_string(node)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONBodyError(
            "invalid JSON in request body: unpaired UTF-16 surrogate in a string"
        ) from None


def fold_key(key: str) -> str:
    """The spelling-independent form Go's field matching compares (ASCII case, ſ, K)."""
    folded = key.translate(_FOLD)
    return folded.lower() if folded.isascii() else folded


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON of a document `loads` accepted (so it always encodes)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
