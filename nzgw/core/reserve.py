"""How many tokens an admission reserves, and the output cap that makes it a true bound.

The reservation is `prompt estimate + output cap`. The prompt estimate is the request body's
size in bytes / 4 (rounded up; the one token estimate), minus inline images: base64 image data says
nothing about its token cost and would reserve thousands of phantom tokens. The output cap is
the request's own (`options.num_predict`, `max_tokens`, `max_output_tokens`); when the client
set none (or an unlimited one), nzgw sets the configured default on the upstream request, so
the model can never generate more than was reserved.
"""

from __future__ import annotations

from typing import Any

import attrs

from nzgw.core.paths import RouteId

R = RouteId

# Which field caps the output, per route. Embeddings and show generate nothing.
_CAP_FIELD: dict[RouteId, str] = {
    R.GENERATE: "num_predict",  # inside "options"
    R.CHAT: "num_predict",
    R.V1_CHAT: "max_tokens",
    R.V1_COMPLETIONS: "max_tokens",
    R.V1_RESPONSES: "max_output_tokens",
    R.V1_MESSAGES: "max_tokens",
}

# Bodies smaller than this are not searched for images (none of consequence fits).
_IMAGE_SCAN_MIN = 16 * 1024


@attrs.frozen
class Reservation:
    prompt_estimate: int
    output_cap: int
    modified: bool  # the request document was changed (re-encode it before forwarding)

    @property
    def tokens(self) -> int:
        return self.prompt_estimate + self.output_cap


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value > 0 else None


def _image_bytes(node: Any) -> int:
    """Total length of inline image data in a request document (all surfaces' spellings)."""
    total = 0
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "images" and isinstance(value, list):
                    total += sum(len(v) for v in value if isinstance(v, str))
                elif isinstance(value, str):
                    if value.startswith("data:") or (
                        key == "data" and item.get("type") == "base64"
                    ):
                        total += len(value)
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    return total


def reserve(route: RouteId, body: bytes, doc: dict[str, Any], *, default_cap: int) -> Reservation:
    """The reservation for a request; sets the default cap in `doc` when it has none."""
    size = len(body)
    if size >= _IMAGE_SCAN_MIN:
        size -= _image_bytes(doc)
    prompt = (max(size, 0) + 3) // 4  # bytes / 4, rounded up, net of images
    field = _CAP_FIELD.get(route)
    if field is None:
        return Reservation(prompt, 0, modified=False)
    if route in (R.GENERATE, R.CHAT):
        options = doc.get("options")
        cap = _positive_int(options.get(field)) if isinstance(options, dict) else None
        if cap is not None:
            return Reservation(prompt, cap, modified=False)
        doc["options"] = {**(options if isinstance(options, dict) else {}), field: default_cap}
        return Reservation(prompt, default_cap, modified=True)
    cap = _positive_int(doc.get(field))
    if cap is None and route is R.V1_CHAT:
        # Ollama ignores `max_completion_tokens` (newer SDKs send only that): honour it.
        cap = _positive_int(doc.get("max_completion_tokens"))
        if cap is not None:
            doc[field] = cap
            return Reservation(prompt, cap, modified=True)
    if cap is not None:
        return Reservation(prompt, cap, modified=False)
    doc[field] = default_cap
    return Reservation(prompt, default_cap, modified=True)
