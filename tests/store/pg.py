"""The PostgreSQL server the tests use: where it is, and what happens when it is not there.

`NZGW_TEST_PG_URL` names an admin connection (default: user postgres, trust auth, on
127.0.0.1:5432). Tests get scratch databases `nzgw_test_<random>` there, dropped afterwards.
If the server cannot be reached the PostgreSQL tests are skipped with the reason, except under
`CI=true`, where they FAIL: CI must never pass by skipping the real database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest
import trio

from nzgw.adapters.postgres import create_database, drop_database
from nzgw.ports import StoreUnavailableError

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get("NZGW_TEST_PG_URL", DEFAULT_ADMIN_URL)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unreachable(reason: str) -> NoReturn:
    """Fail under CI=true, else skip; never returns."""
    message = f"PostgreSQL at {admin_url()} is unreachable ({reason})"
    if in_ci():
        pytest.fail(message + "; CI=true: the PostgreSQL tests must run")
    pytest.skip(message + "; set NZGW_TEST_PG_URL or start the server")


def new_database_name() -> str:
    return f"nzgw_test_{secrets.token_hex(6)}"


@contextmanager
def scratch_database() -> Iterator[str]:
    """An empty database for the duration (sync: for fixtures outside `trio.run`)."""
    name = new_database_name()
    try:
        url = trio.run(create_database, admin_url(), name)
    except StoreUnavailableError as exc:
        unreachable(str(exc))
    try:
        yield url
    finally:
        trio.run(drop_database, admin_url(), name)
