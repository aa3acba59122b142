"""Fixtures for the Store contract suite: one store per backend, the same tests for each.

- `store_url`: parametrized `sqlite` (a fresh file per test) and `postgres` (one migrated
  database per session, `nzgw_test_<random>`, dropped at the end). Tests on the shared
  PostgreSQL database must not assume it is empty: they make unique names with `unique`.
- `store`: the open, migrated store for `store_url`.
- `empty_db_url`: an empty database of the same backend, for migration tests.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nzgw.adapters.stores import open_store
from nzgw.ports import Store
from tests.store import pg

BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """One database for the whole session, migrated once by the first store that opens it."""
    with pg.scratch_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return str(request.getfixturevalue("pg_session_url"))


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    with pg.scratch_database() as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(store_url) as opened:
        await opened.migrate()
        yield opened


@pytest.fixture
def unique() -> str:
    """A suffix that keeps names apart on the shared database."""
    return secrets.token_hex(4)
