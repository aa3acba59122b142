"""The audit log end to end: the real gateway (`tests/harness.py`) on SQLite and on the real
PostgreSQL, every outcome kind, batching, the store going away and coming back, the full queue
(fail closed), graceful shutdown, prompt logs, and the purge on virtual time.

Rules: no sleeping for synchronisation; wait on conditions (`h.wait_finished`,
`AuditLog.wait_written`, `StoreSwitch.wait_attempts`) under `trio.fail_after`. The store is
made to fail or hang by replacing the running gateway's `append_audit` (the only method the
flusher calls), so everything else (keys, limits, readiness) keeps working.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import attrs
import httpx
import pytest
import trio
import trio.testing

from nzgw.adapters.stores import open_store
from nzgw.core.audit import AuditRow, PromptRecord
from nzgw.core.models import Budgets, Limits
from nzgw.ports import AuditQuery, ChainHead, Store, StoreUnavailableError
from nzgw.services.audit import AuditLog, purge_expired_prompts, run_prompt_purge, verify_audit
from nzgw.testing import Fault
from tests.harness import Harness, open_harness

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello"}], "stream": False}


def audit_of(h: Harness) -> AuditLog:
    audit = h.running.gateway.audit
    assert isinstance(audit, AuditLog)
    return audit


async def all_rows(store: Store) -> list[AuditRow]:
    return await store.list_audit(AuditQuery(limit=100_000))


async def flushed_rows(h: Harness, requests: int) -> list[AuditRow]:
    """Wait for `requests` settlements, write the audit queue now, read every row."""
    with trio.fail_after(30):
        await h.wait_finished(requests)
        await audit_of(h).flush(h.running.store)
    return await all_rows(h.running.store)


class StoreSwitch:
    """The running gateway's `append_audit`, made to fail (`down`) or hang (`hold`) at will."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self._real = store.append_audit
        self.down = False
        self.hold: trio.Event | None = None
        self.attempts = 0
        self.writes = 0
        self._changed = trio.Event()
        monkeypatch.setattr(store, "append_audit", self.append_audit)

    async def append_audit(
        self,
        rows: Sequence[AuditRow],
        prompts: Sequence[PromptRecord] = (),
        heads: Sequence[ChainHead] = (),
    ) -> None:
        self.attempts += 1
        self._changed.set()
        self._changed = trio.Event()
        if self.hold is not None:
            await self.hold.wait()
        if self.down:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailableError("test: the store is down")
        await self._real(rows, prompts, heads)
        self.writes += 1

    async def wait_attempts(self, count: int) -> None:
        while self.attempts < count:
            await self._changed.wait()


# --- every outcome kind ---------------------------------------------------------------------------


async def test_every_outcome_leaves_exactly_one_row_with_the_right_fields(
    tmp_path: Path, database_url: str
) -> None:
    async with open_harness(
        tmp_path, database_url=database_url, max_body_bytes=4096, auth_fail_limit=2
    ) as h:
        settings = h.emulator.settings
        tenant = await h.running.store.get_tenant("acme")
        ids: dict[str, str] = {}

        async def call(name: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
            response = await h.client.request(method, path, **kwargs)
            ids[name] = response.headers["x-request-id"]
            return response

        async def status(name: str, method: str, path: str, **kwargs: Any) -> int:
            return (await call(name, method, path, **kwargs)).status_code

        auth = h.auth
        ok = await call("ok", "POST", "/api/chat", json=CHAT, headers=auth)
        assert ok.status_code == 200
        stream_body = {**CHAT, "stream": True}
        assert (
            await status("stream", "POST", "/v1/chat/completions", json=stream_body, headers=auth)
            == 200
        )
        assert await status("listing", "GET", "/api/tags", headers=auth) == 200
        assert await status("healthz", "GET", "/healthz") == 200
        assert await status("blocked", "POST", "/api/pull", json={}) == 403
        assert await status("not_found", "GET", "/nope/x?api_key=secret") == 404
        assert await status("method", "GET", "/api/chat") == 405
        bad_model = {**CHAT, "model": "nosuch"}
        assert await status("forbidden", "POST", "/api/chat", json=bad_model, headers=auth) == 403
        assert await status("bad", "POST", "/api/chat", content=b"{", headers=auth) == 400
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert await status("large", "POST", "/api/chat", json=big, headers=auth) == 413
        rpm_key = await h.new_key(name="rpm", limits=Limits(requests_per_minute=1))
        rpm = {"Authorization": f"Bearer {rpm_key}"}
        assert await status("rpm_ok", "POST", "/api/chat", json=CHAT, headers=rpm) == 200
        assert await status("rpm", "POST", "/api/chat", json=CHAT, headers=rpm) == 429
        budget_key = await h.new_key(name="budget", budgets=Budgets(daily_tokens=1))
        budget = {"Authorization": f"Bearer {budget_key}"}
        assert await status("budget", "POST", "/api/chat", json=CHAT, headers=budget) == 429
        qwen3 = {**CHAT, "model": "qwen3"}
        settings.model_faults["qwen3"] = Fault.HTTP_500
        assert await status("backend", "POST", "/api/chat", json=qwen3, headers=auth) == 503
        settings.model_faults["qwen3"] = Fault.DIE_MID_STREAM
        qwen3_stream = {**qwen3, "stream": True}
        assert (
            await status("truncated", "POST", "/api/chat", json=qwen3_stream, headers=auth) == 200
        )
        # The client leaves before the answer begins: 499, "cancelled".
        settings.model_faults["qwen3"] = Fault.STALL
        body = json.dumps({**qwen3, "messages": [{"role": "user", "content": "gone-1"}]})
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        await stream.send_all(
            (
                f"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {h.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        with trio.fail_after(10):
            await h.emulator.wait_until(
                lambda: any(b"gone-1" in r.body for r in h.emulator.requests)
            )
        await stream.aclose()
        # Authentication failures last: the throttle then refuses keys not cached yet.
        assert await status("no_key", "POST", "/api/chat", json=CHAT) == 401
        wrong = {"Authorization": "Bearer nz_aaaaaaaa" + "b" * 40}
        assert await status("bad_key", "POST", "/api/chat", json=CHAT, headers=wrong) == 401
        await call("bad_key2", "POST", "/api/chat", json=CHAT, headers=wrong)
        assert await status("throttled", "POST", "/api/chat", json=CHAT, headers=wrong) == 429

        requests = len(ids) + 1  # and the one that left
        rows = await flushed_rows(h, requests)
        assert len(rows) == requests - 1  # the health probe leaves no row (NZGW_AUDIT_PROBES)
        by_id = {r.event.request_id: r.event for r in rows}
        assert len(by_id) == requests - 1  # exactly one row each
        assert ids["healthz"] not in by_id
        (gone,) = [r.event for r in rows if r.event.request_id not in ids.values()]

        e = by_id[ids["ok"]]
        answer = ok.json()
        assert (e.tenant_id, e.key_prefix, e.key_id) == (tenant.id, h.key[:11], e.key_id)
        assert e.key_id is not None
        assert (e.client, e.method, e.surface, e.path) == (
            "127.0.0.1",
            "POST",
            "native",
            "/api/chat",
        )
        assert (e.model, e.status, e.outcome, e.refusal) == ("llama3:latest", 200, "ok", None)
        assert (e.prompt_tokens, e.completion_tokens, e.tokens_reported) == (
            answer["prompt_eval_count"],
            answer["eval_count"],
            True,
        )
        assert not e.streamed and e.backend == "backend-0" and not e.prompt_logged
        assert e.ttfb_us is not None and 0 < e.ttfb_us <= e.latency_us
        assert e.requests == 1 and e.note is None
        assert abs(e.ts - datetime.now(UTC)) < timedelta(minutes=5)

        s = by_id[ids["stream"]]
        assert (s.surface, s.path, s.streamed, s.outcome) == (
            "openai",
            "/v1/chat/completions",
            True,
            "ok",
        )
        assert s.tokens_reported and s.completion_tokens > 0

        expected = {
            "listing": (200, "ok", None, "/api/tags"),
            "blocked": (403, "refused", "blocked_endpoint", "/api/pull"),
            "not_found": (404, "refused", "not_found", "/nope/x"),
            "method": (405, "refused", "method_not_allowed", "/api/chat"),
            "forbidden": (403, "refused", "forbidden_model", "/api/chat"),
            "bad": (400, "refused", "bad_request", "/api/chat"),
            "large": (413, "refused", "too_large", "/api/chat"),
            "rpm_ok": (200, "ok", None, "/api/chat"),
            "rpm": (429, "refused", "limit_requests_per_minute", "/api/chat"),
            "budget": (429, "refused", "budget_daily", "/api/chat"),
            "backend": (503, "refused", "backend_failure", "/api/chat"),
            "truncated": (200, "upstream_truncated", None, "/api/chat"),
            "no_key": (401, "refused", "auth", "/api/chat"),
            "bad_key": (401, "refused", "auth", "/api/chat"),
            "throttled": (429, "refused", "auth_throttled", "/api/chat"),
        }
        for name, want in expected.items():
            got = by_id[ids[name]]
            assert (got.status, got.outcome, got.refusal, got.path) == want, name
        assert (gone.status, gone.outcome, gone.path, gone.model) == (
            499,
            "cancelled",
            "/api/chat",
            "qwen3:latest",
        )
        # who: known for keyed requests, unknown before authentication
        assert by_id[ids["blocked"]].tenant_id is None and by_id[ids["no_key"]].key_prefix is None
        assert by_id[ids["rpm"]].key_prefix == rpm_key[:11]
        assert by_id[ids["forbidden"]].model == "nosuch:latest"
        # never forwarded: no backend, no tokens; forwarded and cut: the tokens seen
        for name in ("forbidden", "rpm", "budget", "backend", "bad"):
            got = by_id[ids[name]]
            assert got.backend is None and got.prompt_tokens == got.completion_tokens == 0, name
        assert by_id[ids["truncated"]].backend == "backend-0"
        assert by_id[ids["truncated"]].completion_tokens >= 1
        # and the chain of this process verifies
        reports = await verify_audit(h.running.store)
        assert [(r.rows, r.broken) for r in reports] == [(requests - 1, None)]


# --- batching, and no store round trip on the request path ----------------------------------------


async def test_rows_are_written_in_batches_off_the_request_path(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, database_url=database_url, flush_interval=3600.0) as h:
        switch = StoreSwitch(h.running.store, monkeypatch)
        switch.hold = trio.Event()  # every audit write hangs until released
        audit = audit_of(h)
        n = 200
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(
                        functools.partial(h.client.get, "/api/version", headers=h.auth)
                    )
            await h.wait_finished(n)
        # Every request was answered and settled while the store could not take a single row:
        # the audit added no store round trip to any of them.
        assert audit.pending == n and audit.rows_written == 0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(audit.flush, h.running.store)
            with trio.fail_after(10):
                await switch.wait_attempts(1)
            switch.hold.set()
        assert (switch.attempts, switch.writes, audit.batches_written) == (1, 1, 1)  # 200 rows
        assert len(await all_rows(h.running.store)) == n


async def test_a_full_batch_is_written_before_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, flush_interval=3600.0, audit_probes=True) as h:
        audit = audit_of(h)
        audit.batch_max = 20
        with trio.fail_after(30):
            for _ in range(45):
                await h.client.get("/healthz")
            await audit.wait_written(40)  # two full batches; the interval is an hour
            await h.wait_finished(45)
        assert audit.batches_written == 2 and audit.pending == 5


async def test_health_probes_leave_no_row_unless_configured(tmp_path: Path) -> None:
    for probes in (False, True):
        async with open_harness(tmp_path / str(probes), audit_probes=probes) as h:
            with trio.fail_after(30):
                for path in ("/healthz", "/readyz", "/healthz"):
                    assert (await h.client.get(path)).status_code == 200
                assert (await h.client.get("/api/tags", headers=h.auth)).status_code == 200
                rows = await flushed_rows(h, 4)
        paths = sorted(r.event.path for r in rows)
        if probes:
            assert paths == ["/api/tags", "/healthz", "/healthz", "/readyz"]
        else:
            assert paths == ["/api/tags"]


# --- the store goes away and comes back -----------------------------------------------------------


async def test_rows_wait_while_the_store_is_down_and_are_all_written_when_it_is_back(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_harness(tmp_path, database_url=database_url, flush_interval=0.05) as h:
        switch = StoreSwitch(h.running.store, monkeypatch)
        switch.down = True
        audit = audit_of(h)
        n = 30
        with trio.fail_after(30):
            for _ in range(n):
                assert (await h.client.post("/api/chat", json=CHAT, headers=h.auth)).is_success
            await h.wait_finished(n)
            await switch.wait_attempts(switch.attempts + 2)  # the flusher tried, and again
        assert audit.pending == n and audit.rows_written == 0 and not audit.refusing
        assert await all_rows(h.running.store) == []

        switch.down = False
        with trio.fail_after(30):
            await audit.wait_written(n)
        rows = await all_rows(h.running.store)
        assert len(rows) == n and audit.pending == 0
        assert sorted(r.seq for r in rows) == list(range(1, n + 1))  # no hole in the chain
        assert [r.broken for r in await verify_audit(h.running.store)] == [None]


# --- fail closed ----------------------------------------------------------------------------------


async def test_a_full_queue_refuses_new_requests_with_503_and_counts_them(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nzgw.audit")
    async with open_harness(
        tmp_path,
        database_url=database_url,
        audit_queue_max=4,
        flush_interval=0.05,
        audit_probes=True,
    ) as h:
        switch = StoreSwitch(h.running.store, monkeypatch)
        switch.down = True
        audit = audit_of(h)
        for _ in range(4):
            assert (await h.client.post("/api/chat", json=CHAT, headers=h.auth)).status_code == 200
        with trio.fail_after(10):
            await h.wait_finished(4)
        assert audit.refusing

        forwarded = len(h.emulator.requests)
        native = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
        openai = await h.client.post("/v1/chat/completions", json=CHAT, headers=h.auth)
        anthropic = await h.client.post(
            "/v1/messages", json={**CHAT, "max_tokens": 5}, headers=h.auth
        )
        unknown = await h.client.get("/nope")
        for refused in (native, openai, anthropic, unknown):
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert native.json() == {"error": "service unavailable, try again"}
        assert openai.json()["error"]["message"] == "service unavailable, try again"
        assert anthropic.json()["type"] == "error"
        assert (await h.client.get("/healthz")).status_code == 200  # liveness holds
        ready = await h.client.get("/readyz")
        assert ready.status_code == 503 and "audit" in ready.json()["missing"]
        with trio.fail_after(10):
            await h.wait_finished(10)
        assert audit.refused_total == 4 and audit.pending == 6  # 4 rows + the two probes
        later = h.emulator.requests[forwarded:]
        assert [r for r in later if "chat" in r.path or "mess" in r.path] == []  # not forwarded

        switch.down = False
        with trio.fail_after(30):
            await audit.wait_written(7)  # 6 rows and the episode's summary
        assert not audit_of(h).refusing  # (a call: mypy keeps no narrowing from above)
        after = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
        assert after.status_code == 200
        rows = await flushed_rows(h, 11)

    (summary,) = [r.event for r in rows if r.event.refusal == "audit_queue_full"]
    assert (summary.requests, summary.status, summary.outcome) == (4, 503, "refused")
    assert sum(r.event.requests for r in rows) == 11  # every request accounted for
    full = [r for r in caplog.records if "audit queue full" in r.getMessage()]
    drained = [r for r in caplog.records if "accepting requests again" in r.getMessage()]
    assert len(full) == 1 and len(drained) == 1  # logged once per episode


# --- graceful shutdown and restart ----------------------------------------------------------------


async def test_graceful_shutdown_writes_every_queued_row(tmp_path: Path, database_url: str) -> None:
    async with open_harness(tmp_path, database_url=database_url, flush_interval=3600.0) as h:
        for _ in range(25):
            await h.client.post("/api/chat", json=CHAT, headers=h.auth)
        with trio.fail_after(10):
            await h.wait_finished(25)
        first = audit_of(h)
        assert first.pending == 25 and first.rows_written == 0
        h.shutdown.set()
        with trio.fail_after(30):
            await h.stopped.wait()
        assert first.rows_written == 25 and first.rows_lost == 0
    # a second process on the same database: a new chain beside the first
    async with open_harness(tmp_path, database_url=database_url, flush_interval=3600.0) as h:
        for _ in range(3):
            await h.client.get("/api/tags", headers=h.auth)
        with trio.fail_after(10):
            await h.wait_finished(3)
        h.shutdown.set()
        with trio.fail_after(30):
            await h.stopped.wait()
    async with open_store(database_url) as store:
        rows = await all_rows(store)
        reports = await verify_audit(store)
    assert len(rows) == 28
    assert sorted((r.rows, r.broken) for r in reports) == [(3, None), (25, None)]


# --- prompt logs ----------------------------------------------------------------------------------


async def _dump_tables(url: str, store: Store) -> str:
    """Every value of every table of the database, as one text (to grep for a marker)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            return "\n".join(
                repr(row) for t in tables for row in conn.execute(f"SELECT * FROM {t}")
            )
        finally:
            conn.close()
    import asyncpg
    import trio_asyncio

    async def work() -> str:
        conn = await asyncpg.connect(url)
        try:
            names = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            ]
            parts: list[str] = []
            for name in names:
                parts.extend(r[0] for r in await conn.fetch(f'SELECT t::text FROM "{name}" t'))
            return "\n".join(parts)
        finally:
            await conn.close()

    loop = getattr(store, "_loop", None) or getattr(getattr(store, "_target", None), "_loop", None)
    assert loop is not None
    return cast(str, await trio_asyncio.aio_as_trio(work, loop=loop)())


async def test_prompt_logs_only_for_opted_in_keys_and_gone_after_their_ttl(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_harness(tmp_path, database_url=database_url) as h:
        logged_key = await h.new_key(name="logged", log_prompts=True, prompt_ttl_seconds=3600)
        forever_key = await h.new_key(name="forever", log_prompts=True)
        calls = [
            (logged_key, "/api/chat", False, "MARKER-YES-1"),
            (logged_key, "/api/chat", True, "MARKER-YES-2"),
            (logged_key, "/v1/chat/completions", True, "MARKER-YES-3"),
            (forever_key, "/api/generate", False, "MARKER-YES-4"),
            (h.key, "/api/chat", False, "MARKER-NO-1"),
            (h.key, "/api/chat", True, "MARKER-NO-2"),
            (h.key, "/v1/chat/completions", True, "MARKER-NO-3"),
        ]
        ids: dict[str, str] = {}
        for key, path, stream, marker in calls:
            body: dict[str, Any] = {"model": "llama3", "stream": stream}
            if path == "/api/generate":
                body["prompt"] = marker
            else:
                body["messages"] = [{"role": "user", "content": marker}]
            response = await h.client.post(
                path, json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200
            ids[marker] = response.headers["x-request-id"]
        rows = await flushed_rows(h, len(calls))
        store = h.running.store
        logged = {r.event.request_id: r.event.prompt_logged for r in rows}
        assert {m: logged[i] for m, i in ids.items()} == {m: "YES" in m for m in ids}

        now = datetime.now(UTC)
        for marker, request_id in ids.items():
            found = await store.get_prompts(request_id, now=now)
            if "NO" in marker:
                assert found == [], marker
                continue
            (log,) = found
            assert marker in log.record.request_body
            assert log.record.response_text is not None and "tok" in log.record.response_text
        streamed = (await store.get_prompts(ids["MARKER-YES-3"], now=now))[0].record
        assert streamed.response_text is not None and "data: " in streamed.response_text
        assert (await store.get_prompts(ids["MARKER-YES-4"], now=now))[0].record.expires_at is None

        dump = await _dump_tables(database_url, store)
        assert "MARKER-YES-1" in dump  # the dump does see prompt logs
        assert "MARKER-NO" not in dump  # and nothing of the other key's bodies, anywhere

        # Retention: nothing goes before its TTL, the TTL'd ones go after it, bounded batches.
        assert await purge_expired_prompts(store, now=now + timedelta(seconds=3000)) == 0
        later = now + timedelta(seconds=3700)
        assert await purge_expired_prompts(store, now=later, batch=2) == 3
        for marker in ("MARKER-YES-1", "MARKER-YES-2", "MARKER-YES-3"):
            assert await store.get_prompts(ids[marker], now=now) == []
        assert len(await store.get_prompts(ids["MARKER-YES-4"], now=later)) == 1
        assert len(await all_rows(store)) == len(calls)  # audit rows stay

    logged_text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "MARKER-" not in logged_text  # bodies never reach the logs


@attrs.define
class FakePromptStore:
    """Prompt logs in memory with their expiry; records each purge statement's time."""

    expiries: list[datetime]
    statements: list[tuple[float, int]] = attrs.Factory(list)

    async def purge_prompts(self, now: datetime, *, limit: int) -> int:
        await trio.lowlevel.checkpoint()
        expired = sorted(e for e in self.expiries if e <= now)[:limit]
        for e in expired:
            self.expiries.remove(e)
        self.statements.append((trio.current_time(), len(expired)))
        return len(expired)


async def test_the_purge_runs_on_its_interval_in_bounded_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = datetime(2031, 1, 1, tzinfo=UTC)
    start = trio.current_time()

    def wall() -> datetime:
        return t0 + timedelta(seconds=trio.current_time() - start)

    store = FakePromptStore([t0 + timedelta(seconds=s) for s in (0, 30, 30, 30, 30, 30, 90, 200)])
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_prompt_purge(
                store,  # type: ignore[arg-type]
                interval=60,
                batch=2,
                now=wall,
                task_status=task_status,
            )
        )
        await trio.sleep(150)
        nursery.cancel_scope.cancel()
    at = [(round(t - start), n) for t, n in store.statements]
    # t=0: the one expired at 0; t=60: five in batches of 2; t=120: the one at 90
    assert at == [(0, 1), (60, 2), (60, 2), (60, 1), (120, 1)]
    assert store.expiries == [t0 + timedelta(seconds=200)]
