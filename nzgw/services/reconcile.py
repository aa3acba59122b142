"""Reconciliation of the budget counters with the usage ledger (`NZGW_RECONCILE_INTERVAL`).

The budget counters (day, month, lifetime; per tenant and per key) are the live copy that
admission checks; the usage ledger is the record. They drift apart when a settlement's counters
call fails (the lease then expires and its reservation is taken back, but the tokens used are
never charged), when a process dies with usage it never flushed, or when a rebuild misses
usage other processes had not flushed yet. Every `interval` seconds this task compares them and
corrects the counters.

A round, per tenant with seeded counters:

1. snapshot the counters (`Counters.budget_snapshot`): per scope the tokens counted and, of
   those, the reservations of leases not settled yet; and the tenant's `version`, which every
   settlement and correction moves;
2. wait `quiet` seconds (two flush intervals and the store timeout): usage settled before the
   snapshot, by any process, is in the ledger by then;
3. snapshot again; a tenant whose version moved (a settlement landed meanwhile) is skipped
   this round: its ledger may lag its counters;
4. read the ledger plus this process's unwritten usage (`Limiter.charged_for_reconciliation`;
   None while one of our settlements is under way) and compute, per scope and period,
   `ledger - (counted - reserved)`;
5. apply the differences with `Counters.correct_budgets`, a compare-and-set on the version of
   the second snapshot: a settlement or another process's correction in between makes it do
   nothing. Admissions in between only add reservations, which are kept.

Busy tenants are corrected in their next quiet moment of `quiet` seconds. The corrected tokens
are counted per scope (key, tenant) and period (day, month, lifetime) in `drift`, and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio

from nzgw.core.limits import Periods
from nzgw.core.models import ApiKey, Tenant
from nzgw.ports import (
    BudgetSnapshot,
    Counters,
    CountersUnavailableError,
    StoreError,
    UsageTotals,
)
from nzgw.services.limiter import Limiter

log = logging.getLogger("nzgw.reconcile")

PERIODS = ("day", "month", "lifetime")


class TenantDirectory(Protocol):
    """The part of the Store the reconciler reads (which tenants and keys there are)."""

    async def list_tenants(self) -> list[Tenant]: ...

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]: ...


def _values(totals: UsageTotals) -> tuple[int, int, int]:
    return totals.day_tokens, totals.month_tokens, totals.lifetime_tokens


class Reconciler:
    """Compares and corrects; `drift[(scope, period)]` is the tokens corrected so far."""

    def __init__(
        self, counters: Counters, directory: TenantDirectory, limiter: Limiter, *, quiet: float
    ) -> None:
        self._counters = counters
        self._directory = directory
        self._limiter = limiter
        self._quiet = quiet
        self.drift: dict[tuple[str, ...], int] = {
            (scope, period): 0 for scope in ("key", "tenant") for period in PERIODS
        }
        self.corrections = 0
        self.rounds = 0

    async def run_once(self) -> int:
        """One round over every tenant; return the tenants corrected. Raises `StoreError` or
        `CountersUnavailableError` if the store or the counters do not answer."""
        _, periods = self._limiter.clock()
        first: dict[int, tuple[list[int], BudgetSnapshot]] = {}
        tenants = await self._directory.list_tenants()
        keys_of: dict[int, list[int]] = {}
        for key in await self._directory.list_keys():  # one listing, not one per tenant
            keys_of.setdefault(key.tenant_id, []).append(key.id)
        for tenant in tenants:
            key_ids = keys_of.get(tenant.id, [])
            snapshot = await self._counters.budget_snapshot(tenant.id, key_ids, periods)
            if snapshot is not None:
                first[tenant.id] = (key_ids, snapshot)
        await trio.sleep(self._quiet)
        corrected = 0
        for tenant_id, (key_ids, before) in first.items():
            if await self._reconcile(tenant_id, key_ids, before, periods):
                corrected += 1
        self.rounds += 1
        return corrected

    async def _reconcile(
        self, tenant_id: int, key_ids: Sequence[int], before: BudgetSnapshot, periods: Periods
    ) -> bool:
        now_ms, now_periods = self._limiter.clock()
        if now_periods != periods:
            return False  # a day went by meanwhile: next round
        snapshot = await self._counters.budget_snapshot(tenant_id, key_ids, periods)
        if snapshot is None or (snapshot.epoch, snapshot.version) != (
            before.epoch,
            before.version,
        ):
            return False  # settled meanwhile: the ledger may lag; next round
        charged = await self._limiter.charged_for_reconciliation(tenant_id, periods)
        if charged is None:
            return False
        ledger_tenant, ledger_keys = charged
        tenant_delta = ledger_tenant.minus(snapshot.tenant.settled)
        key_deltas = {
            key_id: ledger_keys.get(key_id, UsageTotals()).minus(budget.settled)
            for key_id, budget in snapshot.keys.items()
        }
        key_deltas = {k: d for k, d in key_deltas.items() if any(_values(d))}
        if not any(_values(tenant_delta)) and not key_deltas:
            return False
        if not await self._counters.correct_budgets(
            snapshot, tenant_delta, key_deltas, now_ms=now_ms
        ):
            return False
        self.corrections += 1
        for scope, deltas in (("tenant", [tenant_delta]), ("key", list(key_deltas.values()))):
            for delta in deltas:
                for period, value in zip(PERIODS, _values(delta), strict=True):
                    self.drift[(scope, period)] += abs(value)
        log.warning(
            "budget counters of tenant %s corrected to the ledger",
            tenant_id,
            extra={
                "tenant_id": tenant_id,
                "drift_day": tenant_delta.day_tokens,
                "drift_month": tenant_delta.month_tokens,
                "drift_lifetime": tenant_delta.lifetime_tokens,
                "keys_corrected": len(key_deltas),
            },
        )
        return True


async def run_reconciliation(
    reconciler: Reconciler,
    *,
    interval: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reconcile every `interval` seconds until cancelled (0: never, returns at once). A round
    that fails (store or counters away) is logged and the next one tries again."""
    task_status.started()
    if interval <= 0:
        return
    while True:
        await trio.sleep(interval)
        try:
            await reconciler.run_once()
        except (StoreError, CountersUnavailableError) as exc:
            log.warning("budget reconciliation skipped this round: %s", exc)
