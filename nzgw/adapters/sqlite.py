"""The Store on a SQLite file: stdlib `sqlite3` in a worker thread (embedded, single node).

One connection per store, used by one worker thread at a time: every call takes `_lock` (a
`trio.Lock`) and then runs its whole unit of work, transaction included, in
`trio.to_thread.run_sync`. The thread is not abandoned on cancellation, so a cancelled call
finishes (or rolls back) its transaction before `Cancelled` is delivered; nothing is left half
written and the connection is never used by two threads at once.

WAL mode lets the `nzgw` CLI (another process) write while the gateway reads; `busy_timeout`
makes a writer wait for the other's lock instead of failing at once. Writes start with
`BEGIN IMMEDIATE`, so the write lock is taken up front and migrations from concurrent
processes are serialised. Needs SQLite >= 3.35 (RETURNING).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import trio

from nzgw.adapters import sql as q
from nzgw.core.audit import AuditRow, PromptRecord
from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Tenant
from nzgw.ports import (
    AuditQuery,
    ChainHead,
    ChangeFeed,
    ConflictError,
    KeyChanges,
    KeyNameTakenError,
    NewKey,
    NotFoundError,
    PromptLog,
    StoreError,
    StoreUnavailableError,
    TenantChanges,
    UsageQuery,
    UsageReportRow,
    UsageRow,
    UsageTotals,
    WallClock,
    utc_now,
)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
CLOSE_TIMEOUT = 10.0
_UNAVAILABLE = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_FULL", "SQLITE_READONLY"}


def sqlite_path(url: str) -> str:
    """`sqlite:///relative/or/./path.db`, `sqlite:////absolute.db`, `sqlite:///:memory:`."""
    if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
        raise ValueError(f"expected sqlite:///path/to/file.db, got {url!r}")
    return unquote(url.removeprefix("sqlite:///").split("?", 1)[0])


@asynccontextmanager
async def open_sqlite_store(url: str, *, clock: WallClock = utc_now) -> AsyncIterator[SqliteStore]:
    """Open (and create, with its directory) the SQLite database at `url`.

    Raises `StoreUnavailableError` if the file cannot be opened. The connection is closed on exit,
    shielded, after any call in flight has finished.
    """
    path = sqlite_path(url)
    conn = await trio.to_thread.run_sync(_connect, path)
    store = SqliteStore(conn, clock=clock)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await store._close()


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. On a brand-new file opened by several processes at once, SQLite answers
    "database is locked" to this pragma without consulting the busy handler: retry it within
    the busy timeout (this runs in the store's worker thread, so sleeping here is fine)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _connect(path: str) -> sqlite3.Connection:
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _make_private(path)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailableError(
            f"SQLite database unavailable: cannot open {path}: {exc}"
        ) from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        _make_private(path)  # -wal and -shm exist now
    except (OSError, sqlite3.Error) as exc:
        conn.close()
        raise StoreUnavailableError(
            f"SQLite database unavailable: cannot open {path}: {exc}"
        ) from exc
    return conn


def _make_private(path: str) -> None:
    """The database holds key hashes, the audit log and prompt logs: owner-only, also when an
    older nzgw (or a loose umask) created it 0644. Files of another owner are left alone."""
    if path == ":memory:":
        return
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(name, 0o600)


def _encode(value: Any) -> Any:
    """Python value → SQLite parameter: instants as ISO-8601 UTC text, days as YYYY-MM-DD."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _params(values: Sequence[Any]) -> list[Any]:
    return [_encode(v) for v in values]


def _decode_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _record_change(
    conn: sqlite3.Connection, tenant_id: int, key_id: int | None, now: datetime
) -> None:
    """Bump the epoch and record what changed under it (inside the caller's transaction)."""
    seq = int(conn.execute(q.BUMP_EPOCH_RETURNING).fetchone()[0])
    conn.execute(q.INSERT_CHANGE, _params([seq, tenant_id, key_id, now]))
    conn.execute(q.PRUNE_CHANGES, (seq - q.CHANGE_FEED_KEEP,))


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction; the write lock is taken at BEGIN (waiting up to busy_timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # also when COMMIT itself failed
            conn.execute("ROLLBACK")
        raise


def _translate(exc: sqlite3.Error) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_CONSTRAINT_UNIQUE" or name == "SQLITE_CONSTRAINT_PRIMARYKEY":
        return ConflictError(f"already exists: {exc}")
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        return NotFoundError(f"refers to a missing row: {exc}")
    if name in _UNAVAILABLE or name.startswith("SQLITE_IOERR"):
        return StoreUnavailableError(f"SQLite database unavailable: {exc}")
    return StoreError(f"SQLite: {exc}")


class SqliteStore:
    """The `Store` port on SQLite. Build it with `open_sqlite_store`."""

    def __init__(self, conn: sqlite3.Connection, *, clock: WallClock = utc_now) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = trio.Lock()
        self._clock = clock

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(conn)` in a worker thread, alone on the connection; errors translated."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("the SQLite store is closed")
            return await trio.to_thread.run_sync(self._call, work, conn)

    @staticmethod
    def _call(work: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        try:
            return work(conn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def _close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)

    # --- migrations -------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        migrations = q.load_migrations("sqlite")
        now = self._clock()

        def work(conn: sqlite3.Connection) -> list[str]:
            applied: list[str] = []
            for migration in migrations:
                # Each migration in its own IMMEDIATE transaction: the write lock serialises
                # concurrent migrators (other connections, other processes), and the applied
                # set is re-read under that lock, so each migration runs exactly once.
                with _transaction(conn):
                    _ensure_migrations_table(conn)
                    if migration.name in _applied(conn):
                        continue
                    for statement in split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(q.INSERT_MIGRATION, _params([migration.name, now]))
                applied.append(migration.name)
            return applied

        return await self._run(work)

    async def pending_migrations(self) -> list[str]:
        names = [m.name for m in q.load_migrations("sqlite")]

        def work(conn: sqlite3.Connection) -> list[str]:
            if not _has_migrations_table(conn):
                return names
            done = _applied(conn)
            return [n for n in names if n not in done]

        return await self._run(work)

    async def describe_schema(self) -> str:
        """The schema as text, for the drift test (`schema/expected-sqlite.txt`)."""
        return await self._run(describe_sqlite_schema)

    # --- tenants ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def create_tenant(
        self,
        name: str,
        *,
        limits: Limits = q.NO_LIMITS,
        budgets: Budgets = q.NO_BUDGETS,
        allowed_models: tuple[str, ...] = (),
        weight: int = 1,
    ) -> Tenant:
        params = _params(
            q.tenant_insert_params(name, limits, budgets, allowed_models, self._clock(), weight)
        )

        def work(conn: sqlite3.Connection) -> Tenant:
            with _transaction(conn):
                try:
                    row = conn.execute(q.INSERT_TENANT, params).fetchone()
                except sqlite3.IntegrityError as exc:
                    if _is_unique(exc):
                        raise ConflictError(f"a tenant named {name!r} exists already") from exc
                    raise
                tenant = q.tenant_from_row(row, _decode_time)
                _record_change(conn, tenant.id, None, self._clock())
            return tenant

        return await self._run(work)

    async def get_tenant(self, name_or_id: str | int) -> Tenant:
        return await self._run(lambda conn: _get_tenant(conn, name_or_id))

    async def list_tenants(self) -> list[Tenant]:
        def work(conn: sqlite3.Connection) -> list[Tenant]:
            rows = conn.execute(q.SELECT_TENANTS).fetchall()
            return [q.tenant_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def update_tenant(self, name_or_id: str | int, changes: TenantChanges) -> Tenant:
        columns = q.tenant_assignments(changes)
        now = self._clock()

        def work(conn: sqlite3.Connection) -> Tenant:
            with _transaction(conn):
                current = _get_tenant(conn, name_or_id)
                if not columns:
                    return current
                sql = q.update_sql("tenants", columns, "id = ?", q.TENANT_SELECT)
                row = _fetch_one_unique(
                    conn,
                    sql,
                    _params([*columns.values(), now, current.id]),
                    lambda _: ConflictError(f"a tenant named {changes.name!r} exists already"),
                )
                _record_change(conn, current.id, None, now)
            return q.tenant_from_row(row, _decode_time)

        return await self._run(work)

    # --- keys -------------------------------------------------------------------------------------

    async def create_key(self, new: NewKey) -> ApiKey:
        now = self._clock()
        params = _params(q.key_insert_params(new, now))

        def work(conn: sqlite3.Connection) -> ApiKey:
            with _transaction(conn):
                _get_tenant(conn, new.tenant_id)
                row = _fetch_one_unique(
                    conn,
                    q.INSERT_KEY,
                    params,
                    lambda exc: _key_conflict(exc, new.name, f"the prefix {new.prefix} is taken"),
                )
                key = q.key_from_row(row, _decode_time)
                _record_change(conn, key.tenant_id, key.id, now)
            return key

        return await self._run(work)

    async def find_key(self, prefix: str) -> Principal | None:
        def work(conn: sqlite3.Connection) -> Principal | None:
            row = conn.execute(q.SELECT_PRINCIPAL, (prefix,)).fetchone()
            if row is None:
                return None
            return q.principal_from_row(row, _decode_time)

        return await self._run(work)

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            if tenant is None:
                rows = conn.execute(q.SELECT_KEYS).fetchall()
            else:
                tenant_id = _get_tenant(conn, tenant).id
                rows = conn.execute(q.SELECT_KEYS_OF_TENANT, (tenant_id,)).fetchall()
            return [q.key_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def update_key(self, prefix: str, changes: KeyChanges) -> ApiKey:
        now = self._clock()
        columns = q.key_assignments(changes, now)

        def work(conn: sqlite3.Connection) -> ApiKey:
            with _transaction(conn):
                row = conn.execute(q.SELECT_KEY_BY_PREFIX, (prefix,)).fetchone()
                current, to_write = q.key_to_change(row, prefix, columns, _decode_time)
                if not to_write:
                    return current
                sql = q.update_sql("api_keys", columns, "id = ?", q.KEY_SELECT)
                row = _fetch_one_unique(
                    conn,
                    sql,
                    _params([*columns.values(), now, current.id]),
                    lambda exc: _key_conflict(exc, changes.name, "another key conflicts"),
                )
                if q.changes_bump_epoch(columns):
                    _record_change(conn, current.tenant_id, current.id, now)
            return q.key_from_row(row, _decode_time)

        return await self._run(work)

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        if not last_used:
            return
        params = [_params([when, key_id, when]) for key_id, when in last_used.items()]

        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(q.TOUCH_KEY, params)

        await self._run(work)

    async def revocation_epoch(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(q.SELECT_EPOCH).fetchone()
            if row is None:
                raise StoreError("the revocation epoch row is missing (run `nzgw migrate`)")
            return int(row[0])

        return await self._run(work)

    async def changes_since(self, after: int, *, limit: int = 1000) -> ChangeFeed:
        def work(conn: sqlite3.Connection) -> ChangeFeed:
            rows = conn.execute(q.SELECT_CHANGES, (after, limit + 1)).fetchall()
            return q.change_feed(after, limit, rows)

        return await self._run(work)

    # --- usage ledger -----------------------------------------------------------------------------

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        if not rows:
            return
        now = self._clock()
        batch = None if batch_id is None else _params([batch_id, now])
        purge_before = _params([now - q.USAGE_BATCH_RETENTION])
        params = [_params(list(q.usage_values(r))) for r in rows]

        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                if batch is not None:
                    if conn.execute(q.INSERT_USAGE_BATCH, batch).rowcount == 0:
                        return  # added before: a retry or a replay
                    conn.execute(q.PURGE_USAGE_BATCHES, purge_before)
                conn.executemany(q.UPSERT_USAGE, params)

        await self._run(work)

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        params = _params([day, month_start, tenant_id])

        def work(conn: sqlite3.Connection) -> list[tuple[int, int, int, int]]:
            return [tuple(r) for r in conn.execute(q.SELECT_USAGE_TOTALS, params).fetchall()]

        return q.totals_from_rows(await self._run(work))

    # --- audit log, prompt logs, usage reports ----------------------------------------------------

    async def append_audit(
        self,
        rows: Sequence[AuditRow],
        prompts: Sequence[PromptRecord] = (),
        heads: Sequence[ChainHead] = (),
    ) -> None:
        if not rows and not prompts and not heads:
            return
        now = self._clock()
        row_params = [_params(q.audit_row_values(r)) for r in rows]
        prompt_params = [_params(q.prompt_values(p)) for p in prompts]
        head_params = [_params(q.head_values(h, now)) for h in heads]

        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                _insert_rows(conn, "audit_log", q.AUDIT_COLUMNS, row_params)
                _insert_rows(conn, "prompt_logs", q.PROMPT_COLUMNS, prompt_params)
                conn.executemany(q.UPSERT_CHAIN_HEAD, head_params)

        await self._run(work)

    async def list_audit(self, query: AuditQuery) -> list[AuditRow]:
        sql, params = q.list_audit_sql(query)
        encoded = _params(params)

        def work(conn: sqlite3.Connection) -> list[AuditRow]:
            rows = conn.execute(sql, encoded).fetchall()
            return [q.audit_row_from_row(r, _decode_time, _decode_day) for r in rows]

        return await self._run(work)

    async def audit_chains(self) -> list[ChainHead]:
        def work(conn: sqlite3.Connection) -> list[ChainHead]:
            heads = [
                ChainHead(r[0], _aware(r[1]), int(r[2]), r[3], _decode_time(r[4]))
                for r in conn.execute(q.SELECT_CHAIN_HEADS).fetchall()
            ]
            heads.extend(
                ChainHead(r[0], _aware(r[1]), 0, "", None, recorded=False)
                for r in conn.execute(q.SELECT_HEADLESS_CHAINS).fetchall()
            )
            return heads

        return await self._run(work)

    async def audit_chain_rows(
        self, chain_id: str, *, after_seq: int, limit: int
    ) -> list[AuditRow]:
        def work(conn: sqlite3.Connection) -> list[AuditRow]:
            rows = conn.execute(q.SELECT_CHAIN_ROWS, (chain_id, after_seq, limit)).fetchall()
            return [q.audit_row_from_row(r, _decode_time, _decode_day) for r in rows]

        return await self._run(work)

    async def get_prompts(self, request_id: str, *, now: datetime) -> list[PromptLog]:
        params = _params([request_id, now])

        def work(conn: sqlite3.Connection) -> list[PromptLog]:
            rows = conn.execute(q.SELECT_PROMPTS, params).fetchall()
            return [q.prompt_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def purge_prompts(self, now: datetime, *, limit: int) -> int:
        params = _params([now, limit])

        def work(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                return conn.execute(q.PURGE_PROMPTS, params).rowcount

        return await self._run(work)

    async def usage_report(self, query: UsageQuery) -> list[UsageReportRow]:
        ledger_sql, refusals_sql, params = q.usage_report_sql(query, "substr(day, 1, 7)")
        encoded = _params(params)

        def work(conn: sqlite3.Connection) -> list[UsageReportRow]:
            ledger = conn.execute(ledger_sql, encoded).fetchall()
            refusals = conn.execute(refusals_sql, encoded).fetchall()
            return q.merge_usage(ledger, refusals)

        return await self._run(work)


# --- helpers running in the worker thread --------------------------------------------------------

# Rows per INSERT statement: a multi-row VALUES list, well under SQLite's default limit of
# 32766 parameters (28 columns × 500 rows = 14000).
ROWS_PER_INSERT = 500


@functools.lru_cache(maxsize=32)
def _insert_sql(table: str, columns: tuple[str, ...], count: int) -> str:
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        + ", ".join([one] * count)
        + " ON CONFLICT (chain_id, seq) DO NOTHING"
    )


def _insert_rows(
    conn: sqlite3.Connection, table: str, columns: tuple[str, ...], rows: Sequence[list[Any]]
) -> None:
    """Insert `rows` with one multi-row statement per `ROWS_PER_INSERT` (idempotent per
    (chain_id, seq))."""
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        conn.execute(_insert_sql(table, columns, len(chunk)), [v for r in chunk for v in r])


def _decode_day(value: Any) -> date:
    return date.fromisoformat(value)


def _aware(value: Any) -> datetime:
    decoded = _decode_time(value)
    if decoded is None:
        raise StoreError("a chain without a start time")
    return decoded


def _write_bumping_epoch(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any], conflict: str
) -> Any:
    """Run a one-row INSERT/UPDATE … RETURNING and bump the revocation epoch (inside the
    caller's transaction); a unique violation is `ConflictError(conflict)`."""
    try:
        row = conn.execute(sql, params).fetchone()
    except sqlite3.IntegrityError as exc:
        if _is_unique(exc):
            raise ConflictError(conflict) from exc
        raise
    conn.execute(q.BUMP_EPOCH)
    return row


def _is_unique(exc: sqlite3.IntegrityError) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_UNIQUE"


def _fetch_one_unique(
    conn: sqlite3.Connection,
    sql: str,
    params: Sequence[Any],
    conflict: Callable[[sqlite3.IntegrityError], ConflictError],
) -> Any:
    """`execute(sql, params).fetchone()`; a unique-constraint violation raises `conflict(exc)`."""
    try:
        return conn.execute(sql, params).fetchone()
    except sqlite3.IntegrityError as exc:
        if _is_unique(exc):
            raise conflict(exc) from exc
        raise


def _key_conflict(exc: sqlite3.IntegrityError, name: str | None, otherwise: str) -> ConflictError:
    """The unique (tenant, name) index of 0006 names its columns in SQLite's message."""
    if "api_keys.name" in str(exc):
        return KeyNameTakenError(f"a key named {name!r} exists already in this tenant")
    return ConflictError(otherwise)


def _get_tenant(conn: sqlite3.Connection, name_or_id: str | int) -> Tenant:
    if isinstance(name_or_id, int):
        row = conn.execute(q.SELECT_TENANT_BY_ID, (name_or_id,)).fetchone()
    else:
        row = conn.execute(q.SELECT_TENANT_BY_NAME, (name_or_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no tenant {name_or_id!r}")
    return q.tenant_from_row(row, _decode_time)


def _has_migrations_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    return row is not None


def _ensure_migrations_table(conn: sqlite3.Connection) -> None:
    if not _has_migrations_table(conn):
        conn.execute(q.substitute(q.MIGRATIONS_TABLE_SQL, "sqlite"))


def _applied(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(q.SELECT_MIGRATIONS).fetchall()}


def split_statements(script: str) -> list[str]:
    """Split a SQL script into statements (`executescript` would COMMIT our transaction)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if _strip_comments(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _strip_comments(buffer):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer.strip()!r}")
    return statements


def _strip_comments(sql: str) -> str:
    return "\n".join(
        line for line in sql.splitlines() if line.strip() and not line.strip().startswith("--")
    ).strip()


def describe_sqlite_schema(conn: sqlite3.Connection) -> str:
    """Every table, index and trigger in `sqlite_master`, with its SQL, whitespace normalised."""
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' ORDER BY tbl_name, type DESC, name"
    ).fetchall()
    lines: list[str] = []
    for kind, name, table, sql in rows:
        lines.append(f"{kind} {name} ON {table}")
        if sql:
            lines.extend(f"    {line.strip()}" for line in sql.splitlines() if line.strip())
    return "\n".join(lines) + "\n"
