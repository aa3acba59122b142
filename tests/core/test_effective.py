"""What applies to a key with its tenant (`nzgw.core.effective`): status, the binding limit of
the two levels, both model lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nzgw.core.effective import LIMIT_FIELDS, Sourced, effective
from nzgw.core.models import ApiKey, Budgets, Limits, Status, Tenant

NOW = datetime(2030, 5, 6, 12, 0, tzinfo=UTC)


def key(**fields: Any) -> ApiKey:
    return ApiKey(id=1, tenant_id=1, name="ci", prefix="nz_abcdefgh", key_hash="h", **fields)


@pytest.mark.parametrize(
    ("key_status", "tenant_status", "expires", "want"),
    [
        (Status.ACTIVE, Status.ACTIVE, None, Sourced("active", None)),
        (Status.ACTIVE, Status.DISABLED, None, Sourced("disabled", "tenant")),
        (Status.DISABLED, Status.ACTIVE, None, Sourced("disabled", "key")),
        (Status.REVOKED, Status.DISABLED, None, Sourced("revoked", "key")),
        (Status.ACTIVE, Status.ACTIVE, NOW, Sourced("expired", "key")),
        (Status.ACTIVE, Status.ACTIVE, NOW + timedelta(seconds=1), Sourced("active", None)),
        (Status.ACTIVE, Status.DISABLED, NOW - timedelta(days=1), Sourced("disabled", "tenant")),
    ],
)
def test_status(
    key_status: Status, tenant_status: Status, expires: datetime | None, want: Sourced
) -> None:
    tenant = Tenant(1, "acme", status=tenant_status)
    assert effective(key(status=key_status, expires_at=expires), tenant, NOW).status == want


@pytest.mark.parametrize(
    ("own", "tenant", "want"),
    [
        (None, None, Sourced(None, None)),
        (60, None, Sourced(60, "key")),
        (None, 600, Sourced(600, "tenant")),
        (60, 600, Sourced(60, "key")),
        (6000, 600, Sourced(600, "tenant")),  # the tenant's cap also binds one key alone
        (600, 600, Sourced(600, "key")),
        (0, 600, Sourced(0, "key")),
    ],
)
def test_the_smaller_level_binds(own: int | None, tenant: int | None, want: Sourced) -> None:
    for section, name in LIMIT_FIELDS:
        if section == "limits":
            mine = key(limits=Limits(**{name: own}))
            owner = Tenant(1, "t", limits=Limits(**{name: tenant}))
        else:
            mine = key(budgets=Budgets(**{name: own}))
            owner = Tenant(1, "t", budgets=Budgets(**{name: tenant}))
        assert effective(mine, owner, NOW).limits[name] == want, name


def test_labels() -> None:
    assert Sourced(60, "key").label() == "60 (key)"
    assert Sourced(None, None).label() == "-"
    assert Sourced("active", None).label() == "active"
    tenant = Tenant(1, "t", allowed_models=("llama3*", "qwen3"))
    assert effective(key(), Tenant(1, "t"), NOW).models_label() == "*"
    assert effective(key(), tenant, NOW).models_label() == "llama3*,qwen3 (tenant)"
    both = effective(key(allowed_models=("llama3:8b",)), tenant, NOW)
    assert both.models_label() == "llama3:8b (key) & llama3*,qwen3 (tenant)"
