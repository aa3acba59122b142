"""The domain values every layer shares: tenants, keys, limits, budgets. Pure attrs, no I/O."""

from __future__ import annotations

import enum
from datetime import datetime

import attrs


class Status(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"  # keys only; final


@attrs.frozen
class Limits:
    """Rate limits; `None` means "not set here" (a key then inherits its tenant's value)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None

    def inherit(self, parent: Limits) -> Limits:
        """Each unset value taken from `parent`."""
        return Limits(
            requests_per_minute=_first(self.requests_per_minute, parent.requests_per_minute),
            tokens_per_minute=_first(self.tokens_per_minute, parent.tokens_per_minute),
            concurrent_requests=_first(self.concurrent_requests, parent.concurrent_requests),
        )


@attrs.frozen
class Budgets:
    """Token budgets per calendar day, calendar month and lifetime; `None`: not set here."""

    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    lifetime_tokens: int | None = None

    def inherit(self, parent: Budgets) -> Budgets:
        return Budgets(
            daily_tokens=_first(self.daily_tokens, parent.daily_tokens),
            monthly_tokens=_first(self.monthly_tokens, parent.monthly_tokens),
            lifetime_tokens=_first(self.lifetime_tokens, parent.lifetime_tokens),
        )


def _first(own: int | None, inherited: int | None) -> int | None:
    return inherited if own is None else own


@attrs.frozen
class Tenant:
    id: int
    name: str
    status: Status = Status.ACTIVE
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    allowed_models: tuple[str, ...] = ()  # glob patterns over normalised names; empty: all
    created_at: datetime | None = None
    # keep_alive and load-time options reach the (shared) backend only when True
    allow_model_controls: bool = False
    weight: int = 1  # share of saturated backend slots relative to other tenants


@attrs.frozen
class ApiKey:
    id: int
    tenant_id: int
    name: str
    prefix: str  # public lookup id, shown in listings ("nz_" + PREFIX_LEN chars)
    key_hash: str  # Argon2id PHC string of the whole key
    status: Status = Status.ACTIVE
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    allowed_models: tuple[str, ...] = ()
    log_prompts: bool = False
    prompt_ttl_seconds: int | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    expires_at: datetime | None = None


@attrs.frozen
class Principal:
    """Who is calling: an authenticated key and its tenant, as of the last cache refresh."""

    key: ApiKey
    tenant: Tenant

    @property
    def key_limits(self) -> Limits:
        """The key's own limits, unset ones inherited from the tenant."""
        return self.key.limits.inherit(self.tenant.limits)

    @property
    def key_budgets(self) -> Budgets:
        return self.key.budgets.inherit(self.tenant.budgets)
