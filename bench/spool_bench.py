"""The local spool's cost: one append + fsync of a batch (services/spool.py), and the replay.

    .venv/bin/python bench/spool_bench.py [--rows 100] [--runs 200] [--dir DIR]

1. Append: `Spool.add` of one sealed audit batch of `--rows` rows (encode, CRC, one write, one
   fsync in a worker thread), and of one usage batch of `--rows` rows; median and p95 over
   `--runs` appends, each a new batch (the spool writes a batch once).
2. Decode: reading the records back (what a replay does before it writes to the store).

The spool is written only while the store is away, so this is not a request-path cost. `--dir`
picks the file system (default: a temporary directory; tmpfs fsyncs for free, so point it at
the volume the spool will live on). A benchmark, not a test: numbers depend on the disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import trio

from nzgw.core.audit import AuditEvent
from nzgw.ports import UsageBatch, UsageRow
from nzgw.services.audit import AuditLog
from nzgw.services.spool import SpoolStats, decode_records, open_spool

T0 = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)


def event(n: int) -> AuditEvent:
    return AuditEvent(
        ts=T0 + timedelta(milliseconds=n),
        day=T0.date(),
        request_id=f"{n:016x}",
        tenant_id=3,
        key_id=7,
        key_prefix="nz_benchkey",
        client="198.51.100.7",
        method="POST",
        surface="native",
        path="/api/chat",
        model="llama3:latest",
        status=200,
        outcome="ok",
        refusal=None,
        prompt_tokens=12,
        completion_tokens=240,
        tokens_reported=True,
        streamed=True,
        ttfb_us=81_000,
        latency_us=2_400_000,
        backend="backend-0",
    )


def ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"


async def main(rows: int, runs: int, directory: Path) -> None:
    audit = AuditLog(queue_max=rows * runs + 1, batch_max=rows)
    for n in range(rows * runs):
        audit.record(event(n))
    audit_batches = audit.seal_all()
    usage_batches = [
        UsageBatch(
            f"batch{i}",
            tuple(UsageRow(date(2031, 3, 4), 3, 7, f"model-{j}", 5, 60, 1200) for j in range(rows)),
        )
        for i in range(runs)
    ]
    with open_spool(directory, "bench", SpoolStats()) as spool:
        for label, batches in (("audit", audit_batches), ("usage", usage_batches)):
            times: list[float] = []
            for batch in batches:
                start = time.perf_counter()
                await spool.add([batch])
                times.append(time.perf_counter() - start)
            print(f"append + fsync of one {label} batch of {rows} rows: {ms(times)}")
        data = spool.path.read_bytes()
        start = time.perf_counter()
        decoded = decode_records(data)
        took = time.perf_counter() - start
        print(
            f"decode {len(decoded.batches)} batches ({len(data) / 1e6:.1f} MB): "
            f"{took * 1000:.0f} ms ({took / len(decoded.batches) * 1000:.2f} ms per batch)"
        )
        await spool.settle("audit", [])
        await spool.settle("usage", [])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        trio.run(main, args.rows, args.runs, Path(tmp))
