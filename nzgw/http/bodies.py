"""Request bodies of the model routes: decoded, checked and re-encoded off the event loop when big.

`nzgw.core.requests.prepare` is linear in the body size: a 32 MiB body costs the CPU for a
noticeable time, and on the event loop every other request (every tenant's) would wait for it.
Bodies above `THREAD_THRESHOLD` are therefore prepared in a worker thread, at most
`Gateway.body_workers` at once (a CapacityLimiter: a flood of big bodies queues there instead of
starving the loop or spawning threads without bound). Small bodies stay inline: a thread hop
costs more than parsing them.

Cancellation: a client that leaves while its body is being prepared in a thread abandons the
result (`abandon_on_cancel=True`); the thread finishes on its own, touches no shared state, and
its result is dropped.
"""

from __future__ import annotations

import functools

import trio

from nzgw.core import paths
from nzgw.core.models import Principal
from nzgw.core.requests import BadRequestError, Prepared, prepare
from nzgw.http.gateway import Gateway, Refused

THREAD_THRESHOLD = 256 * 1024


async def prepare_body(
    gateway: Gateway,
    route: paths.RouteId,
    body: bytes,
    principal: Principal,
    *,
    thread_threshold: int = THREAD_THRESHOLD,
) -> Prepared:
    """The checked, canonical request, or `Refused(400)` in the caller's surface shape."""
    work = functools.partial(
        prepare,
        route,
        body,
        default_cap=gateway.config.default_max_tokens,
        allow_model_controls=principal.tenant.allow_model_controls,
    )
    try:
        if len(body) <= thread_threshold:
            return work()
        return await trio.to_thread.run_sync(
            work, limiter=gateway.body_workers, abandon_on_cancel=True
        )
    except BadRequestError as exc:
        raise Refused(400, str(exc), refusal="bad_request") from None
