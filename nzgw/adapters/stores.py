"""Choosing a Store by URL.

Apart from the shared SQL (`sql.py`) so that nothing imports in a circle: the adapters import
`sql`, this factory imports the adapters, and only inside `open_store`, so asyncpg and
trio-asyncio are loaded only when a PostgreSQL URL is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

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


def store_identity(database_url: str) -> str:
    """The database `database_url` names, without credentials or options: for PostgreSQL
    ``postgresql://host:port/dbname``, for SQLite ``sqlite:`` and the file's absolute path.
    Two URLs of one database give the same text (the local spool's folder is named by it)."""
    scheme = database_url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from nzgw.adapters.sqlite import sqlite_path

        path = sqlite_path(database_url)
        return "sqlite::memory:" if path == ":memory:" else f"sqlite:{Path(path).resolve()}"
    parts = urlsplit(database_url)
    host = parts.hostname or "localhost"
    return f"postgresql://{host}:{parts.port or 5432}/{parts.path.lstrip('/') or 'postgres'}"
