"""Write `schema/expected-<dialect>.txt`: the schema after applying every migration to an empty
database. Usage: `python schema/describe.py sqlite|postgres`.

PostgreSQL: a scratch database `nzgw_describe_<random>` is created on the server named by
`NZGW_TEST_PG_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`) and dropped after.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import trio

from nzgw.adapters.postgres import admin_database, open_postgres_store
from nzgw.adapters.sqlite import open_sqlite_store

HERE = Path(__file__).resolve().parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def describe_sqlite() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_sqlite_store(f"sqlite:///{tmp}/describe.db") as store:
            await store.migrate()
            return await store.describe_schema()


async def describe_postgres(admin_url: str) -> str:
    name = f"nzgw_describe_{secrets.token_hex(4)}"
    async with admin_database(admin_url, name) as url, open_postgres_store(url) as store:
        await store.migrate()
        return await store.describe_schema()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in {"sqlite", "postgres"}:
        print(__doc__, file=sys.stderr)
        return 2
    dialect = argv[1]
    if dialect == "sqlite":
        text = trio.run(describe_sqlite)
    else:
        text = trio.run(describe_postgres, os.environ.get("NZGW_TEST_PG_URL", DEFAULT_ADMIN_URL))
    target = HERE / f"expected-{dialect}.txt"
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
