"""The ASGI connection class: per-request cleanup and a shielded `send`.

Two quart-trio behaviours would otherwise leak (docs/ARCHITECTURE.md, "quart-trio and hypercorn"):

1. hypercorn delivers `http.disconnect` from inside the final `send()`; quart-trio then cancels
   the request nursery, and that cancellation aborts hypercorn's idle-timer restart, so idle
   keep-alive connections live forever. Each `send` therefore runs shielded: it cannot block
   forever either, because hypercorn's socket writes are bounded by TCP_USER_TIMEOUT (server.py).
2. A response body that was created but never iterated (the request was cancelled after the
   handler returned, before Quart sent the body) is never closed. Every request gets an
   `AsyncExitStack`; handlers register what must be released (upstream responses, counter leases,
   the settlement of a request) with `request_cleanup()`, and the connection closes the stack in
   its `finally`, shielded and under a deadline, whatever happened.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any

import trio
from quart_trio.asgi import TrioASGIHTTPConnection

log = logging.getLogger("nzgw.http")

# Cleanup of one request may close an upstream connection and write settlement to the counter
# store; both have their own timeouts. This deadline only guards against a bug hanging shutdown.
CLEANUP_DEADLINE = 10.0

_request_stack: contextvars.ContextVar[contextlib.AsyncExitStack] = contextvars.ContextVar(
    "nzgw_request_stack"
)


def request_cleanup() -> contextlib.AsyncExitStack:
    """The current request's cleanup stack (closed when the connection is done with it)."""
    return _request_stack.get()


class GatewayHTTPConnection(TrioASGIHTTPConnection):
    async def __call__(self, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        stack = contextlib.AsyncExitStack()
        # Set before the request nursery starts, so both of its tasks inherit it.
        token = _request_stack.set(stack)
        try:
            await super().__call__(receive, shielded_send)
        finally:
            _request_stack.reset(token)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_DEADLINE
                try:
                    await stack.aclose()
                except Exception:
                    log.exception("request cleanup failed")
            if scope.cancelled_caught:
                log.error("request cleanup exceeded %.0f s", CLEANUP_DEADLINE)
