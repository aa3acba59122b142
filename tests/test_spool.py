"""The local spool (nzgw/services/spool.py): records that survive a torn write, ownership by
`flock`, takeover of orphaned spools, idempotent replay into a real SQLite store, and the
flushers spooling what the store did not take (failed, hung, at shutdown).

Virtual time where the flushers run (autojump clock). Spool appends run in a worker thread,
which an autojump clock does not wait for: those tests use a real clock with generous bounds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cattrs.preconf.json import make_converter

from nzgw.adapters.stores import open_store, store_identity
from nzgw.core.audit import AuditEvent, PendingPrompt
from nzgw.ports import (
    AuditBatch,
    AuditQuery,
    NewKey,
    Store,
    StoreUnavailableError,
    UsageBatch,
    UsageRow,
)
from nzgw.services.audit import AuditLog, run_audit_flusher, verify_audit
from nzgw.services.limiter import Limiter, run_usage_flusher
from nzgw.services.spool import (
    Spool,
    SpoolBatch,
    SpoolStats,
    decode_records,
    encode_record,
    open_spool,
    replay_orphans,
    run_spool_replay,
    store_fingerprint,
)
from tests.counters.conftest import principal
from tests.test_audit_core import event as audit_event

DAY = date(2031, 3, 4)
T0 = datetime(2031, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC)
FP = "f" * 16


def event(n: int, tenant_id: int = 1, key_id: int = 2) -> AuditEvent:
    return attrs.evolve(
        audit_event(n), ts=T0 + timedelta(seconds=n), tenant_id=tenant_id, key_id=key_id
    )


class FlakyStore:
    """A real store whose writes can be made to fail (`down`) or hang (`hang`)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self.hang = False

    async def _gate(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise StoreUnavailableError("store down (test)")

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        await self._gate()
        await self.inner.add_usage(rows, batch_id=batch_id)

    async def append_audit(self, *args: Any) -> None:
        await self._gate()
        await self.inner.append_audit(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@attrs.frozen
class Db:
    store: Store
    tenant_id: int
    key_id: int


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    async with open_store(f"sqlite:///{tmp_path}/store.db") as store:
        await store.migrate()
        tenant = await store.create_tenant("t")
        key = await store.create_key(NewKey(tenant.id, "k", "nz_spool0001", "hash"))
        yield Db(store, tenant.id, key.id)


def usage_batch(db: Db, batch_id: str, tokens: int) -> UsageBatch:
    return UsageBatch(batch_id, (UsageRow(DAY, db.tenant_id, db.key_id, "m", 1, tokens, 0),))


def audit_batches(db: Db, n: int, per_batch: int) -> list[AuditBatch]:
    audit = AuditLog(queue_max=10_000, batch_max=per_batch, now=lambda: T0)
    for i in range(n):
        prompt = PendingPrompt(b'{"prompt": "hi"}', "hello", None) if i == 0 else None
        audit.record(event(i, db.tenant_id, db.key_id), prompt)
    return audit.seal_all()


async def ledger_tokens(db: Db) -> int:
    tenant, _ = await db.store.usage_totals(db.tenant_id, day=DAY, month_start=DAY)
    return tenant.lifetime_tokens


# --- records --------------------------------------------------------------------------------------


async def test_records_round_trip_and_a_torn_tail_is_skipped(db: Db) -> None:
    batches: list[SpoolBatch] = [usage_batch(db, "u1", 5), *audit_batches(db, 3, 2)]
    data = b"".join(encode_record(b, make_converter()) for b in batches)
    decoded = decode_records(data)
    assert decoded.batches == batches and decoded.torn == 0

    # SIGKILL in the middle of the last append: the lines before it are whole.
    cut = data[: len(data) - 7]
    decoded = decode_records(cut)
    assert decoded.batches == batches[:-1] and decoded.torn == 1

    # A flipped byte inside a record: its CRC no longer matches; the others still count.
    first_end = data.index(b"\n")
    flipped = data[: first_end - 3] + bytes([data[first_end - 3] ^ 1]) + data[first_end - 2 :]
    decoded = decode_records(flipped)
    assert decoded.batches == batches[1:] and decoded.torn == 1


def test_the_spool_folder_names_the_database_not_the_credentials(tmp_path: Path) -> None:
    a = store_fingerprint(store_identity("postgresql://alice:secret@db.example:5432/nzgw"))
    b = store_fingerprint(store_identity("postgresql://bob:other@db.example/nzgw?sslmode=x"))
    c = store_fingerprint(store_identity("postgresql://alice:secret@db.example:5432/nzgw2"))
    assert a == b != c
    os.chdir(tmp_path)
    assert store_fingerprint(store_identity("sqlite:///x.db")) == store_fingerprint(
        store_identity(f"sqlite:///{tmp_path}/x.db")
    )


# --- ownership and replay -------------------------------------------------------------------------


async def test_a_live_spool_is_left_alone_and_an_orphan_is_replayed_once(
    db: Db, tmp_path: Path
) -> None:
    stats = SpoolStats()
    batches: list[SpoolBatch] = [usage_batch(db, "u1", 5), *audit_batches(db, 5, 2)]
    with trio.fail_after(30), open_spool(tmp_path, FP, stats) as spool:
        assert await spool.add(batches) == (6, 6)  # rows, requests
        assert await spool.add(batches[:2]) is None  # each batch once
        # Its process is alive (it holds the flock): another process must not take it.
        assert await replay_orphans(tmp_path, FP, db.store, SpoolStats()) == 0
        path = spool.path
    assert path.exists()  # left with its rows: the process ended with the store away
    copy = path.with_name("spool-copy.log")
    shutil.copy(path, copy)  # the same batches in a second orphan: written once all the same

    replayed = SpoolStats()
    with trio.fail_after(30):
        assert await replay_orphans(tmp_path, FP, db.store, replayed) == 12
    assert not path.exists() and not copy.exists()
    assert replayed.replayed_rows == 12
    assert await ledger_tokens(db) == 5
    rows = await db.store.list_audit(AuditQuery(limit=100))
    assert sorted(r.event.request_id for r in rows) == [f"req{i:04d}" for i in range(5)]
    [report] = await verify_audit(db.store)
    assert report.broken is None and report.rows == 5 and report.head.seq == 5
    # Another database's spools are another folder: nothing to replay here.
    assert await replay_orphans(tmp_path, "0" * 16, db.store, SpoolStats()) == 0


async def test_the_lock_is_flock_so_a_second_open_in_the_same_process_is_refused(
    tmp_path: Path,
) -> None:
    with open_spool(tmp_path, FP, SpoolStats()) as spool:
        fd = os.open(spool.path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not spool.path.exists()  # nothing outstanding: removed on a clean exit


async def test_a_spool_is_truncated_once_everything_in_it_was_written(
    db: Db, tmp_path: Path
) -> None:
    with trio.fail_after(30), open_spool(tmp_path, FP, SpoolStats()) as spool:
        usage = usage_batch(db, "u1", 5)
        [audit] = audit_batches(db, 2, 2)
        await spool.add([usage, audit])
        await spool.settle("usage", [])  # usage written, audit not yet
        assert spool.path.stat().st_size > 0
        await spool.settle("audit", [audit])  # still waiting
        assert spool.path.stat().st_size > 0
        await spool.settle("audit", [])
        assert spool.path.stat().st_size == 0 and spool.outstanding == 0
        await spool.add([usage])  # a new outage appends from the start again
        assert decode_records(spool.path.read_bytes()).batches == [usage]
        await spool.settle("usage", [])


async def test_replay_with_the_store_down_starts_anyway_and_retries(db: Db, tmp_path: Path) -> None:
    with open_spool(tmp_path, FP, SpoolStats()) as spool:
        await spool.add([usage_batch(db, "u1", 7)])
    flaky = FlakyStore(db.store)
    flaky.down = True
    stats = SpoolStats()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_spool_replay(
                    tmp_path, FP, flaky, stats, retry_interval=0.05, task_status=task_status
                )
            )
            assert stats.replayed_rows == 0  # started: the process serves meanwhile
            flaky.down = False
    assert stats.replayed_rows == 1 and await ledger_tokens(db) == 7
    assert list((tmp_path / FP).iterdir()) == []


# --- the flushers ---------------------------------------------------------------------------------


async def spooled(stats: SpoolStats, rows: int = 1) -> None:
    """Return once `rows` rows were spooled (appends finish in a worker thread: polled)."""
    while stats.spooled_rows < rows:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def quick_usage_flusher(
    limiter: Limiter,
    store: FlakyStore,
    spool: Spool,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The usage flusher on short times: flushes every 10 ms, spools a flush unanswered for
    0.2 s, gives the last flush 0.1 s."""
    await run_usage_flusher(
        limiter,
        store,
        interval=0.01,
        spool=spool,
        spool_after=0.2,
        final_flush_timeout=0.1,
        task_status=task_status,
    )


async def settle_one(limiter: Limiter, db: Db, tokens: int) -> None:
    who = principal(db.tenant_id, db.key_id)
    lease = (await limiter.admit(who, model="m", reserve_tokens=1)).lease
    assert lease is not None
    await limiter.settle(lease, model="m", prompt_tokens=tokens, completion_tokens=0)


async def test_a_failed_usage_flush_is_spooled_and_a_crash_then_loses_nothing(
    db: Db, tmp_path: Path
) -> None:
    """SIGKILL after a failed flush: what was settled before that flush is on disk. The
    limiter is dropped without its final flush (the process died); the next start replays."""
    from nzgw.adapters.memory_counters import MemoryCounters

    flaky = FlakyStore(db.store)
    limiter = Limiter(MemoryCounters(), flaky)
    stats = SpoolStats()
    with trio.fail_after(30), open_spool(tmp_path, FP, stats) as spool:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(quick_usage_flusher, limiter, flaky, spool))
            await settle_one(limiter, db, 11)
            while await ledger_tokens(db) != 11:  # noqa: ASYNC110 (an ordinary flush, polled)
                await trio.sleep(0.01)
            flaky.down = True
            await settle_one(limiter, db, 22)
            await spooled(stats)
            # The crash: no final flush. (Cancelling would run it; the spool is what remains.)
            spool_path = spool.path
            data = spool_path.read_bytes()
            nursery.cancel_scope.cancel()
    assert await ledger_tokens(db) == 11
    [batch] = decode_records(data).batches
    assert isinstance(batch, UsageBatch) and sum(r.prompt_tokens for r in batch.rows) == 22
    orphan = tmp_path / FP / "spool-crashed.log"
    orphan.write_bytes(data)
    with trio.fail_after(30):
        await replay_orphans(tmp_path, FP, db.store, SpoolStats())
    assert await ledger_tokens(db) == 33


async def test_a_hung_store_gets_the_rows_spooled_every_spool_after(db: Db, tmp_path: Path) -> None:
    """The flush hangs (a frozen PostgreSQL): what settled is spooled `spool_after` seconds
    later, and what settles while it still hangs too. The file as it is while hanging (what a
    SIGKILL leaves) holds both."""
    from nzgw.adapters.memory_counters import MemoryCounters

    flaky = FlakyStore(db.store)
    flaky.hang = True
    limiter = Limiter(MemoryCounters(), flaky)
    stats = SpoolStats()
    with trio.fail_after(30), open_spool(tmp_path, FP, stats) as spool:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(quick_usage_flusher, limiter, flaky, spool))
            await settle_one(limiter, db, 5)
            await spooled(stats)
            assert limiter.pending_rows == 1  # still in memory too: the flush waits on
            await settle_one(limiter, db, 7)
            await spooled(stats, rows=2)
            crash_image = spool.path.read_bytes()
            nursery.cancel_scope.cancel()
        assert stats.lost_rows == 0
    flaky.hang = False
    (tmp_path / FP / "spool-crashed.log").write_bytes(crash_image)
    with trio.fail_after(30):
        await replay_orphans(tmp_path, FP, db.store, SpoolStats())
    assert await ledger_tokens(db) == 12


async def test_shutdown_with_the_store_down_spools_usage_and_audit_and_replays_them_once(
    db: Db, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nzgw.adapters.memory_counters import MemoryCounters

    flaky = FlakyStore(db.store)
    flaky.down = True
    limiter = Limiter(MemoryCounters(), flaky)
    audit = AuditLog(queue_max=1000, batch_max=3)
    stats = SpoolStats()
    with trio.fail_after(30), open_spool(tmp_path, FP, stats) as spool:
        async with trio.open_nursery() as nursery:
            for flusher in (
                lambda task_status: run_usage_flusher(
                    limiter,
                    flaky,
                    interval=60,
                    spool=spool,
                    final_flush_timeout=0.2,
                    task_status=task_status,
                ),
                lambda task_status: run_audit_flusher(
                    audit,
                    flaky,
                    interval=60,
                    spool=spool,
                    final_flush_timeout=0.2,
                    task_status=task_status,
                ),
            ):
                await nursery.start(flusher)
            for i in range(7):
                await settle_one(limiter, db, 10)
                audit.record(event(i, db.tenant_id, db.key_id))
            nursery.cancel_scope.cancel()  # SIGTERM with the store down
    assert (stats.spooled_rows, stats.lost_rows, audit.rows_lost) == (1 + 7, 0, 0)
    assert not [r for r in caplog.records if "lost" in r.getMessage()]
    with trio.fail_after(30):
        assert await replay_orphans(tmp_path, FP, db.store, SpoolStats()) == 8
    assert await ledger_tokens(db) == 70
    [report] = await verify_audit(db.store)
    assert report.broken is None and report.rows == 7


async def test_without_a_spool_the_rows_lost_at_shutdown_are_counted(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyStore(db.store)
    flaky.down = True
    audit = AuditLog(queue_max=1000)
    audit.record(event(1, db.tenant_id, db.key_id))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_audit_flusher(
                    audit, flaky, interval=60, final_flush_timeout=0.1, task_status=task_status
                )
            )
            nursery.cancel_scope.cancel()
    assert audit.rows_lost == 1
    assert [r for r in caplog.records if "are lost" in r.getMessage()]
