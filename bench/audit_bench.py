"""Audit log costs: the request path (finish hook) and the batch writes, SQLite and PostgreSQL.

    .venv/bin/python bench/audit_bench.py [--rows 20000] [--batch 1000] [--pg-url URL]

1. Request path: CPU per request of the audit finish hook (`RequestInfo` → `AuditEvent`, the
   queue append). It makes no store call at all; the number is what the hook costs.
2. Flusher: rows/s through `AuditLog.flush` (sealing: canonical encoding + SHA-256 chain, then
   `store.append_audit`: one transaction per batch, one multi-row INSERT per batch on
   PostgreSQL via unnest, one per 500 rows on SQLite), and, for scale, the same rows written
   one row per batch.

PostgreSQL: a scratch database on `--pg-url` (default NZGW_TEST_PG_URL or postgres@127.0.0.1),
dropped after. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from datetime import UTC

import trio

from nzgw.adapters.postgres import admin_database
from nzgw.adapters.stores import open_store
from nzgw.core import paths
from nzgw.core.framing import Usage
from nzgw.core.models import ApiKey, Principal, Tenant
from nzgw.http.audit import audit_event, audit_hook
from nzgw.http.gateway import RequestInfo
from nzgw.ports import Store
from nzgw.services.audit import AuditLog

DEFAULT_PG = os.environ.get("NZGW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WHO = Principal(ApiKey(7, 3, "bench", "nz_benchkey", "h"), Tenant(3, "bench"))


def request_info(n: int) -> RequestInfo:
    started = trio.current_time()
    info = RequestInfo(
        request_id=f"{n:016x}",
        method="POST",
        decision=paths.classify("POST", "/api/chat"),
        client="198.51.100.7",
        started=started,
        wall_started=time.time(),
        status=200,
        principal=WHO,
        model="llama3:latest",
        streamed=True,
        backend="gpu-1",
        usage=Usage(123, 456),
        first_byte=started + 0.05,
        finished=started + 1.2,
    )
    return info


async def hook_cost(n: int) -> float:
    """CPU µs per request of the finish hook (building the row and queueing it)."""
    audit = AuditLog(queue_max=10 * n)
    hook = audit_hook(audit, zone=UTC)
    infos = [request_info(i) for i in range(n)]
    start = time.process_time()
    for info in infos:
        await hook(info)
    elapsed = time.process_time() - start
    assert audit.pending == n
    return elapsed / n * 1e6


async def write_rate(store: Store, rows: int, batch: int) -> tuple[float, float]:
    """(rows/s through flush incl. sealing, CPU µs per row in this process)."""
    audit = AuditLog(queue_max=rows + 1, batch_max=batch)
    for i in range(rows):
        event, _ = audit_event(request_info(i))
        audit.record(event)
    cpu, wall = time.process_time(), time.perf_counter()
    written = await audit.flush(store)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    assert written == rows and audit.batches_written == -(-rows // batch)
    return rows / wall, cpu / rows * 1e6


async def bench_store(name: str, url: str, rows: int, batch: int) -> None:
    async with open_store(url) as store:
        await store.migrate()
        await write_rate(store, min(rows, 2000), batch)  # warm-up
        rate, cpu = await write_rate(store, rows, batch)
        print(f"{name:10s} batch {batch:5d}: {rate:9.0f} rows/s  ({cpu:5.1f} µs CPU/row here)")
        small = min(rows, 2000)
        rate1, cpu1 = await write_rate(store, small, 1)
        print(f"{name:10s} batch     1: {rate1:9.0f} rows/s  ({cpu1:5.1f} µs CPU/row here)")


async def main(rows: int, batch: int, pg_url: str) -> None:
    print(f"finish hook (row + queue): {await hook_cost(50_000):.1f} µs CPU per request")
    with tempfile.TemporaryDirectory() as tmp:
        await bench_store("sqlite", f"sqlite:///{tmp}/bench.db", rows, batch)
    name = f"nzgw_bench_{secrets.token_hex(4)}"
    async with admin_database(pg_url, name) as url:
        await bench_store("postgres", url, rows, batch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    args = parser.parse_args()
    trio.run(main, args.rows, args.batch, args.pg_url)
