"""Admission and settlement as the request path sees them: `Limiter` behind the `Admitter`
protocol, refusals turned into 429/503 with the right headers and error codes."""

from __future__ import annotations

import logging
import math
from types import MappingProxyType

import trio

from nzgw.config import Config
from nzgw.core.limits import AdmissionResult, Lease, Limit, ratelimit_headers
from nzgw.core.models import Principal
from nzgw.http.gateway import Refused, RequestInfo
from nzgw.ports import CountersUnavailableError
from nzgw.services.limiter import Limiter

log = logging.getLogger("nzgw.limits")

_BUDGETS = MappingProxyType(
    {
        Limit.DAILY_TOKENS: "daily",
        Limit.MONTHLY_TOKENS: "monthly",
        Limit.LIFETIME_TOKENS: "lifetime",
    }
)
_RATES = MappingProxyType(
    {
        Limit.REQUESTS_PER_MINUTE: ("requests per minute", "requests"),
        Limit.TOKENS_PER_MINUTE: ("tokens per minute", "tokens"),
        Limit.CONCURRENT_REQUESTS: ("concurrent requests", "requests"),
    }
)


class LimiterAdmitter:
    def __init__(self, limiter: Limiter, config: Config) -> None:
        self._limiter = limiter
        self._settle_timeout = max(1.0, 4 * config.counters_timeout)

    async def admit(
        self, principal: Principal, *, model: str, reserve_tokens: int, info: RequestInfo
    ) -> _Ticket:
        try:
            result = await self._limiter.admit(
                principal, model=model, reserve_tokens=reserve_tokens
            )
        except CountersUnavailableError:
            raise Refused(
                503,
                "rate limiting is unavailable, try again",
                refusal="counters_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        headers = dict(ratelimit_headers(result))
        if result.lease is None:
            raise _refusal(result, headers)
        return _Ticket(self._limiter, result.lease, model, headers, self._settle_timeout)


def _refusal(result: AdmissionResult, headers: dict[str, str]) -> Refused:
    refusal = result.refusal
    assert refusal is not None
    scope = refusal.scope.value
    if refusal.limit in _BUDGETS:
        period = _BUDGETS[refusal.limit]
        return Refused(
            429,
            f"{period} token budget of this {scope} is exhausted",
            refusal=f"budget_{period}",
            headers=headers,
            code="budget_exhausted",
            error_type="insufficient_quota",
        )
    what, kind = _RATES[refusal.limit]
    if refusal.retry_after is None:
        # The request alone is larger than the limit: waiting will not help.
        headers.pop("retry-after", None)
        return Refused(
            429,
            f"request exceeds the {what} limit of this {scope}",
            refusal=f"limit_{refusal.limit.value}",
            headers=headers,
            code="rate_limit_exceeded",
            error_type=kind,
        )
    return Refused(
        429,
        f"{what} limit of this {scope} reached, retry later",
        refusal=f"limit_{refusal.limit.value}",
        headers=headers,
        code="rate_limit_exceeded",
        error_type=kind,
    )


class _Ticket:
    __slots__ = ("_lease", "_limiter", "_model", "_timeout", "headers", "refresh_every")

    def __init__(
        self, limiter: Limiter, lease: Lease, model: str, headers: dict[str, str], timeout: float
    ) -> None:
        self._limiter = limiter
        self._lease = lease
        self._model = model
        self.headers = headers
        self._timeout = timeout
        # The limiter's lease keeper refreshes every lease in flight, from admission on.
        self.refresh_every = math.inf

    async def refresh(self) -> None:
        with trio.move_on_after(self._timeout):
            try:
                await self._limiter.refresh(self._lease)
            except CountersUnavailableError:
                log.warning("lease refresh failed; retried at the next interval")

    async def settle(self, info: RequestInfo) -> None:
        """Release the slot and charge what was used; shielded, bounded, never raises."""
        usage = info.usage
        if usage is None:
            prompt, completion = info.prompt_estimate, 0
        else:
            prompt = usage.prompt_tokens or info.prompt_estimate
            completion = usage.completion_tokens
        with trio.CancelScope(shield=True), trio.move_on_after(self._timeout) as scope:
            try:
                await self._limiter.settle(
                    self._lease,
                    model=self._model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                )
            except CountersUnavailableError:
                log.warning(
                    "settlement failed; the lease expires on its own",
                    extra={"request_id": info.request_id},
                )
        if scope.cancelled_caught:
            log.warning("settlement timed out", extra={"request_id": info.request_id})
