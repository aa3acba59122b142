"""The ASGI connection class: per-request cleanup and a shielded `send`.

Two quart-trio behaviours would otherwise leak (docs/ARCHITECTURE.md, "quart-trio and hypercorn"):

1. hypercorn delivers `http.disconnect` from inside the final `send()`; quart-trio then cancels
   the request nursery, and that cancellation aborts hypercorn's idle-timer restart, so idle
   keep-alive connections live forever. Each `send` therefore runs shielded: it cannot block
   forever either, because hypercorn's socket writes are bounded by TCP_USER_TIMEOUT (server.py).
2. A response body that was created but never iterated (the request was cancelled after the
   handler returned, before Quart sent the body) is never closed. Every request gets a
   `RequestScope` with an `AsyncExitStack`, placed in the ASGI scope (`request_scope`); the
   dispatcher passes it down explicitly, handlers register what must be released (upstream
   responses, counter leases, the settlement of a request) on it, and the connection closes the
   stack in its `finally`, shielded and under a deadline, whatever happened.

And two shortcuts: a whole answer leaves as one ASGI body message (one pass through hypercorn
and h11 instead of two), and a `RelayResponse` body goes to the connection's relay extension
when it offers one (`nzgw.http.fastrelay`; docs/ARCHITECTURE.md, "The relay fast path").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, cast

import attrs
import trio
from quart import Response
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_trio.asgi import TrioASGIHTTPConnection

from nzgw.http.fastrelay import RelayResponse, relay_of

log = logging.getLogger("nzgw.http")

# Cleanup of one request may close an upstream connection and write settlement to the counter
# store; both have their own timeouts. This deadline only guards against a bug hanging shutdown.
CLEANUP_DEADLINE = 10.0

# The key of the request's `RequestScope` in the ASGI scope.
SCOPE_KEY = "nzgw.request"


@attrs.define(eq=False)
class RequestScope:
    """What the connection owns for one request: the cleanup stack it closes when it is done
    with the request, and the request id for the one log line of a failure that escapes the
    handler (a response body that raises mid-stream)."""

    cleanup: contextlib.AsyncExitStack = attrs.Factory(contextlib.AsyncExitStack)
    request_id: str | None = None


def request_scope(scope: Mapping[str, Any]) -> RequestScope:
    """The `RequestScope` the connection placed in this request's ASGI scope."""
    found: RequestScope = scope[SCOPE_KEY]
    return found


def split_errors(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the errors to contain, what must propagate: cancellation, KeyboardInterrupt, ...)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


class GatewayHTTPConnection(TrioASGIHTTPConnection):
    async def __call__(self, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        owned = RequestScope()
        # In the scope Quart's request is made from, before the request nursery starts.
        cast(dict[str, Any], self.scope)[SCOPE_KEY] = owned
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
                    extra={"request_id": owned.request_id},
                )
            if rest is not None:
                raise rest from None
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_DEADLINE
                try:
                    await owned.cleanup.aclose()
                except Exception:
                    log.exception("request cleanup failed")
            if scope.cancelled_caught:
                log.error("request cleanup exceeded %.0f s", CLEANUP_DEADLINE)

    async def _send_response(self, send: Any, response: Any) -> None:
        whole = response.response if type(response) is Response else None
        if type(whole) is DataBody:
            # Quart sends the bytes and then an empty last message; one message carries both
            # (and the head goes out in the same write: nzgw.http.edge).
            await send(_start(response))
            await send({"type": "http.response.body", "body": whole.data, "more_body": False})
            return
        relay = relay_of(self.scope) if isinstance(response, RelayResponse) else None
        if relay is None:
            await super()._send_response(send, response)  # other streams: Quart's own way
            return
        # Quart's own order (head, body, end), with the body written by the connection.
        await send(_start(response))
        body = response.relay_body
        try:
            await relay(body)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _start(response: Response) -> dict[str, Any]:
    """The ASGI message that starts `response`: its status and headers."""
    return {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": encode_headers(response.headers),
    }
