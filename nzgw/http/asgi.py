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

And one shortcut: a `RelayResponse` body goes to the connection's relay extension when it
offers one (`nzgw.http.fastrelay`; docs/ARCHITECTURE.md, "The relay fast path").
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any

import trio
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection

from nzgw.http.fastrelay import RelayResponse, relay_of

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


# The request id, for the one log line of a failure that escapes the handler (a response body
# that raises mid-stream). A mutable cell set before the request nursery starts, so the
# handler task can fill it in and the connection can read it.
_request_name: contextvars.ContextVar[list[str]] = contextvars.ContextVar("nzgw_request_name")


def split_errors(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the errors to contain, what must propagate: cancellation, KeyboardInterrupt, ...)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


def name_request(request_id: str) -> None:
    """Record the current request's id for the connection's failure log."""
    cell = _request_name.get(None)
    if cell is not None:
        cell[:] = [request_id]


class GatewayHTTPConnection(TrioASGIHTTPConnection):
    async def __call__(self, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        stack = contextlib.AsyncExitStack()
        # Set before the request nursery starts, so both of its tasks inherit it.
        token = _request_stack.set(stack)
        name: list[str] = []
        name_token = _request_name.set(name)
        try:
            await super().__call__(receive, shielded_send)
        except (Exception, BaseExceptionGroup) as exc:
            # Contained: a body that raised mid-stream ends this request (hypercorn closes the
            # connection, the answer is incomplete); never the server. Logged once, here.
            errors, rest = split_errors(exc)
            if errors is not None:
                log.error(
                    "request failed",
                    exc_info=errors,
                    extra={"request_id": name[0] if name else None},
                )
            if rest is not None:
                raise rest from None
        finally:
            _request_stack.reset(token)
            _request_name.reset(name_token)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_DEADLINE
                try:
                    await stack.aclose()
                except Exception:
                    log.exception("request cleanup failed")
            if scope.cancelled_caught:
                log.error("request cleanup exceeded %.0f s", CLEANUP_DEADLINE)

    async def _send_response(self, send: Any, response: Any) -> None:
        relay = relay_of(self.scope) if isinstance(response, RelayResponse) else None
        if relay is None:
            await super()._send_response(send, response)
            return
        # Quart's own order (head, body, end), with the body written by the connection.
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encode_headers(response.headers),
            }
        )
        body = response.relay_body
        try:
            await relay(body)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
