"""One "gateway process" for the multi-process test: N concurrent admissions, one counter store.

Usage: python -m tests.counters.multiproc_worker URL PREFIX TENANT KEY N NOW_MS START_AT
Waits until the wall clock reaches START_AT (epoch seconds), so all processes fire together,
then prints the number of requests admitted.
"""

from __future__ import annotations

import secrets
import sys
import time
from datetime import UTC, datetime

import trio

from nzgw.adapters.redis import open_redis_counters
from nzgw.core.limits import AdmissionRequest, AdmissionResult, EffectiveLimits, periods_at
from nzgw.core.models import ApiKey, Limits, Principal, Tenant


async def main(
    url: str, prefix: str, tenant: int, key: int, n: int, now_ms: int, at: float
) -> None:
    who = Principal(
        ApiKey(key, tenant, "k", "p", "h"),
        Tenant(tenant, "t", limits=Limits(requests_per_minute=100)),
    )
    periods = periods_at(datetime.fromtimestamp(now_ms / 1000, UTC), UTC)
    admitted = 0
    async with open_redis_counters(url, call_timeout=5.0, prefix=prefix) as counters:
        await counters.ping()  # connected before the start line

        async def one() -> None:
            nonlocal admitted
            request = AdmissionRequest(
                tenant,
                key,
                secrets.token_hex(8),
                10,
                now_ms,
                60_000,
                periods,
                EffectiveLimits.of(who),
            )
            result = await counters.admit(request)
            assert isinstance(result, AdmissionResult)
            admitted += result.admitted

        await trio.sleep(max(at - time.time(), 0))
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    print(admitted)


if __name__ == "__main__":
    url, prefix, *numbers = sys.argv[1:]
    tenant, key, n, now_ms = (int(v) for v in numbers[:4])
    trio.run(main, url, prefix, tenant, key, n, now_ms, float(numbers[4]))
