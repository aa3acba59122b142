"""Issue #14, finding 2: a change to one key or tenant drops only the cache entries it concerns
(the change feed), not every key at once; the "trusted while fresh < 1 s" rule stays.

Rules: the authenticator tests run on virtual time against the in-memory fake store of
`tests/test_identity.py` and feed the change feed by hand (no background task sleeps while
Argon2id runs in its thread); the HTTP test runs a real gateway with its revocation watch on the
real clock, under `fail_after` hang guards, and counts Argon2id verifications, never time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from nzgw.core.models import Status
from nzgw.http.metrics import render
from nzgw.ports import ChangeFeed, KeyChanges, TenantChanges
from nzgw.services.identity import AuthenticationError
from tests.harness import Harness, open_harness
from tests.metrics_samples import parse_exposition, sample_sum
from tests.test_audit import CHAT
from tests.test_auth_flood import caught_up
from tests.test_identity import CLIENT, Setup
from tests.test_identity import setup as setup  # the fixture


def _verifications(h: Harness) -> float:
    """Argon2id verifications the gateway ran so far, as its metrics count them."""
    samples = parse_exposition(render(h.running.gateway.metrics).decode())
    return sample_sum(samples, "nzgw_auth_events_total", event="verification")


async def observe(setup: Setup) -> None:
    position = setup.auth.feed_position
    assert position is not None
    setup.auth.changes_observed(await setup.store.changes_since(position), trio.current_time())


async def test_a_key_change_drops_only_that_key(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    a = setup.store.add(setup.hasher, tenant_id=1)
    b = setup.store.add(setup.hasher, tenant_id=1)
    c = setup.store.add(setup.hasher, tenant_id=2)
    setup.auth.changes_observed(ChangeFeed(setup.store.epoch, None), trio.current_time())
    for key in (a, b, c):
        await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 3

    setup.store.set_key(a[:11], status=Status.REVOKED)
    setup.store.record_change(1, setup.store.keys[a[:11]].key.id)
    await observe(setup)
    for key in (b, c):
        await setup.auth.authenticate(key, CLIENT)  # still cached: no Argon2id
    assert setup.events["verification"] == 3
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(a, CLIENT)
    assert setup.events["verification"] == 4

    # A tenant change drops every key of that tenant, and only those.
    setup.store.record_change(2, None)
    await observe(setup)
    await setup.auth.authenticate(b, CLIENT)
    assert setup.events["verification"] == 4
    await setup.auth.authenticate(c, CLIENT)
    assert setup.events["verification"] == 5


async def test_when_the_feed_cannot_tell_everything_is_dropped(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    a = setup.store.add(setup.hasher)
    setup.auth.changes_observed(ChangeFeed(setup.store.epoch, None), trio.current_time())
    await setup.auth.authenticate(a, CLIENT)
    setup.store.epoch += 1  # a bump without its feed row (pruned, or older than the feed)
    await observe(setup)
    await setup.auth.authenticate(a, CLIENT)
    assert setup.events["verification"] == 2


async def test_a_verification_racing_a_change_caches_only_if_the_change_is_elsewhere(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    a = setup.store.add(setup.hasher, tenant_id=1)
    other = setup.store.keys[setup.store.add(setup.hasher, tenant_id=1)[:11]].key.id
    a_id = setup.store.keys[a[:11]].key.id
    setup.auth.changes_observed(ChangeFeed(setup.store.epoch, None), trio.current_time())
    for changed, cached in ((other, True), (a_id, False)):
        setup.auth.invalidate()
        verifications = setup.events["verification"]
        setup.store.gate = trio.Event()
        # No fail_after here: on the autojumping clock it would fire while Argon2id runs in
        # its thread (the fake store does no I/O: nothing here can hang on the outside).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(setup.auth.authenticate, a, CLIENT)
            await trio.testing.wait_all_tasks_blocked()  # in find_key, before Argon2id
            setup.store.record_change(1, changed)
            await observe(setup)
            setup.store.gate.set()
        setup.store.gate = None
        await setup.auth.authenticate(a, CLIENT)
        assert setup.events["verification"] == verifications + (1 if cached else 2)


async def test_over_http_revoking_one_key_leaves_the_others_cached(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        store = h.running.store
        with trio.fail_after(60):
            keys = [await h.new_key(name=f"k{n}") for n in range(5)]
            await caught_up(h)
            for key in keys:
                answer = await h.client.post("/api/chat", json=CHAT, headers=_bearer(key))
                assert answer.status_code == 200
            verifications = _verifications(h)
            await store.update_key(keys[0][:11], KeyChanges(status=Status.REVOKED))
            await store.update_tenant("acme", TenantChanges(name="acme"))  # a no-op rename
            await caught_up(h)
            refused = await h.client.post("/api/chat", json=CHAT, headers=_bearer(keys[0]))
            assert refused.status_code == 401
            # The rename was a tenant change: its keys were dropped too, and verified again.
            after_tenant = _verifications(h)
            assert after_tenant == verifications + 1
            other = await h.new_key(tenant="beta", name="elsewhere")
            await caught_up(h)
            await h.client.post("/api/chat", json=CHAT, headers=_bearer(other))
            before = _verifications(h)
            await store.update_key(keys[1][:11], KeyChanges(status=Status.DISABLED))
            await caught_up(h)
            assert await _status(h, other) == 200
            assert _verifications(h) == before  # another tenant's key stayed cached
            for key in keys[2:]:
                assert await _status(h, key) == 200


async def _status(h: Harness, key: str) -> int:
    return (await h.client.post("/api/chat", json=CHAT, headers=_bearer(key))).status_code


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
