"""Rate limits and budgets as users see them over HTTP (issue 5, "Done means").

What each test proves:

- `test_three_processes_share_one_requests_per_minute_window`: three `nzgw serve` processes on
  one Redis, 300 concurrent requests (100 to each) against requests_per_minute=100 → exactly 100
  answers 200, 200 answers 429 with Retry-After and the x-ratelimit-* headers; the 200s carry
  every remaining-requests value 99…0 exactly once (one atomic window, not three); at the
  default NZGW_COUNTERS_TIMEOUT, and no refusal is another bound's (a 503 from counters that
  answered late, a 429 for a body the busy gateway read late). Run on one Redis and on a Redis
  Cluster (3 masters, `NZGW_REDIS_CLUSTER=true`).
- `test_three_processes_share_one_daily_budget`: a daily token budget that each process alone
  would overrun is not overrun by the three together; every admitted request is charged exactly
  once in the ledger (written by the graceful shutdown's last flush only).
- `test_redis_killed_under_load_fails_closed_and_an_empty_restart_keeps_the_budget`: Redis
  killed while clients run → every request that starts afterwards is a fast 503, none reaches
  the backend, /readyz names `counters`; restarted empty → admitted again, and a key whose
  daily budget was mostly used is refused at exactly the request it would have been without
  the restart (the budget was rebuilt from the ledger).
- `test_a_stalled_redis_is_refused_within_the_counters_timeout`: Redis alive but silent
  (SIGSTOP) → 503 once it has been silent for NZGW_COUNTERS_TIMEOUT, nothing forwarded;
  resumed → served again.
- `test_client_leaving_mid_stream_releases_the_lease_and_is_charged` (memory and Redis
  counters): with concurrent_requests=1, the slot is held while a slow stream runs and freed
  when its client leaves; the tokens relayed up to then are charged in the ledger.
- Fail closed with in-process counters: not applicable (memory cannot fail), not tested.

Rules of this module:

- Every Redis test runs its own `redis-server` (free port, `--save '' --appendonly no`: a
  restart comes back empty), never the shared one: nzgw's key names are fixed and every fresh
  store numbers its tenants from 1, so anything else writing there (another run of this suite
  flushing "its" database included) would count in, or wipe, the windows and budgets under
  test. No `redis-server`: the test is skipped with the reason, but with `CI=true` it fails.
- Multi-process tests run real `python -m nzgw serve` processes (`NZGW_BIND=127.0.0.1:0`, cwd
  `tmp_path` so no `.env` of the checkout is read) sharing one SQLite file that the test
  prepares; readiness is each process's "nzgw ready" log line (which names its port), never a
  sleep. The Ollama emulator runs in the test's own Trio run.
- No sleeps as synchronisation; the one poll (bounded) waits for /readyz to see a
  redis-server that was just (re)started, which offers no event to wait on. Timing assertions
  (the counters timeout) run on real time: a real Redis's timeouts cannot run on a MockClock;
  the disconnect test needs no timing at all (it synchronises on frames read and on
  settlement, `Harness.wait_finished`).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import math
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from nzgw.adapters.stores import open_store
from nzgw.core.models import Budgets, Limits
from nzgw.http.gateway import RequestInfo
from nzgw.ports import NewKey, Store, UsageQuery, UsageReportRow
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import EmulatorSettings, open_emulator
from tests.counters.conftest import COREDIS_CONNECT_LEAK, OwnedRedis, own_redis_server
from tests.harness import FAST_ARGON2, Harness, open_harness
from tests.process_log import ProcessLog, open_nzgw, reap
from tests.redis_cluster import own_redis_cluster

PROCESSES = 3
PER_PROCESS = 100
COUNTERS_TIMEOUT = 0.5  # NZGW_COUNTERS_TIMEOUT: its default
# A hang guard, not a latency figure (that is measured in bench/, bench/results/faults.md).
FAIL_CLOSED_GUARD = 10.0


def _collect_failed_connections(caplog: pytest.LogCaptureFixture) -> None:
    """Collect coredis' failed connections now, under the test's warning filter.

    The adapter logs each failed call with its exception, and pytest keeps the log records
    (and through their tracebacks, the connections) until after the test's teardown: a
    `gc.collect()` in a fixture is too early, and they would warn at the end of the session.
    """
    caplog.clear()
    gc.collect()


# --- Redis ----------------------------------------------------------------------------------------


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    """A redis-server of this test's own (free port, `--save '' --appendonly no`)."""
    with own_redis_server() as server:
        yield server


# --- requests and the ledger ----------------------------------------------------------------------


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def _body(doc: dict[str, Any]) -> bytes:
    # Sent as these exact bytes: the gateway's reservation is computed from the body size.
    return json.dumps(doc, separators=(",", ":")).encode()


GENERATE = _body({"model": "llama3", "prompt": "x", "stream": False})
CHAT_CAP = 8
CHAT = _body(
    {"model": "llama3", "messages": [{"role": "user", "content": "x"}], "max_tokens": CHAT_CAP}
)
# What the gateway reserves for CHAT: prompt estimate (body bytes / 4) plus the output cap.
CHAT_RESERVATION = (len(CHAT) + 3) // 4 + CHAT_CAP


def _chat_tokens(response: httpx.Response) -> int:
    usage = response.json()["usage"]
    total: int = usage["prompt_tokens"] + usage["completion_tokens"]
    return total


async def _new_key(
    store: Store, *, limits: Limits = Limits(), budgets: Budgets = Budgets()
) -> tuple[str, int]:
    """A key of tenant "acme" (created if need be): the full key and its id."""
    tenants = {t.name: t for t in await store.list_tenants()}
    tenant = tenants.get("acme") or await store.create_tenant("acme")
    template = NewKey(tenant.id, f"k{len(await store.list_keys())}", "", "", limits=limits)
    full_key, key = await issue_key(
        store, KeyHasher(FAST_ARGON2), attrs.evolve(template, budgets=budgets)
    )
    return full_key, key.id


async def _usage(store: Store, key_id: int) -> UsageReportRow:
    """The key's usage report: requests and tokens from the ledger, refusals from the audit."""
    (row,) = await store.usage_report(UsageQuery(by="model", key_id=key_id))
    return row


def _seconds_to_midnight_utc() -> float:
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - now).total_seconds()


# --- real gateway processes -----------------------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class GatewayProcess(ProcessLog):
    """One `python -m nzgw serve` and the JSON log lines it wrote so far."""

    url: str = ""

    async def wait_ready(self) -> None:
        ready = await self.wait_logged("nzgw ready")
        self.url = f"http://{ready[0]['bind']}"


@contextlib.asynccontextmanager
async def open_gateways(
    tmp_path: Path,
    *,
    redis_url: str,
    database_url: str,
    ollama_url: str,
    redis_cluster: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[list[GatewayProcess]]:
    """`PROCESSES` gateways on their own ports, one Redis, one store; ready when yielded.
    `extra_env`: more settings of the processes (e.g. OLLAMA_PARALLEL).

    The usage flush interval is long: the ledger is written by the graceful shutdown's last
    flush (`stop_gracefully`), which is what the budget test reads. Leaving the block kills
    whatever still runs.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONUNBUFFERED": "1",
        "REDIS_URL": redis_url,
        "NZGW_REDIS_CLUSTER": "true" if redis_cluster else "false",
        "DATABASE_URL": database_url,
        "NZGW_BIND": "127.0.0.1:0",
        "OLLAMA_BASE_URL": ollama_url,
        "NZGW_LOG_FORMAT": "json",
        "NZGW_MIGRATE_ON_START": "false",  # the test migrated; three at once would race
        "NZGW_GRACEFUL_TIMEOUT": "5",
        # Discovery polls get min(interval, 5 s): on a busy host a 0.5 s poll of the
        # emulator times out, the backend leaves the rotation and requests get 503.
        "NZGW_DISCOVERY_INTERVAL": "5",
        "NZGW_FLUSH_INTERVAL": "600",
        # NZGW_COUNTERS_TIMEOUT stays at its default (0.5 s): a burst that keeps three busy
        # gateways' loops late for their replies is not a silent Redis (issue 13, finding 2).
        **(extra_env or {}),
    }
    gateways: list[GatewayProcess] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(PROCESSES):
                gateway = GatewayProcess(process=await open_nzgw("serve", env=env, cwd=tmp_path))
                gateways.append(gateway)
                nursery.start_soon(gateway.read_stderr)
            with trio.fail_after(30):
                for gateway in gateways:
                    await gateway.wait_ready()
            yield gateways
            for gateway in gateways:
                if gateway.process.returncode is None:
                    gateway.process.kill()
    finally:
        for gateway in gateways:
            await reap(gateway.process)


async def stop_gracefully(gateways: list[GatewayProcess]) -> None:
    """SIGTERM each: it drains, flushes its usage and audit rows, and exits 0."""
    for gateway in gateways:
        gateway.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        for gateway in gateways:
            assert await gateway.process.wait() == 0, gateway.lines[-5:]
            await gateway.eof.wait()
    for gateway in gateways:
        errors = [line for line in gateway.lines if line.get("level") == "error"]
        assert not errors, errors


@contextlib.asynccontextmanager
async def open_clients(gateways: list[GatewayProcess]) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One client per gateway, with room for `PER_PROCESS` concurrent connections."""
    room = httpx.Limits(max_connections=PER_PROCESS, max_keepalive_connections=PER_PROCESS)
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=gateway.url, limits=room, timeout=30)
            )
            for gateway in gateways
        ]


async def _fire(
    clients: list[httpx.AsyncClient], path: str, body: bytes, key: str
) -> list[tuple[int, httpx.Response]]:
    """`PER_PROCESS` concurrent requests to each gateway, all at once: (gateway index, answer)."""
    answers: list[tuple[int, httpx.Response]] = []

    async def one(index: int) -> None:
        answers.append((index, await clients[index].post(path, content=body, headers=_auth(key))))

    async with trio.open_nursery() as nursery:
        for _ in range(PER_PROCESS):
            for index in range(len(clients)):
                nursery.start_soon(one, index)
    return answers


async def _warm_up(clients: list[httpx.AsyncClient], key: str) -> None:
    # Authenticates the key once per process (a listing is not admitted: no limit is touched),
    # so that the burst measures admission, not a hundred first-time key verifications.
    for client in clients:
        listing = await client.get("/api/tags", headers=_auth(key))
        assert listing.status_code == 200


# --- 1. three processes, one window ---------------------------------------------------------------


TOKENS_PER_MINUTE = 1_000_000  # never reached: set so that the -tokens headers are sent


@attrs.define
class SharedRedis:
    url: str
    cluster: bool


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedRedis]:
    """The gateways' Redis: one server, or a Redis Cluster (3 masters), of this test's own."""
    if request.param == "redis":
        yield SharedRedis(request.getfixturevalue("owned_redis").url, cluster=False)
        return
    with own_redis_cluster(tmp_path / "redis-cluster") as cluster:
        yield SharedRedis(cluster.url, cluster=True)


@pytest.mark.redis
async def test_three_processes_share_one_requests_per_minute_window(
    tmp_path: Path, shared_redis: SharedRedis
) -> None:
    database_url = f"sqlite:///{tmp_path}/nzgw.db"
    async with open_store(database_url) as store:
        await store.migrate()
        rates = Limits(requests_per_minute=PER_PROCESS, tokens_per_minute=TOKENS_PER_MINUTE)
        key, _ = await _new_key(store, limits=rates)
    settings = EmulatorSettings(tokens_per_reply=2)
    async with (
        open_emulator(settings) as emulator,
        open_gateways(
            tmp_path,
            redis_url=shared_redis.url,
            redis_cluster=shared_redis.cluster,
            database_url=database_url,
            ollama_url=emulator.url,
        ) as gateways,
        open_clients(gateways) as clients,
    ):
        await _warm_up(clients, key)
        answers = await _fire(clients, "/api/generate", GENERATE, key)
        await stop_gracefully(gateways)

    statuses = collections.Counter(response.status_code for _, response in answers)
    # Every refusal is the shared window's, none another bound's (a 503 for counters that
    # answered late, a 429 for bodies "still arriving" that had arrived whole).
    others = [r.text for _, r in answers if r.status_code != 200 and "per minute" not in r.text]
    warned = [line.get("msg") for g in gateways for line in g.lines if line.get("level") != "info"]
    assert not others, (collections.Counter(others), collections.Counter(warned))
    assert statuses == {200: PER_PROCESS, 429: 2 * PER_PROCESS}
    # Each process alone saw PER_PROCESS requests, as many as the limit: only a window shared
    # by all three refuses any of them.
    assert collections.Counter(index for index, _ in answers) == dict.fromkeys(
        range(PROCESSES), PER_PROCESS
    )
    admitted = [response for _, response in answers if response.status_code == 200]
    refused = [response for _, response in answers if response.status_code == 429]
    for response in admitted:
        assert response.headers["x-ratelimit-limit-requests"] == str(PER_PROCESS)
        assert response.headers["x-ratelimit-reset-requests"]
        assert response.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < TOKENS_PER_MINUTE
        assert response.headers["x-ratelimit-reset-tokens"]
        assert response.json()["done"] is True
    # One atomic window: each admission saw a different count, 99 remaining down to 0.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(PER_PROCESS))
    # A request leaves a one-minute window at most 60 s from now: Retry-After is never more.
    retry_after = [int(response.headers["retry-after"]) for response in refused]
    assert min(retry_after) >= 1 and max(retry_after) <= 60, collections.Counter(retry_after)
    for response in refused:
        assert response.headers["x-ratelimit-limit-requests"] == str(PER_PROCESS)
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["x-ratelimit-reset-requests"]
        assert response.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
        assert response.headers["x-ratelimit-remaining-tokens"]
        assert response.headers["x-ratelimit-reset-tokens"]
        assert "requests per minute limit" in response.json()["error"]
    assert len([r for r in emulator.requests if r.path == "/api/generate"]) == PER_PROCESS


# --- 2. three processes, one budget ---------------------------------------------------------------


BUDGET = 1_000


@pytest.mark.redis
async def test_three_processes_share_one_daily_budget(
    tmp_path: Path, owned_redis: OwnedRedis
) -> None:
    database_url = f"sqlite:///{tmp_path}/nzgw.db"
    async with open_store(database_url) as store:
        await store.migrate()
        key, key_id = await _new_key(store, budgets=Budgets(daily_tokens=BUDGET))
    settings = EmulatorSettings(tokens_per_reply=CHAT_CAP)
    async with (
        open_emulator(settings) as emulator,
        open_gateways(
            tmp_path, redis_url=owned_redis.url, database_url=database_url, ollama_url=emulator.url
        ) as gateways,
        open_clients(gateways) as clients,
    ):
        await _warm_up(clients, key)
        day_left = _seconds_to_midnight_utc()  # at most this, plus a rounding up, for all
        answers = await _fire(clients, "/v1/chat/completions", CHAT, key)
        await stop_gracefully(gateways)  # their last flush writes the ledger
    async with open_store(database_url) as store:
        usage = await _usage(store, key_id)

    admitted = [response for _, response in answers if response.status_code == 200]
    refused = [response for _, response in answers if response.status_code == 429]
    assert len(admitted) + len(refused) == PROCESSES * PER_PROCESS
    assert refused
    charged = [_chat_tokens(response) for response in admitted]
    # Each request used at most its reservation (the output cap is a true bound), so the
    # in-flight reservations at the moment the budget ran out add no slack to the bound
    # "charged <= budget + in-flight reservations": nothing may pass the budget itself.
    assert max(charged) <= CHAT_RESERVATION
    # The test discriminates: each process alone would have let more than the budget through.
    assert PER_PROCESS * min(charged) > BUDGET
    assert usage.prompt_tokens + usage.completion_tokens <= BUDGET
    # Every admitted request charged exactly once, by whichever process served it.
    assert usage.requests == len(admitted)
    assert usage.prompt_tokens + usage.completion_tokens == sum(charged)
    # Refused only when the budget was truly short of a reservation: each refusal needs
    # used + reserved + CHAT_RESERVATION > BUDGET, and each admission adds <= CHAT_RESERVATION.
    assert len(admitted) >= BUDGET // CHAT_RESERVATION
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == "budget_exhausted"
        assert error["type"] == "insufficient_quota"
        assert "daily token budget" in error["message"]
        if "retry-after" in response.headers:  # never beyond the end of the day
            assert int(response.headers["retry-after"]) <= day_left + 1
    assert usage.refusals == len(refused)  # each one audited
    generated = [r for r in emulator.requests if r.path == "/v1/chat/completions"]
    assert len(generated) == len(admitted)


# --- 3. Redis stopped under load ------------------------------------------------------------------


@attrs.frozen
class Outcome:
    started: float
    took: float
    status: int
    retry_after: str | None
    request_id: str


async def _generate(h: Harness, key: str) -> httpx.Response:
    return await h.client.post("/api/generate", content=GENERATE, headers=_auth(key))


async def _chat(h: Harness, key: str) -> httpx.Response:
    return await h.client.post("/v1/chat/completions", content=CHAT, headers=_auth(key))


async def _readyz_missing(h: Harness) -> list[str]:
    response = await h.client.get("/readyz")
    if response.status_code == 200:
        return []
    assert response.status_code == 503
    missing: list[str] = response.json()["missing"]
    return missing


async def _wait_counters_ready(h: Harness) -> None:
    """Until /readyz stops naming `counters`. A bounded poll: a redis-server that just started
    has no event to wait on, and on a busy host the gateway's first connect to it may miss
    its short connect timeout (then that request is refused, 503, as it must be)."""
    with trio.fail_after(10):
        while True:
            if "counters" not in await _readyz_missing(h):
                return
            await trio.sleep(0.02)  # the poll's pace, not a synchronisation


async def _wait_settled(h: Harness, request_ids: set[str]) -> list[RequestInfo]:
    """Until the requests with these X-Request-Id have been settled: their infos."""
    with trio.fail_after(10):
        while not request_ids <= {info.request_id for info in h.finished}:
            await h.wait_finished(len(h.finished) + 1)
    return [info for info in h.finished if info.request_id in request_ids]


async def _settled(h: Harness, request: Awaitable[httpx.Response]) -> httpx.Response:
    """The answer to `request` once its settlement ran too: the next admission then sees its
    real tokens, not its reservation."""
    answer = await request
    await _wait_settled(h, {answer.headers["x-request-id"]})
    return answer


@pytest.mark.redis
@COREDIS_CONNECT_LEAK
async def test_redis_killed_under_load_fails_closed_and_an_empty_restart_keeps_the_budget(
    tmp_path: Path, owned_redis: OwnedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_harness(
        tmp_path,
        settings=lambda _: EmulatorSettings(tokens_per_reply=CHAT_CAP),
        redis_url=owned_redis.url,
        counters_timeout=COUNTERS_TIMEOUT,
        flush_interval=0.05,
    ) as h:
        store = h.running.store
        load_key = h.key  # no limits, no budget
        await _wait_counters_ready(h)

        # A key whose budget admits exactly `total` chat requests one after the other: after
        # `before` of them, `total - before` more, whatever happens to Redis in between.
        first = await _settled(h, _chat(h, load_key))
        assert first.status_code == 200
        per_request = _chat_tokens(first)
        total, before = 10, 7
        budget = CHAT_RESERVATION + (total - 1) * per_request + per_request // 2
        budget_key, budget_key_id = await _new_key(store, budgets=Budgets(daily_tokens=budget))
        for _ in range(before):
            answer = await _settled(h, _chat(h, budget_key))
            assert answer.status_code == 200 and _chat_tokens(answer) == per_request
        # In the ledger before Redis goes (the flusher also runs every 0.05 s).
        await h.running.limiter.flush_usage(store)
        used = await _usage(store, budget_key_id)
        assert used.prompt_tokens + used.completion_tokens == before * per_request

        # Load: clients that never pause; Redis is killed while they run.
        outcomes: list[Outcome] = []
        killed_at = math.inf  # set when Redis is killed
        warmed, enough, stop = trio.Event(), trio.Event(), trio.Event()

        async def client() -> None:
            while not stop.is_set():
                started = trio.current_time()
                answer = await _generate(h, load_key)
                outcomes.append(
                    Outcome(
                        started,
                        trio.current_time() - started,
                        answer.status_code,
                        answer.headers.get("retry-after"),
                        answer.headers["x-request-id"],
                    )
                )
                if sum(o.status == 200 for o in outcomes) >= 40:
                    warmed.set()
                if sum(o.started > killed_at for o in outcomes) >= 200:
                    enough.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(client)
                await warmed.wait()
                killed_at = trio.current_time()
                owned_redis.kill()
                await enough.wait()
                stop.set()
        settled = await _wait_settled(h, {o.request_id for o in outcomes})

        before_kill = [o for o in outcomes if o.started + o.took < killed_at]
        after_kill = [o for o in outcomes if o.started > killed_at]
        assert len(before_kill) >= 40 and all(o.status == 200 for o in before_kill)
        assert len(after_kill) >= 200
        assert all(o.status == 503 and o.retry_after == "1" for o in after_kill)
        assert max(o.took for o in after_kill) <= FAIL_CLOSED_GUARD
        # None admitted: the backend saw exactly the requests answered 200 (those admitted
        # before the kill, some finishing after it); no request refused with 503 reached it.
        admitted = sum(o.status == 200 for o in outcomes)
        generated = [r for r in h.emulator.requests if r.path == "/api/generate"]
        assert len(generated) == admitted
        refused = [info for info in settled if info.status == 503]
        assert {info.refusal for info in refused} == {"counters_unavailable"}  # audited so
        assert len(refused) == len(outcomes) - admitted

        assert (await _settled(h, _chat(h, budget_key))).status_code == 503
        assert "counters" in await _readyz_missing(h)

        # EMPTY: no window, lease or budget counter survived. (`start` polls the new server's
        # port, bounded: a process coming up has no event to wait on.)
        owned_redis.start()
        await _wait_counters_ready(h)
        assert (await _settled(h, _generate(h, load_key))).status_code == 200
        after_restart = 0
        while (answer := await _settled(h, _chat(h, budget_key))).status_code == 200:
            after_restart += 1
            assert after_restart <= total, "the restart reset the budget"
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "budget_exhausted"
        assert after_restart == total - before  # refused where it would have been anyway
        assert len([r for r in h.emulator.requests if r.path == "/api/generate"]) == admitted + 1
    _collect_failed_connections(caplog)


@pytest.mark.redis
@COREDIS_CONNECT_LEAK
async def test_a_stalled_redis_is_refused_within_the_counters_timeout(
    tmp_path: Path, owned_redis: OwnedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_harness(
        tmp_path, redis_url=owned_redis.url, counters_timeout=COUNTERS_TIMEOUT
    ) as h:
        await _wait_counters_ready(h)
        assert (await _generate(h, h.key)).status_code == 200
        owned_redis.stall()  # SIGSTOP: connections are accepted by the kernel, nothing answers
        took: list[float] = []

        async def one() -> None:
            started = trio.current_time()
            answer = await _generate(h, h.key)
            took.append(trio.current_time() - started)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len(took) == 20 and max(took) <= FAIL_CLOSED_GUARD, took
        assert "counters" in await _readyz_missing(h)
        assert len([r for r in h.emulator.requests if r.path == "/api/generate"]) == 1
        owned_redis.resume()
        assert (await _generate(h, h.key)).status_code == 200
        assert await _readyz_missing(h) == []
    _collect_failed_connections(caplog)


# --- 4. client disconnect mid-stream --------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def counters_url(request: pytest.FixtureRequest) -> str:
    """The gateway's REDIS_URL: empty for in-process counters, else a server of the test's."""
    if request.param == "memory":
        return ""
    server: OwnedRedis = request.getfixturevalue("owned_redis")
    return server.url


async def test_client_leaving_mid_stream_releases_the_lease_and_is_charged(
    tmp_path: Path, counters_url: str
) -> None:
    frames_read = 3
    slow = EmulatorSettings(tokens_per_reply=2_000, token_delay=0.01)  # 20 s if read to the end
    async with open_harness(tmp_path, settings=lambda _: slow, redis_url=counters_url) as h:
        key = await h.new_key(name="one-at-a-time", limits=Limits(concurrent_requests=1))
        short = _body(
            {"model": "llama3", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
        )
        long = _body({"model": "llama3", "prompt": "x", "options": {"num_predict": 2_000}})

        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        head = (
            f"POST /api/generate HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(long)}\r\n\r\n"
        )
        await stream.send_all(head.encode() + long)
        received = b""
        with trio.fail_after(10):
            while received.count(b'"done":false') < frames_read:
                chunk = await stream.receive_some(65536)
                assert chunk, received
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        # The slot is taken while the stream runs.
        busy = await h.client.post("/api/generate", content=short, headers=_auth(key))
        assert busy.status_code == 429
        assert "concurrent requests limit" in busy.json()["error"]
        await stream.aclose()  # the client leaves mid-stream

        with trio.fail_after(10):
            finished = await h.wait_finished(2)  # the refusal and the stream: settled
        (left,) = [info for info in finished if info.streamed]
        assert left.outcome == "cancelled"
        assert left.usage is not None
        assert frames_read <= left.usage.completion_tokens < 2_000
        (upstream,) = [r for r in h.emulator.requests if b'"num_predict":2000' in r.body]
        assert not upstream.completed  # cut off mid-stream, not read to the end

        again = await h.client.post("/api/generate", content=short, headers=_auth(key))
        assert again.status_code == 200  # the lease was released

        with trio.fail_after(10):
            await h.wait_finished(3)
        await h.running.limiter.flush_usage(h.running.store)
        keys = {k.name: k.id for k in await h.running.store.list_keys()}
        usage = await _usage(h.running.store, keys["one-at-a-time"])
        assert usage.requests == 2  # the stream left behind, and `again`
        assert usage.completion_tokens == left.usage.completion_tokens + again.json()["eval_count"]
        assert usage.prompt_tokens > 0
