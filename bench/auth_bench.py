"""Authentication cost per request: warm cache, and cold cache (Argon2id) by parameters.

    .venv/bin/python bench/auth_bench.py [--warm N] [--cold N] [--database-url URL]
    .venv/bin/python bench/auth_bench.py --flood [--queue-max N]

Runs the real `Authenticator` on a real store (a scratch SQLite file by default), with
`run_revocation_watch` running as in the gateway. Warm: the same key again and again (HMAC,
cache lookup, status and expiry checks). Cold: the cache emptied before every call, so each
call is a store lookup plus one Argon2id verification in a worker thread; also shown: the
wrong-secret and unknown-prefix paths, which must cost the same (no prefix oracle).
`--flood` (issue #14): 60 client addresses (127.0.0.2-61) send 20 wrong keys each, all at once,
each retried after the Retry-After of a "busy" answer (so the queue stays full; `--retry-factor
0.1` retries 10x sooner); meanwhile a client
from another address presents a valid key nobody used yet, 10 times (a new key each time).
Reported: that cold verification's time under the flood against the same on an idle gateway,
with the default Argon2id parameters and concurrency; `--queue-max 1000000` shows the unbounded
queue (the address priority still applies).
Not a test: the numbers depend on the machine. Record them in the README.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

from nzgw.adapters.stores import open_store
from nzgw.config import Argon2Params, test_config
from nzgw.core.keys import generate_key
from nzgw.ports import NewKey, Store
from nzgw.services.identity import (
    AuthBusyError,
    AuthenticationError,
    Authenticator,
    AuthThrottledError,
    KeyHasher,
    run_revocation_watch,
)

PARAMS = [
    Argon2Params(time_cost=1, memory_cost_kib=8192, parallelism=1),
    Argon2Params(time_cost=2, memory_cost_kib=19456, parallelism=1),  # the default (OWASP)
    Argon2Params(time_cost=3, memory_cost_kib=65536, parallelism=1),
    Argon2Params(time_cost=3, memory_cost_kib=65536, parallelism=4),
]
CLIENT = "192.0.2.1"


async def _timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples: list[float] = []
    for i in range(n):
        if i % 100 == 0:
            # A cache hit never checkpoints; let the revocation watch run (untimed), as the
            # rest of a real request would.
            await trio.lowlevel.checkpoint()
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def _fmt(samples: list[float], unit: float, suffix: str) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"mean {statistics.fmean(samples) / unit:8.2f} {suffix}  "
        f"median {statistics.median(samples) / unit:8.2f} {suffix}  p99 {p99 / unit:8.2f} {suffix}"
    )


async def _bench(store: Store, params: Argon2Params, warm: int, cold: int) -> None:
    config = test_config(argon2=params, auth_fail_limit=1_000_000_000)
    hasher = KeyHasher(params)
    tenant = await store.create_tenant(f"bench-{generate_key()[1]}")
    key, prefix = generate_key()
    await store.create_key(NewKey(tenant.id, "bench", prefix, hasher.hash(key)))
    events: collections.Counter[str] = collections.Counter()
    auth = Authenticator.from_config(store, config, events=lambda e: events.update([e.value]))

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_revocation_watch(
                store, auth, interval=config.revocation_poll_interval, task_status=task_status
            )
        )
        label = f"t={params.time_cost} m={params.memory_cost_kib} KiB p={params.parallelism}"
        print(f"\nArgon2id {label}")

        stored_hash = hasher.hash(key)
        raw: list[float] = []
        for _ in range(max(5, cold)):
            start = time.perf_counter()
            hasher.verify(stored_hash, key)
            raw.append(time.perf_counter() - start)
        print(f"  Argon2id verify alone     {_fmt(raw, 1e-3, 'ms')}")

        async def cold_call() -> object:
            auth.invalidate()
            return await auth.authenticate(key, CLIENT)

        print(f"  cold cache (store+Argon2) {_fmt(await _timed(cold, cold_call), 1e-3, 'ms')}")

        wrong = prefix + ("a" if key[len(prefix)] != "a" else "b") + key[len(prefix) + 1 :]
        unknown = generate_key()[0]

        async def refused(presented: str) -> object:
            with contextlib.suppress(AuthenticationError):
                await auth.authenticate(presented, CLIENT)
            return None

        wrong_s: list[float] = []
        unknown_s: list[float] = []
        for _ in range(cold):  # interleaved, so load changes hit both alike
            wrong_s += await _timed(1, lambda: refused(wrong))
            unknown_s += await _timed(1, lambda: refused(unknown))
        print(f"  wrong secret (refused)    {_fmt(wrong_s, 1e-3, 'ms')}")
        print(f"  unknown prefix (refused)  {_fmt(unknown_s, 1e-3, 'ms')}")

        await auth.authenticate(key, CLIENT)
        hits = events["cache_hit"]
        samples = await _timed(warm, lambda: auth.authenticate(key, CLIENT))
        assert events["cache_hit"] - hits == warm, "the warm loop must hit the cache"
        print(f"  warm cache ({warm} calls)  {_fmt(samples, 1e-6, 'µs')}")
        nursery.cancel_scope.cancel()


async def _new_key(store: Store, hasher: KeyHasher, tenant_id: int) -> str:
    key, prefix = generate_key()
    key_hash = await trio.to_thread.run_sync(hasher.hash, key)
    await store.create_key(NewKey(tenant_id, f"k-{prefix}", prefix, key_hash))
    return key


async def _flood(store: Store, queue_max: int, samples: int, retry_factor: float) -> None:
    params = PARAMS[1]  # the default
    config = test_config(argon2=params, auth_queue_max=queue_max)
    hasher = KeyHasher(params)
    tenant = await store.create_tenant(f"flood-{generate_key()[1]}")
    keys = [await _new_key(store, hasher, tenant.id) for _ in range(2 * samples)]
    auth = Authenticator.from_config(store, config)

    async def honest(key: str, address: str) -> float:
        auth.epoch_observed(await store.revocation_epoch(), trio.current_time())
        start = time.perf_counter()
        await auth.authenticate(key, address)
        return time.perf_counter() - start

    idle = [await honest(keys[i], f"192.0.2.{i + 1}") for i in range(samples)]
    outcomes = {"refused": 0, "busy": 0, "throttled": 0}

    async def flooder(address: str) -> None:
        for _ in range(20):
            while True:
                try:
                    await auth.authenticate(generate_key()[0], address)
                except AuthBusyError as exc:
                    outcomes["busy"] += 1
                    await trio.sleep(exc.retry_after * retry_factor)
                    continue
                except AuthThrottledError:
                    outcomes["throttled"] += 1
                except AuthenticationError:
                    outcomes["refused"] += 1
                break

    loaded: list[float] = []
    async with trio.open_nursery() as nursery:
        for i in range(60):
            for _ in range(20):
                nursery.start_soon(flooder, f"127.0.0.{i + 2}")
        await trio.sleep(0.5)  # the flood is in full swing
        for n in range(samples):
            loaded.append(await honest(keys[samples + n], f"198.51.100.{n + 1}"))
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    threads = config.argon2_max_concurrency
    print(f"\nflood: 60 addresses x 20 wrong keys, queue max {queue_max}, {threads} threads")
    print(f"  retry after busy: Retry-After x {retry_factor}")
    print(f"  valid cold key, idle      {_fmt(idle, 1e-3, 'ms')}")
    print(f"  valid cold key, flooded   {_fmt(loaded, 1e-3, 'ms')}")
    ratio = statistics.median(loaded) / statistics.median(idle)
    print(f"  ratio of medians          {ratio:.2f}x")
    print(f"  flood so far: {outcomes}, gate refused {auth.gate.refused}")


async def main(database_url: str | None, warm: int, cold: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{tmp}/bench.db"
        async with open_store(url) as store:
            await store.migrate()
            print(f"store: {url.split('://', 1)[0]}")
            for params in PARAMS:
                await _bench(store, params, warm, cold)


async def flood_main(
    database_url: str | None, queue_max: int, samples: int, retry_factor: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{tmp}/bench.db"
        async with open_store(url) as store:
            await store.migrate()
            await _flood(store, queue_max, samples, retry_factor)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=100_000)
    parser.add_argument("--cold", type=int, default=30)
    parser.add_argument("--database-url", default=None, help="default: a scratch SQLite file")
    parser.add_argument("--flood", action="store_true", help="the 60-address flood (issue #14)")
    parser.add_argument("--queue-max", type=int, default=64)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--retry-factor", type=float, default=1.0)
    args = parser.parse_args()
    if args.flood:
        trio.run(flood_main, args.database_url, args.queue_max, args.samples, args.retry_factor)
    else:
        trio.run(main, args.database_url, args.warm, args.cold)
