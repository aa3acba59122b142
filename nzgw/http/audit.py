"""The audit row of a finished request: `RequestInfo` → `AuditEvent`, queued by a finish hook.

The hook runs for every request in the connection's shielded cleanup (`app._finish`), so it
only builds a small value and appends it to the `AuditLog` queue: no I/O, no await, O(1) (the
bodies of opted-in keys are cut to `PROMPT_LOG_MAX_BYTES` here and decoded by the flusher).

What goes into the row, and what never does:

* the path is the canonical route path (or the blocked endpoint's name); for a 404/405 the raw
  target, query cut off (it may carry secrets), escaped and truncated;
* the backend that served the request is stored for operators and never reaches a client;
* request and response bodies only for keys with `log_prompts`, into the prompt log, never into
  the audit row and never into a log line.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

from nzgw.core import paths
from nzgw.core.audit import (
    AUDIT_QUEUE_FULL,
    PROMPT_LOG_MAX_BYTES,
    AuditEvent,
    PendingPrompt,
    charged_tokens,
    clean_target,
    clean_text,
)
from nzgw.http.gateway import FinishHook, RequestInfo
from nzgw.services.audit import AuditLog

_PROBES = frozenset({paths.RouteId.HEALTHZ, paths.RouteId.READYZ})


def is_probe(decision: paths.Decision) -> bool:
    """A health probe (`/healthz`, `/readyz`): no key, no model, asked every few seconds."""
    return isinstance(decision, paths.Route) and decision.route in _PROBES


def audit_hook(audit: AuditLog, *, zone: tzinfo = UTC, probes: bool = False) -> FinishHook:
    """The finish hook that records every request in `audit` (append it to `finish_hooks`).

    Health probes are left out unless `probes` (NZGW_AUDIT_PROBES): an orchestrator's probe
    every few seconds would otherwise be most of the log. They still reach metrics and logs."""

    async def record_request(info: RequestInfo) -> None:
        if not probes and is_probe(info.decision):
            return
        if info.refusal == AUDIT_QUEUE_FULL:
            audit.count_refused()  # no room for its row: counted, summarised per episode
            return
        event, prompt = audit_event(info, zone)
        audit.record(event, prompt)

    return record_request


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def audit_event(info: RequestInfo, zone: tzinfo = UTC) -> tuple[AuditEvent, PendingPrompt | None]:
    """The audit row of a finished request, and its prompt log if the key opted in."""
    ts = datetime.fromtimestamp(info.wall_started, UTC)
    decision = info.decision
    if isinstance(decision, paths.Route | paths.Blocked):
        path = decision.path
    else:
        path = clean_target(info.target)
    principal = info.principal
    finished = info.finished if info.finished is not None else info.started
    prompt_tokens, completion_tokens, reported = charged_tokens(
        info.usage, info.prompt_estimate, forwarded=info.backend is not None
    )
    outcome = info.outcome
    if info.refusal is not None and outcome == "ok":
        outcome = "refused"  # refused before the data plane (blocked, 404, 405)
    prompt: PendingPrompt | None = None
    if principal is not None and principal.key.log_prompts and info.request_body is not None:
        ttl = principal.key.prompt_ttl_seconds
        response = info.response_text
        prompt = PendingPrompt(
            request_body=info.request_body[:PROMPT_LOG_MAX_BYTES],
            response=None if response is None else response[:PROMPT_LOG_MAX_BYTES],
            expires_at=None if ttl is None else ts + timedelta(seconds=ttl),
        )
    event = AuditEvent(
        ts=ts,
        day=ts.astimezone(zone).date(),
        request_id=info.request_id,
        tenant_id=principal.tenant.id if principal else None,
        key_id=principal.key.id if principal else None,
        key_prefix=principal.key.prefix if principal else None,
        client=clean_text(info.client),
        method=clean_text(info.method, 16),
        surface=decision.surface.value,
        path=path,
        model=info.model,
        status=info.status,
        outcome=outcome,
        refusal=info.refusal,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        tokens_reported=reported,
        streamed=info.streamed,
        ttfb_us=None if info.first_byte is None else _us(info.first_byte - info.started),
        latency_us=_us(finished - info.started),
        backend=info.backend,
        prompt_logged=prompt is not None,
    )
    return event, prompt
