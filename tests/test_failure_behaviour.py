"""What clients see, and what is kept, when parts of the system fail (issue 13; README "Failure
behaviour" is written from these tests).

- `test_a_lease_is_held_while_a_request_waits_for_its_first_byte`: leases are short (30 s by
  default, never `first_byte_timeout + 60`) and refreshed from admission on, so a request that
  waits longer than the ttl for its first byte still holds its concurrency slot (finding 3).
- `test_a_frozen_store_is_a_503_within_the_store_timeout`: PostgreSQL stops answering (a TCP
  proxy of the test's own stops forwarding) → a request that needs a key lookup gets 503
  `store_unavailable` instead of hanging for as long as the store does (finding 4).
- `test_streams_cut_at_the_end_of_the_drain_end_with_an_error_frame`: streams still running
  when `graceful_timeout` ends get an error frame in their surface's shape (NDJSON, SSE) and a
  properly ended body (finding 6).
- `test_serve_refuses_an_unmigrated_database_with_one_line`: exit status 2 and one line naming
  the schema's state and `bin/nzgw migrate`, instead of "ready" and 503s (finding 7).

Rules: no assertion depends on this machine's speed. The waits are the fault scenario itself (a
lease must have outlived its ttl), never a stand-in for an event; every test has a hang guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import trio

from nzgw.adapters.sql import load_migrations
from nzgw.config import config_from_values
from nzgw.core.models import Limits
from nzgw.services.drain import CUT_MESSAGE
from tests.harness import open_harness
from tests.store import pg
from tests.tcp_proxy import open_tcp_proxy

HANG_GUARD = 60
STREAM = {"model": "llama3", "messages": [{"role": "user", "content": "x"}], "stream": True}
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "x"}], "stream": False}


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg.scratch_database() as url:
        yield url


def test_the_default_lease_ttl_is_at_most_a_minute() -> None:
    config = config_from_values({"NZGW_UPSTREAM_FIRST_BYTE_TIMEOUT": "300"})
    assert config.lease_ttl <= 60


async def test_a_lease_is_held_while_a_request_waits_for_its_first_byte(tmp_path: Path) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path, lease_ttl=0.5, upstream_first_byte_timeout=300.0) as h:
            assert h.running.limiter.lease_ttl == 0.5  # not first_byte_timeout + 60
            key = await h.new_key(limits=Limits(concurrent_requests=1))
            auth = {"Authorization": f"Bearer {key}"}
            h.emulator.settings.first_token_delay = 3600  # the backend thinks, a long time
            async with trio.open_nursery() as nursery:

                async def waiting() -> None:
                    async with h.client.stream(
                        "POST", "/api/chat", json=STREAM, headers=auth, timeout=None
                    ):
                        pass

                nursery.start_soon(waiting)
                await h.emulator.wait_until(
                    lambda: any(r.path == "/api/chat" for r in h.emulator.requests)
                )
                # The fault: the first byte takes longer than three lease ttls.
                await trio.sleep(1.5)
                second = await h.client.post("/api/chat", json=CHAT, headers=auth, timeout=20)
                assert second.status_code == 429, second.text
                assert "concurrent requests limit" in second.json()["error"]
                nursery.cancel_scope.cancel()


@pytest.mark.postgres
async def test_a_frozen_store_is_a_503_within_the_store_timeout(
    tmp_path: Path, pg_url: str
) -> None:
    host_port = pg_url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    with trio.fail_after(HANG_GUARD):
        async with (
            open_tcp_proxy(host, int(port or 5432)) as proxy,
            open_harness(tmp_path, database_url=proxy.url_for(pg_url), store_timeout=0.5) as h,
        ):
            proxy.freeze()  # PostgreSQL "hangs": connections open, nothing answers
            try:
                # h.key was never used: its lookup needs the store
                answer = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
                assert answer.status_code == 503, answer.text
                assert answer.json() == {"error": "service unavailable, try again"}
                openai = await h.client.post("/v1/chat/completions", json=CHAT, headers=h.auth)
                assert openai.status_code == 503
                assert openai.json()["error"]["message"] == "service unavailable, try again"
            finally:
                proxy.thaw()
            answer = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
            assert answer.status_code == 200, answer.text


@pytest.mark.postgres
async def test_a_call_cancelled_on_a_frozen_store_ends_and_the_store_stays_usable(
    pg_url: str,
) -> None:
    """Cancelling a query on a hung PostgreSQL used to wait as long as it hung (asyncpg asks
    the same server to cancel, the ROLLBACK waits too): a shutdown with PostgreSQL frozen never
    ended. The call's connection is now terminated `CANCEL_GRACE` after the cancellation."""
    from nzgw.adapters.stores import open_store
    from nzgw.ports import NewKey, UsageRow

    host_port = pg_url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    async with open_store(pg_url) as direct:
        await direct.migrate()
        tenant = await direct.create_tenant("t")
        key = await direct.create_key(NewKey(tenant.id, "k", "nz_frozen001", "h"))
    row = UsageRow(date(2031, 1, 1), tenant.id, key.id, "m", 1, 1, 1)
    with trio.fail_after(HANG_GUARD):
        async with (
            open_tcp_proxy(host, int(port or 5432)) as proxy,
            open_store(proxy.url_for(pg_url)) as store,
        ):
            await store.ping()
            proxy.freeze()
            with trio.move_on_after(0.2) as waited:
                await store.add_usage([row], batch_id="frozen")
            assert waited.cancelled_caught  # it ended: cancelled, not hanging on
            proxy.thaw()
            await store.add_usage([row], batch_id="frozen")  # retried on a new connection
            totals, _ = await store.usage_totals(tenant.id, day=row.day, month_start=row.day)
            assert totals.lifetime_tokens == 2  # the batch is in the ledger once


def test_serve_refuses_an_unmigrated_database_with_one_line(tmp_path: Path) -> None:
    """Finding 7: not "nzgw ready" and a 503 for every request, but a refusal to start."""
    needed = len(load_migrations("sqlite"))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": f"sqlite:///{tmp_path}/empty.db",
        "NZGW_BIND": "127.0.0.1:0",
        "NZGW_MIGRATE_ON_START": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "nzgw", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: database schema is at 0, this nzgw needs {needed}: run `bin/nzgw migrate` "
        "(or set NZGW_MIGRATE_ON_START=true)"
    ]
    assert "nzgw ready" not in result.stderr + result.stdout


async def test_streams_cut_at_the_end_of_the_drain_end_with_an_error_frame(
    tmp_path: Path,
) -> None:
    """Finding 6: the grace period ends mid-stream → an error frame in the surface's shape and
    a properly ended body, not a broken chunked body."""
    with trio.fail_after(HANG_GUARD):
        # Two slots: both streams must be running on the backend when the drain begins.
        async with open_harness(
            tmp_path, graceful_timeout=2.0, backend_fields=lambda i: {"parallel": 2}
        ) as h:
            h.emulator.settings.tokens_per_reply = 100_000
            h.emulator.settings.token_delay = 0.05  # far longer than the grace period
            bodies: dict[str, bytes] = {}
            streaming = 0
            all_streaming = trio.Event()

            async def one(path: str, body: dict[str, object]) -> None:
                nonlocal streaming
                async with h.client.stream(
                    "POST", path, json=body, headers=h.auth, timeout=None
                ) as response:
                    assert response.status_code == 200
                    received = b""
                    async for chunk in response.aiter_raw():
                        if not received:
                            streaming += 1
                            if streaming == 2:
                                all_streaming.set()
                        received += chunk
                    bodies[path] = received

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "/api/chat", STREAM)
                nursery.start_soon(one, "/v1/chat/completions", STREAM)
                await all_streaming.wait()
                h.shutdown.set()
            await h.stopped.wait()
    native = bodies["/api/chat"].decode().strip().splitlines()
    assert json.loads(native[-1]) == {"error": CUT_MESSAGE}
    openai = bodies["/v1/chat/completions"].decode().strip().split("\n\n")
    last = openai[-1].removeprefix("data: ")
    assert last.startswith("{"), openai[-3:]
    assert json.loads(last)["error"]["message"] == CUT_MESSAGE
