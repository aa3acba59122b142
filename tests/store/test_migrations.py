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
from typing import Any

import pytest
import trio

from nzgw.adapters.postgres import PostgresStore
from nzgw.adapters.sql import SCHEMA_DIR, load_migrations, substitute
from nzgw.adapters.sqlite import SqliteStore, split_statements
from nzgw.adapters.stores import open_store
from nzgw.core.keys import generate_key
from nzgw.core.models import ApiKey, Status
from nzgw.ports import KeyChanges, KeyNameTakenError, NewKey, Store

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


async def _raw(store: Store, sql: str) -> None:
    """One statement outside the store's API: to rebuild a database from before a migration."""
    if isinstance(store, SqliteStore):
        await store._run(lambda conn: conn.execute(sql))
    else:
        assert isinstance(store, PostgresStore)

        async def work(conn: Any) -> None:
            await conn.execute(sql)

        await store._run(work)


async def test_0006_renames_existing_duplicate_key_names_then_refuses_new_ones(
    empty_db_url: str,
) -> None:
    async with open_store(empty_db_url) as store:
        await store.migrate()
        # A database from before 0006, with duplicate names already in it.
        await _raw(store, "DROP INDEX api_keys_tenant_name")
        await _raw(store, "DELETE FROM schema_migrations WHERE name = '0006_unique_key_names'")
        acme = await store.create_tenant("acme")
        other = await store.create_tenant("other")

        async def key(tenant: int, name: str) -> ApiKey:
            return await store.create_key(NewKey(tenant, name, generate_key()[1], "hash"))

        first, second, revoked, third = [await key(acme.id, "ci") for _ in range(4)]
        elsewhere = await key(other.id, "ci")
        await store.update_key(revoked.prefix, KeyChanges(status=Status.REVOKED))

        assert await store.migrate() == ["0006_unique_key_names"]
        names = {k.id: k.name for k in await store.list_keys()}
        assert names == {
            first.id: "ci",  # the oldest keeps its name
            second.id: f"ci #{second.id}",
            revoked.id: "ci",  # revoked keys are final and never collide
            third.id: f"ci #{third.id}",
            elsewhere.id: "ci",  # names are unique per tenant
        }
        with pytest.raises(KeyNameTakenError):
            await key(acme.id, "ci")
        with pytest.raises(KeyNameTakenError):
            await store.update_key(second.prefix, KeyChanges(name="ci"))
        # Rotation: once the old one is revoked, its name is free again.
        await store.update_key(first.prefix, KeyChanges(status=Status.REVOKED))
        assert (await key(acme.id, "ci")).name == "ci"
        assert (await store.update_key(second.prefix, KeyChanges(name="ci-2"))).name == "ci-2"
