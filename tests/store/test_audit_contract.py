"""The audit part of the Store contract, on SQLite and the real PostgreSQL.

Rules as in `test_contract.py`: the `Store` port only (raw SQL only to play the attacker that
edits or deletes rows); chain ids, request ids and tenant names carry `unique`, because the
PostgreSQL database is shared by the session.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime, timedelta
from typing import Any

import attrs
import pytest

from nzgw.adapters.stores import open_store
from nzgw.core.audit import AuditEvent, AuditRow, Chain, PromptRecord
from nzgw.ports import (
    AuditQuery,
    ChainHead,
    NewKey,
    NotFoundError,
    Store,
    UsageQuery,
    UsageRow,
)
from nzgw.services.audit import purge_expired_prompts, verify_audit

T0 = datetime(2031, 5, 6, 7, 8, 9, 123_456, tzinfo=UTC)


def event(unique: str, n: int, **changes: Any) -> AuditEvent:
    base = AuditEvent(
        ts=T0 + timedelta(seconds=n),
        day=date(2031, 5, 6),
        request_id=f"{unique}-{n:05d}",
        tenant_id=None,
        key_id=None,
        key_prefix=None,
        client="2001:db8::1",
        method="POST",
        surface="openai",
        path="/v1/chat/completions",
        model="llama3:latest",
        status=200,
        outcome="ok",
        refusal=None,
        prompt_tokens=11,
        completion_tokens=22,
        tokens_reported=False,
        streamed=True,
        ttfb_us=1234,
        latency_us=56789,
        backend="gpu-1",
        prompt_logged=False,
        requests=1,
        note=None,
    )
    return attrs.evolve(base, **changes)


def sealed(chain: Chain, events: list[AuditEvent]) -> tuple[list[AuditRow], ChainHead]:
    rows = [chain.seal(e) for e in events]
    return rows, ChainHead(chain.id, chain.started_at, rows[-1].seq, rows[-1].hash)


async def _tenant_key(store: Store, unique: str) -> tuple[int, int, str]:
    tenant = await store.create_tenant(f"audit-{unique}")
    key = await store.create_key(NewKey(tenant.id, "k", f"nz_{unique[:6]}aa", "hash"))
    return tenant.id, key.id, key.prefix


async def _chain_rows(store: Store, chain_id: str) -> list[AuditRow]:
    return await store.audit_chain_rows(chain_id, after_seq=0, limit=100_000)


async def test_rows_round_trip_every_field(store: Store, unique: str) -> None:
    tenant_id, key_id, prefix = await _tenant_key(store, unique)
    chain = Chain(f"rt-{unique}", T0)
    events = [
        event(unique, 0, tenant_id=tenant_id, key_id=key_id, key_prefix=prefix),
        event(
            unique,
            1,
            model=None,
            refusal="auth",
            outcome="refused",
            status=401,
            ttfb_us=None,
            backend=None,
            tokens_reported=True,
            streamed=False,
            note="a note",
            requests=3,
        ),
    ]
    rows, head = sealed(chain, events)
    await store.append_audit(rows, [], [head])
    assert await _chain_rows(store, chain.id) == rows
    heads = {h.chain_id: h for h in await store.audit_chains()}
    got = heads[chain.id]
    assert (got.seq, got.hash, got.started_at, got.recorded) == (2, rows[-1].hash, T0, True)


async def test_append_is_idempotent_and_a_head_never_moves_back(store: Store, unique: str) -> None:
    chain = Chain(f"idem-{unique}", T0)
    first, head1 = sealed(chain, [event(unique, i) for i in range(3)])
    second, head2 = sealed(chain, [event(unique, i) for i in range(3, 5)])
    await store.append_audit(first, [], [head1])
    await store.append_audit(second, [], [head2])
    await store.append_audit(first, [], [head1])  # written again: an unknown outcome retried
    assert [r.seq for r in await _chain_rows(store, chain.id)] == [1, 2, 3, 4, 5]
    heads = {h.chain_id: h for h in await store.audit_chains()}
    assert heads[chain.id].seq == 5


async def test_a_batch_is_one_transaction(store: Store, unique: str) -> None:
    chain = Chain(f"tx-{unique}", T0)
    rows, head = sealed(chain, [event(unique, i) for i in range(3)])
    bad_prompt = PromptRecord(chain.id, 3, "x", 1, 1, T0, None, "body", None)
    # A prompt log whose audit row is not in the batch breaks its foreign key: nothing lands.
    orphan = attrs.evolve(bad_prompt, seq=99)
    with pytest.raises(NotFoundError):
        await store.append_audit(rows, [orphan], [head])
    assert await _chain_rows(store, chain.id) == []


async def test_chain_rows_page_in_seq_order(store: Store, unique: str) -> None:
    chain = Chain(f"page-{unique}", T0)
    rows, head = sealed(chain, [event(unique, i) for i in range(7)])
    await store.append_audit(rows, [], [head])
    page = await store.audit_chain_rows(chain.id, after_seq=2, limit=3)
    assert [r.seq for r in page] == [3, 4, 5]


async def test_list_audit_filters_newest_first(store: Store, unique: str) -> None:
    tenant_id, key_id, prefix = await _tenant_key(store, unique)
    chain = Chain(f"list-{unique}", T0)
    mine = {"tenant_id": tenant_id, "key_id": key_id, "key_prefix": prefix}
    events = [
        event(unique, 0, **mine),
        event(unique, 1, **mine, status=429, outcome="refused", refusal="limit_rpm"),
        event(unique, 2, **mine, status=403, outcome="refused", refusal="forbidden_model"),
        event(unique, 3),  # no tenant
    ]
    rows, head = sealed(chain, events)
    await store.append_audit(rows, [], [head])

    got = await store.list_audit(AuditQuery(tenant_id=tenant_id))
    assert [r.event.request_id for r in got] == [f"{unique}-{n:05d}" for n in (2, 1, 0)]
    got = await store.list_audit(AuditQuery(key_prefix=prefix, status_min=400, status_max=499))
    assert [r.seq for r in got] == [3, 2]
    got = await store.list_audit(
        AuditQuery(tenant_id=tenant_id, since=T0 + timedelta(seconds=1), until=T0 + timedelta(2))
    )
    assert [r.seq for r in got] == [3, 2]
    got = await store.list_audit(AuditQuery(tenant_id=tenant_id, limit=1))
    assert [r.seq for r in got] == [3]


async def test_prompt_logs_are_linked_found_and_purged_in_batches(
    store: Store, unique: str
) -> None:
    tenant_id, key_id, prefix = await _tenant_key(store, unique)
    chain = Chain(f"prompt-{unique}", T0)
    mine = {"tenant_id": tenant_id, "key_id": key_id, "key_prefix": prefix, "prompt_logged": True}
    rows, head = sealed(chain, [event(unique, i, **mine) for i in range(5)])
    expiry = T0 + timedelta(hours=1)
    prompts = [
        PromptRecord(
            chain.id,
            r.seq,
            r.event.request_id,
            tenant_id,
            key_id,
            r.event.ts,
            None if r.seq == 5 else expiry,  # the last one never expires
            f'{{"prompt": "héllo {r.seq}"}}',
            None if r.seq == 1 else f"answer {r.seq} ✓",
        )
        for r in rows
    ]
    await store.append_audit(rows, prompts, [head])

    found = await store.get_prompts(rows[0].event.request_id, now=T0)
    assert [f.record for f in found] == [prompts[0]] and found[0].key_prefix == prefix
    assert await store.get_prompts(rows[0].event.request_id, now=expiry) == []  # expired

    assert await store.purge_prompts(T0, limit=10) == 0  # nothing expired yet
    assert await store.purge_prompts(expiry, limit=3) == 3  # bounded
    assert await purge_expired_prompts(store, now=expiry, batch=3) == 1
    assert await purge_expired_prompts(store, now=expiry + timedelta(days=9999)) == 0
    assert [f.record for f in await store.get_prompts(rows[4].event.request_id, now=expiry)] == [
        prompts[4]
    ]
    # the audit rows themselves are not touched by the purge
    assert len(await _chain_rows(store, chain.id)) == 5


async def test_usage_report_groups_ledger_and_audit_refusals(store: Store, unique: str) -> None:
    tenant_id, key_id, prefix = await _tenant_key(store, unique)
    d1, d2, d3 = date(2031, 1, 30), date(2031, 1, 31), date(2031, 2, 1)
    await store.add_usage(
        [
            UsageRow(d1, tenant_id, key_id, "llama3:latest", 2, 10, 20),
            UsageRow(d2, tenant_id, key_id, "llama3:latest", 1, 5, 6),
            UsageRow(d3, tenant_id, key_id, "qwen3:latest", 4, 100, 200),
        ]
    )
    chain = Chain(f"usage-{unique}", T0)
    mine = {"tenant_id": tenant_id, "key_id": key_id, "key_prefix": prefix}
    refused = {"outcome": "refused", "status": 429, "refusal": "limit_rpm"}
    rows, head = sealed(
        chain,
        [
            event(unique, 0, day=d1, **mine, **refused),
            event(unique, 1, day=d3, **mine, **refused, model=None),
            event(unique, 2, day=d3, **mine),  # not a refusal
            event(unique, 3, day=d3, **refused),  # nobody's (no tenant)
        ],
    )
    await store.append_audit(rows, [], [head])

    by_day = await store.usage_report(UsageQuery(by="day", tenant_id=tenant_id))
    assert [
        (r.group, r.requests, r.prompt_tokens, r.completion_tokens, r.refusals) for r in by_day
    ] == [
        ("2031-01-30", 2, 10, 20, 1),
        ("2031-01-31", 1, 5, 6, 0),
        ("2031-02-01", 4, 100, 200, 1),
    ]
    by_month = await store.usage_report(UsageQuery(by="month", key_id=key_id))
    assert [(r.group, r.requests, r.refusals) for r in by_month] == [
        ("2031-01", 3, 1),
        ("2031-02", 4, 1),
    ]
    by_model = await store.usage_report(
        UsageQuery(by="model", tenant_id=tenant_id, since=d2, until=d3 + timedelta(days=1))
    )
    assert [(r.group, r.requests, r.refusals) for r in by_model] == [
        ("-", 0, 1),
        ("llama3:latest", 1, 0),
        ("qwen3:latest", 4, 0),
    ]


async def test_verify_reports_intact_edited_deleted_and_truncated_chains(
    store: Store, store_url: str, unique: str
) -> None:
    ids = {name: f"v{name}-{unique}" for name in ("ok", "edit", "del", "tail")}
    for chain_id in ids.values():
        chain = Chain(chain_id, T0)
        rows, head = sealed(chain, [event(unique, i) for i in range(6)])
        await store.append_audit(rows, [], [head])
    await raw_sql(
        store_url, "UPDATE audit_log SET status = 500 WHERE chain_id = ? AND seq = 3", ids["edit"]
    )
    await raw_sql(store_url, "DELETE FROM audit_log WHERE chain_id = ? AND seq = 2", ids["del"])
    await raw_sql(store_url, "DELETE FROM audit_log WHERE chain_id = ? AND seq >= 5", ids["tail"])

    reports = {r.head.chain_id: r for r in await verify_audit(store, page=2)}
    assert reports[ids["ok"]].broken is None and reports[ids["ok"]].rows == 6
    problems = {
        name: (b.seq, b.problem)
        for name, chain_id in ids.items()
        if (b := reports[chain_id].broken) is not None
    }
    assert problems == {"edit": (3, "edited"), "del": (2, "missing"), "tail": (5, "truncated")}


async def test_verify_reports_a_chain_whose_head_was_deleted(
    store: Store, store_url: str, unique: str
) -> None:
    chain = Chain(f"headless-{unique}", T0)
    rows, head = sealed(chain, [event(unique, i) for i in range(2)])
    await store.append_audit(rows, [], [head])
    await raw_sql(store_url, "DELETE FROM audit_chains WHERE chain_id = ?", chain.id)
    reports = {r.head.chain_id: r for r in await verify_audit(store)}
    broken = reports[chain.id].broken
    assert broken is not None and broken.problem == "head_missing"
    assert not reports[chain.id].head.recorded


async def test_sqlite_writes_a_batch_with_few_statements(tmp_path: Any) -> None:
    """SQLite: 1200 rows = 3 multi-row INSERTs (500 rows each) and one head upsert."""
    url = f"sqlite:///{tmp_path}/count.db"
    async with open_store(url) as store:
        await store.migrate()
        conn = store._conn  # type: ignore[attr-defined]
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        chain = Chain("count", T0)
        rows, head = sealed(chain, [event("n", i) for i in range(1200)])
        await store.append_audit(rows, [], [head])
        conn.set_trace_callback(None)
    inserts = [s for s in statements if s.startswith("INSERT INTO audit_log")]
    assert len(inserts) == 3
    assert len(statements) <= 6  # BEGIN, 3 INSERTs, head upsert, COMMIT


async def raw_sql(store_url: str, statement: str, *params: Any) -> None:
    """Raw SQL behind the store's back: the attacker editing the database."""
    if store_url.startswith("sqlite"):
        path = store_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path)
        try:
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()
        return
    import asyncpg
    import trio_asyncio

    numbered = statement
    for i in range(1, len(params) + 1):
        numbered = numbered.replace("?", f"${i}", 1)

    async def work() -> None:
        conn = await asyncpg.connect(store_url)
        try:
            await conn.execute(numbered, *params)
        finally:
            await conn.close()

    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        await trio_asyncio.aio_as_trio(work, loop=loop)()
    else:
        async with trio_asyncio.open_loop() as own:
            await trio_asyncio.aio_as_trio(work, loop=own)()
