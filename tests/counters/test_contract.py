"""The Counters contract: every test runs on the memory backend and on the real Redis."""

from __future__ import annotations

import random
import secrets
from datetime import UTC, datetime, timedelta

import attrs
import trio

from nzgw.core.limits import (
    CONCURRENCY_RETRY_MS,
    AdmissionRequest,
    AdmissionResult,
    EffectiveLimits,
    Lease,
    Limit,
    Scope,
    ScopeLimits,
    WindowUsage,
    epoch_ms,
    ratelimit_headers,
)
from nzgw.core.models import Budgets, Limits, Principal
from nzgw.ports import BudgetSeed, Counters, SeedNeeded, UsageTotals

from .conftest import T0, Backend, admission, periods_of, principal

T0_MS = epoch_ms(T0)
NONE = UsageTotals()


async def seeded(c: Counters, tenant_id: int = 1, **keys: UsageTotals) -> None:
    seed = BudgetSeed(
        tenant_id,
        secrets.token_hex(4),
        periods_of(T0_MS),
        T0_MS,
        keys.pop("tenant", NONE),
        {int(k.removeprefix("k")): v for k, v in keys.items()},
    )
    assert await c.seed(seed)


async def admit(c: Counters, request: AdmissionRequest) -> AdmissionResult:
    result = await c.admit(request)
    assert isinstance(result, AdmissionResult)
    return result


async def lease_of(c: Counters, request: AdmissionRequest) -> Lease:
    result = await admit(c, request)
    assert result.lease is not None, result.refusal
    return result.lease


async def used(c: Counters, who: Principal, limit: Limit, scope: Scope, at_ms: int = 0) -> int:
    """The counter behind one limit, read through a refusal (a limit of 0 on it alone)."""
    zero = ScopeLimits(**{limit.value: 0})
    limits = EffectiveLimits(
        key=zero if scope is Scope.KEY else ScopeLimits(),
        tenant=zero if scope is Scope.TENANT else ScopeLimits(),
    )
    request = admission(who, at_ms=at_ms, reserve=1)
    result = await admit(c, attrs.evolve(request, limits=limits))
    assert result.refusal is not None and result.refusal.limit is limit
    return result.refusal.used


# --- seeding --------------------------------------------------------------------------------------


async def test_an_unseeded_tenant_is_not_admitted_and_nothing_is_reserved(
    backend: Backend,
) -> None:
    who = principal()
    async with backend.open() as c:
        assert await c.admit(admission(who)) == SeedNeeded(1)
        await seeded(c)
        assert await used(c, who, Limit.LIFETIME_TOKENS, Scope.TENANT) == 0
        assert await used(c, who, Limit.REQUESTS_PER_MINUTE, Scope.KEY) == 0


async def test_a_seed_sets_the_budget_counters_once(backend: Backend) -> None:
    who = principal(key_id=10)
    async with backend.open() as c:
        await seeded(c, tenant=UsageTotals(5, 50, 500), k10=UsageTotals(1, 10, 100))
        again = BudgetSeed(1, "other", periods_of(T0_MS), T0_MS, UsageTotals(9, 9, 9), {})
        assert not await c.seed(again)
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.TENANT) == 5
        assert await used(c, who, Limit.MONTHLY_TOKENS, Scope.TENANT) == 50
        assert await used(c, who, Limit.LIFETIME_TOKENS, Scope.TENANT) == 500
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.KEY) == 1
        assert await used(c, who, Limit.MONTHLY_TOKENS, Scope.KEY) == 10
        assert await used(c, who, Limit.LIFETIME_TOKENS, Scope.KEY) == 100
        other_key = principal(key_id=11)
        assert await used(c, other_key, Limit.LIFETIME_TOKENS, Scope.KEY) == 0


async def test_tenants_are_independent(backend: Backend) -> None:
    one, two = principal(1, 10), principal(2, 20)
    async with backend.open() as c:
        await seeded(c, 1)
        assert await c.admit(admission(two)) == SeedNeeded(2)
        await lease_of(c, admission(one, reserve=7))
        await seeded(c, 2)
        assert await used(c, two, Limit.LIFETIME_TOKENS, Scope.TENANT) == 0
        assert await used(c, one, Limit.LIFETIME_TOKENS, Scope.TENANT) == 7


# --- requests per minute --------------------------------------------------------------------------


async def test_300_concurrent_admissions_against_rpm_100_admit_exactly_100(
    backend: Backend,
) -> None:
    # two keys, so that it is the tenant's aggregate that binds
    keys = [principal(key_id=k, tenant_limits=Limits(requests_per_minute=100)) for k in (10, 11)]
    results: list[AdmissionResult] = []
    async with backend.open() as c:
        await seeded(c)

        async def one(i: int) -> None:
            results.append(await admit(c, admission(keys[i % 2], at_ms=i % 7)))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
        admitted = [r for r in results if r.admitted]
        assert len(admitted) == 100
        refusals = [r.refusal for r in results if r.refusal is not None]
        assert len(refusals) == 200
        assert all(r.limit is Limit.REQUESTS_PER_MINUTE for r in refusals)
        assert await used(c, keys[0], Limit.REQUESTS_PER_MINUTE, Scope.TENANT, at_ms=10) == 100


async def test_the_window_slides_exactly(backend: Backend) -> None:
    who = principal(key_limits=Limits(requests_per_minute=3))
    async with backend.open() as c:
        await seeded(c)
        for at in (0, 10_000, 20_000):
            await lease_of(c, admission(who, at_ms=at))
        refused = await admit(c, admission(who, at_ms=59_999))
        assert refused.refusal is not None
        assert refused.refusal.scope is Scope.KEY
        assert refused.refusal.retry_after_ms == 1  # the first leaves the window at 60 000
        assert refused.key == WindowUsage(3, 30, 1)
        # at 60 000 the first request is out: one slot, exactly
        assert (await admit(c, admission(who, at_ms=60_000))).admitted
        assert not (await admit(c, admission(who, at_ms=60_001))).admitted
        assert (await admit(c, admission(who, at_ms=70_000))).admitted


async def test_a_wait_is_never_longer_than_the_window(backend: Backend) -> None:
    """Two processes: one reads its clock later (5 ms) but reaches the store first."""
    who = principal(key_limits=Limits(requests_per_minute=1, tokens_per_minute=10))
    async with backend.open() as c:
        await seeded(c)
        await lease_of(c, admission(who, at_ms=5, reserve=10))
        late = await admit(c, admission(who, at_ms=0, reserve=10))
        assert late.refusal is not None and late.refusal.retry_after_ms is not None
        assert 0 < late.refusal.retry_after_ms <= 60_000
        assert 0 < late.key.reset_ms <= 60_000
        assert dict(ratelimit_headers(late))["retry-after"] == "60"


async def test_a_refused_request_reserves_nothing(backend: Backend) -> None:
    tenant, own = Limits(requests_per_minute=2), Limits(requests_per_minute=100)
    a = principal(key_id=10, tenant_limits=tenant, key_limits=own)
    b = principal(key_id=11, tenant_limits=tenant, key_limits=own)
    async with backend.open() as c:
        await seeded(c)
        await lease_of(c, admission(a, reserve=100))
        await lease_of(c, admission(a, reserve=100))
        for _ in range(5):
            result = await admit(c, admission(b, reserve=100))
            assert result.refusal is not None and result.refusal.scope is Scope.TENANT
        for limit in (
            Limit.REQUESTS_PER_MINUTE,
            Limit.TOKENS_PER_MINUTE,
            Limit.CONCURRENT_REQUESTS,
            Limit.DAILY_TOKENS,
            Limit.LIFETIME_TOKENS,
        ):
            assert await used(c, b, limit, Scope.KEY) == 0, limit
        assert await used(c, b, Limit.DAILY_TOKENS, Scope.TENANT) == 200
        assert await used(c, b, Limit.CONCURRENT_REQUESTS, Scope.TENANT) == 2


# --- tokens per minute ----------------------------------------------------------------------------


async def test_tokens_per_minute_reserve_then_correct(backend: Backend) -> None:
    who = principal(key_limits=Limits(tokens_per_minute=150))
    async with backend.open() as c:
        await seeded(c)
        first = await lease_of(c, admission(who, reserve=100))
        refused = await admit(c, admission(who, at_ms=1_000, reserve=100))
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.TOKENS_PER_MINUTE
        assert (refused.refusal.allowed, refused.refusal.used) == (150, 100)
        assert refused.refusal.requested == 100
        assert refused.refusal.retry_after_ms == 59_000
        await c.settle(first, tokens=20, now_ms=T0_MS + 2_000)  # real usage: 20
        second = await admit(c, admission(who, at_ms=3_000, reserve=100))
        assert second.admitted
        assert second.key.tokens == 120
        too_big = await admit(c, admission(who, at_ms=4_000, reserve=151))
        assert too_big.refusal is not None and too_big.refusal.retry_after_ms is None


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrency_leases_release_and_expire(backend: Backend) -> None:
    who = principal(tenant_limits=Limits(concurrent_requests=2))
    async with backend.open() as c:
        await seeded(c)
        a = await lease_of(c, admission(who, lease_ttl_ms=30_000))
        await lease_of(c, admission(who, lease_ttl_ms=30_000))  # never settled: its process died
        refused = await admit(c, admission(who, at_ms=1))
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.CONCURRENT_REQUESTS
        assert refused.refusal.retry_after_ms == CONCURRENCY_RETRY_MS
        await c.settle(a, tokens=5, now_ms=T0_MS + 2)
        c1 = await lease_of(c, admission(who, at_ms=3, lease_ttl_ms=30_000))
        assert not (await admit(c, admission(who, at_ms=29_999))).admitted
        # the dead one expires at 30 000; c1 at 30 003 unless refreshed
        assert await c.refresh(c1, now_ms=T0_MS + 29_000)  # now until 59 000
        assert (await admit(c, admission(who, at_ms=30_000, lease_ttl_ms=30_000))).admitted
        assert not (await admit(c, admission(who, at_ms=30_001))).admitted


async def test_an_expired_lease_is_not_revived(backend: Backend) -> None:
    who = principal(tenant_limits=Limits(concurrent_requests=1))
    async with backend.open() as c:
        await seeded(c)
        lease = await lease_of(c, admission(who, lease_ttl_ms=10_000))
        assert not await c.refresh(lease, now_ms=T0_MS + 10_000)
        assert (await admit(c, admission(who, at_ms=10_001))).admitted
        await c.settle(lease, tokens=1, now_ms=T0_MS + 10_002)  # late settlement: harmless
        assert not (await admit(c, admission(who, at_ms=10_003))).admitted


# --- budgets --------------------------------------------------------------------------------------


async def test_daily_budget_refuses_until_the_day_ends(backend: Backend) -> None:
    who = principal(key_budgets=Budgets(daily_tokens=100))
    async with backend.open() as c:
        await seeded(c, k10=UsageTotals(30, 30, 30))
        lease = await lease_of(c, admission(who, reserve=60))
        refused = await admit(c, admission(who, at_ms=1_000, reserve=20))
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.DAILY_TOKENS
        assert (refused.refusal.used, refused.refusal.allowed) == (90, 100)
        assert refused.refusal.retry_after_ms == 3_600_000 - 1_000  # T0 is 23:00
        await c.settle(lease, tokens=40, now_ms=T0_MS + 2_000)
        assert (await admit(c, admission(who, at_ms=3_000, reserve=30))).admitted
        assert not (await admit(c, admission(who, at_ms=4_000, reserve=1))).admitted
        # a new day, a new budget
        assert (await admit(c, admission(who, at_ms=3_600_000, reserve=100))).admitted


async def test_monthly_and_lifetime_budgets(backend: Backend) -> None:
    monthly = principal(key_id=10, tenant_budgets=Budgets(monthly_tokens=1000))
    lifetime = principal(key_id=10, tenant_budgets=Budgets(lifetime_tokens=1000))
    async with backend.open() as c:
        await seeded(c, tenant=UsageTotals(0, 950, 950))
        refused = await admit(c, admission(monthly, reserve=60))
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.MONTHLY_TOKENS
        assert refused.refusal.retry_after_ms == 3_600_000  # March ends at T0 + 1 h
        refused = await admit(c, admission(lifetime, reserve=60))
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.LIFETIME_TOKENS
        assert refused.refusal.retry_after_ms is None
        # April: the month is new, the lifetime is not
        assert (await admit(c, admission(monthly, at_ms=3_600_000, reserve=60))).admitted
        assert not (await admit(c, admission(lifetime, at_ms=3_600_000, reserve=60))).admitted


async def test_the_refusal_reported_is_the_longest_wait(backend: Backend) -> None:
    who = principal(
        key_limits=Limits(requests_per_minute=1),
        tenant_budgets=Budgets(daily_tokens=10),
        key_budgets=Budgets(monthly_tokens=10),
    )
    async with backend.open() as c:
        await seeded(c)
        await lease_of(c, admission(who, reserve=10))
        refused = await admit(c, admission(who, reserve=10))
        assert refused.refusal is not None
        assert (refused.refusal.limit, refused.refusal.scope) == (Limit.MONTHLY_TOKENS, Scope.KEY)


async def test_late_settlement_is_charged_to_the_admission_day(backend: Backend) -> None:
    who = principal(key_budgets=Budgets(daily_tokens=100))
    async with backend.open() as c:
        await seeded(c)
        lease = await lease_of(c, admission(who, at_ms=3_599_000, reserve=50))  # 23:59:59
        await c.settle(lease, tokens=80, now_ms=T0_MS + 3_700_000)  # after midnight
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.KEY, at_ms=3_700_001) == 0
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.KEY, at_ms=3_500_000) == 80
        assert await used(c, who, Limit.LIFETIME_TOKENS, Scope.KEY, at_ms=3_700_001) == 80


async def test_budgets_are_never_exceeded_beyond_in_flight_reservations(backend: Backend) -> None:
    budget = 2_000
    who = [
        principal(key_id=k, tenant_budgets=Budgets(daily_tokens=budget, lifetime_tokens=budget))
        for k in (10, 11, 12)
    ]
    rng = random.Random(5)
    charged = 0
    in_flight: dict[str, int] = {}
    worst = 0
    async with backend.open() as c:
        await seeded(c)

        async def client(i: int) -> None:
            nonlocal charged, worst
            for j in range(12):
                reserve = rng.randint(1, 120)
                result = await admit(c, admission(who[i % 3], at_ms=i * 100 + j, reserve=reserve))
                if result.lease is None:
                    continue
                in_flight[result.lease.id] = reserve
                # invariant at every admission: settled + reservations in flight <= budget
                worst = max(worst, charged + sum(in_flight.values()))
                assert charged + sum(in_flight.values()) <= budget
                await trio.sleep(rng.random() / 100)
                real = rng.randint(0, reserve)
                # booked before the call: while it runs the counters still hold the (larger)
                # reservation, so this bookkeeping never exceeds what the counters saw
                del in_flight[result.lease.id]
                charged += real
                await c.settle(result.lease, tokens=real, now_ms=T0_MS + 50_000)

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(client, i)
        assert charged <= budget
        assert worst > budget * 0.9  # the budget really was the binding limit
        assert await used(c, who[0], Limit.DAILY_TOKENS, Scope.TENANT, at_ms=60_000) == charged


# --- inheritance ----------------------------------------------------------------------------------


async def test_unset_key_limits_inherit_the_tenants_and_both_apply(backend: Backend) -> None:
    tenant = Limits(requests_per_minute=3)
    inherits = principal(key_id=10, tenant_limits=tenant)
    stricter = principal(key_id=11, tenant_limits=tenant, key_limits=Limits(1))
    looser = principal(key_id=12, tenant_limits=tenant, key_limits=Limits(10))
    async with backend.open() as c:
        await seeded(c)
        await lease_of(c, admission(stricter))
        refused = await admit(c, admission(stricter))
        assert refused.refusal is not None and refused.refusal.scope is Scope.KEY
        assert refused.refusal.allowed == 1
        await lease_of(c, admission(inherits))
        await lease_of(c, admission(looser))
        # the tenant's aggregate (3) binds the key that allows itself 10
        refused = await admit(c, admission(looser))
        assert refused.refusal is not None and refused.refusal.scope is Scope.TENANT
        assert refused.refusal.allowed == 3


async def test_a_key_inherits_the_tenant_budget_as_its_own(backend: Backend) -> None:
    tenant = Budgets(daily_tokens=100)
    a = principal(key_id=10, tenant_budgets=tenant)
    b = principal(key_id=11, tenant_budgets=tenant, key_budgets=Budgets(daily_tokens=500))
    async with backend.open() as c:
        await seeded(c, k10=UsageTotals(90, 90, 90), tenant=UsageTotals(90, 90, 90))
        refused = await admit(c, admission(a, reserve=20))
        assert refused.refusal is not None
        assert (refused.refusal.scope, refused.refusal.used) == (Scope.KEY, 90)
        refused = await admit(c, admission(b, reserve=20))
        assert refused.refusal is not None
        assert (refused.refusal.scope, refused.refusal.used) == (Scope.TENANT, 90)


# --- rebuilds -------------------------------------------------------------------------------------


async def test_settling_after_a_rebuild_charges_the_real_tokens(backend: Backend) -> None:
    who = principal()
    async with backend.open() as c:
        await seeded(c)
        lease = await lease_of(c, admission(who, reserve=100))
        async with backend.wipe(c) as fresh:
            # the rebuilt counters hold the ledger (say 40), not the lost reservation
            await seeded(fresh, tenant=UsageTotals(40, 40, 40), k10=UsageTotals(40, 40, 40))
            await fresh.settle(lease, tokens=30, now_ms=T0_MS + 1)
            assert await used(fresh, who, Limit.DAILY_TOKENS, Scope.TENANT) == 70
            assert await used(fresh, who, Limit.LIFETIME_TOKENS, Scope.KEY) == 70


async def test_settling_while_unseeded_leaves_the_budgets_to_the_seed(backend: Backend) -> None:
    who = principal()
    async with backend.open() as c:
        await seeded(c)
        lease = await lease_of(c, admission(who, reserve=100))
        async with backend.wipe(c) as fresh:
            await fresh.settle(lease, tokens=30, now_ms=T0_MS + 1)  # the seed will read it
            await seeded(fresh, tenant=UsageTotals(30, 30, 30))
            assert await used(fresh, who, Limit.DAILY_TOKENS, Scope.TENANT) == 30


# --- what the HTTP layer gets ---------------------------------------------------------------------


async def test_results_carry_what_the_headers_need(backend: Backend) -> None:
    who = principal(
        key_limits=Limits(requests_per_minute=2, tokens_per_minute=1000),
        tenant_limits=Limits(requests_per_minute=50, tokens_per_minute=500),
    )
    async with backend.open() as c:
        await seeded(c)
        first = await admit(c, admission(who, reserve=200))
        assert dict(ratelimit_headers(first)) == {
            "x-ratelimit-limit-requests": "2",
            "x-ratelimit-remaining-requests": "1",
            "x-ratelimit-reset-requests": "1m0s",
            "x-ratelimit-limit-tokens": "500",
            "x-ratelimit-remaining-tokens": "300",
            "x-ratelimit-reset-tokens": "1m0s",
        }
        await admit(c, admission(who, at_ms=15_500, reserve=100))
        refused = await admit(c, admission(who, at_ms=30_000, reserve=100))
        headers = dict(ratelimit_headers(refused))
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "30s"
        assert headers["x-ratelimit-remaining-tokens"] == "200"
        assert headers["retry-after"] == "30"


async def test_the_budget_time_zone_decides_the_day(backend: Backend) -> None:
    who = principal(key_budgets=Budgets(daily_tokens=100))
    # 23:00 UTC on March 31st is 01:00 on April 1st in Paris (summer time since March 30th)
    paris = "Europe/Paris"
    async with backend.open() as c:
        await seeded(c)
        lease = await lease_of(c, admission(who, reserve=100, zone=paris))
        assert lease.periods.day_id == "2025-04-01"
        refused = await admit(c, admission(who, at_ms=1, reserve=1, zone=paris))
        assert refused.refusal is not None
        # Paris midnight is 22:00 UTC on April 1st: 23 hours after T0
        assert refused.refusal.retry_after_ms == 23 * 3_600_000 - 1
        assert lease.periods.day_end_ms == epoch_ms(datetime(2025, 4, 1, 22, tzinfo=UTC))
        assert T0 + timedelta(hours=23) == datetime(2025, 4, 1, 22, tzinfo=UTC)


async def test_an_expired_unsettled_lease_gives_its_reservation_back(backend: Backend) -> None:
    """A lease nobody refreshed or settled (its process died) no longer holds budget once it
    expired; settling it later charges the tokens used, not the difference."""
    who = principal(key_budgets=Budgets(daily_tokens=1_000))
    async with backend.open() as c:
        await seeded(c)
        dead = await lease_of(c, admission(who, reserve=600, lease_ttl_ms=10_000))
        assert (await admit(c, admission(who, at_ms=5_000, reserve=600))).refusal is not None
        after = await admit(c, admission(who, at_ms=10_001, reserve=1))
        assert after.admitted and after.reclaimed_tokens == 600
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.KEY, at_ms=10_002) == 1
        await c.settle(dead, tokens=50, now_ms=T0_MS + 10_003)  # late: charged what it used
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.KEY, at_ms=10_004) == 51


# --- reconciliation: snapshot and compare-and-set correction --------------------------------------


async def test_a_snapshot_tells_settled_tokens_from_reservations(backend: Backend) -> None:
    who = principal()
    periods = periods_of(T0_MS)
    async with backend.open() as c:
        assert await c.budget_snapshot(1, [10], periods) is None  # not seeded: nothing to compare
        await seeded(c, tenant=UsageTotals(5, 50, 500), k10=UsageTotals(5, 50, 500))
        settled = await lease_of(c, admission(who, reserve=30))
        await c.settle(settled, tokens=7, now_ms=T0_MS + 10)
        await lease_of(c, admission(who, reserve=40, at_ms=20))  # in flight
        snap = await c.budget_snapshot(1, [10, 11], periods)
        assert snap is not None
        assert snap.tenant.counted == UsageTotals(52, 97, 547)
        assert snap.tenant.reserved == UsageTotals(40, 40, 40)
        assert snap.tenant.settled == UsageTotals(12, 57, 507)
        assert snap.keys[10].settled == UsageTotals(12, 57, 507)
        assert snap.keys[11].counted == NONE  # a key without counters


async def test_a_correction_applies_once_and_keeps_admissions_made_meanwhile(
    backend: Backend,
) -> None:
    who = principal()
    periods = periods_of(T0_MS)
    async with backend.open() as c:
        await seeded(c, tenant=UsageTotals(100, 100, 100), k10=UsageTotals(100, 100, 100))
        snap = await c.budget_snapshot(1, [10], periods)
        assert snap is not None
        # An admission between the read and the write: its reservation must survive.
        await lease_of(c, admission(who, reserve=9))
        minus = UsageTotals(-60, -60, -60)
        assert await c.correct_budgets(snap, minus, {10: minus}, now_ms=T0_MS + 1)
        # The same snapshot again (a second reconciler): nothing more.
        assert not await c.correct_budgets(snap, minus, {10: minus}, now_ms=T0_MS + 2)
        after = await c.budget_snapshot(1, [10], periods)
        assert after is not None and after.version != snap.version
        assert after.tenant.counted == UsageTotals(49, 49, 49)  # 100 - 60 + 9 reserved
        assert after.keys[10].reserved == UsageTotals(9, 9, 9)
        assert await used(c, who, Limit.DAILY_TOKENS, Scope.TENANT, at_ms=3) == 49


async def test_a_settlement_between_snapshot_and_correction_wins(backend: Backend) -> None:
    who = principal()
    periods = periods_of(T0_MS)
    async with backend.open() as c:
        await seeded(c, tenant=UsageTotals(100, 100, 100))
        lease = await lease_of(c, admission(who, reserve=10))
        snap = await c.budget_snapshot(1, [10], periods)
        assert snap is not None
        await c.settle(lease, tokens=4, now_ms=T0_MS + 5)
        assert not await c.correct_budgets(
            snap, UsageTotals(-100, -100, -100), {}, now_ms=T0_MS + 6
        )
        after = await c.budget_snapshot(1, [10], periods)
        assert after is not None and after.tenant.counted == UsageTotals(104, 104, 104)
