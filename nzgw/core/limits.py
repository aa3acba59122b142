"""Limit arithmetic, sans-IO: effective limits, budget periods, admission values, headers.

The Counters port (memory and Redis adapters) decides admissions; this module holds the values
it is fed with and answers with, and the pure functions around them. Time is always passed in
(`now` as an aware datetime or as epoch milliseconds); nothing here reads a clock.

Semantics, shared by both adapters and checked by one contract suite:

- Windows: requests/min and tokens/min are a *sliding-window log* of the last `WINDOW_MS`
  milliseconds: every admitted request is one entry (admission time, tokens). A request made at
  time t counts while `now < t + WINDOW_MS`. Exact for bursts and at window edges: never more
  than the limit in any 60 s interval (no fixed-window double burst, no approximation).
  Its tokens are the reservation until settlement replaces them by the real count (the entry
  keeps its admission time; if it left the window already, nothing changes).
- Concurrency: a lease per admitted request, expiring `lease_ttl_ms` after admission or after the
  last `refresh`; settlement releases it. A crashed process's leases expire on their own.
- Budgets: tokens per calendar day and month in the configured time zone, and lifetime. The
  counters hold settled tokens plus the reservations of requests still in flight, so an admission
  needs `used + reservation <= budget`. A lease that is never settled (process crash) stays
  charged with its reservation (conservative); the ledger, the durable truth, has only real usage.
- Both scopes: key limits (the key's own, unset ones inherited from the tenant) and tenant limits
  (over the tenant's aggregate) must all pass. If any fails, nothing is reserved.
- Which refusal is reported when several fail: the first in `CHECK_ORDER` (longest wait first),
  key scope before tenant scope.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from itertools import islice
from typing import Final
from zoneinfo import ZoneInfo

import attrs

from nzgw.core.models import Budgets, Limits, Principal

WINDOW_MS: Final = 60_000
"""Length of the requests/min and tokens/min sliding windows."""

TPM_RETRY_SCAN: Final = 256
"""Oldest window entries examined to compute a tokens/min Retry-After; beyond: a whole window."""

CONCURRENCY_RETRY_MS: Final = 1_000
"""Retry-After hint for a concurrency refusal (leases end when requests end, not on a clock)."""

PERIOD_SLACK_MS: Final = 86_400_000
"""Day and month counters outlive their period by this much (late settlements still land)."""


class Limit(enum.StrEnum):
    """A kind of limit; the values match the `Limits` / `Budgets` field names."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    CONCURRENT_REQUESTS = "concurrent_requests"
    DAILY_TOKENS = "daily_tokens"
    MONTHLY_TOKENS = "monthly_tokens"
    LIFETIME_TOKENS = "lifetime_tokens"

    @property
    def is_budget(self) -> bool:
        return self in _BUDGETS


_BUDGETS = frozenset({Limit.DAILY_TOKENS, Limit.MONTHLY_TOKENS, Limit.LIFETIME_TOKENS})

LIMIT_ORDER: Final = tuple(Limit)
"""Wire order of the kinds (index = code in the Redis scripts' answers)."""

CHECK_ORDER: Final = (
    Limit.LIFETIME_TOKENS,
    Limit.MONTHLY_TOKENS,
    Limit.DAILY_TOKENS,
    Limit.TOKENS_PER_MINUTE,
    Limit.REQUESTS_PER_MINUTE,
    Limit.CONCURRENT_REQUESTS,
)
"""Order in which failed checks are reported: the one a client must wait longest for first."""


class Scope(enum.StrEnum):
    KEY = "key"
    TENANT = "tenant"


SCOPE_ORDER: Final = (Scope.KEY, Scope.TENANT)


@attrs.frozen
class ScopeLimits:
    """All six limits of one scope; `None`: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    lifetime_tokens: int | None = None

    @classmethod
    def of(cls, limits: Limits, budgets: Budgets) -> ScopeLimits:
        return cls(
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_requests,
            budgets.daily_tokens,
            budgets.monthly_tokens,
            budgets.lifetime_tokens,
        )

    def get(self, limit: Limit) -> int | None:
        value: int | None = getattr(self, limit.value)
        return value

    def as_tuple(self) -> tuple[int | None, ...]:
        """In `LIMIT_ORDER` (a test checks it)."""
        return (
            self.requests_per_minute,
            self.tokens_per_minute,
            self.concurrent_requests,
            self.daily_tokens,
            self.monthly_tokens,
            self.lifetime_tokens,
        )


@attrs.frozen
class EffectiveLimits:
    """What one admission checks: the key's limits (with inheritance) and the tenant's."""

    key: ScopeLimits
    tenant: ScopeLimits

    @classmethod
    def of(cls, principal: Principal) -> EffectiveLimits:
        return cls(
            key=ScopeLimits.of(principal.key_limits, principal.key_budgets),
            tenant=ScopeLimits.of(principal.tenant.limits, principal.tenant.budgets),
        )

    def scope(self, scope: Scope) -> ScopeLimits:
        return self.key if scope is Scope.KEY else self.tenant


# --- budget periods -------------------------------------------------------------------------------


def _day_id(periods: Periods) -> str:
    return periods.day.isoformat()


def _month_id(periods: Periods) -> str:
    return periods.month_start.isoformat()[:7]


@attrs.frozen
class Periods:
    """The calendar day and month containing one instant, in the budget time zone."""

    day: date
    month_start: date
    day_start_ms: int
    day_end_ms: int
    month_end_ms: int
    # The counters' names for the day and the month, spelt once (read several times per
    # admission and settlement).
    day_id: str = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_day_id, takes_self=True)
    )
    month_id: str = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_month_id, takes_self=True)
    )

    def contains(self, now_ms: int) -> bool:
        return self.day_start_ms <= now_ms < self.day_end_ms


@lru_cache(maxsize=16)
def budget_zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


def periods_at(now: datetime, zone: tzinfo) -> Periods:
    """The day and month around `now` (aware) in `zone`; ends are the next local midnights."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    local = now.astimezone(zone)
    day = local.date()
    month_start = day.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Periods(
        day=day,
        month_start=month_start,
        day_start_ms=_midnight_ms(day, zone),
        day_end_ms=_midnight_ms(day + timedelta(days=1), zone),
        month_end_ms=_midnight_ms(next_month, zone),
    )


def _midnight_ms(day: date, zone: tzinfo) -> int:
    return round(datetime.combine(day, time(0), tzinfo=zone).timestamp() * 1000)


def epoch_ms(now: datetime) -> int:
    return round(now.timestamp() * 1000)


# --- admission values -----------------------------------------------------------------------------


@attrs.frozen
class AdmissionRequest:
    """One check-and-reserve. `lease_id` is unique (random); times are epoch milliseconds."""

    tenant_id: int
    key_id: int
    lease_id: str
    reserve_tokens: int = attrs.field(validator=attrs.validators.ge(0))
    now_ms: int
    lease_ttl_ms: int
    periods: Periods
    limits: EffectiveLimits


@attrs.frozen
class Lease:
    """An admitted request's hold on its slot and its reservation, until settled.

    `epoch` names the budget counters that hold the reservation (they are replaced when
    rebuilt from the ledger); `periods` are the ones the reservation was charged to.
    """

    id: str
    tenant_id: int
    key_id: int
    reserved: int
    admitted_ms: int
    ttl_ms: int
    epoch: str
    periods: Periods


@attrs.frozen
class WindowUsage:
    """One scope's sliding window as seen by an admission (including it, if admitted)."""

    requests: int = 0
    tokens: int = 0
    reset_ms: int = 0  # until the oldest counted request leaves the window; 0: window empty


@attrs.frozen
class Refusal:
    """Why a request was refused: the first failing check in `CHECK_ORDER`."""

    limit: Limit
    scope: Scope
    retry_after_ms: int | None  # None: waiting does not help (lifetime budget, request too big)
    allowed: int  # the limit's value
    used: int  # its current use, reservations in flight included
    requested: int  # 1 for requests and concurrency, the reservation for tokens and budgets

    @property
    def retry_after(self) -> float | None:
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000


@attrs.frozen
class AdmissionResult:
    """The answer to an admission: a lease or a refusal, and both windows for the headers."""

    lease: Lease | None
    refusal: Refusal | None
    limits: EffectiveLimits
    key: WindowUsage
    tenant: WindowUsage
    # Tokens this admission took back off the tenant's budget counters from leases that had
    # expired unsettled (their process died): the drift between counters and ledger it fixed.
    reclaimed_tokens: int = 0

    @property
    def admitted(self) -> bool:
        return self.lease is not None

    def window(self, scope: Scope) -> WindowUsage:
        return self.key if scope is Scope.KEY else self.tenant


@attrs.define(slots=True)
class WindowEntry:
    """One admitted request in a sliding window (mutable: settlement corrects `tokens`)."""

    at_ms: int
    lease_id: str
    tokens: int


def in_window(ms: int) -> int:
    """A wait clamped to [0, window]. Callers stamp entries with their own clocks, so an entry
    can be slightly newer than a later caller's `now` (another process read its clock after
    but reached the store first); no per-minute wait is ever reported as longer than a minute."""
    return min(max(ms, 0), WINDOW_MS)


def retry_after_ms(
    limit: Limit,
    *,
    allowed: int,
    requested: int,
    used: int,
    now_ms: int,
    periods: Periods,
    window: Sequence[WindowEntry],
) -> int | None:
    """Retry-After of a failed check; `window` holds the scope's entries, oldest first.

    Requests/min: when enough entries left for one more. Tokens/min: when enough tokens left
    (scanning at most `TPM_RETRY_SCAN` entries, else one whole window); never if the request
    alone is above the limit. Budgets: until the period ends; lifetime: never.
    """
    if limit is Limit.REQUESTS_PER_MINUTE:
        if allowed <= 0:
            return None
        return in_window(window[used - allowed].at_ms + WINDOW_MS - now_ms)
    if limit is Limit.TOKENS_PER_MINUTE:
        if requested > allowed:
            return None
        freed = 0
        for entry in islice(window, TPM_RETRY_SCAN):
            freed += entry.tokens
            if used - freed + requested <= allowed:
                return in_window(entry.at_ms + WINDOW_MS - now_ms)
        return WINDOW_MS
    if limit is Limit.CONCURRENT_REQUESTS:
        return CONCURRENCY_RETRY_MS
    if limit is Limit.DAILY_TOKENS:
        return periods.day_end_ms - now_ms
    if limit is Limit.MONTHLY_TOKENS:
        return periods.month_end_ms - now_ms
    return None


# --- headers --------------------------------------------------------------------------------------


def format_duration(ms: int) -> str:
    """OpenAI's reset format: `250ms`, `1s`, `12.5s`, `1m0s`."""
    ms = max(ms, 0)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def ratelimit_headers(result: AdmissionResult) -> list[tuple[str, str]]:
    """OpenAI-style `x-ratelimit-*` headers (and `retry-after` on a refusal that has one).

    For each of requests and tokens, the binding scope is shown: of the scopes that have a
    per-minute limit, the one with the fewest remaining (the key on a tie). No limit set at
    either scope: no headers of that kind. Reset: until the oldest counted request leaves the
    window, i.e. when `remaining` next grows.
    """
    headers: list[tuple[str, str]] = []
    for limit, noun in (
        (Limit.REQUESTS_PER_MINUTE, "requests"),
        (Limit.TOKENS_PER_MINUTE, "tokens"),
    ):
        best: tuple[int, int, int] | None = None  # remaining, limit, reset
        for scope in SCOPE_ORDER:
            allowed = result.limits.scope(scope).get(limit)
            if allowed is None:
                continue
            window = result.window(scope)
            used = window.requests if limit is Limit.REQUESTS_PER_MINUTE else window.tokens
            remaining = max(allowed - used, 0)
            if best is None or remaining < best[0]:
                best = (remaining, allowed, window.reset_ms)
        if best is not None:
            headers += [
                (f"x-ratelimit-limit-{noun}", str(best[1])),
                (f"x-ratelimit-remaining-{noun}", str(best[0])),
                (f"x-ratelimit-reset-{noun}", format_duration(best[2])),
            ]
    refusal = result.refusal
    if refusal is not None and refusal.retry_after_ms is not None:
        headers.append(("retry-after", str(max(1, math.ceil(refusal.retry_after_ms / 1000)))))
    return headers
