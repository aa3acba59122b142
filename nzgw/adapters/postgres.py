"""The Store on PostgreSQL: asyncpg, driven from Trio through trio-asyncio.

Every public method is Trio-flavoured. Each one runs its whole unit of work (acquire a pooled
connection, transaction, statements, release) as ONE asyncio coroutine through
`trio_asyncio.aio_as_trio`, on the loop captured at open time (not the caller's context: a
task spawned before the loop opened, or a pytest-trio fixture, can still use the store).
Cancelling the Trio caller cancels that asyncio task; asyncpg then rolls back and releases the
connection on the asyncio side.

asyncpg and OS errors are translated here, and only here, into the `StoreError` family.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import outcome
import trio
import trio_asyncio

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

CLOSE_TIMEOUT = 10.0
#: Seconds a cancelled call may take to end; then its connection is terminated. Cancelling a
#: query on a hung server (frozen, or a network path that stops forwarding) otherwise waits as
#: long as the server hangs: asyncpg sends the cancel request to the same server, and the
#: transaction's ROLLBACK waits too. A shutdown must not.
CANCEL_GRACE = 1.0
# pg_advisory_xact_lock key serialising migrators: "nzgwmigr" as a big-endian int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"nzgwmigr", "big", signed=True)

Connection = Any  # asyncpg.Connection (asyncpg ships no type information)


@asynccontextmanager
async def open_postgres_store(
    url: str, *, clock: WallClock = utc_now, max_connections: int = 10
) -> AsyncIterator[PostgresStore]:
    """Connect a pool to the PostgreSQL database at `url`.

    Uses the trio-asyncio loop of the calling context if there is one (the server opens it at
    the root), else opens its own for the lifetime of the store. Raises `StoreUnavailableError`
    if the server cannot be reached. The pool is closed on exit, shielded, within
    `CLOSE_TIMEOUT` seconds, after which its connections are terminated.
    """
    async with (
        _asyncio_loop() as loop,
        _open_pool(url, loop, clock, max_connections) as store,
    ):
        yield store


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[Any]:
    """The trio-asyncio loop of the calling context, or a new one for the duration."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield loop
        return
    try:
        async with trio_asyncio.open_loop() as own_loop:
            yield own_loop
    except BaseExceptionGroup as group:
        # The loop's nursery wraps whatever the caller's block raised in an ExceptionGroup;
        # callers catch StoreError & co., so hand a lone exception back unwrapped.
        lone = _lone_exception(group)
        if lone is None:
            raise
        raise lone from None


def _lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return None


@asynccontextmanager
async def _open_pool(
    url: str, loop: Any, clock: WallClock, max_connections: int
) -> AsyncIterator[PostgresStore]:
    async def create_pool() -> Any:
        return await asyncpg.create_pool(url, min_size=1, max_size=max_connections)

    try:
        pool = await trio_asyncio.aio_as_trio(create_pool, loop=loop)()
    except Exception as exc:
        raise _translate(exc) from exc
    store = PostgresStore(pool, loop, clock=clock)
    try:
        yield store
    finally:
        await store._close()


# --- scratch databases (tests, `schema/describe.py`) ----------------------------------------------

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def database_url(server_url: str, name: str) -> str:
    """`server_url` with its database replaced by `name`."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + name))


async def create_database(admin_url: str, name: str) -> str:
    """Create the empty database `name` on the server of `admin_url`; return its URL."""
    await _admin(admin_url, f'CREATE DATABASE "{_checked(name)}"')
    return database_url(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop the database `name` (disconnecting its sessions) if it exists."""
    await _admin(admin_url, f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')


@asynccontextmanager
async def admin_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """A scratch database `name` for the duration: created empty, dropped after (shielded)."""
    url = await create_database(admin_url, name)
    try:
        yield url
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await drop_database(admin_url, name)


def _checked(name: str) -> str:
    if _DATABASE_NAME.fullmatch(name) is None:
        raise ValueError(f"not a plain database name: {name!r}")
    return name


async def _admin(admin_url: str, statement: str) -> None:
    async def work() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async with _asyncio_loop() as loop:
        try:
            await trio_asyncio.aio_as_trio(work, loop=loop)()
        except Exception as exc:
            raise _translate(exc) from exc


def _key_conflict(
    exc: asyncpg.UniqueViolationError, name: str | None, otherwise: str
) -> ConflictError:
    """Which unique index refused the key: 0006's (tenant, name), or the prefix."""
    if getattr(exc, "constraint_name", None) == "api_keys_tenant_name":
        return KeyNameTakenError(f"a key named {name!r} exists already in this tenant")
    return ConflictError(otherwise)


def _translate(exc: BaseException) -> BaseException:
    """A foreign exception → the nzgw error to raise instead (or itself, if not foreign)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(
        exc,
        OSError  # refused, reset, DNS, connect timeout (TimeoutError is an OSError)
        | asyncpg.PostgresConnectionError  # class 08
        | asyncpg.CannotConnectNowError  # starting up / shutting down
        | asyncpg.AdminShutdownError
        | asyncpg.TooManyConnectionsError
        | asyncpg.InvalidCatalogNameError  # no such database
        | asyncpg.InvalidAuthorizationSpecificationError,  # role or password refused
    ):
        return StoreUnavailableError(f"PostgreSQL unreachable: {exc}")
    if isinstance(exc, asyncpg.UniqueViolationError):
        return ConflictError(f"already exists: {exc}")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFoundError(f"refers to a missing row: {exc}")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return StoreError(f"PostgreSQL: {exc}")
    return exc


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """`?` parameters → `$1, $2, …` (the shared SQL has no `?` inside literals)."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _decode_time(value: Any) -> datetime | None:
    return value  # type: ignore[no-any-return]  # asyncpg gives aware datetimes for timestamptz


class PostgresStore:
    """The `Store` port on PostgreSQL. Build it with `open_postgres_store`."""

    def __init__(self, pool: Any, loop: Any, *, clock: WallClock = utc_now) -> None:
        self._pool = pool
        self._loop = loop
        self._clock = clock

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work(conn)` on a pooled connection, as one asyncio task; errors translated.

        Cancellation: the asyncio task is cancelled; if it has not ended `CANCEL_GRACE`
        seconds later (a hung server), its connection is terminated, which ends it."""
        pool = self._pool
        conns: list[Any] = []
        done = trio.Event()

        async def job() -> T:
            async with pool.acquire() as conn:
                conns.append(conn)
                return await work(conn)

        async def terminate_if_stuck() -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(CANCEL_GRACE):
                        await done.wait()
                    if not done.is_set():
                        for conn in conns:
                            conn.terminate()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_if_stuck)
            called = await outcome.acapture(trio_asyncio.aio_as_trio(job, loop=self._loop))
            done.set()
            nursery.cancel_scope.cancel()
        try:
            result: T = called.unwrap()
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        return result

    async def _close(self) -> None:
        """Close the pool gracefully within CLOSE_TIMEOUT, else terminate it. Shielded."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                await trio_asyncio.aio_as_trio(self._pool.close, loop=self._loop)()
                return
            self._pool.terminate()

    # --- migrations -------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        migrations = q.load_migrations("postgres")
        now = self._clock()

        async def work(conn: Connection) -> list[str]:
            applied: list[str] = []
            for migration in migrations:
                # Each migration in its own transaction, under a transaction-scoped advisory
                # lock: concurrent migrators queue here, and whoever comes second re-reads the
                # applied set under the lock and skips what the first one did.
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
                    if not await _has_migrations_table(conn):
                        await conn.execute(q.substitute(q.MIGRATIONS_TABLE_SQL, "postgres"))
                    if migration.name in await _applied(conn):
                        continue
                    await conn.execute(migration.sql)
                    await conn.execute(_pg(q.INSERT_MIGRATION), migration.name, now)
                applied.append(migration.name)
            return applied

        return await self._run(work)

    async def pending_migrations(self) -> list[str]:
        names = [m.name for m in q.load_migrations("postgres")]

        async def work(conn: Connection) -> list[str]:
            if not await _has_migrations_table(conn):
                return names
            done = await _applied(conn)
            return [n for n in names if n not in done]

        return await self._run(work)

    async def describe_schema(self) -> str:
        """The schema as text, for the drift test (`schema/expected-postgres.txt`)."""
        return await self._run(describe_postgres_schema)

    # --- tenants ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        async def work(conn: Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._run(work)

    async def create_tenant(
        self,
        name: str,
        *,
        limits: Limits = q.NO_LIMITS,
        budgets: Budgets = q.NO_BUDGETS,
        allowed_models: tuple[str, ...] = (),
        weight: int = 1,
    ) -> Tenant:
        params = q.tenant_insert_params(
            name, limits, budgets, allowed_models, self._clock(), weight
        )

        async def work(conn: Connection) -> Tenant:
            async with conn.transaction():
                try:
                    row = await conn.fetchrow(_pg(q.INSERT_TENANT), *params)
                except asyncpg.UniqueViolationError as exc:
                    raise ConflictError(f"a tenant named {name!r} exists already") from exc
                tenant = q.tenant_from_row(row, _decode_time)
                await _record_change(conn, tenant.id, None, self._clock())
            return tenant

        return await self._run(work)

    async def get_tenant(self, name_or_id: str | int) -> Tenant:
        async def work(conn: Connection) -> Tenant:
            return await _get_tenant(conn, name_or_id)

        return await self._run(work)

    async def list_tenants(self) -> list[Tenant]:
        async def work(conn: Connection) -> list[Tenant]:
            rows = await conn.fetch(q.SELECT_TENANTS)
            return [q.tenant_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def update_tenant(self, name_or_id: str | int, changes: TenantChanges) -> Tenant:
        columns = q.tenant_assignments(changes)
        now = self._clock()

        async def work(conn: Connection) -> Tenant:
            async with conn.transaction():
                current = await _get_tenant(conn, name_or_id, for_update=True)
                if not columns:
                    return current
                sql = _pg(q.update_sql("tenants", columns, "id = ?", q.TENANT_SELECT))
                try:
                    row = await conn.fetchrow(sql, *columns.values(), now, current.id)
                except asyncpg.UniqueViolationError as exc:
                    raise ConflictError(f"a tenant named {changes.name!r} exists already") from exc
                await _record_change(conn, current.id, None, now)
            return q.tenant_from_row(row, _decode_time)

        return await self._run(work)

    # --- keys -------------------------------------------------------------------------------------

    async def create_key(self, new: NewKey) -> ApiKey:
        now = self._clock()
        params = q.key_insert_params(new, now)

        async def work(conn: Connection) -> ApiKey:
            async with conn.transaction():
                await _get_tenant(conn, new.tenant_id)
                try:
                    row = await conn.fetchrow(_pg(q.INSERT_KEY), *params)
                except asyncpg.UniqueViolationError as exc:
                    raise _key_conflict(exc, new.name, f"the prefix {new.prefix} is taken") from exc
                key = q.key_from_row(row, _decode_time)
                await _record_change(conn, key.tenant_id, key.id, now)
            return key

        return await self._run(work)

    async def find_key(self, prefix: str) -> Principal | None:
        async def work(conn: Connection) -> Principal | None:
            row = await conn.fetchrow(_pg(q.SELECT_PRINCIPAL), prefix)
            if row is None:
                return None
            return q.principal_from_row(row, _decode_time)

        return await self._run(work)

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]:
        async def work(conn: Connection) -> list[ApiKey]:
            if tenant is None:
                rows = await conn.fetch(q.SELECT_KEYS)
            else:
                tenant_id = (await _get_tenant(conn, tenant)).id
                rows = await conn.fetch(_pg(q.SELECT_KEYS_OF_TENANT), tenant_id)
            return [q.key_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def update_key(self, prefix: str, changes: KeyChanges) -> ApiKey:
        now = self._clock()
        columns = q.key_assignments(changes, now)

        async def work(conn: Connection) -> ApiKey:
            async with conn.transaction():
                row = await conn.fetchrow(_pg(q.SELECT_KEY_BY_PREFIX + " FOR UPDATE"), prefix)
                current, to_write = q.key_to_change(row, prefix, columns, _decode_time)
                if not to_write:
                    return current
                sql = _pg(q.update_sql("api_keys", columns, "id = ?", q.KEY_SELECT))
                try:
                    row = await conn.fetchrow(sql, *columns.values(), now, current.id)
                except asyncpg.UniqueViolationError as exc:
                    raise _key_conflict(exc, changes.name, "another key conflicts") from exc
                if q.changes_bump_epoch(columns):
                    await _record_change(conn, current.tenant_id, current.id, now)
            return q.key_from_row(row, _decode_time)

        return await self._run(work)

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        if not last_used:
            return
        params = [(when, key_id, when) for key_id, when in sorted(last_used.items())]

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                await conn.executemany(_pg(q.TOUCH_KEY), params)

        await self._run(work)

    async def revocation_epoch(self) -> int:
        async def work(conn: Connection) -> int:
            epoch = await conn.fetchval(q.SELECT_EPOCH)
            if epoch is None:
                raise StoreError("the revocation epoch row is missing (run `nzgw migrate`)")
            return int(epoch)

        return await self._run(work)

    async def changes_since(self, after: int, *, limit: int = 1000) -> ChangeFeed:
        async def work(conn: Connection) -> ChangeFeed:
            rows = await conn.fetch(_pg(q.SELECT_CHANGES), after, limit + 1)
            return q.change_feed(after, limit, rows)

        return await self._run(work)

    # --- usage ledger -----------------------------------------------------------------------------

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        if not rows:
            return
        now = self._clock()
        # Sorted by primary key, so concurrent flushers lock rows in the same order (no deadlock).
        params = sorted(q.usage_values(r) for r in rows)

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                if batch_id is not None:
                    status = await conn.execute(_pg(q.INSERT_USAGE_BATCH), batch_id, now)
                    if status.endswith(" 0"):
                        return  # added before: a retry or a replay
                    await conn.execute(_pg(q.PURGE_USAGE_BATCHES), now - q.USAGE_BATCH_RETENTION)
                await conn.executemany(_pg(q.UPSERT_USAGE), params)

        await self._run(work)

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        async def work(conn: Connection) -> list[tuple[int, int, int, int]]:
            rows = await conn.fetch(_pg(q.SELECT_USAGE_TOTALS), day, month_start, tenant_id)
            return [tuple(r) for r in rows]

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
        # Column-wise arrays: the whole batch is ONE statement, `INSERT … SELECT FROM unnest`.
        row_columns = _columns([q.audit_row_values(r) for r in rows], len(q.AUDIT_COLUMNS))
        prompt_columns = _columns([q.prompt_values(p) for p in prompts], len(q.PROMPT_COLUMNS))
        head_params = sorted(tuple(q.head_values(h, now)) for h in heads)

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                if rows:
                    await conn.execute(_INSERT_AUDIT, *row_columns)
                if prompts:
                    await conn.execute(_INSERT_PROMPTS, *prompt_columns)
                if head_params:
                    await conn.executemany(_pg(q.UPSERT_CHAIN_HEAD), head_params)

        await self._run(work)

    async def list_audit(self, query: AuditQuery) -> list[AuditRow]:
        sql, params = q.list_audit_sql(query)

        async def work(conn: Connection) -> list[AuditRow]:
            rows = await conn.fetch(_pg(sql), *params)
            return [q.audit_row_from_row(r, _decode_time, _decode_day) for r in rows]

        return await self._run(work)

    async def audit_chains(self) -> list[ChainHead]:
        async def work(conn: Connection) -> list[ChainHead]:
            heads = [
                ChainHead(r[0], r[1], int(r[2]), r[3], r[4])
                for r in await conn.fetch(q.SELECT_CHAIN_HEADS)
            ]
            heads.extend(
                ChainHead(r[0], r[1], 0, "", None, recorded=False)
                for r in await conn.fetch(q.SELECT_HEADLESS_CHAINS)
            )
            return heads

        return await self._run(work)

    async def audit_chain_rows(
        self, chain_id: str, *, after_seq: int, limit: int
    ) -> list[AuditRow]:
        async def work(conn: Connection) -> list[AuditRow]:
            rows = await conn.fetch(_pg(q.SELECT_CHAIN_ROWS), chain_id, after_seq, limit)
            return [q.audit_row_from_row(r, _decode_time, _decode_day) for r in rows]

        return await self._run(work)

    async def get_prompts(self, request_id: str, *, now: datetime) -> list[PromptLog]:
        async def work(conn: Connection) -> list[PromptLog]:
            rows = await conn.fetch(_pg(q.SELECT_PROMPTS), request_id, now)
            return [q.prompt_from_row(r, _decode_time) for r in rows]

        return await self._run(work)

    async def purge_prompts(self, now: datetime, *, limit: int) -> int:
        async def work(conn: Connection) -> int:
            status: str = await conn.execute(_pg(q.PURGE_PROMPTS), now, limit)
            return int(status.rsplit(" ", 1)[-1])  # "DELETE n"

        return await self._run(work)

    async def usage_report(self, query: UsageQuery) -> list[UsageReportRow]:
        ledger_sql, refusals_sql, params = q.usage_report_sql(query, "to_char(day, 'YYYY-MM')")

        async def work(conn: Connection) -> list[UsageReportRow]:
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                ledger = await conn.fetch(_pg(ledger_sql), *params)
                refusals = await conn.fetch(_pg(refusals_sql), *params)
            return q.merge_usage([tuple(r) for r in ledger], [tuple(r) for r in refusals])

        return await self._run(work)


# --- audit statements (PostgreSQL only: one INSERT per batch from column arrays) ------------------

_AUDIT_TYPES = {
    "chain_id": "text",
    "seq": "bigint",
    "ts": "timestamptz",
    "day": "date",
    "request_id": "text",
    "tenant_id": "bigint",
    "key_id": "bigint",
    "key_prefix": "text",
    "client": "text",
    "method": "text",
    "surface": "text",
    "path": "text",
    "model": "text",
    "status": "integer",
    "outcome": "text",
    "refusal": "text",
    "prompt_tokens": "bigint",
    "completion_tokens": "bigint",
    "tokens_reported": "boolean",
    "streamed": "boolean",
    "ttfb_us": "bigint",
    "latency_us": "bigint",
    "backend": "text",
    "prompt_logged": "boolean",
    "requests": "bigint",
    "note": "text",
    "prev_hash": "text",
    "hash": "text",
    # prompt_logs
    "created_at": "timestamptz",
    "expires_at": "timestamptz",
    "request_body": "text",
    "response_text": "text",
}


def _unnest_insert(table: str, columns: tuple[str, ...]) -> str:
    arrays = ", ".join(f"${i}::{_AUDIT_TYPES[c]}[]" for i, c in enumerate(columns, 1))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (chain_id, seq) DO NOTHING"
    )


_INSERT_AUDIT = _unnest_insert("audit_log", q.AUDIT_COLUMNS)
_INSERT_PROMPTS = _unnest_insert("prompt_logs", q.PROMPT_COLUMNS)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows → one list per column (the arrays `unnest` takes)."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _decode_day(value: Any) -> date:
    return value  # type: ignore[no-any-return]  # asyncpg gives datetime.date for date


# --- helpers running on the asyncio side ----------------------------------------------------------


async def _record_change(
    conn: Connection, tenant_id: int, key_id: int | None, now: datetime
) -> None:
    """Bump the epoch and record what changed under it (inside the caller's transaction)."""
    seq = int(await conn.fetchval(q.BUMP_EPOCH_RETURNING))
    await conn.execute(_pg(q.INSERT_CHANGE), seq, tenant_id, key_id, now)
    await conn.execute(_pg(q.PRUNE_CHANGES), seq - q.CHANGE_FEED_KEEP)


async def _get_tenant(
    conn: Connection, name_or_id: str | int, *, for_update: bool = False
) -> Tenant:
    lock = " FOR UPDATE" if for_update else ""
    if isinstance(name_or_id, int):
        row = await conn.fetchrow(_pg(q.SELECT_TENANT_BY_ID + lock), name_or_id)
    else:
        row = await conn.fetchrow(_pg(q.SELECT_TENANT_BY_NAME + lock), name_or_id)
    if row is None:
        raise NotFoundError(f"no tenant {name_or_id!r}")
    return q.tenant_from_row(row, _decode_time)


async def _has_migrations_table(conn: Connection) -> bool:
    return await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")  # type: ignore[no-any-return]


async def _applied(conn: Connection) -> set[str]:
    return {row["name"] for row in await conn.fetch(q.SELECT_MIGRATIONS)}


async def describe_postgres_schema(conn: Connection) -> str:
    """Columns, constraints and indexes of the current schema, from the catalogs."""
    lines: list[str] = []
    columns = await conn.fetch(
        """SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
           FROM information_schema.columns WHERE table_schema = current_schema()
           ORDER BY table_name COLLATE "C", ordinal_position"""
    )
    constraints = await conn.fetch(
        """SELECT conrelid::regclass::text AS table_name, conname, pg_get_constraintdef(oid) AS def
           FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
           ORDER BY conrelid::regclass::text COLLATE "C", conname COLLATE "C" """
    )
    indexes = await conn.fetch(
        """SELECT tablename, indexname, indexdef FROM pg_indexes
           WHERE schemaname = current_schema()
           ORDER BY tablename COLLATE "C", indexname COLLATE "C" """
    )
    tables = sorted({r["table_name"] for r in columns})
    for table in tables:
        lines.append(f"table {table}")
        for r in columns:
            if r["table_name"] != table:
                continue
            parts = [f"    column {r['column_name']} {r['data_type']}"]
            parts.append("NULL" if r["is_nullable"] == "YES" else "NOT NULL")
            if r["is_identity"] == "YES":
                parts.append("IDENTITY")
            if r["column_default"] is not None:
                parts.append(f"DEFAULT {r['column_default']}")
            lines.append(" ".join(parts))
        for r in constraints:
            if r["table_name"] == table:
                lines.append(f"    constraint {r['conname']} {r['def']}")
        for r in indexes:
            if r["tablename"] == table:
                lines.append(f"    index {r['indexname']} {r['indexdef']}")
    return "\n".join(lines) + "\n"
