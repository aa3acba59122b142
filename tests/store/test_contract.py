"""The Store contract: the same tests against SQLite and the real PostgreSQL.

Rules: every test goes through the `Store` port only; names are made unique with `unique`
(the PostgreSQL database is shared by the session); timestamps are compared as aware UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import trio

from nzgw.core.models import Budgets, Limits, Status
from nzgw.ports import (
    ChangeFeed,
    ConflictError,
    KeyChanges,
    NewKey,
    NotFoundError,
    Store,
    TenantChanges,
    UsageRow,
    UsageTotals,
)


def _prefix(unique: str, n: int = 0) -> str:
    return f"nz_{unique[:6]}{n:02d}"


async def _tenant_and_key(store: Store, unique: str) -> tuple[int, int, str]:
    tenant = await store.create_tenant(f"t-{unique}")
    key = await store.create_key(NewKey(tenant.id, "k", _prefix(unique), "hash"))
    return tenant.id, key.id, key.prefix


# --- basics and migrations ----------------------------------------------------------------------


async def test_ping_and_migrate_is_idempotent(store: Store) -> None:
    await store.ping()
    assert await store.migrate() == []
    assert await store.pending_migrations() == []


# --- tenants ------------------------------------------------------------------------------------


async def test_create_and_get_tenant_by_name_and_id(store: Store, unique: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    created = await store.create_tenant(
        f"acme-{unique}",
        limits=Limits(requests_per_minute=60, tokens_per_minute=10_000),
        budgets=Budgets(daily_tokens=1_000_000, lifetime_tokens=2**40),
        allowed_models=("llama3*", "qwen3"),
    )
    assert created.name == f"acme-{unique}"
    assert created.status is Status.ACTIVE
    assert created.limits == Limits(requests_per_minute=60, tokens_per_minute=10_000)
    assert created.budgets == Budgets(daily_tokens=1_000_000, lifetime_tokens=2**40)
    assert created.allowed_models == ("llama3*", "qwen3")
    assert created.created_at is not None and created.created_at.tzinfo is not None
    assert before < created.created_at < datetime.now(UTC) + timedelta(seconds=5)
    assert await store.get_tenant(created.name) == created
    assert await store.get_tenant(created.id) == created


async def test_tenant_defaults(store: Store, unique: str) -> None:
    created = await store.create_tenant(f"plain-{unique}")
    assert created.limits == Limits()
    assert created.budgets == Budgets()
    assert created.allowed_models == ()
    assert created.weight == 1


async def test_tenant_weight_is_stored_and_changed(store: Store, unique: str) -> None:
    created = await store.create_tenant(f"heavy-{unique}", weight=4)
    assert created.weight == 4
    assert (await store.get_tenant(created.id)).weight == 4
    updated = await store.update_tenant(created.id, TenantChanges(weight=9))
    assert updated.weight == 9
    assert (await store.update_tenant(created.id, TenantChanges(name=f"h-{unique}"))).weight == 9
    assert [t.weight for t in await store.list_tenants() if t.id == created.id] == [9]


async def test_duplicate_tenant_name_conflicts(store: Store, unique: str) -> None:
    await store.create_tenant(f"dup-{unique}")
    with pytest.raises(ConflictError):
        await store.create_tenant(f"dup-{unique}")


async def test_unknown_tenant_is_not_found(store: Store, unique: str) -> None:
    with pytest.raises(NotFoundError):
        await store.get_tenant(f"nobody-{unique}")
    with pytest.raises(NotFoundError):
        await store.get_tenant(2**62)
    with pytest.raises(NotFoundError):
        await store.update_tenant(f"nobody-{unique}", TenantChanges(status=Status.DISABLED))


async def test_list_tenants_in_id_order(store: Store, unique: str) -> None:
    a = await store.create_tenant(f"a-{unique}")
    b = await store.create_tenant(f"b-{unique}")
    listed = await store.list_tenants()
    assert [t for t in listed if t.id in {a.id, b.id}] == [a, b]
    assert [t.id for t in listed] == sorted(t.id for t in listed)


async def test_update_tenant_fields(store: Store, unique: str) -> None:
    tenant = await store.create_tenant(f"u-{unique}", limits=Limits(requests_per_minute=1))
    updated = await store.update_tenant(
        tenant.name,
        TenantChanges(
            name=f"u2-{unique}",
            status=Status.DISABLED,
            limits=Limits(concurrent_requests=3),
            budgets=Budgets(monthly_tokens=5),
            allowed_models=("m*",),
        ),
    )
    assert updated.id == tenant.id
    assert updated.name == f"u2-{unique}"
    assert updated.status is Status.DISABLED
    assert updated.limits == Limits(concurrent_requests=3)
    assert updated.budgets == Budgets(monthly_tokens=5)
    assert updated.allowed_models == ("m*",)
    assert updated.created_at == tenant.created_at
    assert await store.get_tenant(tenant.id) == updated
    # Nothing to change: the tenant as it is.
    assert await store.update_tenant(tenant.id, TenantChanges()) == updated


async def test_rename_tenant_onto_a_taken_name_conflicts(store: Store, unique: str) -> None:
    await store.create_tenant(f"x-{unique}")
    other = await store.create_tenant(f"y-{unique}")
    with pytest.raises(ConflictError):
        await store.update_tenant(other.id, TenantChanges(name=f"x-{unique}"))
    assert (await store.get_tenant(other.id)).name == f"y-{unique}"


async def test_a_tenant_cannot_be_revoked(store: Store, unique: str) -> None:
    tenant = await store.create_tenant(f"r-{unique}")
    with pytest.raises(ValueError):
        await store.update_tenant(tenant.id, TenantChanges(status=Status.REVOKED))


# --- keys ---------------------------------------------------------------------------------------


async def test_create_key_round_trips_every_field(store: Store, unique: str) -> None:
    tenant = await store.create_tenant(f"k-{unique}")
    expires = datetime(2031, 2, 3, 4, 5, 6, 789_000, tzinfo=UTC)
    new = NewKey(
        tenant_id=tenant.id,
        name="ci bot",
        prefix=_prefix(unique),
        key_hash="$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        limits=Limits(requests_per_minute=5, tokens_per_minute=None, concurrent_requests=2),
        budgets=Budgets(daily_tokens=100),
        allowed_models=("llama3",),
        log_prompts=True,
        prompt_ttl_seconds=7 * 86400,
        expires_at=expires,
    )
    key = await store.create_key(new)
    assert (key.tenant_id, key.name, key.prefix, key.key_hash) == (
        tenant.id,
        "ci bot",
        new.prefix,
        new.key_hash,
    )
    assert key.status is Status.ACTIVE
    assert key.limits == new.limits
    assert key.budgets == new.budgets
    assert key.allowed_models == ("llama3",)
    assert key.log_prompts is True
    assert key.prompt_ttl_seconds == 7 * 86400
    assert key.expires_at == expires
    assert key.last_used_at is None
    assert key.created_at is not None and key.created_at.tzinfo is not None

    found = await store.find_key(new.prefix)
    assert found is not None
    assert found.key == key
    assert found.tenant == tenant


async def test_find_unknown_prefix_is_none(store: Store, unique: str) -> None:
    assert await store.find_key(_prefix(unique, 99)) is None


async def test_create_key_for_unknown_tenant_is_not_found(store: Store, unique: str) -> None:
    with pytest.raises(NotFoundError):
        await store.create_key(NewKey(2**62, "k", _prefix(unique), "h"))


async def test_duplicate_prefix_conflicts(store: Store, unique: str) -> None:
    tenant = await store.create_tenant(f"p-{unique}")
    await store.create_key(NewKey(tenant.id, "a", _prefix(unique), "h"))
    with pytest.raises(ConflictError):
        await store.create_key(NewKey(tenant.id, "b", _prefix(unique), "h"))


async def test_list_keys_all_and_per_tenant(store: Store, unique: str) -> None:
    t1 = await store.create_tenant(f"l1-{unique}")
    t2 = await store.create_tenant(f"l2-{unique}")
    k1 = await store.create_key(NewKey(t1.id, "a", _prefix(unique, 1), "h"))
    k2 = await store.create_key(NewKey(t2.id, "b", _prefix(unique, 2), "h"))
    k3 = await store.create_key(NewKey(t1.id, "c", _prefix(unique, 3), "h"))
    assert await store.list_keys(t1.name) == [k1, k3]
    assert await store.list_keys(t1.id) == [k1, k3]
    assert await store.list_keys(t2.id) == [k2]
    everything = await store.list_keys()
    assert [k for k in everything if k.id in {k1.id, k2.id, k3.id}] == [k1, k2, k3]
    with pytest.raises(NotFoundError):
        await store.list_keys(f"nobody-{unique}")


async def test_update_key_fields(store: Store, unique: str) -> None:
    tenant_id, _, prefix = await _tenant_and_key(store, unique)
    when = datetime(2030, 1, 1, tzinfo=UTC)
    updated = await store.update_key(
        prefix,
        KeyChanges(
            name="renamed",
            status=Status.DISABLED,
            limits=Limits(tokens_per_minute=7),
            budgets=Budgets(lifetime_tokens=9),
            allowed_models=("a", "b*"),
            log_prompts=True,
            prompt_ttl_seconds=3600,
            expires_at=when,
        ),
    )
    assert updated.tenant_id == tenant_id
    assert updated.name == "renamed"
    assert updated.status is Status.DISABLED
    assert updated.limits == Limits(tokens_per_minute=7)
    assert updated.budgets == Budgets(lifetime_tokens=9)
    assert updated.allowed_models == ("a", "b*")
    assert updated.log_prompts is True
    assert updated.prompt_ttl_seconds == 3600
    assert updated.expires_at == when
    found = await store.find_key(prefix)
    assert found is not None and found.key == updated

    cleared = await store.update_key(
        prefix, KeyChanges(status=Status.ACTIVE, clear_expires_at=True, clear_prompt_ttl=True)
    )
    assert cleared.status is Status.ACTIVE
    assert cleared.expires_at is None
    assert cleared.prompt_ttl_seconds is None
    assert cleared.name == "renamed"  # untouched
    assert await store.update_key(prefix, KeyChanges()) == cleared


async def test_update_unknown_key_is_not_found(store: Store, unique: str) -> None:
    with pytest.raises(NotFoundError):
        await store.update_key(_prefix(unique, 98), KeyChanges(status=Status.REVOKED))


async def test_revoked_is_final(store: Store, unique: str) -> None:
    _, _, prefix = await _tenant_and_key(store, unique)
    revoked = await store.update_key(prefix, KeyChanges(status=Status.REVOKED))
    assert revoked.status is Status.REVOKED
    # Revoking again is a no-op; anything else is refused.
    assert await store.update_key(prefix, KeyChanges(status=Status.REVOKED)) == revoked
    for changes in (
        KeyChanges(status=Status.ACTIVE),
        KeyChanges(name="x"),
        KeyChanges(key_hash="other"),
        KeyChanges(limits=Limits(requests_per_minute=1)),
    ):
        with pytest.raises(ConflictError):
            await store.update_key(prefix, changes)
    found = await store.find_key(prefix)
    assert found is not None and found.key == revoked


async def test_touch_keys_only_moves_forward(store: Store, unique: str) -> None:
    _, key_id, prefix = await _tenant_and_key(store, unique)
    t1 = datetime(2030, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    t0 = t1 - timedelta(hours=1)
    await store.touch_keys({key_id: t1, 2**62: t1})  # an unknown id is ignored
    await store.touch_keys({key_id: t0})
    await store.touch_keys({})
    found = await store.find_key(prefix)
    assert found is not None and found.key.last_used_at == t1


# --- revocation epoch ---------------------------------------------------------------------------


async def test_every_key_and_tenant_change_bumps_the_epoch(store: Store, unique: str) -> None:
    async def bumps(change: object) -> bool:
        before = await store.revocation_epoch()
        await change  # type: ignore[misc]
        return await store.revocation_epoch() > before

    tenant = await store.create_tenant(f"e-{unique}")
    assert await bumps(store.create_key(NewKey(tenant.id, "k", _prefix(unique), "h")))
    assert await bumps(store.update_key(_prefix(unique), KeyChanges(name="k2")))
    assert await bumps(store.update_tenant(tenant.id, TenantChanges(status=Status.DISABLED)))
    assert await bumps(store.update_tenant(tenant.id, TenantChanges(limits=Limits(1, 2, 3))))
    assert await bumps(store.update_key(_prefix(unique), KeyChanges(status=Status.REVOKED)))
    assert await bumps(store.create_tenant(f"e2-{unique}"))


async def test_rehash_and_touch_do_not_bump_the_epoch(store: Store, unique: str) -> None:
    _, key_id, prefix = await _tenant_and_key(store, unique)
    before = await store.revocation_epoch()
    await store.update_key(prefix, KeyChanges(key_hash="rehashed"))
    await store.touch_keys({key_id: datetime.now(UTC)})
    assert await store.revocation_epoch() == before
    found = await store.find_key(prefix)
    assert found is not None and found.key.key_hash == "rehashed"


async def test_epoch_seen_from_a_second_connection(
    store_url: str, store: Store, unique: str
) -> None:
    from nzgw.adapters.stores import open_store

    async with open_store(store_url) as other:
        before = await other.revocation_epoch()
        await store.create_tenant(f"s-{unique}")
        assert await other.revocation_epoch() > before


# --- change feed (targeted revocation) --------------------------------------------------------


async def test_the_change_feed_says_what_changed(store: Store, unique: str) -> None:
    start = await store.revocation_epoch()
    tenant = await store.create_tenant(f"f-{unique}")
    key = await store.create_key(NewKey(tenant.id, "k", _prefix(unique), "h"))
    await store.update_key(key.prefix, KeyChanges(name="k2"))
    await store.update_key(key.prefix, KeyChanges(key_hash="rehashed"))  # not a change of access
    await store.update_tenant(tenant.id, TenantChanges(status=Status.DISABLED))
    await store.update_key(key.prefix, KeyChanges(status=Status.REVOKED))
    feed = await store.changes_since(start)
    assert feed.epoch == await store.revocation_epoch()
    assert feed.changes is not None
    assert [c.seq for c in feed.changes] == list(range(start + 1, feed.epoch + 1))
    mine = [(c.tenant_id, c.key_id) for c in feed.changes if c.tenant_id == tenant.id]
    assert mine == [
        (tenant.id, None),
        (tenant.id, key.id),
        (tenant.id, key.id),
        (tenant.id, None),
        (tenant.id, key.id),
    ]
    assert await store.changes_since(feed.epoch) == ChangeFeed(feed.epoch, ())


async def test_the_change_feed_cannot_tell_beyond_its_limit_or_backwards(
    store: Store, unique: str
) -> None:
    start = await store.revocation_epoch()
    for n in range(3):
        await store.create_tenant(f"l{n}-{unique}")
    epoch = await store.revocation_epoch()
    assert (await store.changes_since(start, limit=2)) == ChangeFeed(epoch, None)
    assert (await store.changes_since(epoch - 2, limit=2)).changes is not None
    assert (await store.changes_since(epoch + 5)) == ChangeFeed(epoch, None)


async def test_concurrent_writers_leave_no_gap_in_the_feed(
    store_url: str, store: Store, unique: str
) -> None:
    from nzgw.adapters.stores import open_store

    start = await store.revocation_epoch()
    async with open_store(store_url) as other:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(10):
                    target = store if n % 2 else other
                    nursery.start_soon(target.create_tenant, f"c{n}-{unique}")
        feed = await other.changes_since(start)
    assert feed.changes is not None and len(feed.changes) == feed.epoch - start >= 10


def test_a_gap_in_the_feed_means_everything_changed() -> None:
    from nzgw.adapters.sql import change_feed

    assert change_feed(10, 100, [(13, 11, 1, None), (13, 13, 1, 7)]) == ChangeFeed(13, None)
    assert change_feed(10, 100, [(10, None, None, None)]) == ChangeFeed(10, ())


# --- usage ledger -------------------------------------------------------------------------------


async def test_add_usage_adds_up_per_day_key_and_model(store: Store, unique: str) -> None:
    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    other_key = await store.create_key(NewKey(tenant_id, "k2", _prefix(unique, 1), "h"))
    d1, d2, prev_month = date(2031, 3, 14), date(2031, 3, 15), date(2031, 2, 27)
    await store.add_usage(
        [
            UsageRow(d1, tenant_id, key_id, "llama3:latest", 1, 10, 20),
            UsageRow(d1, tenant_id, key_id, "llama3:latest", 2, 1, 2, refusals=1),
            UsageRow(d2, tenant_id, key_id, "qwen3:8b", 1, 100, 200),
            UsageRow(d2, tenant_id, other_key.id, "llama3:latest", 1, 1000, 0),
            UsageRow(prev_month, tenant_id, key_id, "llama3:latest", 1, 5, 5),
        ]
    )
    await store.add_usage([UsageRow(d2, tenant_id, key_id, "qwen3:8b", 1, 1, 1)])
    await store.add_usage([])

    tenant, per_key = await store.usage_totals(tenant_id, day=d2, month_start=date(2031, 3, 1))
    assert per_key == {
        key_id: UsageTotals(day_tokens=302, month_tokens=335, lifetime_tokens=345),
        other_key.id: UsageTotals(day_tokens=1000, month_tokens=1000, lifetime_tokens=1000),
    }
    assert tenant == UsageTotals(day_tokens=1302, month_tokens=1335, lifetime_tokens=1345)


async def test_usage_totals_of_a_tenant_without_usage(store: Store, unique: str) -> None:
    tenant_id, _, _ = await _tenant_and_key(store, unique)
    assert await store.usage_totals(tenant_id, day=date.today(), month_start=date.today()) == (
        UsageTotals(),
        {},
    )


async def test_add_usage_is_atomic(store: Store, unique: str) -> None:
    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    day = date(2031, 4, 1)
    with pytest.raises(NotFoundError):  # the second row refers to a key that does not exist
        await store.add_usage(
            [
                UsageRow(day, tenant_id, key_id, "m", 1, 1, 1),
                UsageRow(day, tenant_id, 2**62, "m", 1, 1, 1),
            ]
        )
    assert await store.usage_totals(tenant_id, day=day, month_start=day) == (UsageTotals(), {})


async def test_a_usage_batch_id_is_added_once(store: Store, unique: str) -> None:
    """A retried flush whose first attempt did commit, or a spool replayed at the next start,
    writes a batch again: the ledger counts it once; another id is another batch."""
    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    day = date(2031, 4, 2)
    rows = [UsageRow(day, tenant_id, key_id, "m", 2, 10, 5)]
    batch_id = f"b-{unique}"
    await store.add_usage(rows, batch_id=batch_id)
    await store.add_usage(rows, batch_id=batch_id)
    tenant, _ = await store.usage_totals(tenant_id, day=day, month_start=day)
    assert tenant.lifetime_tokens == 15
    await store.add_usage(rows, batch_id=f"c-{unique}")
    await store.add_usage(rows)  # no id: always added
    tenant, _ = await store.usage_totals(tenant_id, day=day, month_start=day)
    assert tenant.lifetime_tokens == 45


async def test_a_failed_usage_batch_leaves_its_id_free(store: Store, unique: str) -> None:
    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    day = date(2031, 4, 3)
    batch_id = f"f-{unique}"
    with pytest.raises(NotFoundError):
        await store.add_usage([UsageRow(day, tenant_id, 2**62, "m", 1, 1, 1)], batch_id=batch_id)
    await store.add_usage([UsageRow(day, tenant_id, key_id, "m", 1, 1, 1)], batch_id=batch_id)
    tenant, _ = await store.usage_totals(tenant_id, day=day, month_start=day)
    assert tenant.lifetime_tokens == 2


async def test_concurrent_usage_adds_are_not_lost(
    store_url: str, store: Store, unique: str
) -> None:
    from nzgw.adapters.stores import open_store

    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    day = date(2031, 5, 1)
    row = UsageRow(day, tenant_id, key_id, "m", 1, 1, 0)

    async def writer() -> None:
        async with open_store(store_url) as own:
            for _ in range(10):
                await own.add_usage([row])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(writer)
    tenant, _ = await store.usage_totals(tenant_id, day=day, month_start=day)
    assert tenant.lifetime_tokens == 40


# --- cancellation, closing, errors at the edge --------------------------------------------------


async def test_cancelled_writes_are_all_or_nothing_and_the_store_stays_usable(
    store: Store, unique: str
) -> None:
    tenant_id, key_id, _ = await _tenant_and_key(store, unique)
    day = date(2031, 6, 1)
    batch = [UsageRow(day, tenant_id, key_id, f"m{i}", 1, 1, 0) for i in range(50)]
    for delay in (0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02):
        with trio.move_on_after(delay):
            await store.add_usage(batch)
    await store.ping()
    tenant, _ = await store.usage_totals(tenant_id, day=day, month_start=day)
    assert tenant.lifetime_tokens % 50 == 0  # whole batches only


async def test_cancelling_the_owner_closes_the_store_cleanly(store_url: str) -> None:
    from nzgw.adapters.stores import open_store

    with trio.move_on_after(0.05):
        async with open_store(store_url) as opened:
            await opened.ping()
            await trio.sleep_forever()
    async with open_store(store_url) as again:
        await again.ping()


async def test_an_unmigrated_database_raises_store_errors(empty_db_url: str) -> None:
    from nzgw.adapters.stores import open_store
    from nzgw.ports import StoreError

    async with open_store(empty_db_url) as opened:
        with pytest.raises(StoreError):
            await opened.find_key("nz_abcdefgh")
        with pytest.raises(StoreError):
            await opened.revocation_epoch()
