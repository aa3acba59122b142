"""Operator commands for the audit log, prompt logs and usage reports. Each takes `--json`.

    nzgw audit [--tenant acme] [--key nz_k3x9a2mq] [--since 24h] [--until 2030-01-31T12:00]
               [--status 429|4xx|500-599] [--limit 50]        newest first
    nzgw audit verify                                         exit 1 if a chain is broken
    nzgw usage [--tenant acme] [--key nz_k3x9a2mq] [--since 2030-01-01] [--until 2030-02-01]
               [--by day|month|model]
    nzgw prompts show <request-id>
    nzgw prompts purge

Times: a duration back from now (`24h`, `7d`), an ISO date (midnight UTC) or an ISO date-time
(UTC unless it has an offset); `--since` is inclusive, `--until` exclusive. Usage days are days of
NZGW_BUDGET_TIMEZONE, like the budgets. The backend that served a request appears here (for
operators); clients never see it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar

import click

from nzgw.cli._common import (
    CliError,
    CliInputError,
    echo_json,
    echo_table,
    load_config_or_exit,
    run_with_store,
)
from nzgw.cli.admin import PrefixType
from nzgw.core.audit import AuditRow
from nzgw.core.keys import parse_duration
from nzgw.core.limits import budget_zone
from nzgw.ports import (
    AuditQuery,
    NotFoundError,
    PromptLog,
    Store,
    UsageGrouping,
    UsageQuery,
    UsageReportRow,
    utc_now,
)
from nzgw.services.audit import ChainReport, purge_expired_prompts, verify_audit

F = TypeVar("F", bound=Callable[..., Any])

_STATUS = re.compile(r"(?:(\d{3})|([1-5])xx|(\d{3})-(\d{3}))")


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


# --- parameter types: errors are one line, exit status 2 ------------------------------------------


def _bad(param: click.Parameter | None, message: str) -> CliInputError:
    name = param.opts[0] if param is not None and param.opts else "value"
    return CliInputError(f"{name}: {message}")


class InstantType(click.ParamType[datetime]):
    """A duration back from now (`24h`), an ISO date (midnight UTC) or date-time (UTC default)."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            if text[:1].isdigit() and text[-1:].isalpha() and "-" not in text:
                return utc_now() - parse_duration(text)
            if len(text) == 10:
                return datetime.combine(date.fromisoformat(text), time(), UTC)
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise _bad(
                param, f"expected a duration like 24h or an ISO date / date-time, got {value!r}"
            ) from None
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class DayType(click.ParamType[date | timedelta]):
    """An ISO date, or a duration back from today (`30d`; resolved in the budget time zone)."""

    name = "day"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> date | timedelta:
        if isinstance(value, date | timedelta):
            return value
        text = str(value).strip()
        try:
            if text[:1].isdigit() and text[-1:].isalpha() and "-" not in text:
                return parse_duration(text)
            return date.fromisoformat(text)
        except ValueError:
            raise _bad(
                param, f"expected an ISO date like 2030-01-31 or a duration like 30d, got {value!r}"
            ) from None


class StatusType(click.ParamType[tuple[int, int]]):
    """`429`, `4xx`, or a range `500-599` → (lowest, highest), inclusive."""

    name = "status"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = _STATUS.fullmatch(str(value).strip().lower())
        if match is None:
            raise _bad(param, f"expected a status like 429, 4xx or 500-599, got {value!r}")
        one, klass, low, high = match.groups()
        if one is not None:
            return int(one), int(one)
        if klass is not None:
            return int(klass) * 100, int(klass) * 100 + 99
        if int(low) > int(high):
            raise _bad(param, f"empty status range {value!r}")
        return int(low), int(high)


async def _tenant_id(store: Store, name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return (await store.get_tenant(name)).id
    except NotFoundError:
        raise CliError(f"unknown tenant {name!r}") from None


async def _tenant_names(store: Store) -> dict[int, str]:
    return {t.id: t.name for t in await store.list_tenants()}


# --- audit ----------------------------------------------------------------------------------------


def _ms(us: int | None) -> str | None:
    return None if us is None else f"{us / 1000:.1f}"


def _audit_json(row: AuditRow, tenants: dict[int, str]) -> dict[str, Any]:
    event = row.event
    data: dict[str, Any] = {
        "time": event.ts.isoformat(),
        "day": event.day.isoformat(),
        "request_id": event.request_id,
        "tenant": tenants.get(event.tenant_id) if event.tenant_id is not None else None,
        "tenant_id": event.tenant_id,
        "key_id": event.key_id,
        "key_prefix": event.key_prefix,
        "client": event.client,
        "method": event.method,
        "surface": event.surface,
        "path": event.path,
        "model": event.model,
        "status": event.status,
        "outcome": event.outcome,
        "refusal": event.refusal,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "tokens_reported": event.tokens_reported,
        "streamed": event.streamed,
        "ttfb_ms": None if event.ttfb_us is None else event.ttfb_us / 1000,
        "latency_ms": event.latency_us / 1000,
        "backend": event.backend,
        "prompt_logged": event.prompt_logged,
        "requests": event.requests,
        "note": event.note,
        "chain_id": row.chain_id,
        "seq": row.seq,
        "hash": row.hash,
    }
    return data


_AUDIT_HEADERS = (
    "TIME (UTC)",
    "REQUEST",
    "TENANT",
    "KEY",
    "CLIENT",
    "METHOD",
    "PATH",
    "MODEL",
    "STATUS",
    "OUTCOME",
    "TOKENS",
    "MS",
    "BACKEND",
)


def _audit_cells(row: AuditRow, tenants: dict[int, str]) -> list[Any]:
    e = row.event
    outcome = e.refusal or e.outcome
    if e.requests != 1:
        outcome = f"{outcome} x{e.requests}"
    tokens = f"{e.prompt_tokens}+{e.completion_tokens}" + ("" if e.tokens_reported else "~")
    return [
        e.ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        e.request_id,
        tenants.get(e.tenant_id, str(e.tenant_id)) if e.tenant_id is not None else None,
        e.key_prefix,
        e.client,
        e.method,
        e.path,
        e.model,
        e.status,
        outcome,
        tokens,
        _ms(e.latency_us),
        e.backend,
    ]


@click.group(invoke_without_command=True)
@click.option("--tenant", help="Only this tenant's requests.")
@click.option("--key", type=PrefixType(), help="Only this key's requests (prefix).")
@click.option("--since", type=InstantType(), help="From this time (24h, 2030-01-31, ISO).")
@click.option("--until", type=InstantType(), help="Before this time.")
@click.option("--status", type=StatusType(), help="429, 4xx or 500-599.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@_json_option
@click.pass_context
def audit(
    ctx: click.Context,
    tenant: str | None,
    key: str | None,
    since: datetime | None,
    until: datetime | None,
    status: tuple[int, int] | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show audit rows, newest first (token counts ending in ~ are estimates)."""
    if ctx.invoked_subcommand is not None:
        return
    config = load_config_or_exit()

    async def work(store: Store) -> tuple[list[AuditRow], dict[int, str]]:
        query = AuditQuery(
            tenant_id=await _tenant_id(store, tenant),
            key_prefix=key,
            since=since,
            until=until,
            status_min=status[0] if status else None,
            status_max=status[1] if status else None,
            limit=limit,
        )
        return await store.list_audit(query), await _tenant_names(store)

    rows, tenants = run_with_store(config, work)
    if as_json:
        echo_json([_audit_json(r, tenants) for r in rows])
    else:
        echo_table(_AUDIT_HEADERS, [_audit_cells(r, tenants) for r in rows])


def _chain_json(report: ChainReport) -> dict[str, Any]:
    head = report.head
    broken = report.broken
    return {
        "chain_id": head.chain_id,
        "started_at": head.started_at.isoformat(),
        "head_seq": head.seq if head.recorded else None,
        "head_hash": head.hash if head.recorded else None,
        "rows_verified": report.rows,
        "ok": broken is None,
        "break": None
        if broken is None
        else {"seq": broken.seq, "problem": broken.problem, "detail": broken.detail},
    }


@audit.command()
@_json_option
def verify(as_json: bool) -> None:
    """Recompute every audit chain; report the first broken link of each (exit 1 if any)."""
    config = load_config_or_exit()
    reports = run_with_store(config, verify_audit)
    broken = [r for r in reports if r.broken is not None]
    if as_json:
        echo_json({"ok": not broken, "chains": [_chain_json(r) for r in reports]})
    else:
        for report in reports:
            head = report.head
            if report.broken is None:
                click.echo(
                    f"ok      chain {head.chain_id}: {report.rows} rows, "
                    f"head {head.seq} {head.hash}"
                )
            else:
                click.echo(f"BROKEN  {report.broken}")
        if not reports:
            click.echo("no audit rows yet")
    if broken:
        raise CliError(
            f"{len(broken)} of {len(reports)} audit chains are broken; first: {broken[0].broken}"
        )


# --- usage ----------------------------------------------------------------------------------------


def _day(value: date | timedelta | None, today: date) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return today - timedelta(days=value.days)


@click.command()
@click.option("--tenant", help="Only this tenant.")
@click.option("--key", type=PrefixType(), help="Only this key (prefix).")
@click.option("--since", type=DayType(), help="From this day (2030-01-01 or 30d), inclusive.")
@click.option("--until", type=DayType(), help="Up to this day, exclusive.")
@click.option(
    "--by",
    type=click.Choice(["day", "month", "model"]),
    default="day",
    show_default=True,
    help="One row per day, month or model.",
)
@_json_option
def usage(
    tenant: str | None,
    key: str | None,
    since: date | timedelta | None,
    until: date | timedelta | None,
    by: UsageGrouping,
    as_json: bool,
) -> None:
    """Requests, tokens and refusals from the usage ledger and the audit log."""
    config = load_config_or_exit()
    today = utc_now().astimezone(budget_zone(config.budget_timezone)).date()

    async def work(store: Store) -> list[UsageReportRow]:
        tenant_id = await _tenant_id(store, tenant)
        key_id: int | None = None
        if key is not None:
            principal = await store.find_key(key)
            if principal is None:
                raise CliError(f"unknown key {key}")
            if tenant_id is not None and principal.tenant.id != tenant_id:
                raise CliError(f"the key {key} does not belong to tenant {tenant!r}")
            key_id = principal.key.id
        query = UsageQuery(
            by=by,
            tenant_id=tenant_id,
            key_id=key_id,
            since=_day(since, today),
            until=_day(until, today),
        )
        return await store.usage_report(query)

    rows = run_with_store(config, work)
    if as_json:
        echo_json(
            [
                {
                    by: r.group,
                    "requests": r.requests,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "refusals": r.refusals,
                }
                for r in rows
            ]
        )
        return
    cells: list[list[Any]] = [
        [r.group, r.requests, r.prompt_tokens, r.completion_tokens, r.refusals] for r in rows
    ]
    if len(rows) > 1:
        cells.append(["total", *(sum(row[i] for row in cells) for i in range(1, 5))])
    echo_table((by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "REFUSALS"), cells)


# --- prompts --------------------------------------------------------------------------------------


@click.group()
def prompts() -> None:
    """Prompt logs of keys created with --log-prompts."""


def _prompt_json(found: PromptLog) -> dict[str, Any]:
    r = found.record
    return {
        "request_id": r.request_id,
        "tenant_id": r.tenant_id,
        "key_id": r.key_id,
        "key_prefix": found.key_prefix,
        "created_at": r.created_at.isoformat(),
        "expires_at": None if r.expires_at is None else r.expires_at.isoformat(),
        "request_body": r.request_body,
        "response": r.response_text,
        "chain_id": r.chain_id,
        "seq": r.seq,
    }


@prompts.command()
@click.argument("request_id")
@_json_option
def show(request_id: str, as_json: bool) -> None:
    """Show the request and response of REQUEST_ID (streams: the frames as relayed)."""
    config = load_config_or_exit()
    found = run_with_store(config, lambda store: store.get_prompts(request_id, now=utc_now()))
    if not found:
        raise CliError(
            f"no prompt log for request {request_id!r} (its key does not log prompts, "
            "or the log expired)"
        )
    if as_json:
        # One object for one request. Two logs under one id would take two processes drawing
        # the same random 64-bit id: kept, under "also", rather than dropped.
        document = _prompt_json(found[0])
        if len(found) > 1:
            document["also"] = [_prompt_json(f) for f in found[1:]]
        echo_json(document)
        return
    for entry in found:
        r = entry.record
        expires = "never" if r.expires_at is None else r.expires_at.isoformat()
        click.echo(f"request  {r.request_id}")
        click.echo(f"key      {entry.key_prefix or '-'} (tenant {r.tenant_id})")
        click.echo(f"created  {r.created_at.isoformat()}")
        click.echo(f"expires  {expires}")
        click.echo("--- request")
        click.echo(_printable(r.request_body))
        click.echo("--- response")
        click.echo("(none)" if r.response_text is None else _printable(r.response_text))


def _printable(text: str) -> str:
    """Stored text for a terminal: control characters (C0, C1, ESC…) shown as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\u{ord(c):04x}" for c in text)


@prompts.command()
@_json_option
def purge(as_json: bool) -> None:
    """Delete every expired prompt log now (the gateway also does it every minute)."""
    config = load_config_or_exit()
    purged = run_with_store(config, lambda store: purge_expired_prompts(store, now=utc_now()))
    if as_json:
        echo_json({"purged": purged})
    else:
        click.echo(f"purged {purged} expired prompt logs")
