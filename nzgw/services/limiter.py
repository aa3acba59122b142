"""The limiter: admission and settlement for the HTTP layer, the usage ledger aggregate, the
rebuild of budget counters from the ledger, and the usage flusher task.

Request path (docs/ARCHITECTURE.md, steps 4 and 8)::

    result = await limiter.admit(principal, model=m, reserve_tokens=n)  # CountersUnavailableError
    if not result.admitted: 429 with ratelimit_headers(result)
    ... forward (the lease keeper refreshes the lease from admission on, first byte or not) ...
    with trio.CancelScope(shield=True):                      # also when the client left
        await limiter.settle(lease, model=m, prompt_tokens=p, completion_tokens=c)

Rebuild: when a tenant's budget counters are missing (Redis restarted empty, fresh process), the
Counters answer `SeedNeeded`; the limiter reads the tenant's ledger totals, adds this process's
settled usage not yet flushed, and seeds the counters under a new epoch (atomically: if another
process seeded first, its seed stands). No request of that tenant is admitted before.

What a rebuild cannot know: usage that *other* processes settled while the counters were empty
and had not flushed to the ledger before the seed (at most one flush interval of theirs); it is
in the ledger, not in the live counters. This process's own usage is always counted exactly once:
see `_TenantGate`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from functools import partial
from typing import Protocol

import attrs
import trio

from nzgw.core.limits import (
    AdmissionRequest,
    AdmissionResult,
    EffectiveLimits,
    Lease,
    Periods,
    budget_zone,
    epoch_ms,
    periods_at,
)
from nzgw.core.models import Principal
from nzgw.ports import (
    BudgetSeed,
    Counters,
    CountersUnavailableError,
    SeedNeeded,
    StoreError,
    UsageBatch,
    UsageRow,
    UsageTotals,
    utc_now,
)
from nzgw.services.spool import Spool, flush_or_spool, spool_at_shutdown

log = logging.getLogger("nzgw.limiter")

_FINAL_RETRY_INTERVAL = 0.5  # seconds between attempts of the last flush at shutdown


class UsageLedger(Protocol):
    """The part of the Store the limiter uses (the Store port has both methods)."""

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None: ...

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]: ...


_UsageKey = tuple[date, int, int, str]  # day, tenant, key, model


def new_batch_id() -> str:
    return secrets.token_hex(12)


@attrs.define
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refusals: int = 0


class _TenantGate:
    """Orders this process's settlements of one tenant around its seeding of that tenant.

    The hazard: a seed counts this process's unflushed usage from `_pending`; a settlement adds
    to `_pending` and then tells the counters. Were both to count one settlement (the seed read
    it, and the settlement's counters call landed after the seed) it would be charged twice; were
    neither (the settlement's call landed on the empty counters and was skipped, and the seed
    read `_pending` before the settlement wrote it) it would be lost. So: while a seed runs, new
    settlements wait for it (then they are not in the seed and land on the seeded counters), and
    the seed first waits for the settlements already under way (then they are in the seed and
    landed before it, where the empty counters skipped them).
    """

    __slots__ = ("attempts", "generation", "idle", "lock", "seeding", "settling")

    def __init__(self) -> None:
        self.lock = trio.Lock()  # one seed per tenant at a time in this process
        self.generation = 0  # seeds done; a waiter that sees it move need not seed again
        self.attempts = 0  # seeds tried; moved without `generation`: the last one failed
        self.seeding: trio.Event | None = None  # set when the running seed is over
        self.settling = 0  # settlements between their `_pending` write and their counters call
        self.idle: trio.Event | None = None  # set when `settling` drops to 0

    def busy(self) -> bool:
        """A settlement is between its usage record and its counters call, or a seed runs."""
        return self.settling > 0 or self.seeding is not None


class Limiter:
    """Admission and settlement against the Counters port; the in-memory usage aggregate.

    `now` gives wall-clock time (aware); budget periods are calendar days and months of it in
    `timezone`. Leases expire `lease_ttl` seconds after admission or the last refresh.
    """

    def __init__(
        self,
        counters: Counters,
        ledger: UsageLedger,
        *,
        timezone: str = "UTC",
        lease_ttl: float = 60.0,
        seed_timeout: float = 5.0,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._counters = counters
        self._ledger = ledger
        self._zone = budget_zone(timezone)
        self._lease_ttl_ms = round(lease_ttl * 1000)
        self._seed_timeout = seed_timeout
        self._now = now
        self._periods: Periods | None = None
        self._pending: dict[_UsageKey, _Usage] = {}
        # Sealed batches not written yet (a flush failed), oldest first; kept until written.
        self._unflushed: list[UsageBatch] = []
        self._ledger_lock = trio.Lock()  # a flush's rows are in neither place while it runs
        self._gates: dict[int, _TenantGate] = {}
        # Leases admitted and not yet settled: the requests in flight (`run_lease_keeper`).
        self._live: dict[str, Lease] = {}
        self._reclaimed_tokens = 0
        # The limits of the last principal seen per key (`_limits`): the authenticator hands
        # out the same Principal object until the key or its tenant changes.
        self._limits: dict[int, tuple[Principal, EffectiveLimits]] = {}

    @property
    def lease_ttl(self) -> float:
        return self._lease_ttl_ms / 1000

    @property
    def reclaimed_tokens(self) -> int:
        """Tokens this process's admissions took back from leases that expired unsettled: the
        drift between the budget counters and the ledger that was corrected (a metric)."""
        return self._reclaimed_tokens

    @property
    def leases_in_flight(self) -> int:
        return len(self._live)

    @property
    def pending_rows(self) -> int:
        """Usage aggregates settled but not yet written to the ledger (a metrics backlog)."""
        return len(self._pending) + sum(len(b.rows) for b in self._unflushed)

    def _clock(self) -> tuple[int, Periods]:
        now = self._now()
        now_ms = epoch_ms(now)
        periods = self._periods
        if periods is None or not periods.contains(now_ms):
            periods = self._periods = periods_at(now, self._zone)
        return now_ms, periods

    def _gate(self, tenant_id: int) -> _TenantGate:
        gate = self._gates.get(tenant_id)
        if gate is None:
            gate = self._gates[tenant_id] = _TenantGate()
        return gate

    # --- request path

    async def admit(
        self, principal: Principal, *, model: str, reserve_tokens: int
    ) -> AdmissionResult:
        """Check every limit of the key and its tenant and reserve `reserve_tokens`, atomically.

        Raises `CountersUnavailableError` when the counters (or, for a needed rebuild, the
        ledger) do not answer in time: the request must then be refused (503). A refusal is
        recorded in the usage ledger aggregate. Cancellation: the counters call runs to its end
        (shielded in the adapter) and its result is returned; the cancellation arrives at the
        caller's next checkpoint, so enter the `try` whose `finally` settles right after this
        returns. A cancellation while a rebuild reads the ledger raises it here, nothing held.
        """
        limits = self._limits_of(principal)
        tenant_id = principal.tenant.id
        for _attempt in range(3):
            now_ms, periods = self._clock()
            request = AdmissionRequest(
                tenant_id=tenant_id,
                key_id=principal.key.id,
                lease_id=secrets.token_hex(8),
                reserve_tokens=max(reserve_tokens, 0),
                now_ms=now_ms,
                lease_ttl_ms=self._lease_ttl_ms,
                periods=periods,
                limits=limits,
            )
            outcome = await self._counters.admit(request)
            if isinstance(outcome, SeedNeeded):
                await self._seed(tenant_id)
                continue
            self._reclaimed_tokens += outcome.reclaimed_tokens
            if outcome.refusal is not None:
                self._usage(periods.day, tenant_id, principal.key.id, model).refusals += 1
            elif outcome.lease is not None:
                self._live[outcome.lease.id] = outcome.lease
            return outcome
        raise CountersUnavailableError(f"budget counters of tenant {tenant_id} not rebuilt")

    def _limits_of(self, principal: Principal) -> EffectiveLimits:
        """`EffectiveLimits.of(principal)`, computed once per Principal object (frozen: a
        changed key or tenant is a new object, so the identity check cannot serve stale
        limits). One entry per key."""
        cached = self._limits.get(principal.key.id)
        if cached is not None and cached[0] is principal:
            return cached[1]
        limits = EffectiveLimits.of(principal)
        self._limits[principal.key.id] = (principal, limits)
        return limits

    async def refresh(self, lease: Lease) -> bool:
        """Extend the lease; False if it had expired (its slot may be taken by now)."""
        now_ms, _ = self._clock()
        return await self._counters.refresh(lease, now_ms=now_ms)

    async def run_lease_keeper(
        self,
        *,
        concurrency: int = 16,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh every lease in flight every third of the lease ttl until cancelled: from
        admission on, also while a request waits for its first byte. A lease whose process
        died is refreshed by nobody and expires one ttl later; its reservation is then taken
        back (the Counters port). A failed refresh is logged and retried at the next tick."""
        task_status.started()
        limit = trio.CapacityLimiter(concurrency)
        while True:
            await trio.sleep(self._lease_ttl_ms / 3000)
            failed = 0

            async def one(lease: Lease) -> None:
                nonlocal failed
                async with limit:
                    if lease.id not in self._live:
                        return  # settled meanwhile
                    try:
                        await self.refresh(lease)
                    except CountersUnavailableError:
                        failed += 1

            async with trio.open_nursery() as nursery:
                for lease in list(self._live.values()):
                    nursery.start_soon(one, lease)
            if failed:
                log.warning("lease refresh failed for %s leases; retried next tick", failed)

    async def settle(
        self, lease: Lease, *, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Release the lease, replace its reservation by the real tokens, record the usage.

        Call it exactly once per lease, shielded (also when the client left). The usage goes
        into the ledger aggregate before the counters call (also if cancelled before it), so it
        is durable even if that call fails; that failure is logged, not raised: the lease then
        expires by itself and its reservation stays charged until the period ends. While this
        process rebuilds the tenant's counters, it waits for the rebuild (see `_TenantGate`).
        """
        self._live.pop(lease.id, None)
        gate = self._gate(lease.tenant_id)
        tokens = max(prompt_tokens, 0) + max(completion_tokens, 0)
        try:
            while gate.seeding is not None:
                await gate.seeding.wait()
        finally:
            # Recorded even if cancelled while waiting: the ledger must have it.
            usage = self._usage(lease.periods.day, lease.tenant_id, lease.key_id, model)
            usage.requests += 1
            usage.prompt_tokens += max(prompt_tokens, 0)
            usage.completion_tokens += max(completion_tokens, 0)
        # No checkpoint between the write above and this count (see _TenantGate).
        gate.settling += 1
        try:
            now_ms, _ = self._clock()
            await self._counters.settle(lease, tokens=tokens, now_ms=now_ms)
        except CountersUnavailableError as exc:
            log.warning("settlement of lease %s failed: %s", lease.id, exc)
        finally:
            gate.settling -= 1
            if gate.settling == 0 and gate.idle is not None:
                gate.idle.set()

    # --- rebuild

    async def _seed(self, tenant_id: int) -> None:
        gate = self._gate(tenant_id)
        generation, attempts = gate.generation, gate.attempts
        async with gate.lock:
            if gate.generation != generation:
                return  # seeded by another task of ours while we waited: admit again
            if gate.attempts != attempts:
                # The attempt we waited for failed: fail now, do not queue up behind a ledger
                # that just did not answer (each waiter would take seed_timeout in turn).
                raise CountersUnavailableError(f"budget counters of tenant {tenant_id} missing")
            gate.attempts += 1
            done = gate.seeding = trio.Event()
            try:
                while gate.settling:
                    gate.idle = trio.Event()
                    await gate.idle.wait()
                gate.idle = None
                await self._seed_now(tenant_id)
                gate.generation += 1
            finally:
                gate.seeding = None
                done.set()

    async def _seed_now(self, tenant_id: int) -> None:
        now_ms, periods = self._clock()
        with trio.move_on_after(self._seed_timeout) as deadline:
            try:
                tenant, keys = await self._charged(tenant_id, periods)
            except StoreError as exc:
                raise CountersUnavailableError(f"usage ledger: {exc}") from exc
        if deadline.cancelled_caught:
            raise CountersUnavailableError("usage ledger: no answer in time for a rebuild")
        seed = BudgetSeed(tenant_id, secrets.token_hex(8), periods, now_ms, tenant, keys)
        if await self._counters.seed(seed):
            log.info("budget counters of tenant %s rebuilt from the ledger", tenant_id)

    async def _charged(
        self, tenant_id: int, periods: Periods
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        """What the tenant and its keys have used: the ledger and this process's usage not
        written to it yet, read together (no flush lands in between). Raises `StoreError`."""
        async with self._ledger_lock:
            tenant, keys = await self._ledger.usage_totals(
                tenant_id, day=periods.day, month_start=periods.month_start
            )
            return self._add_pending(tenant_id, periods, tenant, keys)

    def clock(self) -> tuple[int, Periods]:
        """Now (epoch ms) and the budget periods around it."""
        return self._clock()

    async def charged_for_reconciliation(
        self, tenant_id: int, periods: Periods
    ) -> tuple[UsageTotals, dict[int, UsageTotals]] | None:
        """`_charged`, or None while one of this process's settlements of the tenant is
        between its usage record and its counters call, or a rebuild runs: the counters may
        not show what the aggregate does yet, and a correction would count it twice (the
        reconciliation's compare-and-set cannot see a settlement that lands after it)."""
        gate = self._gate(tenant_id)
        if gate.busy():
            return None
        charged = await self._charged(tenant_id, periods)
        # Checked again right after the aggregate was read (no checkpoint in between).
        return None if gate.busy() else charged

    def _add_pending(
        self,
        tenant_id: int,
        periods: Periods,
        tenant: UsageTotals,
        keys: dict[int, UsageTotals],
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        keys = dict(keys)
        unflushed = [
            (row.day, row.tenant_id, row.key_id, row.prompt_tokens + row.completion_tokens)
            for batch in self._unflushed
            for row in batch.rows
        ]
        pending = [
            (day, row_tenant, key_id, usage.prompt_tokens + usage.completion_tokens)
            for (day, row_tenant, key_id, _model), usage in self._pending.items()
        ]
        for day, row_tenant, key_id, tokens in unflushed + pending:
            if row_tenant != tenant_id:
                continue
            extra = _totals(day, periods, tokens)
            tenant = _plus(tenant, extra)
            keys[key_id] = _plus(keys.get(key_id, UsageTotals()), extra)
        return tenant, keys

    # --- usage ledger aggregate

    def _usage(self, day: date, tenant_id: int, key_id: int, model: str) -> _Usage:
        key = (day, tenant_id, key_id, model)
        usage = self._pending.get(key)
        if usage is None:
            usage = self._pending[key] = _Usage()
        return usage

    def drain_usage(self) -> list[UsageRow]:
        """Take all unwritten usage out (one row per day, tenant, key, model), merged."""
        for batch in self._unflushed:
            self.restore_usage(batch.rows)
        self._unflushed = []
        return self._drain_pending()

    def _drain_pending(self) -> list[UsageRow]:
        pending, self._pending = self._pending, {}
        return [
            UsageRow(
                day=day,
                tenant_id=tenant_id,
                key_id=key_id,
                model=model,
                requests=u.requests,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                refusals=u.refusals,
            )
            for (day, tenant_id, key_id, model), u in pending.items()
        ]

    def restore_usage(self, rows: Iterable[UsageRow]) -> None:
        """Put drained rows back (their write failed); they merge with what came since."""
        for row in rows:
            usage = self._usage(row.day, row.tenant_id, row.key_id, row.model)
            usage.requests += row.requests
            usage.prompt_tokens += row.prompt_tokens
            usage.completion_tokens += row.completion_tokens
            usage.refusals += row.refusals

    @property
    def unflushed_batches(self) -> list[UsageBatch]:
        """The sealed batches not written yet, oldest first."""
        return list(self._unflushed)

    def seal_usage(self) -> list[UsageBatch]:
        """Seal the usage aggregated so far into a batch (kept until written); return every
        batch not written yet, oldest first: what a spool must hold if the store is away."""
        rows = self._drain_pending()
        if rows:
            self._unflushed.append(UsageBatch(new_batch_id(), tuple(rows)))
        return self.unflushed_batches

    async def flush_usage(self, store: UsageLedger) -> int:
        """Seal the aggregated usage into a batch and write every unwritten batch to `store`'s
        ledger, oldest first; return the rows written.

        On failure (any `StoreError`, or cancellation) the batches not written stay sealed for
        the next flush (same ids: written twice, added once) and the error propagates. Holds a
        lock a rebuild also takes, so a rebuild never reads the ledger while a batch is
        landing (it counts the unwritten batches itself).
        """
        async with self._ledger_lock:
            written = 0
            for batch in self.seal_usage():
                await store.add_usage(batch.rows, batch_id=batch.id)
                self._unflushed.remove(batch)
                written += len(batch.rows)
            return written


def _totals(day: date, periods: Periods, tokens: int) -> UsageTotals:
    return UsageTotals(
        day_tokens=tokens if day == periods.day else 0,
        month_tokens=tokens if day >= periods.month_start else 0,
        lifetime_tokens=tokens,
    )


def _plus(a: UsageTotals, b: UsageTotals) -> UsageTotals:
    return UsageTotals(
        a.day_tokens + b.day_tokens,
        a.month_tokens + b.month_tokens,
        a.lifetime_tokens + b.lifetime_tokens,
    )


async def run_usage_flusher(
    limiter: Limiter,
    store: UsageLedger,
    *,
    interval: float,
    final_flush_timeout: float = 10.0,
    spool: Spool | None = None,
    spool_after: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush the limiter's usage aggregate to `store` every `interval` seconds; never returns.

    A failed flush keeps the rows for the next one; with a `spool`, a flush that fails or has
    not answered within `spool_after` seconds also appends them to it (`services/spool.py`). On
    cancellation (shutdown) a last flush runs shielded and is retried until
    `final_flush_timeout`; rows it cannot write by then go to the spool, or without one (or if
    the spool fails) are lost and counted in one error line (rows, requests, tokens): the
    ledger misses them, the live counters never did.
    """
    task_status.started()

    def unwritten() -> list[UsageBatch]:
        return limiter.unflushed_batches

    async def flush_once() -> int:
        return await flush_or_spool(
            "usage",
            partial(limiter.flush_usage, store),
            seal=limiter.seal_usage,
            unwritten=unwritten,
            spool=spool,
            spool_after=spool_after,
        )

    try:
        while True:
            await trio.sleep(interval)
            try:
                await flush_once()
            except StoreError as exc:
                log.warning("usage flush failed, rows kept for the next one: %s", exc)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(final_flush_timeout):
                while True:
                    try:
                        await flush_once()
                        break
                    except StoreError as exc:
                        log.warning("final usage flush failed, retrying: %s", exc)
                        await trio.sleep(_FINAL_RETRY_INTERVAL)
            left = limiter.seal_usage()
            lost_rows = await spool_at_shutdown("usage", left, spool)
        if lost_rows:
            lost = [row for batch in left for row in batch.rows]
            log.error(
                "final usage flush gave up after %s s: %d usage rows lost",
                final_flush_timeout,
                len(lost),
                extra={
                    "usage_rows_lost": len(lost),
                    "requests_lost": sum(row.requests for row in lost),
                    "tokens_lost": sum(row.prompt_tokens + row.completion_tokens for row in lost),
                },
            )
