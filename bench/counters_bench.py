"""CPU per request of the limiter: one admission plus one settlement, memory and Redis.

    .venv/bin/python bench/counters_bench.py [--n 20000] [--concurrency 64] [--redis-url URL]

Measures this process's CPU time (`time.process_time()`) over N admission+settlement pairs run
one after another, then N pairs from `concurrency` concurrent tasks, through the `Limiter` (what
the HTTP layer calls: limits, clock, lease ids, usage aggregate included). For Redis it also
reports the server's CPU (INFO cpu) per request. Target (issue 5): <= 0.3 ms of gateway CPU per
request for both calls together on Redis. A benchmark, not a test: numbers vary per machine.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import date

import coredis
import trio

from nzgw.adapters.memory_counters import MemoryCounters
from nzgw.adapters.redis import open_redis_counters
from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Tenant
from nzgw.ports import Counters, UsageRow, UsageTotals
from nzgw.services.limiter import Limiter

BIG = 10**12
# every limit set (all checks run) and never reached
LIMITS = Limits(requests_per_minute=BIG, tokens_per_minute=BIG, concurrent_requests=BIG)
BUDGETS = Budgets(daily_tokens=BIG, monthly_tokens=BIG, lifetime_tokens=BIG)


class NullLedger:
    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        await trio.lowlevel.checkpoint()

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        await trio.lowlevel.checkpoint()
        return UsageTotals(), {}


def principal(tenant_id: int) -> Principal:
    tenant = Tenant(tenant_id, "bench", limits=LIMITS, budgets=BUDGETS)
    key = ApiKey(tenant_id * 10, tenant_id, "k", "p", "h", limits=LIMITS, budgets=BUDGETS)
    return Principal(key, tenant)


async def one_request(limiter: Limiter, who: Principal) -> None:
    result = await limiter.admit(who, model="bench", reserve_tokens=600)
    assert result.lease is not None, result.refusal
    await limiter.settle(result.lease, model="bench", prompt_tokens=100, completion_tokens=200)


async def measure(limiter: Limiter, n: int, concurrency: int) -> tuple[float, float, float]:
    """(CPU ms per request sequential, concurrent; requests per second concurrent)."""
    who = principal(int.from_bytes(secrets.token_bytes(3), "big"))
    for _ in range(200):  # warm up: seed, connections, scripts loaded
        await one_request(limiter, who)
    limiter.drain_usage()

    cpu = time.process_time()
    for _ in range(n):
        await one_request(limiter, who)
    sequential = (time.process_time() - cpu) / n * 1000

    async def worker(count: int) -> None:
        for _ in range(count):
            await one_request(limiter, who)

    cpu, wall = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, n // concurrency)
    done = n // concurrency * concurrency
    concurrent = (time.process_time() - cpu) / done * 1000
    rate = done / (time.perf_counter() - wall)
    limiter.drain_usage()
    return sequential, concurrent, rate


async def server_cpu(url: str) -> float:
    client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])  # type: ignore[arg-type]


@asynccontextmanager
async def memory() -> AsyncIterator[Counters]:
    yield MemoryCounters()


async def main(n: int, concurrency: int, redis_url: str) -> None:
    print(f"N = {n} admission+settlement pairs; concurrent: {concurrency} tasks")
    print(f"{'backend':<8} {'sequential':>14} {'concurrent':>14} {'req/s':>9} {'server CPU':>14}")
    limiter = Limiter(MemoryCounters(), NullLedger())
    seq, conc, rate = await measure(limiter, n, concurrency)
    print(f"{'memory':<8} {seq:>11.3f} ms {conc:>11.3f} ms {rate:>9.0f}")

    prefix = f"nzgwbench:{secrets.token_hex(4)}:"
    async with open_redis_counters(redis_url, call_timeout=0.5, prefix=prefix) as counters:
        limiter = Limiter(counters, NullLedger())
        before = await server_cpu(redis_url)
        seq, conc, rate = await measure(limiter, n, concurrency)
        server = (await server_cpu(redis_url) - before) / (2 * n + 200) * 1000
    print(f"{'redis':<8} {seq:>11.3f} ms {conc:>11.3f} ms {rate:>9.0f} {server:>11.3f} ms")
    client: coredis.Redis[str] = coredis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(keys)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    trio.run(main, args.n, args.concurrency, args.redis_url)
