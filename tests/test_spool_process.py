"""Nothing lost when PostgreSQL is away (issue 13), on real `nzgw serve` processes with
PostgreSQL (a scratch database) and a redis-server of the test's own.

PostgreSQL is reached through a TCP proxy (tests/tcp_proxy.py) that the test freezes: the
connections stay open and nothing answers, the way a hung or partitioned database looks. With
it frozen the gateway keeps answering (keys cached, counters in Redis); the flushes hang, and
their rows are spooled after NZGW_STORE_TIMEOUT. Then:

* SIGTERM: the last flushes give up at their deadline, the rest goes to the spool; a restart
  with PostgreSQL back writes it before serving. Every usage row and audit row is in the
  database exactly once, the audit chain verifies, nothing is counted lost.
* SIGKILL: no last flush. What was spooled before the kill is in the database after the
  restart, exactly once (the bound: what settled after the last spool append is lost).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from nzgw.adapters.stores import open_store
from nzgw.ports import AuditQuery, NewKey, Store, UsageQuery
from nzgw.services.audit import verify_audit
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import open_emulator
from tests.counters.conftest import OwnedRedis, own_redis_server
from tests.harness import FAST_ARGON2
from tests.metrics_samples import parse_exposition
from tests.process_log import ProcessLog, open_nzgw, reap
from tests.store import pg
from tests.tcp_proxy import open_tcp_proxy

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.hang_guard(240)]

CHAT = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
REQUESTS = 12


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg.scratch_database() as url:
        yield url


@pytest.fixture
def redis() -> Iterator[OwnedRedis]:
    with own_redis_server() as server:
        yield server


@attrs.define(eq=False, kw_only=True)
class Gateway(ProcessLog):
    url: str = ""
    metrics_url: str = ""

    async def wait_ready(self) -> None:
        (ready,) = await self.wait_logged("nzgw ready")
        self.url = f"http://{ready['bind']}"
        self.metrics_url = f"http://{ready['metrics']}/metrics"

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.metrics_url)).text
        return {
            name: value for (name, labels), value in parse_exposition(text).items() if not labels
        }

    def spooled_requests(self, kind: str) -> int:
        """Requests whose rows of `kind` were spooled while running (from the log lines)."""
        return sum(
            int(line["spool_requests"])
            for line in self.lines
            if line.get("spool_kind") == kind and line.get("msg", "").endswith("store is away")
        )


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Gateway]:
    """One `nzgw serve`, ready when yielded; killed if still running at the end."""
    process = await open_nzgw("serve", env=env, cwd=tmp_path)
    gw = Gateway(process=process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.read_stderr)
            await gw.wait_ready()
            yield gw
            if process.returncode is None:
                process.kill()
    finally:
        await reap(process)


def gateway_env(
    tmp_path: Path, database_url: str, redis_url: str, ollama_url: str
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONUNBUFFERED": "1",
        "NZGW_ENV_FILE": str(tmp_path / "none.env"),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": ollama_url,
        "NZGW_BIND": "127.0.0.1:0",
        "NZGW_METRICS_BIND": "127.0.0.1:0",
        "NZGW_LOG_FORMAT": "json",
        "NZGW_MIGRATE_ON_START": "false",
        "NZGW_SPOOL_DIR": str(tmp_path / "spool"),
        "NZGW_FLUSH_INTERVAL": "0.2",
        "NZGW_STORE_TIMEOUT": "1",
        # Cached keys stay trusted for 2 × this after the last revocation read (60 s): with
        # PostgreSQL frozen, requests are served from the cache for the whole outage even on a
        # loaded machine (with the default 1 s, a slow burst outlived it and got 503, fail closed).
        "NZGW_REVOCATION_POLL_INTERVAL": "30",
        "NZGW_DISCOVERY_INTERVAL": "5",
        "NZGW_GRACEFUL_TIMEOUT": "5",
    }


async def new_key(store: Store) -> tuple[str, int]:
    tenant = await store.create_tenant("acme")
    full_key, key = await issue_key(store, KeyHasher(FAST_ARGON2), NewKey(tenant.id, "k", "", ""))
    return full_key, key.id


@attrs.define
class Traffic:
    key: str
    request_ids: list[str] = attrs.Factory(list)

    async def chat(self, gw: Gateway) -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            answer = await client.post(
                "/api/chat", json=CHAT, headers={"Authorization": f"Bearer {self.key}"}
            )
        assert answer.status_code == 200, answer.text
        self.request_ids.append(answer.headers["x-request-id"])


async def backlog(gw: Gateway) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url)).text
    return sum(v for (name, _), v in parse_exposition(text).items() if name == "nzgw_flush_backlog")


async def check_store(pg_url: str, key_id: int, traffic: Traffic) -> None:
    """Every request's usage and audit row in the database, exactly once; the chains verify."""
    async with open_store(pg_url) as store:
        rows = await store.list_audit(AuditQuery(limit=10_000))
        ids = [r.event.request_id for r in rows if r.event.path == "/api/chat"]
        assert sorted(ids) == sorted(traffic.request_ids)
        (usage,) = await store.usage_report(UsageQuery(by="model", key_id=key_id))
        assert usage.requests == len(traffic.request_ids)
        reports = await verify_audit(store)
        assert reports and all(r.broken is None for r in reports), reports


async def run_outage(
    tmp_path: Path, pg_url: str, redis: OwnedRedis, *, stop: signal.Signals
) -> tuple[Traffic, int, list[dict[str, Any]]]:
    """Start a gateway, serve traffic with PostgreSQL frozen until it is all spooled, stop
    the gateway with `stop`, restart it with PostgreSQL back; the restarted one's log."""
    async with open_store(pg_url) as store:
        await store.migrate()
        key, key_id = await new_key(store)
    host, _, port = pg_url.split("@", 1)[1].split("/", 1)[0].partition(":")
    traffic = Traffic(key)
    async with open_emulator() as emulator, open_tcp_proxy(host, int(port or 5432)) as proxy:
        env = gateway_env(tmp_path, proxy.url_for(pg_url), redis.url, emulator.url)
        async with gateway(tmp_path, env) as first:
            await traffic.chat(first)  # the key is looked up and the counters seeded
            while await backlog(first):  # noqa: ASYNC110 (another process: polled)
                await trio.sleep(0.1)
            proxy.freeze()
            async with trio.open_nursery() as nursery:
                for _ in range(REQUESTS):
                    nursery.start_soon(traffic.chat, first)
            await first.wait_until(
                lambda _: (
                    first.spooled_requests("usage") == REQUESTS
                    and first.spooled_requests("audit") == REQUESTS
                )
            )
            lost = (await first.metrics())["nzgw_rows_lost_total"]
            assert lost == 0
            first.process.send_signal(stop)
            with trio.fail_after(60):
                code = await first.process.wait()
            await first.eof.wait()
        if stop is signal.SIGTERM:
            assert code == 0, first.lines[-5:]
            assert not [line for line in first.lines if line.get("level") == "error"]
        else:
            assert code == -signal.SIGKILL
        assert list((tmp_path / "spool").rglob("spool-*.log")), "nothing left in the spool"
        proxy.thaw()
        async with gateway(tmp_path, env) as second:
            samples = await second.metrics()
            second.process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                assert await second.process.wait() == 0
        assert samples["nzgw_spool_rows_replayed_total"] > 0
        assert samples["nzgw_rows_lost_total"] == 0
    assert not list((tmp_path / "spool").rglob("spool-*.log")), "the spool was not emptied"
    await check_store(pg_url, key_id, traffic)
    return traffic, key_id, second.lines


async def test_postgres_away_at_sigterm_every_row_is_spooled_and_written_once_at_restart(
    tmp_path: Path, pg_url: str, redis: OwnedRedis
) -> None:
    _, _, lines = await run_outage(tmp_path, pg_url, redis, stop=signal.SIGTERM)
    assert [line for line in lines if "replayed into the store" in str(line.get("msg"))]


async def test_sigkill_with_postgres_away_loses_nothing_that_was_spooled(
    tmp_path: Path, pg_url: str, redis: OwnedRedis
) -> None:
    await run_outage(tmp_path, pg_url, redis, stop=signal.SIGKILL)
