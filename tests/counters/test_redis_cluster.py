"""Redis Cluster only: counters on a cluster of the test's own (tests/redis_cluster.py) when a
slot moves and when a master dies. The contract suite runs on a cluster too (`backend`
"redis-cluster"); the three-process window test on one is in tests/test_limits_http.py.

What a client sees when a master is SIGKILLed (README "Redis Cluster"):
- with a replica: the tenants whose slots it served get 503 until the replica has taken over
  (cluster-node-timeout plus a layout refresh: a few seconds), then are admitted again; every
  other tenant is admitted throughout;
- without one: those tenants get 503 until the master is back; every other tenant is admitted.

While a tenant's slot migrates (a resharding), its admissions and settlements wait for the
migration to close and then count exactly; a call whose keys all moved follows ASK.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from nzgw.adapters.redis import RedisCounters, open_redis_counters
from nzgw.core.limits import AdmissionResult, Lease, Limit, Scope, epoch_ms
from nzgw.core.models import Limits, Principal
from nzgw.ports import BudgetSeed, CountersUnavailableError, UsageTotals
from tests.redis_cluster import OwnedCluster, key_slot, own_redis_cluster

from .conftest import COREDIS_CONNECT_LEAK, T0, admission, periods_of, principal

pytestmark = [
    pytest.mark.redis,
    COREDIS_CONNECT_LEAK,
    pytest.mark.usefixtures("collect_garbage"),
]

CALL_TIMEOUT = 0.5
HANG_GUARD = 60.0  # a bound for a whole failover, not a latency figure
PREFIX = "nzgwtest:"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OwnedCluster]:
    with own_redis_cluster(tmp_path) as owned:
        yield owned


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[OwnedCluster]:
    with own_redis_cluster(tmp_path, replicas=1) as owned:
        yield owned


def tenants_on_two_masters(cluster: OwnedCluster) -> tuple[int, int]:
    """Two tenant ids whose keys live on different masters."""
    first = 1
    owner = cluster.slot_owner(key_slot(f"{PREFIX}{{t{first}}}:seed"))
    for other in range(2, 100):
        if cluster.slot_owner(key_slot(f"{PREFIX}{{t{other}}}:seed")) != owner:
            return first, other
    raise AssertionError("every tenant on one master")


async def seed(c: RedisCounters, tenant_id: int) -> None:
    now_ms = epoch_ms(T0)
    assert await c.seed(BudgetSeed(tenant_id, "e", periods_of(now_ms), now_ms, UsageTotals(), {}))


async def seeded_and_admitted(c: RedisCounters, *tenant_ids: int) -> None:
    await c.ping()
    for tenant_id in tenant_ids:
        await seed(c, tenant_id)
        assert await admitted(c, tenant_id)


async def admitted(c: RedisCounters, tenant_id: int) -> bool:
    result = await c.admit(admission(principal(tenant_id, 10 + tenant_id)))
    assert isinstance(result, AdmissionResult), result
    return result.admitted


async def until_admitted(c: RedisCounters, tenant_id: int) -> int:
    """Admit until it succeeds; the number of refusals (503) before it did."""
    refusals = 0
    while True:
        try:
            if await admitted(c, tenant_id):
                return refusals
        except CountersUnavailableError:
            refusals += 1
        await trio.sleep(0.1)  # a retry interval (a client's), not a synchronisation


async def test_a_moved_slot_is_followed(cluster: OwnedCluster) -> None:
    """A tenant's slot handed to another master (CLUSTER SETSLOT ... NODE on every node): the
    next call gets MOVED, follows it, and the tenant's counters live on the new master."""
    tenant = 7
    slot = key_slot(f"{PREFIX}{{t{tenant}}}:seed")
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            cluster.url, call_timeout=CALL_TIMEOUT, prefix=PREFIX, cluster=True
        ) as c:
            await c.ping()  # the layout is read: slot -> its first master
            source = cluster.slot_owner(slot)
            target = next(n.port for n in cluster.nodes if n.port != source)
            cluster.move_empty_slot(slot, target)
            await seed(c, tenant)  # MOVED from the old owner, done on the new one
            assert await admitted(c, tenant)
            assert cluster.keys_on(target, f"{PREFIX}{{t{tenant}}}:*")
            assert not cluster.keys_on(source or 0, f"{PREFIX}{{t{tenant}}}:*")


async def test_a_killed_master_without_replica_refuses_its_tenants_only(
    cluster: OwnedCluster,
) -> None:
    lost, kept = tenants_on_two_masters(cluster)
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            cluster.url, call_timeout=CALL_TIMEOUT, prefix=PREFIX, cluster=True
        ) as c:
            await seeded_and_admitted(c, lost, kept)
            cluster.kill_master_of(f"{{t{lost}}}")
            for _ in range(20):  # past the slot map re-reads: still 503, still served
                with pytest.raises(CountersUnavailableError):
                    await admitted(c, lost)
                assert await admitted(c, kept)
            await c.ping()  # readiness: the other masters answer, the replica stays in service


async def test_a_killed_master_s_replica_takes_over_and_admissions_resume(
    replicated: OwnedCluster,
) -> None:
    lost, kept = tenants_on_two_masters(replicated)
    slot = key_slot(f"{PREFIX}{{t{lost}}}:seed")
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            replicated.url, call_timeout=CALL_TIMEOUT, prefix=PREFIX, cluster=True
        ) as c:
            await seeded_and_admitted(c, lost, kept)
            await trio.to_thread.run_sync(replicated.wait_replicated)
            killed = replicated.kill_master_of(f"{{t{lost}}}")
            assert await admitted(c, kept)  # another master's tenant: served at once
            started = time.monotonic()
            refusals = await until_admitted(c, lost)
            took = time.monotonic() - started
            # The replica owns the slot now and holds the tenant's seed (replicated before the
            # kill): admitted without a rebuild.
            assert replicated.slot_owner(slot) not in (None, killed.port)
            assert await admitted(c, kept)
            print(f"failover: {refusals} refusals over {took:.1f} s")  # shown with -s


async def test_a_quiet_process_s_first_call_after_a_failover_goes_to_the_new_master(
    replicated: OwnedCluster,
) -> None:
    """No call while the replica took over: the process's slot map still names the dead
    master, which answers no MOVED (and coredis reads the map again only after errors). The
    first call after the takeover cannot connect, reads the slot map again and is admitted by
    the new master: no refusal once the replica serves."""
    lost, kept = tenants_on_two_masters(replicated)
    slot = key_slot(f"{PREFIX}{{t{lost}}}:seed")
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            replicated.url, call_timeout=CALL_TIMEOUT, prefix=PREFIX, cluster=True
        ) as c:
            await seeded_and_admitted(c, lost, kept)
            await trio.to_thread.run_sync(replicated.wait_replicated)
            killed = replicated.kill_master_of(f"{{t{lost}}}")
            owner = await trio.to_thread.run_sync(
                lambda: replicated.wait_slot_served(slot, not_by=killed.port, timeout=HANG_GUARD)
            )
            await trio.to_thread.run_sync(replicated.wait_owner, slot, owner)
            assert await admitted(c, lost)
            assert await admitted(c, kept)
            assert replicated.keys_on(owner, f"{PREFIX}{{t{lost}}}:lease")


async def test_a_slot_whose_settlement_fell_in_the_takeover_frees_itself_after_its_ttl(
    replicated: OwnedCluster,
) -> None:
    """A request that ends while its master is dead cannot release its concurrency slot (the
    settlement fails closed, logged); the replica has the lease, so after the takeover the slot
    is still taken, until the lease's ttl has passed: then the next admission takes it back.
    No slot is lost for good (README "Redis Cluster")."""
    lost, kept = tenants_on_two_masters(replicated)
    who = principal(lost, 10 + lost, key_limits=Limits(concurrent_requests=1))
    slot = key_slot(f"{PREFIX}{{t{lost}}}:seed")
    ttl_ms = 60_000  # `admission`'s lease ttl; the caller's clock makes it pass at once
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            replicated.url,
            call_timeout=CALL_TIMEOUT,
            prefix=PREFIX,
            cluster=True,
            caller_clock=True,
        ) as c:
            await seeded_and_admitted(c, kept)
            await seed(c, lost)
            lease = await lease_of(c, who)
            await trio.to_thread.run_sync(replicated.wait_replicated)
            killed = replicated.kill_master_of(f"{{t{lost}}}")
            with pytest.raises(CountersUnavailableError):  # before any replica can take over
                await c.settle(lease, tokens=3, now_ms=epoch_ms(T0))
            owner = await trio.to_thread.run_sync(
                lambda: replicated.wait_slot_served(slot, not_by=killed.port, timeout=HANG_GUARD)
            )
            await trio.to_thread.run_sync(replicated.wait_owner, slot, owner)
            busy = await c.admit(admission(who, at_ms=1_000))
            assert isinstance(busy, AdmissionResult) and busy.refusal is not None
            assert busy.refusal.limit == Limit.CONCURRENT_REQUESTS
            freed = await c.admit(admission(who, at_ms=ttl_ms + 1))
            assert isinstance(freed, AdmissionResult) and freed.lease is not None, freed


async def test_every_key_of_a_tenant_lands_on_one_master(cluster: OwnedCluster) -> None:
    prefix = f"{PREFIX}{secrets.token_hex(4)}:"
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            cluster.url, call_timeout=CALL_TIMEOUT, prefix=prefix, cluster=True
        ) as c:
            owners = set()
            for tenant in range(1, 13):
                await seed(c, tenant)
                assert await admitted(c, tenant)
                owner = cluster.slot_owner(key_slot(f"{prefix}{{t{tenant}}}:seed"))
                owners.add(owner)
                keys = cluster.keys_on(owner or 0, f"{prefix}{{t{tenant}}}:*")
                assert len(keys) >= 10, keys  # seed, windows, leases, budgets, reservations
            assert len(owners) > 1  # the tenants are spread over the masters


MIGRATION_CALL_TIMEOUT = 10.0
"""The counters' call timeout in the migration test: a call waits up to 5 times this for a
slot's migration to close (a hang guard, not a latency figure; under HANG_GUARD)."""


async def until(holds: Callable[[], bool]) -> None:
    """Poll a cluster observation (redis-cli, in a thread) until it holds; bounded by the
    caller's fail_after."""
    while True:
        if await trio.to_thread.run_sync(holds):
            return
        await trio.sleep(0.02)  # a poll interval, not a synchronisation


async def lease_of(c: RedisCounters, who: Principal) -> Lease:
    result = await c.admit(admission(who))
    assert isinstance(result, AdmissionResult), result
    assert result.lease is not None, result.refusal
    return result.lease


async def test_a_migrating_slot_asks_and_the_tenant_s_counts_stay_exact(
    cluster: OwnedCluster,
) -> None:
    """A tenant's slot resharded to another master while its admissions and settlements go
    on: IMPORTING on the target, MIGRATING on the source, MIGRATE of the key scope's counters
    (the source holds part of every call's keys: TRYAGAIN), then of the rest (the source
    holds none: ASK, and the target, asked, serves a call whose keys it holds all and answers
    TRYAGAIN to one that declares a key that exists nowhere yet, as an admission's and a
    settlement's do), then SETSLOT NODE on every master. The waiting calls complete once the
    slot is the target's (MOVED), nothing is counted twice or lost, and the requests-per-minute
    limit still admits exactly its number."""
    tenant, key, rpm = 7, 17, 6
    who = principal(tenant, key, tenant_limits=Limits(requests_per_minute=rpm))
    slot = key_slot(f"{PREFIX}{{t{tenant}}}:seed")
    now_ms = epoch_ms(T0)
    run = trio.to_thread.run_sync
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(
            cluster.url,
            call_timeout=MIGRATION_CALL_TIMEOUT,
            prefix=PREFIX,
            cluster=True,
            caller_clock=True,
        ) as c:
            await seed(c, tenant)
            before = [await lease_of(c, who) for _ in range(3)]
            await c.settle(before[0], tokens=7, now_ms=now_ms)
            source = cluster.slot_owner(slot)
            assert source is not None
            target = next(n.port for n in cluster.nodes if n.port != source)

            await run(cluster.start_migration, slot, source, target)
            held = await run(cluster.keys_in_slot, source, slot)
            of_key = [k for k in held if f":k{key}:" in k]
            of_tenant = [k for k in held if k not in of_key]
            assert of_key and of_tenant, held
            await run(cluster.migrate_keys, source, target, of_key)
            rejected = await run(cluster.command_stat, source, "evalsha", "rejected_calls")
            during: list[Lease] = []

            settled: list[Lease] = []

            async def admit_during() -> None:
                during.append(await lease_of(c, who))

            async def settle_during() -> None:
                await c.settle(before[1], tokens=5, now_ms=now_ms)
                settled.append(before[1])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(admit_during)
                nursery.start_soon(settle_during)
                # The source refuses them (it holds part of their keys: TRYAGAIN); they go
                # again, and again.
                await until(
                    lambda: cluster.command_stat(source, "evalsha", "rejected_calls") > rejected
                )
                asked = await run(cluster.command_stat, target, "asking", "calls")
                await run(cluster.migrate_keys, source, target, of_tenant)
                # Now the source answers ASK (it holds none of their keys), and they go to the
                # target with ASKING; the target answers TRYAGAIN (their tombstone key exists
                # nowhere), and they go again from the source.
                await until(lambda: cluster.command_stat(target, "asking", "calls") > asked)
                # A call whose keys the target holds all (the leases of before[2]) is served
                # there while the slot still migrates: ASK followed.
                assert await c.refresh(before[2], now_ms=now_ms)
                assert not during and not settled  # no node runs them while the slot is open
                await run(cluster.finish_migration, slot, source, target)
            assert len(during) == len(settled) == 1

            after = [await lease_of(c, who) for _ in range(rpm - 4)]
            refused = await c.admit(admission(who))
            assert isinstance(refused, AdmissionResult) and refused.refusal is not None
            # The key inherits the tenant's limit and is checked first; both windows hold
            # exactly the admitted requests (the key's moved first, the tenant's after).
            assert refused.refusal.limit == Limit.REQUESTS_PER_MINUTE
            assert refused.refusal.scope == Scope.KEY
            assert refused.refusal.used == rpm
            assert refused.key.requests == refused.tenant.requests == rpm
            tokens = {before[2].id: 3, during[0].id: 4, after[0].id: 2, after[1].id: 1}
            for lease in (before[2], *during, *after):
                await c.settle(lease, tokens=tokens[lease.id], now_ms=now_ms)
            snapshot = await c.budget_snapshot(tenant, [key], before[0].periods)
            assert snapshot is not None
            spent = 7 + 5 + sum(tokens.values())
            for scope in (snapshot.tenant, snapshot.keys[key]):
                assert scope.counted == UsageTotals(spent, spent, spent)
                assert scope.reserved == UsageTotals()
            assert snapshot.version == 6  # one per settlement, none twice
            assert cluster.keys_on(target, f"{PREFIX}{{t{tenant}}}:*")
            assert not cluster.keys_on(source, f"{PREFIX}{{t{tenant}}}:*")
