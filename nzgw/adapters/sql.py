"""What the SQLite and PostgreSQL adapters share (the factory is `stores.open_store`).

Shared here, so the two adapters differ only in how they execute statements:

- the migrations (`schema/NNNN_name.sql`, one file for both dialects, with the placeholders
  `{{ID}}`, `{{TIMESTAMP}}` and `{{DATE}}` substituted per dialect; see `schema/README.md`);
- the SQL text, written once with `?` parameters (the PostgreSQL adapter renumbers them `$n`);
- how rows become `Tenant` / `ApiKey` values and how change sets become column assignments.

Both adapters import this module; it imports neither (no import circle).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs

from nzgw.core.audit import (
    EVENT_FIELDS,
    AuditRow,
    PromptRecord,
    event_from_values,
    event_values,
)
from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Status, Tenant
from nzgw.ports import (
    AuditQuery,
    ChainHead,
    Change,
    ChangeFeed,
    ConflictError,
    KeyChanges,
    NewKey,
    NotFoundError,
    PromptLog,
    StoreError,
    TenantChanges,
    UsageQuery,
    UsageReportRow,
    UsageRow,
    UsageTotals,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
_MIGRATION_NAME = re.compile(r"(\d{4})_[a-z0-9_]+")

# --- migrations -----------------------------------------------------------------------------------

DIALECTS: Mapping[str, Mapping[str, str]] = {
    "postgres": {
        "{{ID}}": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "{{TIMESTAMP}}": "TIMESTAMPTZ",
        "{{DATE}}": "DATE",
    },
    "sqlite": {
        "{{ID}}": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "{{TIMESTAMP}}": "TEXT",
        "{{DATE}}": "TEXT",
    },
}

# Created by the migration runner itself (it must exist to record the first migration).
MIGRATIONS_TABLE_SQL = """\
CREATE TABLE schema_migrations (
    name       TEXT PRIMARY KEY,
    applied_at {{TIMESTAMP}} NOT NULL
)"""


@attrs.frozen
class Migration:
    name: str  # file name without ".sql", e.g. "0001_init"
    sql: str  # placeholders substituted for one dialect


def substitute(sql: str, dialect: str) -> str:
    """Replace the dialect placeholders; an unknown `{{…}}` left over is an error."""
    for placeholder, replacement in DIALECTS[dialect].items():
        sql = sql.replace(placeholder, replacement)
    leftover = re.search(r"\{\{\w*\}\}", sql)
    if leftover:
        raise ValueError(f"unknown schema placeholder {leftover.group(0)}")
    return sql


def load_migrations(dialect: str, directory: Path = SCHEMA_DIR) -> list[Migration]:
    """Every `NNNN_name.sql` in `directory`, in order, for `dialect`."""
    migrations: list[Migration] = []
    numbers: set[str] = set()
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.fullmatch(path.stem)
        if not match:
            raise ValueError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        if match.group(1) in numbers:
            raise ValueError(f"{path.name}: two migrations numbered {match.group(1)}")
        numbers.add(match.group(1))
        migrations.append(Migration(path.stem, substitute(path.read_text(), dialect)))
    if not migrations:
        raise ValueError(f"no migrations found in {directory}")
    return migrations


# --- SQL shared by both adapters (`?` parameters) -------------------------------------------------

NO_LIMITS = Limits()
NO_BUDGETS = Budgets()

LIMIT_COLUMNS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
BUDGET_COLUMNS = ("daily_tokens", "monthly_tokens", "lifetime_tokens")

TENANT_COLUMNS = (
    "id",
    "name",
    "status",
    *LIMIT_COLUMNS,
    *BUDGET_COLUMNS,
    "allowed_models",
    "created_at",
    "allow_model_controls",
    "weight",
)
KEY_COLUMNS = (
    "id",
    "tenant_id",
    "name",
    "prefix",
    "key_hash",
    "status",
    *LIMIT_COLUMNS,
    *BUDGET_COLUMNS,
    "allowed_models",
    "log_prompts",
    "prompt_ttl_seconds",
    "created_at",
    "last_used_at",
    "expires_at",
)

TENANT_SELECT = ", ".join(TENANT_COLUMNS)
KEY_SELECT = ", ".join(KEY_COLUMNS)

SELECT_TENANT_BY_NAME = f"SELECT {TENANT_SELECT} FROM tenants WHERE name = ?"
SELECT_TENANT_BY_ID = f"SELECT {TENANT_SELECT} FROM tenants WHERE id = ?"
SELECT_TENANTS = f"SELECT {TENANT_SELECT} FROM tenants ORDER BY id"
INSERT_TENANT = (
    f"INSERT INTO tenants (name, status, {', '.join(LIMIT_COLUMNS)}, "
    f"{', '.join(BUDGET_COLUMNS)}, allowed_models, created_at, updated_at, weight) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {TENANT_SELECT}"
)

SELECT_KEY_BY_PREFIX = f"SELECT {KEY_SELECT} FROM api_keys WHERE prefix = ?"
SELECT_KEYS = f"SELECT {KEY_SELECT} FROM api_keys ORDER BY id"
SELECT_KEYS_OF_TENANT = f"SELECT {KEY_SELECT} FROM api_keys WHERE tenant_id = ? ORDER BY id"
INSERT_KEY = (
    f"INSERT INTO api_keys (tenant_id, name, prefix, key_hash, status, "
    f"{', '.join(LIMIT_COLUMNS)}, {', '.join(BUDGET_COLUMNS)}, allowed_models, log_prompts, "
    f"prompt_ttl_seconds, created_at, updated_at, expires_at) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {KEY_SELECT}"
)
# The key and its tenant in one row; tenant columns carry a "t_" prefix.
SELECT_PRINCIPAL = (
    "SELECT "
    + ", ".join(f"k.{c}" for c in KEY_COLUMNS)
    + ", "
    + ", ".join(f"t.{c} AS t_{c}" for c in TENANT_COLUMNS)
    + " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = ?"
)
TOUCH_KEY = (
    "UPDATE api_keys SET last_used_at = ? "
    "WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)"
)
BUMP_EPOCH = "UPDATE revocation_epoch SET epoch = epoch + 1 WHERE id = 1"
SELECT_EPOCH = "SELECT epoch FROM revocation_epoch WHERE id = 1"
# The change feed (schema/0005_change_feed.sql): the bumped epoch is the change's seq.
BUMP_EPOCH_RETURNING = BUMP_EPOCH + " RETURNING epoch"
INSERT_CHANGE = "INSERT INTO change_feed (seq, tenant_id, key_id, changed_at) VALUES (?, ?, ?, ?)"
PRUNE_CHANGES = "DELETE FROM change_feed WHERE seq <= ?"
CHANGE_FEED_KEEP = 10_000
# One statement, so one snapshot: the epoch and the rows up to it. Parameters: after, limit.
SELECT_CHANGES = (
    "SELECT e.epoch, c.seq, c.tenant_id, c.key_id FROM revocation_epoch e "
    "LEFT JOIN change_feed c ON c.seq > ? AND c.seq <= e.epoch WHERE e.id = 1 "
    "ORDER BY c.seq LIMIT ?"
)
UPSERT_USAGE = (
    "INSERT INTO usage_ledger (day, tenant_id, key_id, model, requests, prompt_tokens, "
    "completion_tokens, refusals) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, tenant_id, key_id, model) DO UPDATE SET "
    "requests = usage_ledger.requests + excluded.requests, "
    "prompt_tokens = usage_ledger.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = usage_ledger.completion_tokens + excluded.completion_tokens, "
    "refusals = usage_ledger.refusals + excluded.refusals"
)
# A batch id is recorded in the transaction that adds its rows (schema/0008_usage_batches.sql):
# no row inserted means the batch was added before, and its rows are skipped.
INSERT_USAGE_BATCH = (
    "INSERT INTO usage_batches (batch_id, applied_at) VALUES (?, ?) "
    "ON CONFLICT (batch_id) DO NOTHING"
)
PURGE_USAGE_BATCHES = "DELETE FROM usage_batches WHERE applied_at < ?"
#: How long a batch id is remembered: a spool replayed later than this could count it twice.
USAGE_BATCH_RETENTION = timedelta(days=35)
# Parameters: day, month_start, tenant_id. SUM of BIGINT is NUMERIC on PostgreSQL: cast back.
SELECT_USAGE_TOTALS = (
    "SELECT key_id, "
    "CAST(SUM(CASE WHEN day = ? THEN prompt_tokens + completion_tokens ELSE 0 END) AS BIGINT), "
    "CAST(SUM(CASE WHEN day >= ? THEN prompt_tokens + completion_tokens ELSE 0 END) AS BIGINT), "
    "CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) "
    "FROM usage_ledger WHERE tenant_id = ? GROUP BY key_id ORDER BY key_id"
)
INSERT_MIGRATION = "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)"
SELECT_MIGRATIONS = "SELECT name FROM schema_migrations"


def tenant_insert_params(
    name: str,
    limits: Limits,
    budgets: Budgets,
    allowed_models: tuple[str, ...],
    now: datetime,
    weight: int = 1,
) -> list[Any]:
    return [
        name,
        Status.ACTIVE.value,
        *limits_values(limits),
        *budgets_values(budgets),
        encode_models(allowed_models),
        now,
        now,
        weight,
    ]


def key_insert_params(new: NewKey, now: datetime) -> list[Any]:
    """The parameters of `INSERT_KEY` for a new (active) key."""
    return [
        new.tenant_id,
        new.name,
        new.prefix,
        new.key_hash,
        Status.ACTIVE.value,
        *limits_values(new.limits),
        *budgets_values(new.budgets),
        encode_models(new.allowed_models),
        new.log_prompts,
        new.prompt_ttl_seconds,
        now,
        now,
        new.expires_at,
    ]


def usage_values(row: UsageRow) -> tuple[Any, ...]:
    """The parameters of `UPSERT_USAGE` for one ledger row (its primary key first)."""
    return (
        row.day,
        row.tenant_id,
        row.key_id,
        row.model,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
        row.refusals,
    )


def limits_values(limits: Limits) -> list[int | None]:
    return [limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_requests]


def budgets_values(budgets: Budgets) -> list[int | None]:
    return [budgets.daily_tokens, budgets.monthly_tokens, budgets.lifetime_tokens]


def encode_models(models: tuple[str, ...]) -> str:
    return json.dumps(list(models))


def tenant_assignments(changes: TenantChanges) -> dict[str, Any]:
    """Column → new value for the fields `changes` sets (column names from a fixed list)."""
    columns = _shared_assignments(changes)
    if changes.status is not None:
        if changes.status is Status.REVOKED:
            raise ValueError("a tenant can be active or disabled, not revoked")
        columns["status"] = changes.status.value
    if changes.allow_model_controls is not None:
        columns["allow_model_controls"] = changes.allow_model_controls
    if changes.weight is not None:
        columns["weight"] = changes.weight
    return columns


def _shared_assignments(changes: TenantChanges | KeyChanges) -> dict[str, Any]:
    """The columns tenants and keys share: name, limits, budgets, allowed models."""
    columns: dict[str, Any] = {}
    if changes.name is not None:
        columns["name"] = changes.name
    if changes.limits is not None:
        columns.update(zip(LIMIT_COLUMNS, limits_values(changes.limits), strict=True))
    if changes.budgets is not None:
        columns.update(zip(BUDGET_COLUMNS, budgets_values(changes.budgets), strict=True))
    if changes.allowed_models is not None:
        columns["allowed_models"] = encode_models(changes.allowed_models)
    return columns


def key_assignments(changes: KeyChanges, now: datetime) -> dict[str, Any]:
    """Column → new value for the fields `changes` sets (column names from a fixed list)."""
    columns = _shared_assignments(changes)
    if changes.status is not None:
        columns["status"] = changes.status.value
        if changes.status is Status.REVOKED:
            columns["revoked_at"] = now
    if changes.log_prompts is not None:
        columns["log_prompts"] = changes.log_prompts
    if changes.clear_prompt_ttl:
        columns["prompt_ttl_seconds"] = None
    elif changes.prompt_ttl_seconds is not None:
        columns["prompt_ttl_seconds"] = changes.prompt_ttl_seconds
    if changes.clear_expires_at:
        columns["expires_at"] = None
    elif changes.expires_at is not None:
        columns["expires_at"] = changes.expires_at
    if changes.key_hash is not None:
        columns["key_hash"] = changes.key_hash
    return columns


def key_change_refused(current: Status, columns: Mapping[str, Any]) -> bool:
    """A revoked key is final: anything but revoking it again is refused."""
    if current is not Status.REVOKED:
        return False
    return set(columns) - {"status", "revoked_at"} != set() or (
        columns.get("status", Status.REVOKED.value) != Status.REVOKED.value
    )


def key_to_change(
    row: Row | None, prefix: str, columns: Mapping[str, Any], decode_time: Decode
) -> tuple[ApiKey, bool]:
    """The key a change applies to, and whether there is anything to write; `NotFoundError`
    for an unknown prefix, `ConflictError` for a change to a revoked key."""
    if row is None:
        raise NotFoundError(f"no key with prefix {prefix}")
    current = key_from_row(row, decode_time)
    if key_change_refused(current.status, columns):
        raise ConflictError(f"the key {prefix} is revoked")
    return current, bool(columns) and current.status is not Status.REVOKED


def changes_bump_epoch(columns: Mapping[str, Any]) -> bool:
    """Every change bumps the revocation epoch except a rehash (it does not change who is let in,
    and bumping would empty every gateway's key cache once per key after a parameter change)."""
    return bool(set(columns) - {"key_hash"})


def change_feed(after: int, limit: int, rows: Sequence[Any]) -> ChangeFeed:
    """The `changes_since` answer from the rows of `SELECT_CHANGES` (asked for `limit + 1`)."""
    if not rows:
        raise StoreError("the revocation epoch row is missing (run `nzgw migrate`)")
    epoch = int(rows[0][0])
    changes = tuple(
        Change(int(r[1]), int(r[2]), None if r[3] is None else int(r[3]))
        for r in rows
        if r[1] is not None
    )
    if epoch < after or epoch - after > limit or len(changes) != epoch - after:
        return ChangeFeed(epoch, None)  # moved back, too many, or a gap: cannot be told
    return ChangeFeed(epoch, changes)


def update_sql(table: str, columns: Mapping[str, Any], where: str, returning: str) -> str:
    sets = ", ".join(f"{column} = ?" for column in columns)
    return f"UPDATE {table} SET {sets}, updated_at = ? WHERE {where} RETURNING {returning}"


# --- rows → domain values -------------------------------------------------------------------------

Row = Mapping[str, Any]
Decode = Callable[[Any], datetime | None]


def tenant_from_row(row: Row, decode_time: Decode, prefix: str = "") -> Tenant:
    def col(name: str) -> Any:
        return row[prefix + name]

    return Tenant(
        id=int(col("id")),
        name=col("name"),
        status=Status(col("status")),
        limits=Limits(*(col(c) for c in LIMIT_COLUMNS)),
        budgets=Budgets(*(col(c) for c in BUDGET_COLUMNS)),
        allowed_models=tuple(json.loads(col("allowed_models"))),
        created_at=decode_time(col("created_at")),
        allow_model_controls=bool(col("allow_model_controls")),
        weight=int(col("weight")),
    )


def principal_from_row(row: Row, decode_time: Decode) -> Principal:
    """A key and its tenant from one `SELECT_PRINCIPAL` row (tenant columns prefixed `t_`)."""
    return Principal(key_from_row(row, decode_time), tenant_from_row(row, decode_time, "t_"))


def key_from_row(row: Row, decode_time: Decode) -> ApiKey:
    return ApiKey(
        id=int(row["id"]),
        tenant_id=int(row["tenant_id"]),
        name=row["name"],
        prefix=row["prefix"],
        key_hash=row["key_hash"],
        status=Status(row["status"]),
        limits=Limits(*(row[c] for c in LIMIT_COLUMNS)),
        budgets=Budgets(*(row[c] for c in BUDGET_COLUMNS)),
        allowed_models=tuple(json.loads(row["allowed_models"])),
        log_prompts=bool(row["log_prompts"]),
        prompt_ttl_seconds=row["prompt_ttl_seconds"],
        created_at=decode_time(row["created_at"]),
        last_used_at=decode_time(row["last_used_at"]),
        expires_at=decode_time(row["expires_at"]),
    )


def totals_from_rows(
    rows: Sequence[Sequence[Any]],
) -> tuple[UsageTotals, dict[int, UsageTotals]]:
    """(key_id, day, month, lifetime) rows → the tenant's totals and each key's."""
    per_key = {
        int(key_id): UsageTotals(int(day or 0), int(month or 0), int(life or 0))
        for key_id, day, month, life in rows
    }
    tenant = UsageTotals(
        sum(t.day_tokens for t in per_key.values()),
        sum(t.month_tokens for t in per_key.values()),
        sum(t.lifetime_tokens for t in per_key.values()),
    )
    return tenant, per_key


# --- audit log, prompt logs, usage reports (schema/0002_audit.sql) -------------------------------

AUDIT_COLUMNS: tuple[str, ...] = ("chain_id", "seq", *EVENT_FIELDS, "prev_hash", "hash")
AUDIT_SELECT = ", ".join(AUDIT_COLUMNS)
PROMPT_COLUMNS: tuple[str, ...] = (
    "chain_id",
    "seq",
    "request_id",
    "tenant_id",
    "key_id",
    "created_at",
    "expires_at",
    "request_body",
    "response_text",
)

# Parameters: chain_id, started_at, head_seq, head_hash, updated_at. Never moves a head back
# (a batch written again after an unknown outcome, or an older batch arriving late).
UPSERT_CHAIN_HEAD = (
    "INSERT INTO audit_chains (chain_id, started_at, head_seq, head_hash, updated_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (chain_id) DO UPDATE SET "
    "head_seq = excluded.head_seq, head_hash = excluded.head_hash, "
    "updated_at = excluded.updated_at WHERE audit_chains.head_seq < excluded.head_seq"
)
SELECT_CHAIN_HEADS = (
    "SELECT chain_id, started_at, head_seq, head_hash, updated_at FROM audit_chains "
    "ORDER BY started_at, chain_id"
)
# Chains with rows but no head record (the head was deleted): found from the rows.
SELECT_HEADLESS_CHAINS = (
    "SELECT chain_id, MIN(ts) FROM audit_log WHERE chain_id NOT IN "
    "(SELECT chain_id FROM audit_chains) GROUP BY chain_id ORDER BY MIN(ts), chain_id"
)
SELECT_CHAIN_ROWS = (
    f"SELECT {AUDIT_SELECT} FROM audit_log WHERE chain_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)
SELECT_PROMPTS = (
    "SELECT "
    + ", ".join(f"p.{c}" for c in PROMPT_COLUMNS)
    + ", a.key_prefix FROM prompt_logs p LEFT JOIN audit_log a "
    "ON a.chain_id = p.chain_id AND a.seq = p.seq "
    "WHERE p.request_id = ? AND (p.expires_at IS NULL OR p.expires_at > ?) ORDER BY p.id"
)
# Parameters: now, limit. One bounded statement; the purge loops until fewer come back.
PURGE_PROMPTS = (
    "DELETE FROM prompt_logs WHERE id IN (SELECT id FROM prompt_logs "
    "WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?)"
)


def audit_row_values(row: AuditRow) -> list[Any]:
    """A row's column values in `AUDIT_COLUMNS` order (Python types; adapters encode)."""
    return [row.chain_id, row.seq, *event_values(row.event), row.prev_hash, row.hash]


def prompt_values(record: PromptRecord) -> list[Any]:
    return [getattr(record, c) for c in PROMPT_COLUMNS]


def head_values(head: ChainHead, now: datetime) -> list[Any]:
    return [head.chain_id, head.started_at, head.seq, head.hash, head.updated_at or now]


DecodeValue = Callable[[Any], Any]


def audit_row_from_row(row: Row, decode_time: DecodeValue, decode_day: DecodeValue) -> AuditRow:
    """A stored row → `AuditRow`, every value back in the type the hash was computed over
    (SQLite gives booleans as 0/1 and times as text)."""
    values: list[Any] = []
    for name in EVENT_FIELDS:
        value = row[name]
        if name == "ts":
            value = decode_time(value)
        elif name == "day":
            value = decode_day(value)
        elif name in _BOOL_FIELDS:
            value = bool(value)
        elif value is not None and name in _INT_FIELDS:
            value = int(value)
        values.append(value)
    return AuditRow(
        chain_id=row["chain_id"],
        seq=int(row["seq"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        event=event_from_values(values),
    )


_BOOL_FIELDS = frozenset({"tokens_reported", "streamed", "prompt_logged"})
_INT_FIELDS = frozenset(
    {
        "tenant_id",
        "key_id",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "ttfb_us",
        "latency_us",
        "requests",
    }
)


def prompt_from_row(row: Row, decode_time: DecodeValue) -> PromptLog:
    record = PromptRecord(
        chain_id=row["chain_id"],
        seq=int(row["seq"]),
        request_id=row["request_id"],
        tenant_id=int(row["tenant_id"]),
        key_id=int(row["key_id"]),
        created_at=decode_time(row["created_at"]),
        expires_at=decode_time(row["expires_at"]),
        request_body=row["request_body"],
        response_text=row["response_text"],
    )
    return PromptLog(record, row["key_prefix"])


def _conditions(*conditions: tuple[str, str, Any]) -> tuple[list[str], list[Any]]:
    """(`column op ?` terms, their values) for the (column, op, value) whose value is set."""
    given = [(column, op, value) for column, op, value in conditions if value is not None]
    return [f"{column} {op} ?" for column, op, _ in given], [value for _, _, value in given]


def _where(terms: list[str]) -> str:
    return f" WHERE {' AND '.join(terms)}" if terms else ""


def list_audit_sql(query: AuditQuery) -> tuple[str, list[Any]]:
    """The listing statement for `query` (`?` parameters) and its parameters."""
    where, params = _conditions(
        ("tenant_id", "=", query.tenant_id),
        ("key_prefix", "=", query.key_prefix),
        ("ts", ">=", query.since),
        ("ts", "<", query.until),
        ("status", ">=", query.status_min),
        ("status", "<=", query.status_max),
    )
    params.append(max(0, query.limit))
    sql = (
        f"SELECT {AUDIT_SELECT} FROM audit_log{_where(where)} "
        "ORDER BY ts DESC, chain_id DESC, seq DESC LIMIT ?"
    )
    return sql, params


def usage_report_sql(query: UsageQuery, month_of_day: str) -> tuple[str, str, list[Any]]:
    """(ledger statement, audit refusals statement, their common parameters) for `query`.

    `month_of_day`: the dialect's expression for the YYYY-MM of the `day` column. Sums of BIGINT
    are NUMERIC on PostgreSQL: cast back. Refusals count audit rows with a tenant only (a request
    without a valid key belongs to no one's usage)."""
    group = {"day": "day", "month": month_of_day, "model": "model"}[query.by]
    where, params = _conditions(
        ("tenant_id", "=", query.tenant_id),
        ("key_id", "=", query.key_id),
        ("day", ">=", query.since),
        ("day", "<", query.until),
    )
    audit_where = " AND ".join(["outcome = 'refused'", "tenant_id IS NOT NULL", *where])
    ledger = (
        f"SELECT {group} AS grp, CAST(SUM(requests) AS BIGINT), "
        "CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT) "
        f"FROM usage_ledger{_where(where)} GROUP BY {group}"
    )
    refusals = (
        f"SELECT {group} AS grp, CAST(SUM(requests) AS BIGINT) "
        f"FROM audit_log WHERE {audit_where} GROUP BY {group}"
    )
    return ledger, refusals, params


def merge_usage(
    ledger: Sequence[Sequence[Any]], refusals: Sequence[Sequence[Any]]
) -> list[UsageReportRow]:
    """Ledger (group, requests, prompt, completion) and audit (group, refusals) rows → report
    rows in group order (a group is a day, a month or a model; no model: "-")."""

    def name(group: Any) -> str:
        if group is None:
            return "-"
        return group.isoformat() if isinstance(group, date) else str(group)

    merged: dict[str, list[int]] = {}
    for group, requests, prompt, completion in ledger:
        entry = merged.setdefault(name(group), [0, 0, 0, 0])
        entry[0] += int(requests or 0)
        entry[1] += int(prompt or 0)
        entry[2] += int(completion or 0)
    for group, refused in refusals:
        merged.setdefault(name(group), [0, 0, 0, 0])[3] += int(refused or 0)
    return [UsageReportRow(g, *merged[g]) for g in sorted(merged)]
