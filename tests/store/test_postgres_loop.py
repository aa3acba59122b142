"""The PostgreSQL adapter and trio-asyncio: with the gateway's root loop, or its own."""

from __future__ import annotations

import pytest
import trio
import trio_asyncio

from nzgw.adapters.postgres import PostgresStore, open_postgres_store
from nzgw.ports import NotFoundError, StoreUnavailableError

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(pg_session_url: str) -> str:
    return pg_session_url


async def test_uses_the_loop_already_open(pg_url: str) -> None:
    async with trio_asyncio.open_loop() as loop, open_postgres_store(pg_url) as store:
        assert store._loop is loop
        await store.ping()


async def test_opens_its_own_loop_and_raises_errors_unwrapped(pg_url: str) -> None:
    assert trio_asyncio.current_loop.get() is None
    with pytest.raises(NotFoundError):
        async with open_postgres_store(pg_url) as store:
            await store.migrate()
            await store.get_tenant("no such tenant, certainly")
    assert trio_asyncio.current_loop.get() is None


async def test_usable_from_tasks_spawned_before_the_store_opened(pg_url: str) -> None:
    # Their context has no trio-asyncio loop: the store must use the loop it captured.
    opened: list[PostgresStore] = []
    ready = trio.Event()
    pinged = trio.Event()

    async def early_task() -> None:
        await ready.wait()
        await opened[0].ping()
        pinged.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(early_task)
        async with open_postgres_store(pg_url) as store:
            opened.append(store)
            ready.set()
            await pinged.wait()


async def test_unreachable_server() -> None:
    with pytest.raises(StoreUnavailableError):
        async with open_postgres_store("postgresql://postgres@127.0.0.1:1/nzgw"):
            pass
