"""What backend answers may not tell a tenant: filesystem paths, other tenants' activity. Sans-IO.

* `/api/show` carries the backend's Modelfile, whose `FROM` (and `ADAPTER`) lines name blob
  files on the backend's disk (`FROM /usr/share/ollama/.ollama/models/blobs/sha256-…`). Those
  lines are rewritten to the model name the client asked for (`FROM llama3`), which is what
  `ollama show --modelfile` suggests for building on a model anyway; ADAPTER paths are dropped.
* `/api/ps` entries carry `expires_at` (when the model was last used, plus its keep-alive) and
  `size_vram`: for a shared backend that is other tenants' activity. Keys that do not own the
  backend do not see them. nzgw's rule for "own": a key is restricted when its key or its tenant
  has a model allow-list; unrestricted keys are operator keys and see the whole entry.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["PS_PRIVATE_FIELDS", "trim_modelfile", "trim_ps_entry", "trim_show_body"]

PS_PRIVATE_FIELDS = ("expires_at", "size_vram")

_PATH_LINE = re.compile(r"(?im)^[ \t]*(FROM|ADAPTER)[ \t]+(\S.*)$")


def trim_ps_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in PS_PRIVATE_FIELDS}


def _looks_like_path(arg: str) -> bool:
    arg = arg.strip().strip('"')
    return arg.startswith(("/", "~", ".", "\\")) or re.match(r"[A-Za-z]:[\\/]", arg) is not None


def trim_modelfile(modelfile: str, model: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if not _looks_like_path(match.group(2)):
            return match.group(0)
        return f"FROM {model}" if match.group(1).upper() == "FROM" else ""

    return _PATH_LINE.sub(replace, modelfile)


def trim_show_body(body: bytes, model: str) -> bytes:
    """The /api/show answer without backend paths (unchanged when it is not a JSON object)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("modelfile"), str):
        return body
    doc["modelfile"] = trim_modelfile(doc["modelfile"], model)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
