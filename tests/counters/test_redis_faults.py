"""Redis only, under faults: an admission cannot outlive its caller, Redis is judged by its
replies (not by our loop's latency), and the windows run on Redis' clock.

Each test runs a redis-server of its own (`owned_redis`) that it may freeze with SIGSTOP. No
assertion here depends on how fast this machine is: they assert what was reserved, what was
refused and what Redis holds. Waits are the fault itself (a frozen server, a busy loop), never a
stand-in for synchronisation.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import trio

from nzgw.adapters import redis_link
from nzgw.adapters.redis import RedisCounters, open_redis_counters
from nzgw.adapters.redis_link import MAX_WAIT_FACTOR
from nzgw.core.limits import AdmissionRequest, Limit
from nzgw.core.models import Budgets, Limits
from nzgw.ports import CountersUnavailableError
from nzgw.services.limiter import Limiter

from .conftest import COREDIS_CONNECT_LEAK, FakeLedger, OwnedRedis, principal, raw_redis

pytestmark = [
    pytest.mark.redis,
    COREDIS_CONNECT_LEAK,
    pytest.mark.usefixtures("collect_garbage"),
]

TIMEOUT = 0.2  # NZGW_COUNTERS_TIMEOUT of these tests: Redis silent this long → refused
HANG_GUARD = 60


def _real_now() -> datetime:
    return datetime.now(UTC)


async def _counter(url: str, pattern: str) -> dict[str, str]:
    async with raw_redis(url) as raw:
        keys = [k async for k in raw.scan_iter(match=pattern)]
        return {k: str(await raw.get(k)) for k in keys}


async def _leases(url: str) -> int:
    async with raw_redis(url) as raw:
        keys = [k async for k in raw.scan_iter(match="*:lease")]
        return sum([await raw.zcard(k) for k in keys])


async def test_admissions_refused_while_redis_was_frozen_reserve_nothing_when_it_resumes(
    owned_redis: OwnedRedis,
) -> None:
    """Finding 1: 503 for a frozen Redis, and after SIGCONT no phantom lease or reservation."""
    who = principal(
        key_limits=Limits(concurrent_requests=2), key_budgets=Budgets(daily_tokens=100_000)
    )
    with trio.fail_after(HANG_GUARD):
        # one connection: the releases are queued behind the admissions they undo
        async with open_redis_counters(
            owned_redis.url, call_timeout=TIMEOUT, max_connections=1
        ) as c:
            limiter = Limiter(c, FakeLedger(), now=_real_now)
            first = await limiter.admit(who, model="m", reserve_tokens=16)
            assert first.lease is not None
            await limiter.settle(first.lease, model="m", prompt_tokens=6, completion_tokens=10)
            day = await _counter(owned_redis.url, "*k10:d:*")
            assert list(day.values()) == ["16"]

            owned_redis.stall()
            refused = 0

            async def one() -> None:
                nonlocal refused
                try:
                    await limiter.admit(who, model="m", reserve_tokens=4_096)
                except CountersUnavailableError:
                    refused += 1

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
            assert refused == 3
            owned_redis.resume()  # the admissions now run in Redis, then their releases

            # both slots are free: nothing in flight holds them
            second = await limiter.admit(who, model="m", reserve_tokens=1)
            third = await limiter.admit(who, model="m", reserve_tokens=1)
            assert second.admitted and third.admitted, (second.refusal, third.refusal)
            assert await _leases(owned_redis.url) == 4  # 2 requests x (key, tenant)
            day = await _counter(owned_redis.url, "*k10:d:*")
            assert list(day.values()) == ["18"]  # 16 settled + 2 reserved, no 3 x 4,096


async def test_an_admission_that_reaches_redis_after_its_deadline_does_nothing(
    owned_redis: OwnedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script's own deadline (Redis TIME) holds even when the release is lost."""
    who = principal(key_budgets=Budgets(daily_tokens=100_000))

    async def lost(
        self: RedisCounters, node: object, keys: object, request: AdmissionRequest
    ) -> None:
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(RedisCounters, "_release_nowait", lost)
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(owned_redis.url, call_timeout=TIMEOUT) as c:
            limiter = Limiter(c, FakeLedger(), now=_real_now)
            assert (await limiter.admit(who, model="m", reserve_tokens=5)).admitted
            owned_redis.stall()
            with pytest.raises(CountersUnavailableError):
                await limiter.admit(who, model="m", reserve_tokens=4_096)
            # The fault: Redis stays frozen past the longest any call may wait.
            await trio.sleep(MAX_WAIT_FACTOR * TIMEOUT + 0.5)
            owned_redis.resume()
            assert (await limiter.admit(who, model="m", reserve_tokens=1)).admitted
            day = await _counter(owned_redis.url, "*k10:d:*")
            assert list(day.values()) == ["6"]
            assert await _leases(owned_redis.url) == 4  # 2 requests x (key, tenant)


async def _admissions_across_a_busy_loop(url: str, busy: float) -> list[str]:
    """50 admissions sent; then the event loop is blocked for `busy` seconds (past the counters'
    timeout) while Redis answers them. The outcomes."""
    who = principal(key_limits=Limits(requests_per_minute=1_000))
    outcomes: list[str] = []
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(url, call_timeout=TIMEOUT) as c:
            limiter = Limiter(c, FakeLedger(), now=_real_now)
            assert (await limiter.admit(who, model="m", reserve_tokens=1)).admitted

            async def one() -> None:
                try:
                    result = await limiter.admit(who, model="m", reserve_tokens=1)
                except CountersUnavailableError:
                    outcomes.append("503")
                else:
                    outcomes.append("admitted" if result.admitted else "429")

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()  # all 50 sent, waiting for replies
                time.sleep(busy)  # noqa: ASYNC251 (the fault: the loop is busy past the timeout)
    return outcomes


async def test_a_busy_event_loop_is_not_taken_for_a_silent_redis(
    owned_redis: OwnedRedis,
) -> None:
    """Finding 2: replies that wait in the socket while our loop is busy are not a timeout."""
    assert await _admissions_across_a_busy_loop(owned_redis.url, 5 * TIMEOUT) == ["admitted"] * 50


async def test_an_answer_unread_in_the_socket_is_not_silence(
    owned_redis: OwnedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and the loop gives the reader no catch-up round: the bytes waiting in the
    socket still show that Redis answered."""
    monkeypatch.setattr(redis_link, "_CATCH_UP_CHECKPOINTS", 0)
    assert await _admissions_across_a_busy_loop(owned_redis.url, 3 * TIMEOUT) == ["admitted"] * 50


async def test_windows_run_on_redis_clock_not_the_callers(owned_redis: OwnedRedis) -> None:
    """Finding 8: a replica whose clock is 61 s behind cannot double a requests/min limit."""
    who = principal(key_limits=Limits(requests_per_minute=1))
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(owned_redis.url, call_timeout=TIMEOUT) as c:
            ledger = FakeLedger()
            behind = Limiter(c, ledger, now=lambda: _real_now() - timedelta(seconds=61))
            on_time = Limiter(c, ledger, now=_real_now)
            assert (await behind.admit(who, model="m", reserve_tokens=1)).admitted
            refused = await on_time.admit(who, model="m", reserve_tokens=1)
            assert refused.refusal is not None
            assert refused.refusal.limit is Limit.REQUESTS_PER_MINUTE
            assert refused.refusal.retry_after_ms is not None
            assert 55_000 < refused.refusal.retry_after_ms <= 60_000


async def test_an_expired_lease_gives_its_reservation_back(owned_redis: OwnedRedis) -> None:
    """A crashed process's lease expires after its ttl and no longer holds budget or slot."""
    who = principal(
        key_limits=Limits(concurrent_requests=1), key_budgets=Budgets(daily_tokens=1_000)
    )
    with trio.fail_after(HANG_GUARD):
        async with open_redis_counters(owned_redis.url, call_timeout=TIMEOUT) as c:
            crashed = Limiter(c, FakeLedger(), now=_real_now, lease_ttl=0.3)
            assert (await crashed.admit(who, model="m", reserve_tokens=900)).admitted
            survivor = Limiter(c, FakeLedger(), now=_real_now)
            refused = await survivor.admit(who, model="m", reserve_tokens=900)
            assert refused.refusal is not None  # the lease and its 900 tokens are held
            await trio.sleep(0.5)  # the fault: nobody refreshes it for longer than its ttl
            again = await survivor.admit(who, model="m", reserve_tokens=900)
            assert again.admitted, again.refusal
            day = await _counter(owned_redis.url, "*k10:d:*")
            assert list(day.values()) == ["900"]
            assert again.reclaimed_tokens == 900  # the drift it corrected, for the metric
            assert survivor.reclaimed_tokens == 900
