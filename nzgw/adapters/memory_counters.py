"""In-process Counters for the embedded (single-process) mode.

Same semantics as the Redis adapter (`nzgw.core.limits` says which); one contract suite runs
against both. Every method does its whole check-and-reserve without an `await` in between, so
concurrent Trio tasks see it as atomic; each method still checkpoints once at the start, like any
Trio coroutine should.

Cost per call: amortised O(1) for the windows (each entry is appended once and pruned once from
a deque), O(log n) for the lease heap. Times must not go backwards much: an entry is pruned when
the entries before it have been, so a clock step back only keeps some entries a little longer
(stricter, never looser).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence

import trio

from nzgw.core.limits import (
    CHECK_ORDER,
    PERIOD_SLACK_MS,
    SCOPE_ORDER,
    WINDOW_MS,
    AdmissionRequest,
    AdmissionResult,
    Lease,
    Limit,
    Periods,
    Refusal,
    Scope,
    WindowEntry,
    WindowUsage,
    in_window,
    retry_after_ms,
)
from nzgw.ports import BudgetSeed, BudgetSnapshot, ScopeBudget, SeedNeeded, UsageTotals


class _ScopeState:
    """One key's or one tenant's counters."""

    __slots__ = (
        "by_lease",
        "day",
        "held",
        "lease_heap",
        "leases",
        "lifetime",
        "month",
        "tokens",
        "window",
    )

    def __init__(self) -> None:
        self.window: deque[WindowEntry] = deque()
        self.by_lease: dict[str, WindowEntry] = {}
        self.tokens = 0  # sum of the window's tokens
        self.leases: dict[str, int] = {}  # lease id -> expiry (ms)
        self.lease_heap: list[tuple[int, str]] = []  # (expiry, id); stale items skipped lazily
        # lease id -> (reserved, day id, month id): reservations on the budget counters below
        self.held: dict[str, tuple[int, str, str]] = {}
        self.day: dict[str, int] = {}  # day id -> tokens (settled + reserved)
        self.month: dict[str, int] = {}
        self.lifetime = 0

    def prune(self, now_ms: int, day_id: str, month_id: str) -> int:
        """Drop window entries and leases past their time; an expired lease's reservation is
        taken back off the budget counters (no live request holds it: live ones are refreshed).
        Returns the tokens taken back."""
        reclaimed = 0
        cutoff = now_ms - WINDOW_MS
        window = self.window
        while window and window[0].at_ms <= cutoff:
            entry = window.popleft()
            self.tokens -= entry.tokens
            del self.by_lease[entry.lease_id]
        heap = self.lease_heap
        while heap and heap[0][0] <= now_ms:
            expiry, lease_id = heapq.heappop(heap)
            if self.leases.get(lease_id) == expiry:
                del self.leases[lease_id]
                held = self.held.pop(lease_id, None)
                if held is not None:
                    tokens, day, month = held
                    reclaimed += tokens
                    self.add_budget(
                        day if day == day_id else None,
                        month if month == month_id else None,
                        -tokens,
                    )
        return reclaimed

    def usage(self, now_ms: int) -> WindowUsage:
        if not self.window:
            return WindowUsage(0, 0, 0)
        reset = in_window(self.window[0].at_ms + WINDOW_MS - now_ms)
        return WindowUsage(len(self.window), self.tokens, reset)

    def used(self, limit: Limit, request: AdmissionRequest) -> int:
        if limit is Limit.REQUESTS_PER_MINUTE:
            return len(self.window)
        if limit is Limit.TOKENS_PER_MINUTE:
            return self.tokens
        if limit is Limit.CONCURRENT_REQUESTS:
            return len(self.leases)
        if limit is Limit.DAILY_TOKENS:
            return self.day.get(request.periods.day_id, 0)
        if limit is Limit.MONTHLY_TOKENS:
            return self.month.get(request.periods.month_id, 0)
        return self.lifetime

    def reserve(self, request: AdmissionRequest) -> None:
        entry = WindowEntry(request.now_ms, request.lease_id, request.reserve_tokens)
        self.window.append(entry)
        self.by_lease[request.lease_id] = entry
        self.tokens += request.reserve_tokens
        expiry = request.now_ms + request.lease_ttl_ms
        self.leases[request.lease_id] = expiry
        heapq.heappush(self.lease_heap, (expiry, request.lease_id))
        periods = request.periods
        _drop_others(self.day, periods.day_id)
        _drop_others(self.month, periods.month_id)
        self.add_budget(periods.day_id, periods.month_id, request.reserve_tokens)
        self.held[request.lease_id] = (request.reserve_tokens, periods.day_id, periods.month_id)

    def budget(self, periods: Periods) -> ScopeBudget:
        day_id, month_id = periods.day_id, periods.month_id
        held = self.held.values()
        return ScopeBudget(
            counted=UsageTotals(
                self.day.get(day_id, 0), self.month.get(month_id, 0), self.lifetime
            ),
            reserved=UsageTotals(
                sum(t for t, day, _ in held if day == day_id),
                sum(t for t, _, month in held if month == month_id),
                sum(t for t, _, _ in held),
            ),
        )

    def add_budget(self, day_id: str | None, month_id: str | None, tokens: int) -> None:
        if day_id is not None:
            self.day[day_id] = self.day.get(day_id, 0) + tokens
        if month_id is not None:
            self.month[month_id] = self.month.get(month_id, 0) + tokens
        self.lifetime += tokens


def _drop_others(counters: dict[str, int], current: str) -> None:
    # Old periods are never read again; keep the dict at one or two entries.
    if len(counters) > 1 or (counters and current not in counters):
        for period in [p for p in counters if p != current]:
            del counters[period]


def _live_periods(periods: Periods, now_ms: int) -> tuple[str | None, str | None]:
    """The day and month of `periods` whose counters still exist at `now_ms` (None: expired)."""
    day_id = periods.day_id if now_ms < periods.day_end_ms + PERIOD_SLACK_MS else None
    month_id = periods.month_id if now_ms < periods.month_end_ms + PERIOD_SLACK_MS else None
    return day_id, month_id


class _TenantState:
    __slots__ = ("epoch", "keys", "scope", "version")

    def __init__(self) -> None:
        self.epoch: str | None = None  # None: budget counters not seeded yet
        self.version = 0  # settlements and corrections (the reconciliation's compare-and-set)
        self.scope = _ScopeState()
        self.keys: dict[int, _ScopeState] = {}

    def key(self, key_id: int) -> _ScopeState:
        state = self.keys.get(key_id)
        if state is None:
            state = self.keys[key_id] = _ScopeState()
        return state


class MemoryCounters:
    """The Counters port in process memory. Lost with the process; rebuilt from the ledger."""

    def __init__(self) -> None:
        self._tenants: dict[int, _TenantState] = {}

    def _tenant(self, tenant_id: int) -> _TenantState:
        state = self._tenants.get(tenant_id)
        if state is None:
            state = self._tenants[tenant_id] = _TenantState()
        return state

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()

    async def admit(self, request: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        await trio.lowlevel.checkpoint()
        # From here to the return: no await, so the check and the reservation are one step.
        tenant = self._tenant(request.tenant_id)
        if tenant.epoch is None:
            return SeedNeeded(request.tenant_id)
        now = request.now_ms
        states = {Scope.KEY: tenant.key(request.key_id), Scope.TENANT: tenant.scope}
        reclaimed = 0
        for scope, state in states.items():
            freed = state.prune(now, request.periods.day_id, request.periods.month_id)
            if scope is Scope.TENANT:
                reclaimed = freed
        refusal = self._first_refusal(request, states)
        if refusal is None:
            for state in states.values():
                state.reserve(request)
        result_lease = None
        if refusal is None:
            result_lease = Lease(
                id=request.lease_id,
                tenant_id=request.tenant_id,
                key_id=request.key_id,
                reserved=request.reserve_tokens,
                admitted_ms=now,
                ttl_ms=request.lease_ttl_ms,
                epoch=tenant.epoch,
                periods=request.periods,
            )
        return AdmissionResult(
            lease=result_lease,
            refusal=refusal,
            limits=request.limits,
            key=states[Scope.KEY].usage(now),
            tenant=states[Scope.TENANT].usage(now),
            reclaimed_tokens=reclaimed,
        )

    @staticmethod
    def _first_refusal(
        request: AdmissionRequest, states: dict[Scope, _ScopeState]
    ) -> Refusal | None:
        for limit in CHECK_ORDER:
            requested = (
                1
                if limit in (Limit.REQUESTS_PER_MINUTE, Limit.CONCURRENT_REQUESTS)
                else request.reserve_tokens
            )
            for scope in SCOPE_ORDER:
                allowed = request.limits.scope(scope).get(limit)
                if allowed is None:
                    continue
                state = states[scope]
                used = state.used(limit, request)
                if used + requested <= allowed:
                    continue
                return Refusal(
                    limit=limit,
                    scope=scope,
                    retry_after_ms=retry_after_ms(
                        limit,
                        allowed=allowed,
                        requested=requested,
                        used=used,
                        now_ms=request.now_ms,
                        periods=request.periods,
                        window=state.window,
                    ),
                    allowed=allowed,
                    used=used,
                    requested=requested,
                )
        return None

    async def settle(self, lease: Lease, *, tokens: int, now_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        tenant = self._tenant(lease.tenant_id)
        tokens = max(tokens, 0)
        delta = tokens - lease.reserved
        day_id, month_id = _live_periods(lease.periods, now_ms)
        tenant.version += 1
        for state in (tenant.key(lease.key_id), tenant.scope):
            state.leases.pop(lease.id, None)  # its heap item is skipped when it comes up
            held = state.held.pop(lease.id, None) is not None
            entry = state.by_lease.get(lease.id)
            if entry is not None:
                entry.tokens += delta
                state.tokens += delta
            if tenant.epoch is None:
                continue  # not seeded: the seed reads this usage from the ledger
            # The reservation is in these counters: correct it. Taken back (the lease expired)
            # or never in them (rebuilt after admission): charge the tokens used.
            budget_delta = delta if tenant.epoch == lease.epoch and held else tokens
            if budget_delta:
                state.add_budget(day_id, month_id, budget_delta)

    async def refresh(self, lease: Lease, *, now_ms: int) -> bool:
        await trio.lowlevel.checkpoint()
        tenant = self._tenants.get(lease.tenant_id)
        if tenant is None:
            return False
        expiry = now_ms + lease.ttl_ms
        held = False
        for state in (tenant.key(lease.key_id), tenant.scope):
            current = state.leases.get(lease.id)
            if current is None:
                continue
            if current <= now_ms:
                continue  # expired: the next admission's prune takes its reservation back
            state.leases[lease.id] = expiry
            heapq.heappush(state.lease_heap, (expiry, lease.id))
            held = True
        return held

    async def seed(self, seed: BudgetSeed) -> bool:
        await trio.lowlevel.checkpoint()
        tenant = self._tenant(seed.tenant_id)
        if tenant.epoch is not None:
            return False
        tenant.epoch = seed.epoch
        periods = seed.periods
        pairs = [(tenant.scope, seed.tenant)]
        pairs += [(tenant.key(key_id), totals) for key_id, totals in seed.keys.items()]
        for state, totals in pairs:
            state.day = {periods.day_id: totals.day_tokens}
            state.month = {periods.month_id: totals.month_tokens}
            state.lifetime = totals.lifetime_tokens
        return True

    async def budget_snapshot(
        self, tenant_id: int, key_ids: Sequence[int], periods: Periods
    ) -> BudgetSnapshot | None:
        await trio.lowlevel.checkpoint()
        tenant = self._tenants.get(tenant_id)
        if tenant is None or tenant.epoch is None:
            return None
        empty = _ScopeState()
        return BudgetSnapshot(
            tenant_id=tenant_id,
            epoch=tenant.epoch,
            version=tenant.version,
            periods=periods,
            tenant=tenant.scope.budget(periods),
            keys={k: tenant.keys.get(k, empty).budget(periods) for k in key_ids},
        )

    async def correct_budgets(
        self,
        snapshot: BudgetSnapshot,
        tenant: UsageTotals,
        keys: Mapping[int, UsageTotals],
        *,
        now_ms: int,
    ) -> bool:
        await trio.lowlevel.checkpoint()
        state = self._tenants.get(snapshot.tenant_id)
        if state is None or (state.epoch, state.version) != (snapshot.epoch, snapshot.version):
            return False
        state.version += 1
        day_id, month_id = _live_periods(snapshot.periods, now_ms)
        pairs = [(state.scope, tenant)] + [(state.key(k), delta) for k, delta in keys.items()]
        for scope, delta in pairs:
            if day_id is not None and delta.day_tokens:
                scope.day[day_id] = scope.day.get(day_id, 0) + delta.day_tokens
            if month_id is not None and delta.month_tokens:
                scope.month[month_id] = scope.month.get(month_id, 0) + delta.month_tokens
            scope.lifetime += delta.lifetime_tokens
        return True
