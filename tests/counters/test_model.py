"""Property test: random sequences of admit / settle / refresh / time advance / restart / seed
give the same answers from each backend as from the naive reference model (`model.py`).

Each example runs in its own `trio.run` (Hypothesis drives a plain function), on a fresh
Counters of the backend under test. Time is explicit (epoch ms), starting an hour before a day
and month end, so the sequences cross window, lease, day and month boundaries.
"""

from __future__ import annotations

from datetime import UTC, datetime

import attrs
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nzgw.core.limits import (
    AdmissionRequest,
    AdmissionResult,
    EffectiveLimits,
    Lease,
    Limit,
    Periods,
    Scope,
    ScopeLimits,
    epoch_ms,
    periods_at,
)
from nzgw.core.models import Budgets, Limits
from nzgw.ports import BudgetSeed, Counters, SeedNeeded, UsageTotals

from .conftest import T0, Backend, principal
from .model import Model

TENANT = 7
KEYS = (70, 71)  # 70 has limits of its own (some inherited), 71 inherits all from the tenant

# None (unlimited) half of the time, rarely 0, mostly tight enough to be reached in a sequence
small = st.one_of(st.none(), st.integers(1, 6), st.none(), st.integers(0, 3))
tokens = st.one_of(st.none(), st.integers(30, 300), st.none(), st.integers(0, 60))
limits_st = st.builds(Limits, small, tokens, small)
budget = st.one_of(st.none(), st.integers(100, 600), st.none(), st.integers(0, 80))
budgets_st = st.builds(Budgets, budget, budget, budget)
totals_st = st.builds(UsageTotals, st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))


@attrs.frozen
class Admit:
    key: int
    reserve: int


@attrs.frozen
class Settle:
    pick: int
    tokens: int


@attrs.frozen
class Refresh:
    pick: int


@attrs.frozen
class Advance:
    ms: int


@attrs.frozen
class Probe:
    limit: Limit
    scope: Scope


@attrs.frozen
class Seed:
    tenant: UsageTotals
    key: UsageTotals


@attrs.frozen
class Restart:
    reseed: Seed | None  # None: stay unseeded (admissions answer SeedNeeded) until a Seed op


admit_st = st.builds(Admit, st.sampled_from(KEYS), st.integers(0, 40))
settle_st = st.builds(Settle, st.integers(0, 20), st.integers(0, 50))
advance_st = st.builds(
    Advance,
    st.sampled_from([0, 1, 500, 7_000, 19_999, 20_000, 30_000, 59_999, 60_000, 3_600_000]),
)
ops_st = st.lists(
    st.one_of(
        *[admit_st] * 5,
        *[settle_st] * 2,
        *[advance_st] * 2,
        st.builds(Refresh, st.integers(0, 20)),
        st.builds(Probe, st.sampled_from(list(Limit)), st.sampled_from(list(Scope))),
        st.builds(Seed, totals_st, totals_st),
        st.builds(Restart, st.one_of(st.none(), *[st.builds(Seed, totals_st, totals_st)] * 3)),
    ),
    min_size=15,
    max_size=60,
)


@attrs.frozen
class Scenario:
    tenant_limits: Limits
    tenant_budgets: Budgets
    key_limits: Limits
    key_budgets: Budgets
    first_seed: Seed
    ops: list[object]


scenario_st = st.builds(
    Scenario,
    limits_st,
    budgets_st,
    limits_st,
    budgets_st,
    st.builds(Seed, totals_st, totals_st),
    ops_st,
)


def _same(got: AdmissionResult | SeedNeeded, want: AdmissionResult | SeedNeeded) -> None:
    assert got == want, f"\n got {got}\nwant {want}"
    if isinstance(got, SeedNeeded):
        event("seed needed")
    elif got.refusal is not None:
        event(f"refused: {got.refusal.scope} {got.refusal.limit}")
    else:
        event("admitted")


async def _run(backend: Backend, sc: Scenario) -> None:
    model = Model()
    who = {
        70: principal(
            TENANT,
            70,
            key_limits=sc.key_limits,
            key_budgets=sc.key_budgets,
            tenant_limits=sc.tenant_limits,
            tenant_budgets=sc.tenant_budgets,
        ),
        71: principal(TENANT, 71, tenant_limits=sc.tenant_limits, tenant_budgets=sc.tenant_budgets),
    }
    now = epoch_ms(T0)
    leases: list[Lease] = []
    serial = 0

    def periods_now() -> Periods:
        return periods_at(datetime.fromtimestamp(now / 1000, UTC), UTC)

    def request(key: int, reserve: int, limits: EffectiveLimits | None = None) -> AdmissionRequest:
        nonlocal serial
        serial += 1
        return AdmissionRequest(
            tenant_id=TENANT,
            key_id=key,
            lease_id=f"l{serial}",
            reserve_tokens=reserve,
            now_ms=now,
            lease_ttl_ms=20_000,
            periods=periods_now(),
            limits=limits or EffectiveLimits.of(who[key]),
        )

    async with backend.open() as counters:
        c: Counters = counters
        for op in [sc.first_seed, *sc.ops]:
            if isinstance(op, Admit):
                req = request(op.key, op.reserve)
                got, want = await c.admit(req), model.admit(req)
                _same(got, want)
                if isinstance(got, AdmissionResult) and got.lease is not None:
                    leases.append(got.lease)
            elif isinstance(op, Settle) and leases:
                lease = leases.pop(op.pick % len(leases))
                await c.settle(lease, tokens=op.tokens, now_ms=now)
                model.settle(lease, op.tokens, now)
            elif isinstance(op, Refresh) and leases:
                lease = leases[op.pick % len(leases)]
                assert await c.refresh(lease, now_ms=now) == model.refresh(lease, now)
            elif isinstance(op, Advance):
                now += op.ms
            elif isinstance(op, Probe):
                # a limit of 0 on just this one reveals its counter in the refusal (`used`)
                zero = ScopeLimits(**{op.limit.value: 0})
                probe = EffectiveLimits(
                    key=zero if op.scope is Scope.KEY else ScopeLimits(),
                    tenant=zero if op.scope is Scope.TENANT else ScopeLimits(),
                )
                req = request(KEYS[0], 1, probe)
                _same(await c.admit(req), model.admit(req))
            elif isinstance(op, Seed):
                seed = BudgetSeed(TENANT, f"e{serial}", periods_now(), now, op.tenant, {70: op.key})
                serial += 1
                assert await c.seed(seed) == model.seed(seed)
            elif isinstance(op, Restart):
                model.restart()
                async with backend.wipe(c) as fresh:
                    c = fresh
                if op.reseed is not None:
                    seed = BudgetSeed(
                        TENANT,
                        f"e{serial}",
                        periods_now(),
                        now,
                        op.reseed.tenant,
                        {70: op.reseed.key},
                    )
                    serial += 1
                    assert await c.seed(seed) == model.seed(seed)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=scenario_st)
def test_backend_matches_the_reference_model(backend: Backend, sc: Scenario) -> None:
    trio.run(_run, backend, sc)
