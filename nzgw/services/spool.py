"""The local spool: usage and audit rows the store could not take, kept on disk until it can.

Why (README, "Failure behaviour"): when the store is away at shutdown, or a flush fails or
hangs, the rows in memory would die with the process. They are appended to this process's spool
file (fsynced) and written to the store at the next start, before the listener opens.

Layout: ``NZGW_SPOOL_DIR/<store fingerprint>/spool-<pid>-<random>.log``, one file per process
(`open_spool`). The fingerprint names the database (`store_fingerprint`): a spool is only ever
replayed into the database it was written for.

Records: one line each, ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``, appended with one
``write`` and an ``fsync`` per call (in a thread: the event loop never waits for the disk). A
line whose CRC does not match, or the last line without its newline, is a torn write (SIGKILL
or power loss in the middle of an append): it is skipped and counted, and the lines before it
are intact (fsynced before it was written). Two kinds of record:

* ``usage``: a sealed `UsageBatch` with its id; the store adds a batch id once
  (schema/0008_usage_batches.sql), so replaying a batch that did reach the store is harmless;
* ``audit``: a sealed `AuditBatch` (rows with seq and hashes, prompt logs, the chain head); the
  store skips (chain_id, seq) it has, and the rows land in their own chain, so `nzgw audit
  verify` sees an unbroken chain.

Ownership: the owner holds ``flock(LOCK_EX)`` on its file for its whole life. `flock` and not
``fcntl``/``lockf`` locks: those are per process (a second open of the same file in the same
process would silently share or drop the lock), `flock` locks belong to the open file. A file
whose lock can be taken is orphaned (its process is gone: stopped, crashed, SIGKILLed): the
next process to start with the same store (a restart, or another worker) takes it over,
replays it and deletes it.

While running, the spool holds exactly the batches not yet written: once every spooled batch
has reached the store, the file is truncated (`settle`). A clean shutdown with the store up
leaves no file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
from cattrs.errors import BaseValidationError
from cattrs.preconf.json import JsonConverter, make_converter

from nzgw.ports import AuditBatch, Store, StoreError, UsageBatch

log = logging.getLogger("nzgw.spool")

_FILE_PREFIX = "spool-"
_FILE_SUFFIX = ".log"

SpoolBatch = UsageBatch | AuditBatch


def batch_key(batch: SpoolBatch) -> str:
    """A batch's identity in the spool (written once per spool file)."""
    return f"usage:{batch.id}" if isinstance(batch, UsageBatch) else batch.key


def rows_of(batch: SpoolBatch) -> int:
    return len(batch.rows)


def requests_of(batch: SpoolBatch) -> int:
    """The requests a batch accounts for (a usage row aggregates many)."""
    if isinstance(batch, UsageBatch):
        return sum(row.requests for row in batch.rows)
    return sum(row.event.requests for row in batch.rows)


# --- records --------------------------------------------------------------------------------------


def encode_record(batch: SpoolBatch, converter: JsonConverter) -> bytes:
    kind: Literal["usage", "audit"] = "usage" if isinstance(batch, UsageBatch) else "audit"
    body = json.dumps(
        {"kind": kind, "batch": converter.unstructure(batch)},
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


@attrs.frozen
class Decoded:
    batches: list[SpoolBatch]
    torn: int  # lines skipped: CRC mismatch, undecodable, or a last line without its newline


def decode_records(data: bytes, converter: JsonConverter | None = None) -> Decoded:
    """The records of a spool file's bytes, in order; torn lines skipped and counted."""
    converter = converter or make_converter()
    batches: list[SpoolBatch] = []
    torn = 0
    lines = data.split(b"\n")
    if lines[-1]:
        torn += 1  # the last append did not complete
    for line in lines[:-1]:
        batch = _decode_line(line, converter)
        if batch is None:
            torn += 1
        else:
            batches.append(batch)
    return Decoded(batches, torn)


def _decode_line(line: bytes, converter: JsonConverter) -> SpoolBatch | None:
    crc, _, body = line.partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body) or len(crc) != 8:
            return None
        record: dict[str, Any] = json.loads(body)
        kind = record["kind"]
        if kind == "usage":
            return converter.structure(record["batch"], UsageBatch)
        if kind == "audit":
            return converter.structure(record["batch"], AuditBatch)
    except (ValueError, KeyError, TypeError, BaseValidationError):
        return None
    return None


# --- where spools live ----------------------------------------------------------------------------


def store_fingerprint(identity: str) -> str:
    """The spool folder of a database: a hash of its identity (`adapters.stores.store_identity`:
    host, port and database, or SQLite's absolute path; never a user or password)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _lock(fd: int) -> bool:
    """Take the exclusive `flock` on `fd` without waiting; False if another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@attrs.define
class SpoolStats:
    """Counters of the spool, for metrics (`nzgw_spool_rows_*_total`)."""

    spooled_rows: int = 0  # rows appended to a spool file
    replayed_rows: int = 0  # rows of orphaned spools written to the store at start
    torn_lines: int = 0  # records skipped at replay: a write cut by a crash
    lost_rows: int = 0  # rows that reached neither the store nor the spool
    failed_appends: int = 0  # spool writes that failed (disk full, read-only)


class Spool:
    """This process's spool file. `add` appends batches (each batch once), `settle` forgets
    written ones and truncates the file when none is left. One file operation at a time."""

    def __init__(self, path: Path, fd: int, stats: SpoolStats) -> None:
        self.path = path
        self.stats = stats
        self._fd = fd
        self._lock = trio.Lock()
        self._outstanding: set[str] = set()  # spooled, not known written
        self._size = 0
        self._converter = make_converter()

    @property
    def outstanding(self) -> int:
        """Batches in the file not known to be written to the store."""
        return len(self._outstanding)

    async def add(self, batches: Sequence[SpoolBatch]) -> tuple[int, int] | None:
        """Append the batches not in the file yet, fsynced; return the rows and requests
        appended (None: nothing new). Raises `OSError` (disk full, read-only): the caller
        still holds the rows in memory."""
        async with self._lock:
            new = [b for b in batches if batch_key(b) not in self._outstanding]
            if not new:
                return None
            data = b"".join(encode_record(b, self._converter) for b in new)
            try:
                await trio.to_thread.run_sync(_append, self._fd, data)
            except OSError:
                self.stats.failed_appends += 1
                raise
            self._size += len(data)
            self._outstanding.update(batch_key(b) for b in new)
            rows = sum(rows_of(b) for b in new)
            self.stats.spooled_rows += rows
            return rows, sum(requests_of(b) for b in new)

    async def settle(self, kind: str, unwritten: Sequence[SpoolBatch]) -> None:
        """Of the batches of `kind` ("usage", "audit") in the file, only `unwritten` have not
        reached the store. Once no batch in the file is left unwritten, truncate it."""
        async with self._lock:
            still = {batch_key(b) for b in unwritten}
            self._outstanding = {
                k for k in self._outstanding if not k.startswith(kind + ":") or k in still
            }
            if not self._outstanding and self._size:
                await trio.to_thread.run_sync(_truncate, self._fd)
                self._size = 0


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _truncate(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.fsync(fd)


@contextlib.contextmanager
def open_spool(directory: Path, fingerprint: str, stats: SpoolStats) -> Iterator[Spool]:
    """Create and own this process's spool file under ``directory/fingerprint``. On exit, an
    empty file is deleted; one with rows is left (closed, unlocked) for the next start."""
    folder = directory / fingerprint
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{_FILE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{_FILE_SUFFIX}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        if not _lock(fd):  # a fresh file nobody else knows: cannot happen
            raise OSError(f"spool {path} is locked by another process")
        spool = Spool(path, fd, stats)
        try:
            yield spool
        finally:
            if spool.outstanding == 0:
                path.unlink(missing_ok=True)
            else:
                log.warning(
                    "%d batches left in the spool %s: written to the store at the next start",
                    spool.outstanding,
                    path,
                )
    finally:
        os.close(fd)  # releases the lock


# --- the flushers' side -------------------------------------------------------------------------

Batches = Callable[[], Sequence[SpoolBatch]]


async def flush_or_spool(
    kind: str,
    flush: Callable[[], Awaitable[int]],
    *,
    seal: Batches,
    unwritten: Batches,
    spool: Spool | None,
    spool_after: float,
) -> int:
    """Run one `flush` of the rows of `kind`; return what it returns.

    With a spool: if the flush raises `StoreError`, or has not returned within `spool_after`
    seconds (a hung store: the flush keeps waiting), everything not written is sealed (`seal`)
    and appended to the spool, and again every `spool_after` seconds while it hangs; so a crash
    loses at most what settled in the last `spool_after` seconds (plus one flush interval).
    The `StoreError` propagates. After a flush that succeeded, the spool forgets what was written
    (`unwritten`: the batches still waiting)."""
    if spool is None:
        return await flush()
    failed: StoreError | None = None
    written = 0
    async with trio.open_nursery() as nursery:

        async def spool_while_slow() -> None:
            while True:  # a hang can last: what settles meanwhile is spooled too
                await trio.sleep(spool_after)
                await _spool_quietly(spool, kind, seal())

        nursery.start_soon(spool_while_slow)
        try:
            written = await flush()
        except StoreError as exc:
            failed = exc
        nursery.cancel_scope.cancel()
    if failed is not None:
        await _spool_quietly(spool, kind, seal())
        raise failed
    await spool.settle(kind, unwritten())
    return written


async def _spool_quietly(spool: Spool, kind: str, batches: Sequence[SpoolBatch]) -> None:
    try:
        added = await spool.add(batches)
    except OSError as exc:
        log.error("%s rows could not be spooled (kept in memory): %s", kind, exc)
    else:
        if added:
            log.warning(
                "%s rows spooled while the store is away",
                kind,
                extra={"spool_kind": kind, "spool_rows": added[0], "spool_requests": added[1]},
            )


async def spool_at_shutdown(kind: str, batches: Sequence[SpoolBatch], spool: Spool | None) -> int:
    """The last flush gave up: append what is left to the spool; return the rows LOST (no
    spool, or it failed), counted in the spool's `stats.lost_rows` and logged with the tokens
    by the caller."""
    rows = sum(rows_of(b) for b in batches)
    if not rows:
        return 0
    if spool is not None:
        try:
            added = await spool.add(batches)
        except OSError as exc:
            log.error("%s rows could not be spooled at shutdown: %s", kind, exc)
        else:
            log.warning(
                "%s rows the store did not take are in the spool (written at the next start)",
                kind,
                extra={
                    "spool_kind": kind,
                    "spool_rows": rows,
                    "spool_requests": sum(requests_of(b) for b in batches),
                    "spool_rows_new": added[0] if added else 0,
                    "spool_file": str(spool.path),
                },
            )
            return 0
        spool.stats.lost_rows += rows
    return rows


# --- replay ---------------------------------------------------------------------------------------


async def replay_orphans(
    directory: Path, fingerprint: str, store: Store, stats: SpoolStats, *, own: Path | None = None
) -> int:
    """Write every orphaned spool file of this store into it, oldest first, and delete each
    file once all its batches are written; return the rows replayed. A file another live
    process owns is left alone. Raises `StoreError` on the first failed write (that file
    stays, for the next attempt or the next start)."""
    folder = directory / fingerprint
    if not folder.is_dir():
        return 0
    replayed = 0
    paths = sorted(
        (p for p in folder.glob(f"{_FILE_PREFIX}*{_FILE_SUFFIX}") if p != own),
        key=lambda p: p.stat().st_mtime if p.exists() else 0,
    )
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # taken over and deleted by another process meanwhile
        try:
            if not _lock(fd):
                continue  # its process is alive
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue
            except FileNotFoundError:
                continue  # replayed and deleted by another process before we locked it
            data = await trio.to_thread.run_sync(_read_all, fd)
            decoded = decode_records(data)
            if decoded.torn:
                stats.torn_lines += decoded.torn
                log.warning("spool %s: %d torn lines skipped", path.name, decoded.torn)
            rows = 0
            for batch in decoded.batches:
                await _write(store, batch)
                rows += rows_of(batch)
            path.unlink()
            stats.replayed_rows += rows
            replayed += rows
            if rows:
                log.info(
                    "spool %s replayed into the store: %d rows",
                    path.name,
                    rows,
                    extra={"spool_rows_replayed": rows},
                )
        finally:
            os.close(fd)
    return replayed


async def _write(store: Store, batch: SpoolBatch) -> None:
    if isinstance(batch, UsageBatch):
        await store.add_usage(batch.rows, batch_id=batch.id)
    else:
        await store.append_audit(batch.rows, batch.prompts, [batch.head])


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def run_spool_replay(
    directory: Path,
    fingerprint: str,
    store: Store,
    stats: SpoolStats,
    *,
    own: Path | None = None,
    retry_interval: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Replay orphaned spools, then report started (start it before the listener opens). If
    the store fails meanwhile, start anyway (the process must not stay down with the store)
    and retry every `retry_interval` seconds until every orphan is replayed, then return."""
    started = False
    while True:
        try:
            await replay_orphans(directory, fingerprint, store, stats, own=own)
        except StoreError as exc:
            log.warning("spool replay failed, retried in %s s: %s", retry_interval, exc)
        else:
            if not started:
                task_status.started()
            return
        if not started:
            started = True
            task_status.started()
        await trio.sleep(retry_interval)
