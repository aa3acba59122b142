"""Store calls on the request path, bounded (`NZGW_STORE_TIMEOUT`).

A hung store (PostgreSQL frozen, a network path that stops forwarding) must not hang requests:
a bounded call that has not answered in time raises `StoreUnavailableError`, which the request
path answers with 503. Only the methods named are bounded; the service tasks (flushers, purge,
revocation watch) keep their own deadlines.

Why the call runs in a task of `nursery` (the server's service nursery) and not in the
caller's: cancelling a query on a hung PostgreSQL does not end at once (asyncpg sends a cancel
request to the same hung server and waits for it), so a `move_on_after` around the call would
wait as long as the store hangs. The caller stops waiting at the deadline; the call itself ends
when the store answers or the service nursery is cancelled at shutdown.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import outcome
import trio

from nzgw.ports import StoreUnavailableError

T = TypeVar("T")

REQUEST_PATH_METHODS: Final = frozenset({"find_key", "update_key"})
"""The Store methods a request may wait for: the key lookup on an auth cache miss, the rehash."""


def bound_store_calls(
    store: T,
    *,
    timeout: float,
    nursery: trio.Nursery,
    methods: frozenset[str] = REQUEST_PATH_METHODS,
) -> T:
    """`store`, with each of `methods` bounded by `timeout` seconds for its caller. Each call
    runs in a task of `nursery`; a caller that stops waiting (deadline, or its own
    cancellation) leaves the call to end there."""
    return cast(T, _Bounded(store, timeout, nursery, methods))


class _Bounded:
    def __init__(
        self, target: Any, timeout: float, nursery: trio.Nursery, methods: frozenset[str]
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._nursery = nursery
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name not in self._methods or not inspect.iscoroutinefunction(value):
            return value
        method = cast(Callable[..., Awaitable[Any]], value)
        timeout, nursery = self._timeout, self._nursery

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            done = trio.Event()
            result: list[outcome.Outcome[Any]] = []

            async def run() -> None:
                result.append(await outcome.acapture(method, *args, **kwargs))
                done.set()

            nursery.start_soon(run)
            with trio.move_on_after(timeout):
                await done.wait()
            if not result:
                raise StoreUnavailableError(f"store: {name} got no answer within {timeout} s")
            return result[0].unwrap()

        self.__dict__[name] = call
        return call

    def __repr__(self) -> str:
        return f"<bounded to {self._timeout} s: {self._target!r}>"
