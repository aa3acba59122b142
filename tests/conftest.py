"""Shared fixtures (`database_url`), and a hang guard for every Trio test.

The whole test (its async fixtures included) runs inside a cancel scope that a wall-clock
watchdog cancels after `HANG_GUARD_SECONDS` (or the seconds of a `@pytest.mark.hang_guard(N)`
marker); the test then fails with `HangGuardError`.

A guard against hangs, not a speed assertion: generous, on real time (a thread timer), so it
is independent of the test's clock (`MockClock` with autojump jumps virtual time; a guard on
that clock would fire on the first long virtual sleep). Tests keep their own `fail_after`
where they wait for one event, to fail with a precise message.

How: pytest-trio runs a test with the runner named by its `trio(run=...)` marker; the hook
below puts a marker with `guarded_run` first, which wraps the function pytest-trio hands it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.store import pg

HANG_GUARD_SECONDS = 300.0


class HangGuardError(Exception):
    """A Trio test ran longer than its hang guard and was cancelled."""


async def _guarded(fn: Callable[[], Awaitable[Any]], seconds: float) -> Any:
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:

        def fire() -> None:
            with suppress(trio.RunFinishedError):  # the test finished meanwhile
                token.run_sync_soon(scope.cancel)

        watchdog = threading.Timer(seconds, fire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return await fn()
        finally:
            watchdog.cancel()
    raise HangGuardError(f"the test did not finish within its {seconds:g} s hang guard")


def guarded_run(seconds: float) -> Callable[..., Any]:
    def run(fn: Callable[[], Awaitable[Any]], **kwargs: Any) -> Any:
        return trio.run(partial(_guarded, fn, seconds), **kwargs)

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or not _is_async(item):
            continue
        marker = item.get_closest_marker("hang_guard")
        seconds = float(marker.args[0]) if marker else HANG_GUARD_SECONDS
        item.add_marker(pytest.mark.trio(run=guarded_run(seconds)), append=False)


def _is_async(item: pytest.Function) -> bool:
    """A coroutine test, also under Hypothesis (which wraps it in a sync function)."""
    inner = getattr(getattr(item.obj, "hypothesis", None), "inner_test", item.obj)
    return inspect.iscoroutinefunction(inner)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL: a SQLite file, and a scratch PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nzgw.db"
        return
    with pg.scratch_database() as url:
        yield url
