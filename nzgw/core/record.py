"""The record one request leaves behind, and the refusal that ends a request early.

`RequestInfo` is filled in along the request path (authentication, admission, forwarding,
relay) and read once at the end by settlement: the request log, the audit row, the metrics and
the limiter's charge. It is plain data: no I/O, no clock of its own (the callers stamp times on
Trio's clock). `FailedAttempt` keeps each backend attempt that failed before the first byte
(docs/ARCHITECTURE.md, "Request path", step 6): logged by the forwarder and left on the record
for the settlement hooks, never shown to a client.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from nzgw.core import paths
from nzgw.core.failover import Failure
from nzgw.core.framing import Usage
from nzgw.core.models import Principal


@attrs.frozen
class FailedAttempt:
    """One backend attempt that did not answer usefully, and how long it took to fail."""

    backend: str  # stored for logs and the audit, never shown to clients
    kind: Failure
    elapsed: float  # seconds from the attempt's start to its failure


@attrs.define(eq=False)
class RequestInfo:
    """Everything one request leaves for the log, the audit row and settlement."""

    request_id: str
    method: str
    decision: paths.Route | paths.Blocked | paths.NotFound | paths.MethodNotAllowed
    client: str
    started: float  # trio clock
    wall_started: float  # unix time
    status: int = 0
    refusal: str | None = None
    principal: Principal | None = None
    model: str | None = None
    streamed: bool = False
    backend: str | None = None  # stored for the audit, never shown to clients
    usage: Usage | None = None
    first_byte: float | None = None
    finished: float | None = None
    prompt_estimate: int = 0  # charged as prompt tokens when no usage was reported
    outcome: str = "ok"  # ok | cancelled | upstream_failed | upstream_truncated | refused
    request_body: bytes | None = None  # kept only for keys that opted in to prompt logging
    response_text: str | None = None
    target: bytes = b""  # the raw request target (the audit keeps a cleaned prefix for 404/405)
    queue_wait: float | None = None  # seconds waited for backend slots (None: never queued)
    # Backend attempts that failed before one answered (or before the request gave up).
    failed_attempts: list[FailedAttempt] = attrs.Factory(list)

    @property
    def log_path(self) -> str:
        decision = self.decision
        # Routes and blocked endpoints have canonical names; raw unknown paths are not logged.
        return decision.path if isinstance(decision, paths.Route | paths.Blocked) else "-"

    @property
    def tenant_name(self) -> str | None:
        return self.principal.tenant.name if self.principal else None

    @property
    def key_prefix(self) -> str | None:
        return self.principal.key.prefix if self.principal else None


class Refused(Exception):
    """A request refused before forwarding: status, message, audit reason, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        refusal: str,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.refusal = refusal
        self.headers = dict(headers or {})
        self.code = code
        self.error_type = error_type
