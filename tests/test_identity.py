"""The Authenticator on virtual time, against an in-memory fake of the store.

Rules for this module:
- Time: `MockClock(autojump_threshold=0)`. Every async test requests `autojump_clock` itself
  (pytest-trio only sees clocks among the test's own arguments). No background task sleeps
  while a test waits for an Argon2id thread (the clock would jump to its deadline), so
  freshness is fed by hand with `epoch_observed` unless the test is about
  `run_revocation_watch` itself.
- Argon2id runs for real, with tiny parameters; the `verification` event counts every run,
  dummy verifications for unknown prefixes included.
- Cross-process revocation on the real stores is in `tests/store/test_revocation.py`.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import cast

import attrs
import pytest
import trio
import trio.testing

from nzgw.config import Argon2Params, test_config
from nzgw.core.keys import KEY_LEN, generate_key
from nzgw.core.models import ApiKey, Principal, Status, Tenant
from nzgw.ports import Change, ChangeFeed, KeyChanges, Store, StoreUnavailableError
from nzgw.services.identity import (
    AuthenticationError,
    Authenticator,
    AuthEvent,
    AuthThrottledError,
    FailureThrottle,
    KeyHasher,
    MemoryAuthThrottle,
    flush_last_used,
    run_last_used_flush,
    run_revocation_watch,
    throttle_key,
)

FAST = Argon2Params(time_cost=1, memory_cost_kib=64, parallelism=1)
CLIENT = "198.51.100.7"
T0 = datetime(2031, 1, 1, tzinfo=UTC)


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class FakeStore:
    """The part of the Store the authenticator uses, in memory, with failure switches."""

    def __init__(self) -> None:
        self.keys: dict[str, Principal] = {}
        self.epoch = 0
        self.find_calls = 0
        self.down = False
        self.gate: trio.Event | None = None  # find_key waits for it when set
        self.touched: list[dict[int, datetime]] = []
        self.feed: list[Change] = []  # `epoch += 1` alone leaves a gap: "everything changed"

    def add(self, hasher: KeyHasher, **key_fields: object) -> str:
        tenant_fields = cast(dict[str, object], key_fields.pop("tenant", {}))
        tenant_id = cast(int, key_fields.pop("tenant_id", 1))
        full, prefix = generate_key()
        tenant = Tenant(id=tenant_id, name=f"t{tenant_id}", **tenant_fields)  # type: ignore[arg-type]
        key = ApiKey(
            id=len(self.keys) + 1,
            tenant_id=tenant_id,
            name="k",
            prefix=prefix,
            key_hash=hasher.hash(full),
            **key_fields,  # type: ignore[arg-type]
        )
        self.keys[prefix] = Principal(key, tenant)
        return full

    def set_key(self, prefix: str, **changes: object) -> None:
        p = self.keys[prefix]
        self.keys[prefix] = Principal(attrs.evolve(p.key, **changes), p.tenant)  # type: ignore[arg-type]

    async def find_key(self, prefix: str) -> Principal | None:
        self.find_calls += 1
        if self.down:
            raise StoreUnavailableError("down")
        found = self.keys.get(prefix)  # read now; the gate delays the answer
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        return found

    async def update_key(self, prefix: str, changes: KeyChanges) -> ApiKey:
        assert changes.key_hash is not None
        self.set_key(prefix, key_hash=changes.key_hash)
        return self.keys[prefix].key

    def record_change(self, tenant_id: int, key_id: int | None) -> None:
        self.epoch += 1
        self.feed.append(Change(self.epoch, tenant_id, key_id))

    async def revocation_epoch(self) -> int:
        if self.down:
            raise StoreUnavailableError("down")
        await trio.lowlevel.checkpoint()
        return self.epoch

    async def changes_since(self, after: int, *, limit: int = 1000) -> ChangeFeed:
        if self.down:
            raise StoreUnavailableError("down")
        await trio.lowlevel.checkpoint()
        rows = tuple(c for c in self.feed if after < c.seq <= self.epoch)
        if self.epoch < after or len(rows) != self.epoch - after or len(rows) > limit:
            return ChangeFeed(self.epoch, None)
        return ChangeFeed(self.epoch, rows)

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        if self.down:
            raise StoreUnavailableError("down")
        await trio.lowlevel.checkpoint()
        self.touched.append(dict(last_used))


@attrs.define
class Setup:
    store: FakeStore
    auth: Authenticator
    hasher: KeyHasher
    wall: WallClock
    events: collections.Counter[str]  # what the authenticator reported (AuthEvent values)

    def fresh(self) -> None:
        """What a successful epoch read does: trust the cache for max_staleness from now."""
        self.auth.epoch_observed(self.store.epoch, trio.current_time())


@pytest.fixture
def setup() -> Iterator[Setup]:
    store = FakeStore()
    hasher = KeyHasher(FAST)
    wall = WallClock()
    events: collections.Counter[str] = collections.Counter()
    auth = Authenticator(
        cast(Store, store),
        hasher=hasher,
        max_concurrency=2,
        cache_ttl=60.0,
        fail_limit=20,
        wall_clock=wall,
        events=counting(events),
    )
    yield Setup(store, auth, hasher, wall, events)


def counting(events: collections.Counter[str]) -> Callable[[AuthEvent], None]:
    def record(event: AuthEvent) -> None:
        events[event.value] += 1

    return record


# --- accept and refuse --------------------------------------------------------------------------


async def test_valid_key_then_cache_hit(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    principal = await setup.auth.authenticate(key, CLIENT)
    assert principal.key.prefix == key[:11]
    assert setup.events["verification"] == 1
    for _ in range(5):
        assert await setup.auth.authenticate(key, CLIENT) == principal
    assert setup.events["verification"] == 1
    assert setup.events["cache_hit"] == 5
    assert setup.store.find_calls == 1


async def test_malformed_keys_cost_nothing(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    for bad in (
        "",
        "Bearer",
        key.upper(),
        key[:-1],
        key + "a",
        key.replace("nz_", "zz_"),
        "é" * 51,
    ):
        with pytest.raises(AuthenticationError) as info:
            await setup.auth.authenticate(bad, CLIENT)
        assert type(info.value) is AuthenticationError
    assert setup.store.find_calls == 0
    assert setup.events["verification"] == 0


async def test_wrong_secret_and_unknown_prefix_both_verify_and_fail_alike(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    wrong_secret = key[:11] + ("a" if key[11] != "a" else "b") + key[12:]
    unknown_prefix = generate_key()[0]
    errors = []
    for presented in (wrong_secret, unknown_prefix):
        with pytest.raises(AuthenticationError) as info:
            await setup.auth.authenticate(presented, CLIENT)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] == (AuthenticationError, "authentication failed")
    # The unknown prefix was verified against the dummy hash: same work as a wrong secret.
    assert setup.events["verification"] == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"status": Status.REVOKED},
        {"status": Status.DISABLED},
        {"tenant": {"status": Status.DISABLED}},
        {"expires_at": T0 - timedelta(seconds=1)},
        {"expires_at": T0},
    ],
    ids=["revoked", "disabled-key", "disabled-tenant", "expired", "expires-now"],
)
async def test_refused_keys(
    setup: Setup, fields: dict[str, object], autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher, **fields)
    setup.fresh()
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 1


async def test_a_cached_key_is_refused_once_it_expires(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher, expires_at=T0 + timedelta(minutes=5))
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    setup.wall.now = T0 + timedelta(minutes=5, microseconds=1)
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(key, CLIENT)


async def test_store_errors_propagate_and_do_not_count_as_failures(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.store.down = True
    for _ in range(50):
        with pytest.raises(StoreUnavailableError):
            await setup.auth.authenticate(key, CLIENT)
    setup.store.down = False
    await setup.auth.authenticate(key, CLIENT)  # not throttled: the attempts were refunded


async def test_rehash_when_parameters_changed(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    old = KeyHasher(Argon2Params(time_cost=2, memory_cost_kib=64, parallelism=1))
    key = setup.store.add(old)
    assert setup.hasher.needs_rehash(setup.store.keys[key[:11]].key.key_hash)
    await setup.auth.authenticate(key, CLIENT)
    new_hash = setup.store.keys[key[:11]].key.key_hash
    assert not setup.hasher.needs_rehash(new_hash)
    assert setup.hasher.verify(new_hash, key)
    assert setup.events["rehash"] == 1


# --- the cache ----------------------------------------------------------------------------------


async def test_cache_entries_expire_after_the_ttl(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    await trio.sleep(59.9)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 1
    await trio.sleep(0.2)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 2


async def test_the_cache_is_not_trusted_when_the_epoch_is_stale(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    await trio.sleep(0.99)
    await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 1
    assert setup.store.find_calls == 1
    await trio.sleep(0.02)  # 1.01 s since the last epoch read: go to the store
    await setup.auth.authenticate(key, CLIENT)
    # The key's record is read again; its secret matched the verified one: no Argon2id.
    assert (setup.store.find_calls, setup.events["verification"]) == (2, 1)
    await trio.sleep(0.99)  # trusted for max_staleness from that read
    await setup.auth.authenticate(key, CLIENT)
    assert setup.store.find_calls == 2
    setup.store.down = True
    await trio.sleep(1.5)
    with pytest.raises(StoreUnavailableError):  # fail closed, not "cached, so fine"
        await setup.auth.authenticate(key, CLIENT)


async def test_a_burst_on_a_stale_cache_reads_the_key_once_and_verifies_nothing(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 17: a burst delays the revocation watch; the requests of a hot key must not each
    go to the store and Argon2id (a stampede that made admissions late)."""
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    await trio.sleep(1.5)  # the watch fell behind: the cache is not trusted
    setup.store.gate = trio.Event()  # the re-read waits: every request arrives meanwhile
    accepted = 0

    async def one() -> None:
        nonlocal accepted
        await setup.auth.authenticate(key, CLIENT)
        accepted += 1

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        setup.store.gate.set()
    assert accepted == 50
    assert (setup.store.find_calls, setup.events["verification"]) == (2, 1)
    assert setup.events["reread"] == 1


async def test_a_key_revoked_while_the_watch_is_behind_is_refused_by_the_re_read(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    setup.store.set_key(key[:11], status=Status.REVOKED)  # the watch has not seen it
    await trio.sleep(1.5)
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(key, CLIENT)


async def test_an_epoch_change_empties_the_cache(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    setup.fresh()  # same epoch: the entry stays
    await setup.auth.authenticate(key, CLIENT)
    assert setup.events["verification"] == 1
    setup.store.set_key(key[:11], status=Status.REVOKED)
    setup.store.epoch += 1
    setup.fresh()
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(key, CLIENT)


async def test_a_verification_racing_a_revocation_does_not_refill_the_cache(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    setup.store.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.auth.authenticate, key, CLIENT)
        await trio.testing.wait_all_tasks_blocked()
        # The key was read as active; now it is revoked and the epoch moves.
        setup.store.set_key(key[:11], status=Status.REVOKED)
        setup.store.epoch += 1
        setup.fresh()
        setup.store.gate.set()
    setup.store.gate = None
    with pytest.raises(AuthenticationError):
        await setup.auth.authenticate(key, CLIENT)


async def test_concurrent_misses_for_one_key_share_one_verification(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    results: list[Principal] = []

    async def one() -> None:
        results.append(await setup.auth.authenticate(key, CLIENT))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert len(results) == 50
    assert setup.events["verification"] == 1


class RoundTripThrottle(MemoryAuthThrottle):
    """The throttle as in Redis: each call is a round trip, so other requests run meanwhile."""

    calls = 0

    async def try_acquire(self, address: str) -> float | None:
        self.calls += 1
        wait = await super().try_acquire(address)
        await trio.sleep(0.001)
        return wait


async def test_a_cold_burst_of_one_key_asks_the_throttle_once(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 17: 1,000 streams of one key from one address on a cold cache each asked the
    (Redis) throttle before the first verification had begun: past the allowance the valid key
    got 429, past the throttle's connections 503. The first request claims the verification
    before it asks; the others wait for it."""
    key = setup.store.add(setup.hasher)
    throttle = RoundTripThrottle(20)
    events: collections.Counter[str] = collections.Counter()
    auth = Authenticator(
        cast(Store, setup.store),
        hasher=setup.hasher,
        max_concurrency=2,
        cache_ttl=60.0,
        fail_limit=20,
        throttle=throttle,
        wall_clock=setup.wall,
        events=counting(events),
    )
    auth.epoch_observed(setup.store.epoch, trio.current_time())
    accepted = 0

    async def one() -> None:
        nonlocal accepted
        await auth.authenticate(key, CLIENT)
        accepted += 1

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert (accepted, throttle.calls, events["verification"]) == (50, 1, 1)


async def test_a_cancelled_verification_leaves_nothing_behind(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    setup.store.gate = trio.Event()
    with trio.move_on_after(1):
        await setup.auth.authenticate(key, CLIENT)
    setup.store.gate = None
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)  # verifies anew, not throttled, no stale flight
    assert setup.events["verification"] == 1


# --- the failure throttle -----------------------------------------------------------------------


async def test_ten_thousand_random_keys_cost_only_the_throttle_allowance(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    throttled = 0
    for _ in range(10_000):
        try:
            await setup.auth.authenticate(generate_key()[0], CLIENT)
        except AuthThrottledError as exc:
            assert 0 < exc.retry_after <= 3.0
            throttled += 1
        except AuthenticationError:
            pass
    assert setup.events["verification"] == 20
    assert setup.store.find_calls == 20
    assert throttled == 10_000 - 20


async def test_concurrent_random_keys_cannot_overrun_the_throttle(
    setup: Setup, mock_clock: trio.testing.MockClock
) -> None:
    # Virtual time stands still (no autojump): the Argon2id threads take real time, during which
    # an autojumping clock would run on and refill the allowance (a race, not a property).
    async def guess() -> None:
        with contextlib.suppress(AuthenticationError):
            await setup.auth.authenticate(generate_key()[0], CLIENT)

    async with trio.open_nursery() as nursery:
        for _ in range(10_000):
            nursery.start_soon(guess)
    assert setup.events["verification"] == 20


async def test_the_allowance_refills_over_a_minute(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    for _ in range(25):
        with pytest.raises(AuthenticationError):
            await setup.auth.authenticate(generate_key()[0], CLIENT)
    assert setup.events["verification"] == 20
    await trio.sleep(30)  # half a minute: 10 more attempts
    for _ in range(25):
        with pytest.raises(AuthenticationError):
            await setup.auth.authenticate(generate_key()[0], CLIENT)
    assert setup.events["verification"] == 30


async def test_throttling_is_per_address_and_spares_cached_keys(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    other = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    for _ in range(21):
        with pytest.raises(AuthenticationError):
            await setup.auth.authenticate(generate_key()[0], CLIENT)
    with pytest.raises(AuthThrottledError):
        await setup.auth.authenticate(generate_key()[0], CLIENT)
    # A key already verified costs no Argon2id work: accepted even from the throttled address.
    await setup.auth.authenticate(key, CLIENT)
    # An unverified one is not, until the allowance refills.
    with pytest.raises(AuthThrottledError):
        await setup.auth.authenticate(other, CLIENT)
    # Another address is not affected.
    await setup.auth.authenticate(other, "203.0.113.9")


async def test_malformed_keys_count_towards_the_throttle(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    for _ in range(20):
        with pytest.raises(AuthenticationError):
            await setup.auth.authenticate("garbage", CLIENT)
    with pytest.raises(AuthThrottledError):
        await setup.auth.authenticate(generate_key()[0], CLIENT)
    assert setup.events["verification"] == 0


def test_throttle_keys() -> None:
    assert throttle_key("192.0.2.1") == "192.0.2.1"
    assert throttle_key("2001:db8:1:2:3:4:5:6") == throttle_key("2001:db8:1:2:ffff::1")
    assert throttle_key("2001:db8:1:2::1") != throttle_key("2001:db8:1:3::1")
    assert throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert throttle_key("unix-socket") == "unix-socket"


def test_throttle_memory_is_bounded() -> None:
    throttle = FailureThrottle(2, max_tracked=100)
    for i in range(1000):
        throttle.record_failure(f"10.0.{i // 256}.{i % 256}", now=0.0)
        assert len(throttle) <= 100
    # Refilled buckets are dropped by prune.
    throttle.prune(now=120.0)
    assert len(throttle) == 0


# --- service tasks ------------------------------------------------------------------------------


async def test_revocation_watch_empties_the_cache_within_the_interval(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_revocation_watch(
                cast(Store, setup.store), setup.auth, interval=0.5, task_status=task_status
            )
        )
        await setup.auth.authenticate(key, CLIENT)  # verified and cached
        await setup.auth.authenticate(key, CLIENT)
        assert setup.events["cache_hit"] == 1
        await trio.sleep(0.25)
        setup.store.set_key(key[:11], status=Status.REVOKED)
        setup.store.epoch += 1
        changed_at = trio.current_time()
        while True:
            hits = setup.events["cache_hit"]
            try:
                await setup.auth.authenticate(key, CLIENT)
            except AuthenticationError:
                break
            assert setup.events["cache_hit"] == hits + 1
            assert trio.current_time() - changed_at < 0.5
            await trio.sleep(0.01)
        assert setup.events["cache_hit"] > 1
        nursery.cancel_scope.cancel()


async def test_revocation_watch_survives_store_errors(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    async with trio.open_nursery() as nursery:
        setup.store.down = True
        await nursery.start(
            lambda task_status: run_revocation_watch(
                cast(Store, setup.store), setup.auth, interval=0.5, task_status=task_status
            )
        )
        await trio.sleep(3)
        setup.store.down = False
        await trio.sleep(0.6)
        await setup.auth.authenticate(key, CLIENT)
        await setup.auth.authenticate(key, CLIENT)
        assert setup.events["cache_hit"] == 1
        nursery.cancel_scope.cancel()


async def test_last_used_times_are_flushed_and_kept_on_failure(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    setup.store.down = True
    await flush_last_used(cast(Store, setup.store), setup.auth)
    assert setup.store.touched == []
    setup.store.down = False
    setup.wall.now = T0 + timedelta(seconds=1)
    await setup.auth.authenticate(key, CLIENT)
    await flush_last_used(cast(Store, setup.store), setup.auth)
    assert setup.store.touched == [{1: T0 + timedelta(seconds=1)}]
    await flush_last_used(cast(Store, setup.store), setup.auth)
    assert len(setup.store.touched) == 1  # nothing new


async def test_the_flush_task_flushes_once_more_when_cancelled(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    key = setup.store.add(setup.hasher)
    setup.fresh()
    await setup.auth.authenticate(key, CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_last_used_flush(
                cast(Store, setup.store), setup.auth, interval=2.0, task_status=task_status
            )
        )
        await trio.sleep(2.5)
        assert setup.store.touched == [{1: T0}]
        setup.wall.now = T0 + timedelta(seconds=3)
        setup.fresh()
        await setup.auth.authenticate(key, CLIENT)
        nursery.cancel_scope.cancel()
    assert setup.store.touched[-1] == {1: T0 + timedelta(seconds=3)}


async def test_from_config(autojump_clock: trio.testing.MockClock) -> None:
    config = test_config(argon2=FAST, revocation_poll_interval=0.5)
    events: collections.Counter[str] = collections.Counter()
    auth = Authenticator.from_config(cast(Store, FakeStore()), config, events=counting(events))
    with pytest.raises(AuthenticationError):
        await auth.authenticate(generate_key()[0], CLIENT)
    # An unknown key: a dummy verification, then a failure, reported where it was told.
    assert events == {"cache_miss": 1, "verification": 1, "failure": 1}
    assert KEY_LEN == 51
