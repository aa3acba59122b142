"""Fixtures of the Counters contract suite: one suite, two backends (memory and the real Redis).

Rules of this suite:

- Every contract test takes `backend` and runs once per backend; the Redis run uses the server
  at `NZGW_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0) under a random key prefix per
  test, deleted afterwards. Redis unreachable: the Redis runs are skipped with the reason, but
  with `CI=true` they fail (a CI run must never pass by skipping its Redis half).
- Time is passed in explicitly (epoch milliseconds) to the Counters port, so the tests control
  it on both backends; Limiter tests use `trio.testing.MockClock(autojump_threshold=0)`.
- Tests that need to stop, stall, kill or restart Redis use their own `redis-server` on a free
  port (`owned_redis`), never the shared one.
"""

from __future__ import annotations

import gc
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import UTC, date, datetime

import attrs
import coredis
import pytest
import trio

from nzgw.adapters.memory_counters import MemoryCounters
from nzgw.adapters.redis import RedisCounters, open_redis_counters
from nzgw.adapters.redis_link import entered
from nzgw.core.limits import (
    AdmissionRequest,
    AdmissionResult,
    EffectiveLimits,
    Lease,
    Periods,
    budget_zone,
    epoch_ms,
    periods_at,
)
from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Tenant
from nzgw.ports import (
    BudgetSeed,
    BudgetSnapshot,
    Counters,
    SeedNeeded,
    StoreUnavailableError,
    UsageRow,
    UsageTotals,
)
from tests.redis_cluster import EPHEMERAL_REDIS_ARGS, own_redis_cluster

REDIS_URL = os.environ.get("NZGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# coredis 6.9 bug: a connection whose TCP connect fails never closes the anyio memory streams it
# made in __init__; they warn when collected. Tests that make connects fail ignore only those
# warnings, and `collect_garbage` makes sure they are collected within the test, not later.
COREDIS_CONNECT_LEAK = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*MemoryObject(Send|Receive)Stream\.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture
def collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
T0 = datetime(2025, 3, 31, 23, 0, tzinfo=UTC)  # an hour before a day and a month end
CALL_TIMEOUT = 0.5


# --- Redis reachability ---------------------------------------------------------------------------


def _redis_address(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.partition(":")
    return host or "127.0.0.1", int(port or 6379)


def _redis_answers(url: str) -> str | None:
    """None if the server answers PING, else why not."""
    try:
        with socket.create_connection(_redis_address(url), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"Redis at {url} unreachable: {exc}"
    return None if answer.startswith(b"+PONG") else f"Redis at {url} answered {answer!r}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    problem = _redis_answers(REDIS_URL)
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{problem} (CI=true: the Redis half of the suite must run)")
        pytest.skip(f"{problem}; set NZGW_TEST_REDIS_URL or start redis-server")
    return REDIS_URL


async def delete_prefix(
    client: coredis.Redis[str] | coredis.RedisCluster[str], prefix: str
) -> None:
    keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(keys[i : i + 500])


@asynccontextmanager
async def raw_redis(
    url: str, *, cluster: bool = False
) -> AsyncIterator[coredis.Redis[str] | coredis.RedisCluster[str]]:
    client: coredis.Redis[str] | coredis.RedisCluster[str]
    if cluster:
        host, port = _redis_address(url)
        client = coredis.RedisCluster(host, port, decode_responses=True)
    else:
        client = coredis.Redis.from_url(url, decode_responses=True)
    async with entered(client):
        yield client


# --- the two backends -----------------------------------------------------------------------------


@attrs.define
class Backend:
    """A way to open Counters, and to make them lose everything (a restart, as seen by them)."""

    name: str
    open: Callable[[], AbstractAsyncContextManager[Counters]]
    wipe: Callable[[Counters], AbstractAsyncContextManager[Counters]]


@asynccontextmanager
async def _open_memory() -> AsyncIterator[Counters]:
    yield MemoryCounters()


@asynccontextmanager
async def _wipe_memory(_old: Counters) -> AsyncIterator[Counters]:
    yield MemoryCounters()


def _redis_backend(url: str, *, cluster: bool = False) -> Backend:
    @asynccontextmanager
    async def open_() -> AsyncIterator[Counters]:
        prefix = f"nzgwtest:{secrets.token_hex(6)}:"
        try:
            async with open_redis_counters(
                url, call_timeout=CALL_TIMEOUT, prefix=prefix, caller_clock=True, cluster=cluster
            ) as c:
                yield c
        finally:
            with trio.CancelScope(shield=True):
                async with raw_redis(url, cluster=cluster) as client:
                    await delete_prefix(client, prefix)

    @asynccontextmanager
    async def wipe(old: Counters) -> AsyncIterator[Counters]:
        assert isinstance(old, RedisCounters)
        async with raw_redis(url, cluster=cluster) as client:
            await delete_prefix(client, old._prefix)
        yield old

    return Backend("redis-cluster" if cluster else "redis", open_, wipe)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of the session's own (3 masters, tests/redis_cluster.py)."""
    with own_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.url


@pytest.fixture(
    scope="session",
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ],
)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", _open_memory, _wipe_memory)
    if request.param == "redis-cluster":
        return _redis_backend(request.getfixturevalue("redis_cluster_url"), cluster=True)
    return _redis_backend(request.getfixturevalue("redis_url"))


# --- values ---------------------------------------------------------------------------------------


NO_LIMITS = Limits()
NO_BUDGETS = Budgets()


def principal(
    tenant_id: int = 1,
    key_id: int = 10,
    *,
    key_limits: Limits = NO_LIMITS,
    key_budgets: Budgets = NO_BUDGETS,
    tenant_limits: Limits = NO_LIMITS,
    tenant_budgets: Budgets = NO_BUDGETS,
) -> Principal:
    tenant = Tenant(tenant_id, f"t{tenant_id}", limits=tenant_limits, budgets=tenant_budgets)
    key = ApiKey(key_id, tenant_id, f"k{key_id}", f"p{key_id}", "h", limits=key_limits)
    key = attrs.evolve(key, budgets=key_budgets)
    return Principal(key, tenant)


def admission(
    who: Principal,
    *,
    now: datetime = T0,
    at_ms: int = 0,
    reserve: int = 10,
    lease_ttl_ms: int = 60_000,
    lease_id: str | None = None,
    zone: str = "UTC",
) -> AdmissionRequest:
    now_ms = epoch_ms(now) + at_ms
    moment = datetime.fromtimestamp(now_ms / 1000, UTC)
    return AdmissionRequest(
        tenant_id=who.tenant.id,
        key_id=who.key.id,
        lease_id=lease_id or secrets.token_hex(8),
        reserve_tokens=reserve,
        now_ms=now_ms,
        lease_ttl_ms=lease_ttl_ms,
        periods=periods_at(moment, budget_zone(zone)),
        limits=EffectiveLimits.of(who),
    )


def periods_of(now_ms: int) -> Periods:
    return periods_at(datetime.fromtimestamp(now_ms / 1000, UTC), UTC)


# --- a usage ledger -------------------------------------------------------------------------------


@attrs.define
class FakeLedger:
    """The Store's usage ledger, in memory, with the SQL adapters' semantics; can fail or stall."""

    rows: dict[tuple[date, int, int, str], list[int]] = attrs.Factory(dict)
    fail: bool = False
    stall: float = 0.0
    totals_calls: int = 0
    add_calls: int = 0
    batch_ids: set[str] = attrs.Factory(set)

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        self.add_calls += 1
        await self._io()
        if batch_id is not None:
            if batch_id in self.batch_ids:
                return  # added before
            self.batch_ids.add(batch_id)
        for r in rows:
            acc = self.rows.setdefault((r.day, r.tenant_id, r.key_id, r.model), [0, 0, 0, 0])
            acc[0] += r.requests
            acc[1] += r.prompt_tokens
            acc[2] += r.completion_tokens
            acc[3] += r.refusals

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        self.totals_calls += 1
        await self._io()
        per_key: dict[int, list[int]] = {}
        for (row_day, row_tenant, key_id, _model), acc in self.rows.items():
            if row_tenant != tenant_id:
                continue
            tokens = acc[1] + acc[2]
            t = per_key.setdefault(key_id, [0, 0, 0])
            t[0] += tokens if row_day == day else 0
            t[1] += tokens if row_day >= month_start else 0
            t[2] += tokens
        keys = {k: UsageTotals(*v) for k, v in per_key.items()}
        tenant = UsageTotals(
            sum(t.day_tokens for t in keys.values()),
            sum(t.month_tokens for t in keys.values()),
            sum(t.lifetime_tokens for t in keys.values()),
        )
        return tenant, keys

    async def _io(self) -> None:
        await trio.sleep(self.stall)
        if self.fail:
            raise StoreUnavailableError("ledger down (test)")

    def tokens(self, tenant_id: int | None = None) -> int:
        return sum(
            acc[1] + acc[2]
            for (_d, t, _k, _m), acc in self.rows.items()
            if tenant_id is None or t == tenant_id
        )


# --- memory counters that can be restarted or slowed down --------------------------------------


class SwappableCounters:
    """Memory counters that can lose everything (a restart) and be slowed down per call."""

    def __init__(self) -> None:
        self.inner = MemoryCounters()
        self.settle_delay = 0.0
        self.seed_delay = 0.0
        self.seeds = 0

    def restart(self) -> None:
        self.inner = MemoryCounters()

    async def ping(self) -> None:
        await self.inner.ping()

    async def admit(self, request: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        return await self.inner.admit(request)

    async def settle(self, lease: Lease, *, tokens: int, now_ms: int) -> None:
        await trio.sleep(self.settle_delay)
        await self.inner.settle(lease, tokens=tokens, now_ms=now_ms)

    async def refresh(self, lease: Lease, *, now_ms: int) -> bool:
        return await self.inner.refresh(lease, now_ms=now_ms)

    async def seed(self, seed: BudgetSeed) -> bool:
        self.seeds += 1
        await trio.sleep(self.seed_delay)
        return await self.inner.seed(seed)

    async def budget_snapshot(
        self, tenant_id: int, key_ids: Sequence[int], periods: Periods
    ) -> BudgetSnapshot | None:
        return await self.inner.budget_snapshot(tenant_id, key_ids, periods)

    async def correct_budgets(
        self,
        snapshot: BudgetSnapshot,
        tenant: UsageTotals,
        keys: Mapping[int, UsageTotals],
        *,
        now_ms: int,
    ) -> bool:
        return await self.inner.correct_budgets(snapshot, tenant, keys, now_ms=now_ms)


# --- a redis-server of our own --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class OwnedRedis:
    """A test-owned redis-server without persistence: a restart comes back empty."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), *EPHEMERAL_REDIS_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while _redis_answers(self.url) is not None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stall(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def own_redis_server() -> Iterator[OwnedRedis]:
    """A redis-server of the caller's own on a free port, killed at the end (also for tests
    outside this package: a shared Redis is flushed and written by parallel runs)."""
    if not os.path.exists(REDIS_SERVER):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{REDIS_SERVER} not found (CI=true)")
        pytest.skip(f"{REDIS_SERVER} not found")
    server = OwnedRedis(_free_port())
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.resume()
        server.kill()


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    with own_redis_server() as server:
        yield server
