"""Revocation across gateway processes, on the real stores.

Each "process" is its own `Authenticator` with its own store connection and its own
`run_revocation_watch`, on the same database. The change is made through a third connection,
as `nzgw revoke-key` would. Real time (not MockClock): the bound is wall-clock behaviour.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import trio

from nzgw.adapters.stores import open_store
from nzgw.config import Argon2Params, test_config
from nzgw.core.keys import generate_key
from nzgw.core.models import Status
from nzgw.ports import KeyChanges, NewKey, Store, TenantChanges
from nzgw.services.identity import (
    AuthenticationError,
    Authenticator,
    KeyHasher,
    run_revocation_watch,
)
from tests.test_identity import counting

FAST_ARGON2 = Argon2Params(time_cost=1, memory_cost_kib=64, parallelism=1)
CONFIG = test_config(argon2=FAST_ARGON2, revocation_poll_interval=0.5)
CLIENT = "192.0.2.10"


async def _refused_within(
    url: str, revoke: Callable[[Store, str], Awaitable[None]], unique: str
) -> float:
    """Seconds from `revoke` returning until the second process refuses its cached key."""
    async with open_store(url) as admin, open_store(url) as first, open_store(url) as second:
        await admin.migrate()
        tenant = await admin.create_tenant(f"rev-{unique}")
        full_key, prefix = generate_key()
        key_hash = KeyHasher(FAST_ARGON2).hash(full_key)
        await admin.create_key(NewKey(tenant.id, "k", prefix, key_hash))

        events: collections.Counter[str] = collections.Counter()  # the second process's
        gateways = [
            Authenticator.from_config(first, CONFIG),
            Authenticator.from_config(second, CONFIG, events=counting(events)),
        ]
        async with trio.open_nursery() as nursery:
            for auth, s in zip(gateways, (first, second), strict=True):
                await nursery.start(
                    lambda task_status, a=auth, st=s: run_revocation_watch(
                        st, a, interval=CONFIG.revocation_poll_interval, task_status=task_status
                    )
                )
            for auth in gateways:
                await auth.authenticate(full_key, CLIENT)
            second_auth = gateways[1]
            hits = events["cache_hit"]
            await second_auth.authenticate(full_key, CLIENT)
            assert events["cache_hit"] == hits + 1, "the second process had it cached"

            await revoke(admin, prefix)
            revoked_at = trio.current_time()
            while True:
                try:
                    await second_auth.authenticate(full_key, CLIENT)
                except AuthenticationError:
                    break
                assert trio.current_time() - revoked_at < 2.0, "still accepted after 2 s"
                await trio.sleep(0.01)
            elapsed = trio.current_time() - revoked_at
            nursery.cancel_scope.cancel()
        return elapsed


async def test_a_revoked_key_stops_working_within_one_second_on_another_process(
    store_url: str, unique: str
) -> None:
    async def revoke(admin: Store, prefix: str) -> None:
        await admin.update_key(prefix, KeyChanges(status=Status.REVOKED))

    assert await _refused_within(store_url, revoke, unique) < 1.0


async def test_a_disabled_tenant_stops_working_within_one_second_on_another_process(
    store_url: str, unique: str
) -> None:
    async def disable(admin: Store, prefix: str) -> None:
        found = await admin.find_key(prefix)
        assert found is not None
        await admin.update_tenant(found.tenant.id, TenantChanges(status=Status.DISABLED))

    assert await _refused_within(store_url, disable, unique) < 1.0
