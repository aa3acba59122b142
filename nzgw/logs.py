"""Logging set-up: one line per event, JSON or text, with the structured fields of the record.

Nothing here ever formats a request body or a key: callers pass only ids, prefixes, paths and
numbers in `extra`, and those are the only fields written. As a last line of defence every
line goes through `nzgw.core.redact` (URL userinfo, tokens, API key secrets: `***`), so a
library exception that quotes a connection URL cannot leak its password.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from nzgw.core.redact import redact

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = (
            f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn's own access log would duplicate ours (and log raw targets).
    logging.getLogger("hypercorn.access").disabled = True
    # httpx logs every discovery poll at INFO (three lines per backend per tick): only its
    # warnings reach the log; discovery logs backend state changes itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
