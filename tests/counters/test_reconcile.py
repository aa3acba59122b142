"""Reconciliation of the budget counters with the ledger (nzgw/services/reconcile.py).

Drift in both directions, on both backends (memory and the real Redis; a real clock with a
short quiet period, because an autojump clock would also jump over Redis' replies); and, on
memory counters in virtual time, what must never happen: a correction that clobbers a
settlement landing meanwhile, or one that counts a settlement twice (the trap: a settlement
whose usage is in the aggregate while its counters call is still on its way).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from nzgw.adapters.memory_counters import MemoryCounters
from nzgw.core.models import ApiKey, Budgets, Principal, Tenant
from nzgw.ports import Counters, UsageRow, UsageTotals
from nzgw.services.limiter import Limiter
from nzgw.services.reconcile import Reconciler, run_reconciliation
from tests.harness import open_harness
from tests.metrics_samples import parse_exposition

from .conftest import T0, Backend, FakeLedger, SwappableCounters, principal

MODEL = "llama3:latest"
WHO = principal(1, 10)


@attrs.define
class Directory:
    """The tenants and keys of the tests (the Store's listing)."""

    who: Principal = WHO

    async def list_tenants(self) -> list[Tenant]:
        await trio.lowlevel.checkpoint()
        return [self.who.tenant]

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]:
        await trio.lowlevel.checkpoint()
        return [self.who.key]


async def serve(limiter: Limiter, tokens: int) -> None:
    lease = (await limiter.admit(WHO, model=MODEL, reserve_tokens=100)).lease
    assert lease is not None
    await limiter.settle(lease, model=MODEL, prompt_tokens=tokens, completion_tokens=0)


async def settled(counters: Counters, limiter: Limiter) -> tuple[UsageTotals, UsageTotals]:
    _, periods = limiter.clock()
    snapshot = await counters.budget_snapshot(1, [10], periods)
    assert snapshot is not None
    return snapshot.tenant.settled, snapshot.keys[10].settled


async def test_drift_both_ways_is_corrected_to_the_ledger(backend: Backend) -> None:
    ledger = FakeLedger()
    today = datetime.now(UTC).date()
    with trio.fail_after(60):
        async with backend.open() as counters:
            crashed = Limiter(counters, ledger)
            await serve(crashed, 25)
            crashed.drain_usage()  # the process died before its flush: the ledger lacks 25
            live = Limiter(counters, ledger)
            await serve(live, 10)
            await live.flush_usage(ledger)
            # Usage another process wrote after the counters were seeded (a rebuild missed it).
            await ledger.add_usage([UsageRow(today, 1, 10, MODEL, 1, 40, 0)])
            assert await settled(counters, live) == (UsageTotals(35, 35, 35),) * 2

            reconciler = Reconciler(counters, Directory(), live, quiet=0.05)
            assert await reconciler.run_once() == 1
            assert await settled(counters, live) == (UsageTotals(50, 50, 50),) * 2
            assert reconciler.drift[("tenant", "day")] == 15  # +40 - 25
            assert reconciler.drift[("key", "lifetime")] == 15
            assert await reconciler.run_once() == 0  # in agreement now: nothing to do
            # Admissions still see the corrected counters (a budget of 60 leaves 10).
            tight = attrs.evolve(
                WHO, tenant=attrs.evolve(WHO.tenant, budgets=Budgets(daily_tokens=60))
            )
            refused = await live.admit(tight, model=MODEL, reserve_tokens=11)
            assert refused.refusal is not None and refused.refusal.used == 50


# --- virtual time, memory counters ----------------------------------------------------------------


def virtual_now() -> datetime:
    return T0 + timedelta(seconds=trio.current_time())


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


async def test_a_settlement_landing_during_the_quiet_period_defers_the_correction(
    clock: trio.testing.MockClock,
) -> None:
    counters = SwappableCounters()
    ledger = FakeLedger()
    limiter = Limiter(counters, ledger, now=virtual_now)
    await serve(limiter, 10)
    await limiter.flush_usage(ledger)
    await ledger.add_usage([UsageRow(T0.date(), 1, 10, MODEL, 1, 40, 0)])  # drift: +40
    reconciler = Reconciler(counters, Directory(), limiter, quiet=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconciler.run_once)
        await trio.sleep(2)  # inside the quiet period: a request settles
        await serve(limiter, 3)
    assert reconciler.corrections == 0  # its snapshot was stale: nothing written
    await limiter.flush_usage(ledger)
    assert await reconciler.run_once() == 1
    assert await settled(counters.inner, limiter) == (UsageTotals(53, 53, 53),) * 2


async def test_a_settlement_under_way_is_not_counted_twice(clock: trio.testing.MockClock) -> None:
    """The trap: the settlement's usage is in the aggregate, its counters call not landed yet.
    Correcting to ledger + aggregate then would charge it twice once the call lands."""
    counters = SwappableCounters()
    ledger = FakeLedger()
    limiter = Limiter(counters, ledger, now=virtual_now)
    await serve(limiter, 10)
    counters.settle_delay = 30.0
    reconciler = Reconciler(counters, Directory(), limiter, quiet=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, limiter, 7)  # lands at 30 s
        await trio.sleep(1)
        assert await reconciler.run_once() == 0  # our own settlement is under way: not now
    assert await settled(counters.inner, limiter) == (UsageTotals(17, 17, 17),) * 2
    await limiter.flush_usage(ledger)
    assert ledger.tokens() == 17
    assert await reconciler.run_once() == 0  # counters and ledger agree: nothing to correct


async def test_the_task_runs_every_interval_and_zero_disables_it(
    clock: trio.testing.MockClock,
) -> None:
    limiter = Limiter(MemoryCounters(), FakeLedger(), now=virtual_now)
    reconciler = Reconciler(MemoryCounters(), Directory(), limiter, quiet=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_reconciliation, reconciler, interval=300))
        await trio.sleep(300 * 3 + 10)
        nursery.cancel_scope.cancel()
    assert reconciler.rounds == 3
    start = trio.current_time()
    with trio.fail_after(1):
        await run_reconciliation(reconciler, interval=0)  # returns at once
    assert trio.current_time() == start and reconciler.rounds == 3


# --- in the running gateway -----------------------------------------------------------------------


async def test_the_gateway_reconciles_every_interval(tmp_path: Path) -> None:
    """`NZGW_RECONCILE_INTERVAL`: usage the counters never saw (written to the ledger by
    another process after this one rebuilt them) is on the counters one round later."""
    chat = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "x"}]}
    with trio.fail_after(60):
        async with open_harness(tmp_path, reconcile_interval=0.3, metrics_bind="127.0.0.1:0") as h:
            answer = await h.client.post("/api/chat", json=chat, headers=h.auth)
            assert answer.status_code == 200
            (key,) = [k for k in await h.running.store.list_keys() if k.prefix in h.key]
            day = h.running.limiter.clock()[1].day
            await h.running.store.add_usage([UsageRow(day, key.tenant_id, key.id, MODEL, 1, 40, 0)])
            reconciler = h.running.reconciler
            assert reconciler is not None
            while not reconciler.corrections:  # noqa: ASYNC110 (a service task's round: polled)
                await trio.sleep(0.05)
            assert reconciler.drift[("tenant", "day")] == 40
            assert reconciler.drift[("key", "lifetime")] == 40
            assert h.running.metrics is not None
            scrape = await h.client.get(
                f"http://{h.running.metrics.host}:{h.running.metrics.port}/metrics"
            )
            samples = parse_exposition(scrape.text)
            drift = "nzgw_counters_drift_tokens_total"
            assert samples[(drift, frozenset({("scope", "tenant"), ("period", "day")}))] == 40
            assert samples[("nzgw_rows_lost_total", frozenset())] == 0
