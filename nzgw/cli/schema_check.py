"""`serve` refuses to start on a database whose schema this nzgw does not match (issue 13).

Without it, a gateway on an un-migrated database logged "ready", answered /readyz with 200 and
then refused every request with 503. Migrations are counted by name (the numbers need not be
contiguous): the schema "is at" the number of this nzgw's migrations already applied.
"""

from __future__ import annotations

import trio

from nzgw.adapters.sql import load_migrations
from nzgw.adapters.stores import open_store
from nzgw.cli._common import CliError, CliInputError
from nzgw.config import Config
from nzgw.ports import StoreError


def require_current_schema(config: Config) -> None:
    """Return if every migration of this nzgw is applied (or `NZGW_MIGRATE_ON_START` will apply
    them); else raise `CliInputError` (one line, exit status 2). A store that cannot be reached
    is a `CliError` (exit status 1)."""
    if config.migrate_on_start:
        return

    async def pending() -> list[str]:
        async with open_store(config.database_url) as store:
            return await store.pending_migrations()

    try:
        missing = trio.run(pending)
    except StoreError as exc:
        raise CliError(f"database: {exc}") from None
    if missing:
        needed = len(load_migrations("postgres"))
        raise CliInputError(
            f"database schema is at {needed - len(missing)}, this nzgw needs {needed}: "
            "run `bin/nzgw migrate` (or set NZGW_MIGRATE_ON_START=true)"
        )
