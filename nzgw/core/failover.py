"""The failover verdict: which answer of a backend lets a request move on to the next one.

Failover is allowed only before anything was committed to the client (docs/ARCHITECTURE.md,
"Request path", step 6). A backend attempt fails, and the next backend is tried, on:

* a transport error or no first byte within NZGW_UPSTREAM_FIRST_BYTE_TIMEOUT;
* a 5xx (Ollama's 503 "busy" included);
* a 404 whose body says the model was not found (a stale discovery snapshot: the backend is
  not sick, so it does not count against its health);
* a streamed 200 that ends before its first chunk.

Any other answer (a 400, a 404 of another kind, ...) is the backend's answer to the request and
is passed through. Pure: the forwarder (`nzgw.services.forwarding`) does the I/O.
"""

from __future__ import annotations

import enum

# How much of an error answer is read to decide (and kept, to pass it through).
ERROR_BODY_LIMIT = 64 * 1024


class Failure(enum.StrEnum):
    """Why a backend attempt failed (the `reason` label of `nzgw_backend_failures_total`)."""

    TRANSPORT = "transport"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    NOT_FOUND = "not_found"
    EMPTY = "empty"

    @property
    def backend_sick(self) -> bool:
        """Counts against the backend's health (its circuit breaker); a 404 for the model does
        not: the backend answered, the snapshot was stale."""
        return self is not Failure.NOT_FOUND


def reads_error_body(status: int) -> bool:
    """Whether the body must be read before the verdict (a 5xx or a 404)."""
    return status >= 500 or status == 404


def status_verdict(status: int, error_body: bytes) -> Failure | None:
    """The failure an answer with `status` (and, for 5xx/404, its body) is, or None: pass on."""
    if status >= 500:
        return Failure.HTTP_5XX
    if status == 404 and b"not found" in error_body:
        return Failure.NOT_FOUND
    return None


def stream_verdict(first_chunk: bytes) -> Failure | None:
    """A streamed 200 must carry at least one chunk before the client is committed to."""
    return None if first_chunk else Failure.EMPTY


def model_gone(attempts: int, not_found: int) -> bool:
    """Every backend tried (at least one) said 404 for the model: it is gone, and the client
    gets the same answer as for a model it may not use. Otherwise: temporarily unavailable."""
    return attempts > 0 and not_found == attempts
