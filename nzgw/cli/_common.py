"""What store-backed CLI commands share: config, running with a store, errors, output.

`run_with_store(config, fn)` is the one way a command touches the database: it runs `fn(store)`
under `trio.run`, with the store opened from `config.database_url` (PostgreSQL opens its own
trio-asyncio loop), checks the schema is migrated first, and turns store failures into one-line
errors with a non-zero exit status:

- exit 1: database unreachable, unknown tenant or key, duplicate name, other database errors;
- exit 2: invalid configuration or arguments (malformed numbers, durations, dates).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import cattrs
import click
import trio

from nzgw.adapters.stores import open_store
from nzgw.config import Config, ConfigError, load_config
from nzgw.core.models import ApiKey, Status, Tenant
from nzgw.ports import Store, StoreError, StoreUnavailableError

T = TypeVar("T")


class CliError(click.ClickException):
    """A one-line error: `Error: <message>` on stderr, then exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class CliInputError(CliError):
    """Invalid configuration or arguments: one line on stderr, then exit status 2."""

    exit_code = 2


def load_config_or_exit() -> Config:
    """`load_config()`; on `ConfigError` print its message and exit with status 2."""
    try:
        return load_config()
    except ConfigError as exc:
        raise CliInputError(str(exc)) from None


def run_with_store(
    config: Config, fn: Callable[[Store], Awaitable[T]], *, require_schema: bool = True
) -> T:
    """`trio.run` `fn(store)` on the configured store. With `require_schema`, refuse to run on a
    database that still has pending migrations. Store errors become `CliError`s."""

    async def main() -> T:
        async with open_store(config.database_url) as store:
            if require_schema:
                pending = await store.pending_migrations()
                if pending:
                    raise CliError(
                        f"the database schema is not up to date (pending: {', '.join(pending)}); "
                        "run `nzgw migrate` first"
                    )
            return await fn(store)

    try:
        return trio.run(main)
    except StoreUnavailableError as exc:
        raise CliError(str(exc)) from None
    except StoreError as exc:
        raise CliError(f"database error: {exc}") from None


# --- output ---------------------------------------------------------------------------------------

_json = cattrs.Converter()
_json.register_unstructure_hook(datetime, lambda d: d.isoformat())
_json.register_unstructure_hook(Status, lambda s: s.value)


def to_json(value: Any) -> Any:
    """attrs values (tenants, keys, limits…) → JSON-ready data; datetimes as ISO-8601."""
    return _json.unstructure(value)


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    data: dict[str, Any] = to_json(tenant)
    data["allowed_models"] = list(tenant.allowed_models)
    return data


def key_json(key: ApiKey, tenant_name: str | None = None) -> dict[str, Any]:
    """A key for listings: never the hash (and the secret is never stored at all)."""
    data: dict[str, Any] = to_json(key)
    del data["key_hash"]
    data["allowed_models"] = list(key.allowed_models)
    if tenant_name is not None:
        data["tenant"] = tenant_name
    return data


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) if value else "*"
    return str(value)


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table; `-` for unset values, `*` for "all models"."""
    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
