"""The ports: Trio-flavoured interfaces that `http` and `services` use, adapters implement.

Every method is a Trio coroutine; none takes a timeout (callers wrap calls in
`trio.fail_after` / `move_on_after`). Adapters translate their library's exceptions into the
errors below and nothing above the adapters catches a library exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Protocol

import attrs

from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Status, Tenant


class StoreError(Exception):
    """The store failed (unreachable, timed out, or refused the statement)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached."""


class NotFoundError(StoreError):
    """The named tenant or key does not exist."""


class ConflictError(StoreError):
    """A unique name or prefix is taken already."""


class CountersUnavailableError(Exception):
    """The counter store could not answer: the request must be refused (fail closed)."""


# --- Store: tenants, keys, usage ledger -----------------------------------------------------------


@attrs.frozen
class TenantChanges:
    """Fields to change on a tenant; `None` leaves a field as it is."""

    name: str | None = None
    status: Status | None = None
    limits: Limits | None = None
    budgets: Budgets | None = None
    allowed_models: tuple[str, ...] | None = None


@attrs.frozen
class KeyChanges:
    """Fields to change on a key; `None` leaves a field as it is."""

    name: str | None = None
    status: Status | None = None
    limits: Limits | None = None
    budgets: Budgets | None = None
    allowed_models: tuple[str, ...] | None = None
    log_prompts: bool | None = None
    prompt_ttl_seconds: int | None = None
    expires_at: datetime | None = None
    key_hash: str | None = None  # rehash-on-verify when Argon2 parameters changed


@attrs.frozen
class NewKey:
    tenant_id: int
    name: str
    prefix: str
    key_hash: str
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    allowed_models: tuple[str, ...] = ()
    log_prompts: bool = False
    prompt_ttl_seconds: int | None = None
    expires_at: datetime | None = None


@attrs.frozen
class UsageRow:
    """Settled usage aggregated per (day, tenant, key, model); added to the ledger."""

    day: date  # calendar day in the budget time zone
    tenant_id: int
    key_id: int
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    refusals: int = 0


@attrs.frozen
class UsageTotals:
    """Tokens charged so far, for rebuilding budget counters: (day, month, lifetime)."""

    day_tokens: int = 0
    month_tokens: int = 0
    lifetime_tokens: int = 0


class Store(Protocol):
    async def ping(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations under a lock; return the names applied now."""
        ...

    async def create_tenant(
        self,
        name: str,
        *,
        limits: Limits = ...,
        budgets: Budgets = ...,
        allowed_models: tuple[str, ...] = ...,
    ) -> Tenant: ...

    async def get_tenant(self, name_or_id: str | int) -> Tenant: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, name_or_id: str | int, changes: TenantChanges) -> Tenant: ...

    async def create_key(self, new: NewKey) -> ApiKey: ...

    async def find_key(self, prefix: str) -> Principal | None:
        """The key with this prefix and its tenant, or None."""
        ...

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]: ...

    async def update_key(self, prefix: str, changes: KeyChanges) -> ApiKey: ...

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        """Record last-used times (batched, off the request path)."""
        ...

    async def revocation_epoch(self) -> int:
        """A number that grows whenever a key or tenant changes (revoke, disable, limits)."""
        ...

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add rows to the ledger (upsert-add per day, tenant, key, model), atomically."""
        ...

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        """Ledger totals of one tenant and of each of its keys (by key id)."""
        ...
