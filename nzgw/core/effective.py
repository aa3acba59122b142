"""What actually applies to a key: its status, limits, budgets and models after its tenant's,
and where each value comes from. Pure; used by the operator listings.

Both levels apply to every request (README, "Tenants, keys and models"): the key's own value
(an unset one inherited from the tenant) and the tenant's value for all its keys together. So
a single key can never go beyond the smaller of the two, and that is the effective value: its
source is `key` when the key's own value is the binding one, `tenant` otherwise. Models are
glob patterns on both levels and a model must pass both, so both lists are kept.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from nzgw.core.models import ApiKey, Status, Tenant

__all__ = ["LIMIT_FIELDS", "Effective", "Sourced", "effective"]

KEY = "key"
TENANT = "tenant"

# (section, field) of every limit and budget, in listing order.
LIMIT_FIELDS: tuple[tuple[str, str], ...] = (
    ("limits", "requests_per_minute"),
    ("limits", "tokens_per_minute"),
    ("limits", "concurrent_requests"),
    ("budgets", "daily_tokens"),
    ("budgets", "monthly_tokens"),
    ("budgets", "lifetime_tokens"),
)


@attrs.frozen
class Sourced:
    """A value and where it comes from: `key`, `tenant`, or None (nothing set anywhere)."""

    value: int | str | None
    source: str | None

    def label(self) -> str:
        """`60 (key)`, `600 (tenant)`, `-` when unset."""
        if self.value is None:
            return "-"
        return f"{self.value} ({self.source})" if self.source else str(self.value)


@attrs.frozen
class Effective:
    status: Sourced  # active | disabled | revoked | expired, and whose state it is
    limits: dict[str, Sourced]  # every name of LIMIT_FIELDS
    key_models: tuple[str, ...]  # empty: every model (at this level)
    tenant_models: tuple[str, ...]

    def models_label(self) -> str:
        """`*` (every model), `a,b (tenant)`, `a (key)`, or both: `a (key) & b,c (tenant)`."""
        parts = [
            f"{','.join(patterns)} ({source})"
            for patterns, source in ((self.key_models, KEY), (self.tenant_models, TENANT))
            if patterns
        ]
        return " & ".join(parts) or "*"


def _status(key: ApiKey, tenant: Tenant, now: datetime) -> Sourced:
    if key.status is Status.REVOKED:
        return Sourced(Status.REVOKED.value, KEY)
    if tenant.status is not Status.ACTIVE:
        return Sourced(tenant.status.value, TENANT)
    if key.status is not Status.ACTIVE:
        return Sourced(key.status.value, KEY)
    if key.expires_at is not None and key.expires_at <= now:
        return Sourced("expired", KEY)
    return Sourced(Status.ACTIVE.value, None)


def _binding(own: int | None, tenant: int | None) -> Sourced:
    if own is not None and (tenant is None or own <= tenant):
        return Sourced(own, KEY)
    if tenant is not None:
        return Sourced(tenant, TENANT)
    return Sourced(None, None)


def effective(key: ApiKey, tenant: Tenant, now: datetime) -> Effective:
    """What applies to `key` (owned by `tenant`) at `now`."""
    limits = {
        name: _binding(
            getattr(getattr(key, section), name), getattr(getattr(tenant, section), name)
        )
        for section, name in LIMIT_FIELDS
    }
    return Effective(
        status=_status(key, tenant, now),
        limits=limits,
        key_models=key.allowed_models,
        tenant_models=tenant.allowed_models,
    )
