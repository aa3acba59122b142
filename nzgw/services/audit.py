"""The audit log of one gateway process: its in-memory queue and hash chain, the flusher that
writes it to the store in batches, the prompt-log purge, and chain verification (docs/audit.md).

Request path (docs/ARCHITECTURE.md, step 8), in the connection's shielded cleanup::

    audit.record(event, prompt)      # sync, O(1): a deque append; never touches the store

Nothing on the request path waits for the store. The flusher (`run_audit_flusher`, in the root
nursery) seals queued events into this process's chain (`nzgw.core.audit.Chain`) and writes them
with `store.append_audit`: one transaction, one multi-row INSERT per batch, every
`flush_interval` seconds or as soon as `batch_max` rows are waiting.

Fail closed: when the store cannot take the rows they stay queued. Once `queue_max` rows (or
`prompt_bytes_max` bytes of prompt logs) are waiting, `refusing` turns True and the HTTP layer
answers new requests 503 until the backlog is down to half. Those refused requests cannot be
queued (that is the point), so each is counted (`refused_total`) and one summary row per episode
records how many there were; the episode is logged when it starts and when it ends. Requests
admitted before the queue filled are still recorded: the bound is soft by at most the requests
in flight.

Ownership: the queue, the chain and the counters belong to the `AuditLog`; one flush runs at a
time (a lock). A batch is sealed once (seq and hashes fixed) and kept until a write of it
succeeds: a failed or cancelled write is retried with the very same rows, and writing a batch
twice is harmless (the store skips (chain_id, seq) it has), so no row is lost or duplicated and
the chain has no holes. That is also what makes the local spool safe (`services/spool.py`):
`seal_all` seals the whole queue into batches, the spool keeps them on disk, and a replay at
the next start writes them into their own chain, skipping what the store already has.
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import UTC, datetime, tzinfo
from functools import partial

import attrs
import trio

from nzgw.core.audit import (
    AuditEvent,
    AuditRow,
    Chain,
    ChainBreak,
    ChainVerifier,
    PendingPrompt,
    PromptRecord,
    new_chain_id,
    overflow_event,
)
from nzgw.ports import AuditBatch, AuditStore, ChainHead, StoreError, WallClock, utc_now
from nzgw.services.spool import Spool, flush_or_spool, spool_at_shutdown

log = logging.getLogger("nzgw.audit")


#: Rows per batch (one INSERT statement on PostgreSQL, one per 500 rows on SQLite).
BATCH_MAX = 1000
#: Prompt-log bytes held while the store is down before requests are refused.
PROMPT_QUEUE_BYTES = 256 << 20
#: Expired prompt logs deleted per statement, and how often the purge runs.
PURGE_BATCH = 1000
PURGE_INTERVAL = 60.0
#: The last flush on shutdown gets this long (shielded), retrying while the store refuses.
FINAL_FLUSH_TIMEOUT = 10.0
#: Rows per page when `verify_audit` reads a chain.
VERIFY_PAGE = 5000


class AuditLog:
    """This process's audit queue and chain. Build one per process; `record` from any task.

    `zone` is the budget time zone (the `day` of summary rows). `now` is the wall clock.
    Counters for metrics: `rows_written`, `batches_written`, `refused_total`, `rows_lost`,
    and `pending` (rows not written yet).
    """

    def __init__(
        self,
        *,
        queue_max: int,
        zone: tzinfo = UTC,
        batch_max: int = BATCH_MAX,
        prompt_bytes_max: int = PROMPT_QUEUE_BYTES,
        now: WallClock = utc_now,
        chain_id: str | None = None,
    ) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be >= 1")
        started = now()
        self.chain = Chain(chain_id or new_chain_id(started), started)
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.prompt_bytes_max = prompt_bytes_max
        self._zone = zone
        self._now = now
        self._queue: deque[tuple[AuditEvent, PendingPrompt | None]] = deque()
        self._queued_bytes = 0  # prompt bytes in `_queue`
        # Sealed, not written yet, oldest first (more than one only after a `seal_all`).
        self._sealed: deque[tuple[AuditBatch, int]] = deque()  # (batch, its prompt bytes)
        self._sealed_rows = 0
        self._sealed_bytes = 0
        self._lock = trio.Lock()  # one flush at a time: batches go out in chain order
        self._batch_ready = trio.Event()
        self._written = trio.Event()  # set (and replaced) after every batch written
        #: True while new requests must be refused (503): the queue is over its bound.
        self.refusing = False
        self._refused_since: datetime | None = None  # first refusal not in a summary row yet
        self._refused_unrecorded = 0
        self.rows_written = 0
        self.batches_written = 0
        self.refused_total = 0
        self.rows_lost = 0

    # --- request path (synchronous, never blocks, never raises)

    @property
    def pending(self) -> int:
        """Rows queued or sealed, not written yet."""
        return len(self._queue) + self._sealed_rows

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes + self._sealed_bytes

    def record(self, event: AuditEvent, prompt: PendingPrompt | None = None) -> None:
        """Queue one row (and its prompt log). O(1); also while refusing: requests admitted
        before the queue filled are recorded too."""
        self._queue.append((event, prompt))
        if prompt is not None:
            self._queued_bytes += prompt.size
        if len(self._queue) >= self.batch_max:
            self._batch_ready.set()
        if not self.refusing and self._over_bound():
            self.refusing = True
            log.error(
                "audit queue full (%d rows, %d prompt bytes waiting): refusing new requests "
                "with 503 until the backlog is written",
                self.pending,
                self.pending_bytes,
            )

    def count_refused(self) -> None:
        """A request was refused because the queue was full: count it (it has no row)."""
        self.refused_total += 1
        self._refused_unrecorded += 1
        if self._refused_since is None:
            self._refused_since = self._now()
        if not self.refusing:
            # Decided while refusing, finished after the backlog drained: record it now.
            self.record_refusals()

    def record_refusals(self) -> None:
        """Queue the summary row of the refusals counted since the last one (if any)."""
        if not self._refused_unrecorded or self._refused_since is None:
            return
        started, count = self._refused_since, self._refused_unrecorded
        self._refused_since, self._refused_unrecorded = None, 0
        self.record(
            overflow_event(started, self._now(), started.astimezone(self._zone).date(), count)
        )

    def _over_bound(self) -> bool:
        return self.pending >= self.queue_max or self.pending_bytes >= self.prompt_bytes_max

    def _under_low_water(self) -> bool:
        return (
            self.pending <= self.queue_max // 2 and self.pending_bytes <= self.prompt_bytes_max // 2
        )

    async def ready(self) -> bool:
        """A readiness probe: False while refusing (take this replica out of the balancer)."""
        await trio.lowlevel.checkpoint()
        return not self.refusing

    # --- flusher side

    async def wait_batch_ready(self) -> None:
        """Return once `batch_max` rows are queued."""
        await self._batch_ready.wait()

    async def wait_written(self, rows: int) -> None:
        """Return once `rows_written` >= `rows` (for tests and tools; no timeout: wrap it)."""
        while self.rows_written < rows:
            await self._written.wait()

    async def flush(self, store: AuditStore, *, full_batches_only: bool = False) -> int:
        """Write everything queued, in batches of `batch_max` (with `full_batches_only`, stop
        when less than a batch is left); return the rows written.

        On `StoreError` the batch in hand stays sealed for the next attempt and the error
        propagates (rows written before it stay written). Cancellation likewise leaves the
        batch for the next flush. Safe to call from any task; flushes run one at a time.
        """
        written = 0
        async with self._lock:
            while True:
                if not self._sealed:
                    if full_batches_only and len(self._queue) < self.batch_max:
                        return written
                    if not self._seal_batch():
                        return written
                batch, size = self._sealed[0]
                await store.append_audit(batch.rows, batch.prompts, [batch.head])
                self._sealed.popleft()
                self._sealed_rows -= len(batch.rows)
                self._sealed_bytes -= size
                rows = batch.rows
                written += len(rows)
                self.rows_written += len(rows)
                self.batches_written += 1
                self._written.set()
                self._written = trio.Event()
                if self.refusing and self._under_low_water():
                    self.refusing = False
                    log.warning(
                        "audit backlog written: accepting requests again (%d refused with 503 "
                        "while the queue was full)",
                        self._refused_unrecorded,
                    )
                    self.record_refusals()

    @property
    def sealed_batches(self) -> list[AuditBatch]:
        """The sealed batches not written yet, oldest first."""
        return [batch for batch, _ in self._sealed]

    def seal_all(self) -> list[AuditBatch]:
        """Seal everything queued (in batches of `batch_max`); return every batch not written
        yet, oldest first: what a spool must hold while the store is away. Runs beside a
        flush in progress: the new batches come after the one being written."""
        while self._seal_batch():
            pass
        return self.sealed_batches

    def _seal_batch(self) -> bool:
        """Move up to `batch_max` queued events into the chain, as a sealed batch."""
        queue = self._queue
        if not queue:
            return False
        chain = self.chain
        rows: list[AuditRow] = []
        prompts: list[PromptRecord] = []
        size = 0
        for _ in range(min(self.batch_max, len(queue))):
            event, prompt = queue.popleft()
            row = chain.seal(event)
            rows.append(row)
            if prompt is not None:
                size += prompt.size
                prompts.append(_prompt_record(row, prompt))
        self._queued_bytes -= size
        if len(queue) < self.batch_max and self._batch_ready.is_set():
            self._batch_ready = trio.Event()
        last = rows[-1]
        head = ChainHead(chain.id, chain.started_at, last.seq, last.hash)
        self._sealed.append((AuditBatch(tuple(rows), tuple(prompts), head), size))
        self._sealed_rows += len(rows)
        self._sealed_bytes += size
        return True


def _text(data: bytes | str) -> str:
    """Stored text: invalid UTF-8 replaced, NUL (which PostgreSQL text cannot hold) too."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text.replace("\x00", "\ufffd")


def _prompt_record(row: AuditRow, prompt: PendingPrompt) -> PromptRecord:
    event = row.event
    assert event.tenant_id is not None and event.key_id is not None  # only keys opt in
    return PromptRecord(
        chain_id=row.chain_id,
        seq=row.seq,
        request_id=event.request_id,
        tenant_id=event.tenant_id,
        key_id=event.key_id,
        created_at=event.ts,
        expires_at=prompt.expires_at,
        request_body=_text(prompt.request_body),
        response_text=None if prompt.response is None else _text(prompt.response),
    )


async def run_audit_flusher(
    audit: AuditLog,
    store: AuditStore,
    *,
    interval: float,
    final_flush_timeout: float = FINAL_FLUSH_TIMEOUT,
    spool: Spool | None = None,
    spool_after: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the audit queue every `interval` seconds, and as soon as a batch is full; never
    returns. A failed write keeps its rows and is retried `interval` seconds later (the failure
    is logged once per outage); with a `spool`, a write that fails or has not answered within
    `spool_after` seconds also seals the queue and appends it there (`services/spool.py`). On
    cancellation (shutdown) a last flush drains the queue, shielded, retrying for at most
    `final_flush_timeout` seconds; rows still unwritten then go to the spool, or without one
    (or if it fails) are counted in `audit.rows_lost` and logged. The chain's id and final head
    are logged, so they can be kept outside the database (see `nzgw.core.audit`)."""
    interval = max(interval, 0.01)
    chain = audit.chain
    log.info("audit chain %s started", chain.id)
    task_status.started()
    failing = False

    def unwritten() -> list[AuditBatch]:
        return audit.sealed_batches

    async def flush_once(*, full_batches_only: bool = False) -> int:
        return await flush_or_spool(
            "audit",
            partial(audit.flush, store, full_batches_only=full_batches_only),
            seal=audit.seal_all,
            unwritten=unwritten,
            spool=spool,
            spool_after=spool_after,
        )

    try:
        while True:
            with trio.move_on_after(interval) as timer:
                await audit.wait_batch_ready()
            try:
                # A full batch does not wait for the interval; the rest does.
                await flush_once(full_batches_only=not timer.cancelled_caught)
            except StoreError as exc:
                if not failing:
                    log.warning("audit rows not written, kept for the next try: %s", exc)
                    failing = True
                await trio.sleep(interval)
            else:
                if failing:
                    log.warning("audit store reachable again; %d rows waiting", audit.pending)
                    failing = False
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(final_flush_timeout):
                audit.record_refusals()
                while audit.pending:
                    try:
                        await flush_once()
                    except StoreError as exc:
                        log.warning("final audit flush failed, retrying: %s", exc)
                        await trio.sleep(min(interval, 0.5))
            lost = await spool_at_shutdown("audit", audit.seal_all(), spool)
        if lost:
            audit.rows_lost += lost
            log.error("%d audit rows could not be written before shutdown and are lost", lost)
        log.info("audit chain %s ends at seq %d, hash %s", chain.id, chain.seq, chain.head)


# --- prompt logs ----------------------------------------------------------------------------------


async def purge_expired_prompts(
    store: AuditStore, *, now: datetime, batch: int = PURGE_BATCH
) -> int:
    """Delete every prompt log expired at `now`, `batch` rows per statement; return how many."""
    total = 0
    while True:
        deleted = await store.purge_prompts(now, limit=batch)
        total += deleted
        if deleted < batch:
            return total


async def run_prompt_purge(
    store: AuditStore,
    *,
    interval: float = PURGE_INTERVAL,
    batch: int = PURGE_BATCH,
    now: WallClock = utc_now,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Purge expired prompt logs now and then every `interval` seconds; never returns. A failed
    purge is logged and tried again at the next tick. Cancellation between or inside statements
    is harmless: each statement deletes a bounded batch atomically."""
    task_status.started()
    while True:
        try:
            purged = await purge_expired_prompts(store, now=now(), batch=batch)
        except StoreError as exc:
            log.warning("prompt log purge failed: %s", exc)
        else:
            if purged:
                log.info("purged %d expired prompt logs", purged)
        await trio.sleep(interval)


# --- verification ---------------------------------------------------------------------------------


@attrs.frozen
class ChainReport:
    """One chain as verified: its head, the rows that checked out, the first break if any."""

    head: ChainHead
    rows: int
    broken: ChainBreak | None


async def verify_audit(store: AuditStore, *, page: int = VERIFY_PAGE) -> list[ChainReport]:
    """Walk every chain in the store and report each one's first broken link (if any).

    The heads are read before the rows: rows a running gateway writes meanwhile come after
    the heads read, which is not a break."""
    reports: list[ChainReport] = []
    for head in await store.audit_chains():
        verifier = ChainVerifier(head.chain_id)
        after = 0
        while True:
            rows = await store.audit_chain_rows(head.chain_id, after_seq=after, limit=page)
            if not rows or verifier.feed(rows) is not None:
                break
            after = rows[-1].seq
        if head.recorded:
            verifier.end(head.seq, head.hash)
        else:
            verifier.end(None, None)
        reports.append(ChainReport(head, verifier.checked, verifier.broken))
    return reports
