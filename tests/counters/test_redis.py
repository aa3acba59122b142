"""Redis only: fail closed (nothing listening, killed, stalled), recovery without leaked pool
slots, rebuild after an empty restart, NOSCRIPT, hash tags, and three processes on one Redis.

These run on real time (a real server's timeouts); `owned_redis` is a redis-server of the test's
own, on a free port, that the test may kill, stall (SIGSTOP) and restart.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from pathlib import Path

import pytest
import trio

from nzgw.adapters.redis import RedisCounters, open_redis_counters
from nzgw.core.limits import AdmissionResult, Lease, Limit, epoch_ms
from nzgw.core.models import Budgets, Limits
from nzgw.ports import BudgetSeed, CountersUnavailableError, SeedNeeded, UsageTotals
from nzgw.services.limiter import Limiter

from .conftest import (
    CALL_TIMEOUT,
    COREDIS_CONNECT_LEAK,
    T0,
    FakeLedger,
    OwnedRedis,
    admission,
    delete_prefix,
    periods_of,
    principal,
    raw_redis,
)

pytestmark = [
    pytest.mark.redis,
    COREDIS_CONNECT_LEAK,
    pytest.mark.usefixtures("collect_garbage"),
]


# A hang guard, not a latency figure: a refused call must end, however loaded the machine is.
# The fail-closed latency itself is measured in bench/ (bench/results/faults.md).
FAIL_CLOSED_GUARD = 10.0
ROOT = Path(__file__).resolve().parents[2]


async def every_call_fails_closed(c: RedisCounters) -> list[float]:
    """Run each port method once; each must raise CountersUnavailableError within the timeout."""
    who = principal()
    lease_source = admission(who)
    lease = Lease("x", 1, 10, 5, lease_source.now_ms, 60_000, "e", lease_source.periods)
    seed = BudgetSeed(1, "e", lease_source.periods, lease_source.now_ms, UsageTotals(), {})
    calls = [
        c.ping(),
        c.admit(admission(who)),
        c.settle(lease, tokens=1, now_ms=lease.admitted_ms),
        c.refresh(lease, now_ms=lease.admitted_ms),
        c.seed(seed),
    ]
    took = []
    for call in calls:
        start = trio.current_time()
        with pytest.raises(CountersUnavailableError):
            await call
        took.append(trio.current_time() - start)
    assert max(took) <= FAIL_CLOSED_GUARD, took
    return took


async def test_nothing_listening_fails_closed_fast() -> None:
    with trio.socket.socket() as sock:  # a port that is certainly closed: bound, not listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0"
        async with open_redis_counters(url, call_timeout=CALL_TIMEOUT) as c:
            took = await every_call_fails_closed(c)
    assert max(took) <= FAIL_CLOSED_GUARD


async def test_a_killed_server_fails_every_call_and_a_restarted_one_serves_again(
    owned_redis: OwnedRedis,
) -> None:
    who = principal(tenant_limits=Limits(requests_per_minute=10_000))
    outcomes: list[tuple[float, float, str]] = []  # start, duration, outcome
    async with open_redis_counters(owned_redis.url, call_timeout=CALL_TIMEOUT) as c:
        seed = BudgetSeed(1, "e1", periods_of(epoch_ms(T0)), epoch_ms(T0), UsageTotals(), {})
        assert await c.seed(seed)

        async def client(stop: trio.Event) -> None:
            while not stop.is_set():
                start = trio.current_time()
                try:
                    result = await c.admit(admission(who, at_ms=int(start * 1000) % 50_000))
                except CountersUnavailableError:
                    outcome = "unavailable"
                else:
                    outcome = "admitted" if isinstance(result, AdmissionResult) else "seed"
                outcomes.append((start, trio.current_time() - start, outcome))
                await trio.sleep(0.005)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(client, stop)
            await trio.sleep(0.3)
            killed_at = trio.current_time()
            owned_redis.kill()
            await trio.sleep(1.0)
            stop.set()
        before = [o for o in outcomes if o[0] + o[1] < killed_at]
        after = [o for o in outcomes if o[0] > killed_at]
        assert before and all(o[2] == "admitted" for o in before)
        assert len(after) > 100
        assert all(o[2] == "unavailable" for o in after)
        assert max(o[1] for o in outcomes) <= FAIL_CLOSED_GUARD
        await every_call_fails_closed(c)

        owned_redis.start()  # empty: no marker, so the budget counters must be rebuilt
        assert await c.admit(admission(who)) == SeedNeeded(1)
        assert await c.seed(seed)
        result = await c.admit(admission(who))
        assert isinstance(result, AdmissionResult) and result.admitted


async def test_a_stalled_server_times_out_and_leaks_no_pool_slot(owned_redis: OwnedRedis) -> None:
    async with open_redis_counters(
        owned_redis.url, call_timeout=CALL_TIMEOUT, max_connections=4
    ) as c:
        await c.ping()
        owned_redis.stall()  # SIGSTOP: connections accept at the kernel, nothing answers
        durations: list[float] = []
        failures = 0

        async def one() -> None:
            nonlocal failures
            start = trio.current_time()
            try:
                await c.ping()
            except CountersUnavailableError:
                failures += 1
            durations.append(trio.current_time() - start)

        # four times the pool, three rounds: the calls share one stalled link and time out
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(one)
        assert failures == 48
        assert max(durations) <= FAIL_CLOSED_GUARD
        owned_redis.resume()
        # every pool slot came back: a full pool's worth of concurrent calls succeeds
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(c.ping)


async def test_a_cancelled_caller_does_not_cut_a_call_in_half(owned_redis: OwnedRedis) -> None:
    async def ping(c: RedisCounters) -> None:
        with contextlib.suppress(CountersUnavailableError):
            await c.ping()

    async with open_redis_counters(
        owned_redis.url, call_timeout=CALL_TIMEOUT, max_connections=2
    ) as c:
        owned_redis.stall()
        # The clients leave while their calls connect or wait: the cancellation must wait for
        # the shielded call (bounded by its timeout) rather than cut it and lose a pool slot.
        for _ in range(4):
            start = trio.current_time()
            with trio.move_on_after(0.01):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(ping, c)
            assert trio.current_time() - start > CALL_TIMEOUT / 2  # the calls ran on
        owned_redis.resume()
        async with trio.open_nursery() as nursery:  # both slots work
            nursery.start_soon(c.ping)
            nursery.start_soon(c.ping)


async def test_restart_empty_rebuilds_budgets_from_the_ledger(owned_redis: OwnedRedis) -> None:
    ledger = FakeLedger()
    who = principal(key_budgets=Budgets(daily_tokens=1_000, lifetime_tokens=5_000))
    async with open_redis_counters(owned_redis.url, call_timeout=CALL_TIMEOUT) as c:
        limiter = Limiter(c, ledger, now=lambda: T0)
        for _ in range(6):
            lease = (await limiter.admit(who, model="m", reserve_tokens=200)).lease
            assert lease is not None
            await limiter.settle(lease, model="m", prompt_tokens=50, completion_tokens=100)
        await limiter.flush_usage(ledger)  # 900 in the ledger
        in_flight = (await limiter.admit(who, model="m", reserve_tokens=100)).lease
        assert in_flight is not None

        owned_redis.kill()
        with pytest.raises(CountersUnavailableError):
            await limiter.admit(who, model="m", reserve_tokens=1)
        owned_redis.start()  # empty

        # the request in flight across the restart finishes: charged its real 30 tokens
        await limiter.settle(in_flight, model="m", prompt_tokens=10, completion_tokens=20)
        refused = await limiter.admit(who, model="m", reserve_tokens=71)
        assert refused.refusal is not None
        assert refused.refusal.limit is Limit.DAILY_TOKENS
        assert refused.refusal.used == 930  # 900 from the ledger + 30 not flushed yet
        assert (await limiter.admit(who, model="m", reserve_tokens=70)).admitted
        assert ledger.totals_calls == 2  # at the first admission, and after the restart


async def test_scripts_are_reloaded_after_a_script_flush(redis_url: str) -> None:
    prefix = f"nzgwtest:{secrets.token_hex(6)}:"
    try:
        async with (
            open_redis_counters(redis_url, call_timeout=CALL_TIMEOUT, prefix=prefix) as c,
            raw_redis(redis_url) as raw,
        ):
            await c.ping()
            await raw.script_flush()
            assert await c.admit(admission(principal())) == SeedNeeded(1)
    finally:
        async with raw_redis(redis_url) as raw:
            await delete_prefix(raw, prefix)


async def test_every_key_of_a_tenant_carries_its_hash_tag(redis_url: str) -> None:
    prefix = f"nzgwtest:{secrets.token_hex(6)}:"
    who = principal(tenant_id=42, key_id=7)
    try:
        async with open_redis_counters(
            redis_url, call_timeout=CALL_TIMEOUT, prefix=prefix, caller_clock=True
        ) as c:
            seed = BudgetSeed(
                42,
                "e",
                periods_of(epoch_ms(T0)),
                epoch_ms(T0),
                UsageTotals(1, 1, 1),
                {7: UsageTotals(1, 1, 1)},
            )
            await c.seed(seed)
            result = await c.admit(admission(who))
            assert isinstance(result, AdmissionResult) and result.lease is not None
            await c.refresh(result.lease, now_ms=result.lease.admitted_ms)
        async with raw_redis(redis_url) as raw:
            keys = [k async for k in raw.scan_iter(match=prefix + "*")]
        assert len(keys) == 15  # with the two reservation hashes
        assert all(k.startswith(prefix + "{t42}:") and k.count("{") == 1 for k in keys), keys
    finally:
        async with raw_redis(redis_url) as raw:
            await delete_prefix(raw, prefix)


async def test_three_processes_300_concurrent_requests_rpm_100(redis_url: str) -> None:
    prefix = f"nzgwtest:{secrets.token_hex(6)}:"
    now_ms = epoch_ms(T0)
    try:
        async with open_redis_counters(redis_url, call_timeout=CALL_TIMEOUT, prefix=prefix) as c:
            await c.seed(BudgetSeed(1, "e", periods_of(now_ms), now_ms, UsageTotals(), {}))
        start_at = time.time() + 3.0  # all three connected and waiting by then
        args = [redis_url, prefix, "1", "10", "100", str(now_ms), str(start_at)]
        command = [sys.executable, "-m", "tests.counters.multiproc_worker", *args]
        results: list[int] = []

        async def worker() -> None:
            done = await trio.run_process(command, capture_stdout=True, cwd=ROOT)
            results.append(int(done.stdout.decode().strip()))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
        assert len(results) == 3
        assert sum(results) == 100, results
    finally:
        async with raw_redis(redis_url) as raw:
            await delete_prefix(raw, prefix)
