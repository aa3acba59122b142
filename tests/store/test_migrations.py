"""Migrations: every one applied once, in order, also by concurrent migrators; no drift.

The drift test applies every migration to an empty database and compares the result with
`schema/expected-<dialect>.txt`. After adding a migration, regenerate them
(`python schema/describe.py sqlite|postgres`) and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nzgw.adapters.postgres import PostgresStore
from nzgw.adapters.sql import SCHEMA_DIR, load_migrations, substitute
from nzgw.adapters.sqlite import SqliteStore, split_statements
from nzgw.adapters.stores import open_store

ALL = [m.name for m in load_migrations("sqlite")]


def test_sql_files_are_numbered_and_load_for_both_dialects() -> None:
    assert ALL[0] == "0001_init"
    assert sorted(ALL) == ALL
    assert [m.name for m in load_migrations("postgres")] == ALL
    for dialect in ("sqlite", "postgres"):
        for migration in load_migrations(dialect):
            assert "{{" not in migration.sql


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(ValueError, match="NOPE"):
        substitute("CREATE TABLE t (x {{NOPE}})", "sqlite")


def test_migration_names_are_checked(tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("SELECT 1;")
    (tmp_path / "0001_again.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="two migrations"):
        load_migrations("sqlite", tmp_path)
    (tmp_path / "0001_again.sql").unlink()
    (tmp_path / "2-Bad.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="NNNN"):
        load_migrations("sqlite", tmp_path)


def test_split_statements() -> None:
    script = (
        "-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');\n\n-- b\nINSERT INTO a VALUES ('1');\n"
    )
    assert split_statements(script) == [
        "-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');",
        "-- b\nINSERT INTO a VALUES ('1');",
    ]
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE b (x TEXT)")


async def test_migrate_an_empty_database_and_compare_with_the_expected_schema(
    backend: str, empty_db_url: str
) -> None:
    async with open_store(empty_db_url) as store:
        assert isinstance(store, SqliteStore | PostgresStore)
        assert await store.pending_migrations() == ALL
        assert await store.migrate() == ALL
        assert await store.pending_migrations() == []
        assert await store.migrate() == []
        assert await store.revocation_epoch() == 0
        described = await store.describe_schema()
    expected = (SCHEMA_DIR / f"expected-{backend}.txt").read_text()
    assert described == expected, (
        f"the migrated schema differs from schema/expected-{backend}.txt; if the change is "
        f"intended, run `python schema/describe.py {backend}` and review the diff"
    )


async def test_concurrent_migrators_apply_each_migration_once(empty_db_url: str) -> None:
    results: list[list[str]] = []

    async def migrator() -> None:
        async with open_store(empty_db_url) as store:
            results.append(await store.migrate())

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(migrator)
    applied = [name for result in results for name in result]
    assert sorted(applied) == ALL
    async with open_store(empty_db_url) as store:
        assert await store.pending_migrations() == []


def test_concurrent_migrate_processes_apply_each_migration_once(
    empty_db_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db_url, "NZGW_ENV_FILE": str(tmp_path / "none")}
    env.pop("NZGW_CONFIG", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "nzgw", "migrate", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    applied: list[str] = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            applied.extend(json.loads(out)["applied"])
    finally:
        for process in processes:  # reap them all, also when one failed
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert sorted(applied) == ALL
