"""The data plane's one seam into the slot pool: the backends a request tries, in order.

`BackendAttempts` is what the forwarder (`nzgw.services.forwarding`) iterates. Without a slot
pool it yields the registry's candidates as before. With one, it walks the priority tiers of the
model's backends; in each tier it waits (fairly, `nzgw.services.slots`) for a slot on any
backend it has not tried yet, and yields that backend wrapped so that the slot is held from
"backend chosen" until the upstream response is closed:

* `open` failing (transport error, cancelled) releases the slot at once;
* the response's `aclose` releases it (the request's cleanup stack closes every response, and
  failover closes a failed one before it moves on);
* the release is also on the request's cleanup stack from the moment the slot is granted, in
  case the request is cut between the grant and `open` (it is idempotent).

Slots are per backend, not per model: a backend that runs several models at once can take a
larger `parallel`. `/api/show` takes no slot (Ollama answers it without a runner).

Refusals, in the caller's API shape: a tenant with too many waiting requests gets 429
(`queue_full`), a request that waited `NZGW_QUEUE_TIMEOUT` gets 503 with `Retry-After`
(`queue_timeout`). Neither says anything about backends.

A queued request has been admitted already: it counts against its concurrency limit while it
waits (its lease is taken at admission), and it is charged nothing for waiting.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

from nzgw.core.record import Refused, RequestInfo
from nzgw.ports import (
    Backend,
    ForwardingMetrics,
    RawBody,
    RegistryPort,
    UpstreamResponse,
    raw_body_of,
)
from nzgw.services.slots import QueueFullError, QueueTimeoutError, Slot, SlotPool


class BackendAttempts:
    """Async iterator over the backends to try for one request (see the module docstring)."""

    def __init__(
        self,
        registry: RegistryPort,
        slots: SlotPool | None,
        metrics: ForwardingMetrics,
        info: RequestInfo,
        cleanup: AsyncExitStack,
        model: str,
        *,
        generates: bool = True,
    ) -> None:
        self._registry = registry
        self._slots = slots
        self._metrics = metrics
        self._info = info
        self._cleanup = cleanup
        self._model = model
        self._plain: Iterator[Backend] | None = None
        self._tiers: list[list[Backend]] = []
        self._remaining: list[Backend] = []
        # Only requests that run the model take a slot (`/api/show` reads metadata).
        if slots is None or not generates:
            self._plain = iter(registry.candidates(model))
        else:
            self._tiers = [list(tier) for tier in registry.candidate_tiers(model)]

    def __aiter__(self) -> BackendAttempts:
        return self

    async def __anext__(self) -> Backend:
        if self._plain is not None:
            for backend in self._plain:
                return backend
            raise StopAsyncIteration
        while not self._remaining:
            if not self._tiers:
                raise StopAsyncIteration
            self._remaining = self._tiers.pop(0)
        slot = await self._acquire(self._remaining)
        self._cleanup.callback(slot.release)
        backend = next(b for b in self._remaining if b.name == slot.backend)
        self._remaining.remove(backend)
        return SlotBackend(backend, slot, self._registry, self._model)

    async def _acquire(self, backends: Sequence[Backend]) -> Slot:
        pool = self._slots
        assert pool is not None
        info = self._info
        tenant = info.principal.tenant if info.principal is not None else None
        label = tenant.name if tenant is not None else ""
        try:
            slot = await pool.acquire(
                tenant.id if tenant is not None else None,
                weight=tenant.weight if tenant is not None else 1,
                backends=[b.name for b in backends],
                model=self._model,
                label=label,
            )
        except QueueFullError:
            raise Refused(
                429,
                "too many requests of this tenant are waiting for the model, retry later",
                refusal="queue_full",
                headers={"Retry-After": str(max(1, math.ceil(pool.mean_hold)))},
                code="rate_limit_exceeded",
                error_type="requests",
            ) from None
        except QueueTimeoutError as exc:
            raise Refused(
                503,
                "the model is busy, try again",
                refusal="queue_timeout",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
            ) from None
        info.queue_wait = (info.queue_wait or 0.0) + slot.waited
        self._metrics.queue_waited(label, slot.waited)
        return slot


class SlotBackend:
    """A backend whose next `open` runs on a granted slot (released as described above)."""

    def __init__(self, backend: Backend, slot: Slot, registry: RegistryPort, model: str) -> None:
        self._backend = backend
        self._slot = slot
        self._registry = registry
        self._model = model
        self.name = backend.name
        self.url = backend.url

    async def open(
        self,
        method: bytes,
        path: bytes,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> UpstreamResponse:
        try:
            response = await self._backend.open(method, path, body=body, headers=headers)
        except BaseException:
            self._slot.release()
            raise
        if response.status < 400:  # Ollama loaded the model to answer
            self._registry.note_routed(self.name, self._model)
        return SlotResponse(response, self._slot)

    async def get_json(self, path: str, *, limit: int = 16 * 1024 * 1024) -> Any:
        return await self._backend.get_json(path, limit=limit)


class WrappedResponse:
    """An upstream response seen through a wrapper: everything delegated; subclasses change
    what they add (`SlotResponse`, `nzgw.services.forwarding`'s replayed error answer)."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers

    def header(self, name: bytes) -> bytes | None:
        return self._response.header(name)

    async def receive_some(self) -> bytes:
        return await self._response.receive_some()

    async def read_all(self, limit: int) -> bytes:
        return await self._response.read_all(limit)

    def raw_body(self) -> RawBody | None:
        return raw_body_of(self._response)

    async def aclose(self) -> None:
        await self._response.aclose()


class SlotResponse(WrappedResponse):
    """An upstream response that gives its slot back when it is closed."""

    __slots__ = ("_slot",)

    def __init__(self, response: UpstreamResponse, slot: Slot) -> None:
        super().__init__(response)
        self._slot = slot

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._slot.release()
