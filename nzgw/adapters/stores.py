"""Choosing a Store by URL.

Apart from the shared SQL (`sql.py`) so that nothing imports in a circle: the adapters import
`sql`, this factory imports the adapters, and only inside `open_store`, so asyncpg and
trio-asyncio are loaded only when a PostgreSQL URL is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nzgw.ports import Store, WallClock, utc_now


@asynccontextmanager
async def open_store(database_url: str, *, clock: WallClock = utc_now) -> AsyncIterator[Store]:
    """Open the store named by `database_url` (`postgresql://…`, `postgres://…`, `sqlite:///…`).

    Raises `StoreUnavailableError` when it cannot be reached, ValueError for another scheme.
    """
    scheme = database_url.split(":", 1)[0].lower()
    if scheme in {"postgresql", "postgres"}:
        from nzgw.adapters.postgres import open_postgres_store

        async with open_postgres_store(database_url, clock=clock) as pg_store:
            yield pg_store
    elif scheme == "sqlite":
        from nzgw.adapters.sqlite import open_sqlite_store

        async with open_sqlite_store(database_url, clock=clock) as sqlite_store:
            yield sqlite_store
    else:
        raise ValueError(f"unknown database URL scheme {scheme!r}: use postgresql:// or sqlite:///")
