"""nzgw.core.limits, sans-IO: periods, inheritance, durations, headers. Plain synchronous tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nzgw.core.limits import (
    LIMIT_ORDER,
    AdmissionResult,
    EffectiveLimits,
    Limit,
    Refusal,
    Scope,
    ScopeLimits,
    WindowUsage,
    budget_zone,
    epoch_ms,
    format_duration,
    periods_at,
    ratelimit_headers,
)
from nzgw.core.models import Budgets, Limits

from .conftest import principal

# --- periods --------------------------------------------------------------------------------------


def test_periods_in_utc() -> None:
    p = periods_at(datetime(2025, 3, 31, 23, 59, 59, tzinfo=UTC), UTC)
    assert (p.day, p.month_start, p.day_id, p.month_id) == (
        date(2025, 3, 31),
        date(2025, 3, 1),
        "2025-03-31",
        "2025-03",
    )
    assert p.day_start_ms == epoch_ms(datetime(2025, 3, 31, tzinfo=UTC))
    assert p.day_end_ms == p.month_end_ms == epoch_ms(datetime(2025, 4, 1, tzinfo=UTC))
    assert p.contains(p.day_end_ms - 1) and not p.contains(p.day_end_ms)


def test_periods_follow_the_zone_and_its_daylight_saving() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2025-03-30 has 23 hours in Berlin; 22:30 UTC on the 29th is already the 30th there
    p = periods_at(datetime(2025, 3, 29, 23, 30, tzinfo=UTC), berlin)
    assert p.day == date(2025, 3, 30)
    assert p.day_end_ms - p.day_start_ms == 23 * 3_600_000
    assert p.month_end_ms == epoch_ms(datetime(2025, 3, 31, 22, tzinfo=UTC))


def test_december_ends_in_january() -> None:
    p = periods_at(datetime(2024, 12, 15, tzinfo=UTC), budget_zone("Pacific/Auckland"))
    assert p.month_start == date(2024, 12, 1)
    assert p.month_end_ms == epoch_ms(datetime(2025, 1, 1, tzinfo=ZoneInfo("Pacific/Auckland")))


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        periods_at(datetime(2025, 1, 1), UTC)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_an_instant_is_inside_its_periods(naive: datetime) -> None:
    now = naive.replace(tzinfo=UTC)
    for zone in ("UTC", "America/Santiago", "Asia/Kolkata", "Pacific/Chatham"):
        p = periods_at(now, budget_zone(zone))
        assert p.contains(epoch_ms(now))
        assert p.day_end_ms <= p.month_end_ms
        assert p.day.day == 1 or p.month_start < p.day


# --- limits ---------------------------------------------------------------------------------------


def test_the_wire_order_of_limits_is_the_field_order() -> None:
    limits = ScopeLimits(**{limit.value: i for i, limit in enumerate(LIMIT_ORDER)})
    assert limits.as_tuple() == tuple(range(6))
    assert [limits.get(limit) for limit in LIMIT_ORDER] == list(range(6))
    assert [limit.is_budget for limit in LIMIT_ORDER] == [False] * 3 + [True] * 3


def test_key_limits_inherit_unset_values_and_the_tenant_keeps_its_own() -> None:
    who = principal(
        key_limits=Limits(requests_per_minute=5),
        key_budgets=Budgets(monthly_tokens=70),
        tenant_limits=Limits(requests_per_minute=50, concurrent_requests=4),
        tenant_budgets=Budgets(daily_tokens=10, monthly_tokens=700),
    )
    limits = EffectiveLimits.of(who)
    assert limits.key == ScopeLimits(5, None, 4, 10, 70, None)
    assert limits.tenant == ScopeLimits(50, None, 4, 10, 700, None)
    assert limits.scope(Scope.KEY) is limits.key


# --- headers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (-5, "0ms"),
        (0, "0ms"),
        (250, "250ms"),
        (1_000, "1s"),
        (1_500, "1.5s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (61_250, "1m1.25s"),
    ],
)
def test_durations_read_like_openais(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def _result(
    key: ScopeLimits,
    tenant: ScopeLimits,
    key_usage: WindowUsage,
    tenant_usage: WindowUsage,
    refusal: Refusal | None = None,
) -> AdmissionResult:
    return AdmissionResult(None, refusal, EffectiveLimits(key, tenant), key_usage, tenant_usage)


def test_no_per_minute_limits_no_headers() -> None:
    result = _result(ScopeLimits(), ScopeLimits(), WindowUsage(3, 30, 1), WindowUsage(3, 30, 1))
    assert ratelimit_headers(result) == []


def test_headers_show_the_binding_scope_per_kind() -> None:
    result = _result(
        ScopeLimits(requests_per_minute=10, tokens_per_minute=10_000),
        ScopeLimits(requests_per_minute=100, tokens_per_minute=1_000),
        WindowUsage(4, 400, 12_000),
        WindowUsage(40, 900, 500),
    )
    assert ratelimit_headers(result) == [
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "6"),
        ("x-ratelimit-reset-requests", "12s"),
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "100"),
        ("x-ratelimit-reset-tokens", "500ms"),
    ]


def test_a_refusal_adds_retry_after_in_whole_seconds_when_waiting_helps() -> None:
    usage = WindowUsage(1, 1, 1)
    for retry_ms, header in [(1, "1"), (1_000, "1"), (1_001, "2"), (86_400_000, "86400")]:
        refusal = Refusal(Limit.DAILY_TOKENS, Scope.KEY, retry_ms, 10, 10, 1)
        headers = dict(
            ratelimit_headers(_result(ScopeLimits(), ScopeLimits(), usage, usage, refusal))
        )
        assert headers == {"retry-after": header}
    never = Refusal(Limit.LIFETIME_TOKENS, Scope.TENANT, None, 10, 10, 1)
    assert ratelimit_headers(_result(ScopeLimits(), ScopeLimits(), usage, usage, never)) == []
    assert never.retry_after is None
    assert Refusal(Limit.DAILY_TOKENS, Scope.KEY, 1_500, 1, 1, 1).retry_after == 1.5


counts = st.one_of(st.none(), st.integers(0, 1000))


@given(counts, counts, st.integers(0, 2000), st.integers(0, 2000))
def test_remaining_is_never_negative_and_never_above_the_tighter_scope(
    key_rpm: int | None, tenant_rpm: int | None, key_used: int, tenant_used: int
) -> None:
    result = _result(
        ScopeLimits(requests_per_minute=key_rpm),
        ScopeLimits(requests_per_minute=tenant_rpm),
        WindowUsage(key_used, 0, 1),
        WindowUsage(tenant_used, 0, 1),
    )
    headers = dict(ratelimit_headers(result))
    if key_rpm is None and tenant_rpm is None:
        assert headers == {}
        return
    remaining = int(headers["x-ratelimit-remaining-requests"])
    assert remaining >= 0
    for limit, used in ((key_rpm, key_used), (tenant_rpm, tenant_used)):
        if limit is not None:
            assert remaining <= max(limit - used, 0)


def test_t0_plus_an_hour_is_the_month_end() -> None:
    # the contract tests lean on this
    t0 = datetime(2025, 3, 31, 23, tzinfo=UTC)
    assert periods_at(t0, UTC).month_end_ms == epoch_ms(t0 + timedelta(hours=1))
