"""How many tokens an admission reserves, and the output cap that makes it a true bound. Sans-IO.

The reservation is `prompt estimate + output cap`:

* The prompt estimate is the forwarded body's size in bytes / 4, minus inline image data (base64
  says nothing about its token cost). Only the fields that carry images on the route count as
  images (`images` of `/api/generate` and of `/api/chat` messages, `image_url` parts of
  `/v1/chat/completions`, `input_image` parts of `/v1/responses`, base64 `image` sources of
  `/v1/messages`), and only strings that are base64, which the backend decodes as an image or
  refuses: a long prompt that merely starts with `data:` is a prompt.
* The output cap is read the way the backend reads it. Ollama turns `options.num_predict` into
  an int64 by truncation and treats `<= 0` as "no limit"; the OpenAI/Anthropic adapters copy
  `max_tokens`/`max_output_tokens` into it. So any cap that is absent, null, not a whole number,
  zero, negative or absurd (above `MAX_CAP`) is replaced, in the forwarded document, by the
  configured default cap; a valid cap is written back as a plain integer. The backend can never
  generate more than was reserved.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from nzgw.core.paths import RouteId

__all__ = ["MAX_CAP", "CapTypeError", "Reservation", "image_bytes", "normalise_cap", "reserve"]

R = RouteId

# Beyond this a cap is absurd (the runner's counters are 32-bit): the default applies.
MAX_CAP = 2**31 - 1

# Which field caps the output, per route (native: inside "options"). Others generate nothing.
_CAP_FIELD: dict[RouteId, str] = {
    R.GENERATE: "num_predict",
    R.CHAT: "num_predict",
    R.V1_CHAT: "max_tokens",
    R.V1_COMPLETIONS: "max_tokens",
    R.V1_RESPONSES: "max_output_tokens",
    R.V1_MESSAGES: "max_tokens",
}

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s_-]*")
_DATA_URL = re.compile(r"data:[^,;]{0,100}(?:;[^,;]{0,100}){0,4};base64,")


@attrs.frozen
class Reservation:
    prompt_estimate: int
    output_cap: int

    @property
    def tokens(self) -> int:
        return self.prompt_estimate + self.output_cap


class CapTypeError(ValueError):
    """A cap field holds something that is not a number (the backend would refuse it too)."""


def normalise_cap(value: Any, field: str) -> int | None:
    """The cap the backend would honour, or None where it would generate without limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CapTypeError(f"{field} must be a number")
    if isinstance(value, float) and not value.is_integer():
        return None
    cap = int(value)
    return cap if 0 < cap <= MAX_CAP else None


def reserve(route: RouteId, doc: dict[str, Any], *, default_cap: int) -> tuple[int, int]:
    """Normalise the output cap in `doc` (writing the default where needed); returns
    `(output cap, inline image bytes)`. `CapTypeError` for a cap that is not a number."""
    images = image_bytes(route, doc)
    field = _CAP_FIELD.get(route)
    if field is None:
        return 0, images
    if route in (R.GENERATE, R.CHAT):
        options = doc.get("options")
        options = dict(options) if isinstance(options, dict) else {}
        cap = normalise_cap(options.get(field), f"options.{field}") or default_cap
        options[field] = cap
        doc["options"] = options
        return cap, images
    value = doc.get(field)
    extra = doc.pop("max_completion_tokens", None) if route is R.V1_CHAT else None
    if value is None and extra is not None:
        # Ollama ignores `max_completion_tokens` (newer SDKs send only that): honour it.
        value = extra
        field_name = "max_completion_tokens"
    else:
        field_name = field
    cap = normalise_cap(value, field_name) or default_cap
    doc[field] = cap
    return cap, images


def _base64_len(value: Any) -> int:
    if isinstance(value, str) and _BASE64.fullmatch(value):
        return len(value)
    return 0


def _data_url_len(value: Any) -> int:
    if not isinstance(value, str):
        return 0
    head = _DATA_URL.match(value)
    if head is None or not _BASE64.fullmatch(value, head.end()):
        return 0
    return len(value)


def _image_list_len(value: Any) -> int:
    return sum(_base64_len(v) for v in value) if isinstance(value, list) else 0


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def image_bytes(route: RouteId, doc: dict[str, Any]) -> int:
    """Bytes of inline image data, counted only where the route carries images."""
    if route is R.GENERATE:
        return _image_list_len(doc.get("images"))
    total = 0
    if route is R.CHAT:
        for message in _dicts(doc.get("messages")):
            total += _image_list_len(message.get("images"))
    elif route is R.V1_CHAT:
        for message in _dicts(doc.get("messages")):
            for part in _dicts(message.get("content")):
                if part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    total += _data_url_len(url)
    elif route is R.V1_RESPONSES:
        for item in _dicts(doc.get("input")):
            for part in _dicts(item.get("content")):
                if part.get("type") == "input_image":
                    total += _data_url_len(part.get("image_url"))
    elif route is R.V1_MESSAGES:
        for message in _dicts(doc.get("messages")):
            for block in _dicts(message.get("content")):
                source = block.get("source")
                if (
                    block.get("type") == "image"
                    and isinstance(source, dict)
                    and source.get("type") == "base64"
                ):
                    total += _base64_len(source.get("data"))
    return total
