"""A deliberately naive reference model of the Counters port, for the property tests.

No pruning, no running sums, no heaps: it keeps every request ever admitted and recomputes each
answer from the whole history, straight from the rules in `nzgw.core.limits`' docstring.
"""

from __future__ import annotations

import attrs

from nzgw.core.limits import (
    CONCURRENCY_RETRY_MS,
    PERIOD_SLACK_MS,
    TPM_RETRY_SCAN,
    WINDOW_MS,
    AdmissionRequest,
    AdmissionResult,
    Lease,
    Limit,
    Periods,
    Refusal,
    Scope,
    WindowUsage,
)
from nzgw.ports import BudgetSeed, SeedNeeded

_CHECKS = [
    Limit.LIFETIME_TOKENS,
    Limit.MONTHLY_TOKENS,
    Limit.DAILY_TOKENS,
    Limit.TOKENS_PER_MINUTE,
    Limit.REQUESTS_PER_MINUTE,
    Limit.CONCURRENT_REQUESTS,
]


@attrs.define
class _Request:
    tenant_id: int
    key_id: int
    lease_id: str
    at_ms: int
    tokens: int
    expires_ms: int | None  # None: released
    day_id: str = ""
    month_id: str = ""
    reserved: int = 0
    # Its reservation is still on the key's / the tenant's budget counters (not settled, and not
    # taken back after the lease expired).
    held: dict[str, bool] = attrs.Factory(lambda: {"key": True, "tenant": True})


@attrs.define
class Model:
    requests: list[_Request] = attrs.Factory(list)
    epochs: dict[int, str | None] = attrs.Factory(dict)
    # (tenant, key or None for the tenant scope, "d"/"m"/"l", period id) -> tokens
    budgets: dict[tuple[int, int | None, str, str], int] = attrs.Factory(dict)

    def restart(self) -> None:
        """Everything is lost, as when Redis restarts empty."""
        self.requests.clear()
        self.epochs.clear()
        self.budgets.clear()

    def _mine(self, tenant_id: int, key_id: int | None) -> list[_Request]:
        return [
            r
            for r in self.requests
            if r.tenant_id == tenant_id and (key_id is None or r.key_id == key_id)
        ]

    def _window(self, tenant_id: int, key_id: int | None, now: int) -> list[_Request]:
        return sorted(
            (r for r in self._mine(tenant_id, key_id) if r.at_ms > now - WINDOW_MS),
            key=lambda r: r.at_ms,
        )

    def _usage(self, tenant_id: int, key_id: int | None, now: int) -> WindowUsage:
        window = self._window(tenant_id, key_id, now)
        if not window:
            return WindowUsage()
        return WindowUsage(
            len(window), sum(r.tokens for r in window), window[0].at_ms + WINDOW_MS - now
        )

    def _budget(self, tenant_id: int, key_id: int | None, kind: str, period: str) -> int:
        return self.budgets.get((tenant_id, key_id, kind, period), 0)

    def _add(self, tenant_id: int, key_id: int | None, kind: str, period: str, n: int) -> None:
        k = (tenant_id, key_id, kind, period)
        self.budgets[k] = self.budgets.get(k, 0) + n

    def admit(self, req: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        epoch = self.epochs.get(req.tenant_id)
        if epoch is None:
            return SeedNeeded(req.tenant_id)
        now, p = req.now_ms, req.periods
        reclaimed = self._expire(req.tenant_id, req.key_id, now, p)
        for kind in _CHECKS:
            for scope in (Scope.KEY, Scope.TENANT):
                allowed = req.limits.scope(scope).get(kind)
                if allowed is None:
                    continue
                key_id = req.key_id if scope is Scope.KEY else None
                window = self._window(req.tenant_id, key_id, now)
                need = (
                    1
                    if kind in (Limit.REQUESTS_PER_MINUTE, Limit.CONCURRENT_REQUESTS)
                    else req.reserve_tokens
                )
                used = {
                    Limit.REQUESTS_PER_MINUTE: len(window),
                    Limit.TOKENS_PER_MINUTE: sum(r.tokens for r in window),
                    Limit.CONCURRENT_REQUESTS: sum(
                        1
                        for r in self._mine(req.tenant_id, key_id)
                        if r.expires_ms is not None and r.expires_ms > now
                    ),
                    Limit.DAILY_TOKENS: self._budget(req.tenant_id, key_id, "d", p.day_id),
                    Limit.MONTHLY_TOKENS: self._budget(req.tenant_id, key_id, "m", p.month_id),
                    Limit.LIFETIME_TOKENS: self._budget(req.tenant_id, key_id, "l", ""),
                }[kind]
                if used + need <= allowed:
                    continue
                retry: int | None
                if kind is Limit.REQUESTS_PER_MINUTE:
                    retry = window[used - allowed].at_ms + WINDOW_MS - now if allowed > 0 else None
                elif kind is Limit.TOKENS_PER_MINUTE:
                    retry = None if need > allowed else WINDOW_MS
                    if retry is not None:
                        freed = 0
                        for r in window[:TPM_RETRY_SCAN]:
                            freed += r.tokens
                            if used - freed + need <= allowed:
                                retry = r.at_ms + WINDOW_MS - now
                                break
                elif kind is Limit.CONCURRENT_REQUESTS:
                    retry = CONCURRENCY_RETRY_MS
                elif kind is Limit.DAILY_TOKENS:
                    retry = p.day_end_ms - now
                elif kind is Limit.MONTHLY_TOKENS:
                    retry = p.month_end_ms - now
                else:
                    retry = None
                return AdmissionResult(
                    None,
                    Refusal(kind, scope, retry, allowed, used, need),
                    req.limits,
                    self._usage(req.tenant_id, req.key_id, now),
                    self._usage(req.tenant_id, None, now),
                    reclaimed,
                )
        self.requests.append(
            _Request(
                req.tenant_id,
                req.key_id,
                req.lease_id,
                now,
                req.reserve_tokens,
                now + req.lease_ttl_ms,
                p.day_id,
                p.month_id,
                req.reserve_tokens,
            )
        )
        for key_id in (req.key_id, None):
            self._add(req.tenant_id, key_id, "d", p.day_id, req.reserve_tokens)
            self._add(req.tenant_id, key_id, "m", p.month_id, req.reserve_tokens)
            self._add(req.tenant_id, key_id, "l", "", req.reserve_tokens)
        lease = Lease(
            req.lease_id,
            req.tenant_id,
            req.key_id,
            req.reserve_tokens,
            now,
            req.lease_ttl_ms,
            epoch,
            p,
        )
        return AdmissionResult(
            lease,
            None,
            req.limits,
            self._usage(req.tenant_id, req.key_id, now),
            self._usage(req.tenant_id, None, now),
            reclaimed,
        )

    def _expire(self, tenant_id: int, key_id: int, now: int, p: Periods) -> int:
        """An expired lease's reservation is taken back off each scope an admission looks at;
        returns the tokens taken back off the tenant scope."""
        reclaimed = 0
        for r in self.requests:
            if r.tenant_id != tenant_id or r.expires_ms is None or r.expires_ms > now:
                continue
            for scope, scope_key in (("key", r.key_id), ("tenant", None)):
                if not r.held[scope] or (scope == "key" and r.key_id != key_id):
                    continue
                r.held[scope] = False
                if r.day_id == p.day_id:
                    self._add(tenant_id, scope_key, "d", r.day_id, -r.reserved)
                if r.month_id == p.month_id:
                    self._add(tenant_id, scope_key, "m", r.month_id, -r.reserved)
                self._add(tenant_id, scope_key, "l", "", -r.reserved)
                if scope == "tenant":
                    reclaimed += r.reserved
        return reclaimed

    def settle(self, lease: Lease, tokens: int, now: int) -> None:
        held = {"key": False, "tenant": False}
        for r in self.requests:
            if r.lease_id == lease.id:
                r.expires_ms = None
                r.tokens = tokens
                held, r.held = r.held, {"key": False, "tenant": False}
        epoch = self.epochs.get(lease.tenant_id)
        if epoch is None:
            return
        p = lease.periods
        for key_id, scope in ((lease.key_id, "key"), (None, "tenant")):
            delta = tokens - lease.reserved if epoch == lease.epoch and held[scope] else tokens
            if now < p.day_end_ms + PERIOD_SLACK_MS:
                self._add(lease.tenant_id, key_id, "d", p.day_id, delta)
            if now < p.month_end_ms + PERIOD_SLACK_MS:
                self._add(lease.tenant_id, key_id, "m", p.month_id, delta)
            self._add(lease.tenant_id, key_id, "l", "", delta)

    def refresh(self, lease: Lease, now: int) -> bool:
        for r in self.requests:
            if r.lease_id == lease.id and r.expires_ms is not None and r.expires_ms > now:
                r.expires_ms = now + lease.ttl_ms
                return True
        return False

    def seed(self, seed: BudgetSeed) -> bool:
        if self.epochs.get(seed.tenant_id) is not None:
            return False
        self.epochs[seed.tenant_id] = seed.epoch
        p = seed.periods
        for key_id, totals in [(None, seed.tenant), *seed.keys.items()]:
            t = seed.tenant_id
            self.budgets[(t, key_id, "d", p.day_id)] = totals.day_tokens
            self.budgets[(t, key_id, "m", p.month_id)] = totals.month_tokens
            self.budgets[(t, key_id, "l", "")] = totals.lifetime_tokens
        return True
