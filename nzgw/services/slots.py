"""Backend slots and the tenant-fair queue in front of them.

Every backend has `parallel` slots (`OLLAMA_BACKENDS`); nzgw never has more requests in flight
on a backend than that, so requests wait here, in a queue that is fair across tenants, instead
of in Ollama's first-come-first-served queue. A request asks for a slot on any backend of a set
(the backends of one priority tier that host its model, minus those it already tried); when a
slot frees, the next request comes from the tenant furthest below its weighted share of
slot-time (`nzgw.core.fairness`), and it gets the backend with the model loaded, then the one
with the fewest requests in flight (`nzgw.core.balance`).

Ownership and cancellation:

* `SlotPool.acquire` returns a `Slot`; its owner calls `Slot.release()` exactly when the
  backend is done with the request (the upstream response is closed). `release` is
  synchronous, idempotent and never raises, so it can sit on any cleanup path; it hands the
  slot to the next waiter at once.
* A waiter that is cancelled (its client left, shutdown) leaves the queue in the same step: its
  place is given back at once and its tenant is charged nothing. If a slot was granted to it in
  the instant between the cancellation and its wake-up, that slot is released again before the
  cancellation propagates.
* A wait is bounded: `queue_timeout` → `QueueTimeoutError`; more than `per_tenant` waiting
  requests of one tenant → `QueueFullError` at once.

Pure bookkeeping: no task, no I/O, no await except the wait itself. Trio code only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import trio

from nzgw.core.balance import Option, choose
from nzgw.core.fairness import FairQueue

# The first estimate of one request's slot-time, before any was measured (seconds).
INITIAL_HOLD = 1.0
_HOLD_SMOOTHING = 0.1  # weight of the newest sample in the running mean


class QueueFullError(Exception):
    """The tenant has `per_tenant` requests waiting already."""


class QueueTimeoutError(Exception):
    """No slot freed within `queue_timeout`; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("no backend slot became free in time")
        self.retry_after = retry_after


class Slot:
    """One granted slot on `backend`. Release it once the backend is done with the request."""

    __slots__ = ("_pool", "_released", "backend", "cost", "granted_at", "tenant", "waited")

    def __init__(
        self, pool: SlotPool, tenant: Hashable, backend: str, *, cost: float, waited: float
    ) -> None:
        self._pool = pool
        self._released = False
        self.tenant = tenant
        self.backend = backend
        self.cost = cost  # provisional charge, corrected on release
        self.granted_at = pool.clock()
        self.waited = waited  # seconds spent in the queue (0 when a slot was free)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back (idempotent; never raises); the next waiter gets it at once."""
        if not self._released:
            self._released = True
            self._pool._release(self)


class _Waiter:
    __slots__ = ("backends", "enqueued_at", "granted", "label", "model", "slot")

    def __init__(self, backends: tuple[str, ...], model: str, label: str, now: float) -> None:
        self.backends = backends
        self.model = model
        self.label = label
        self.enqueued_at = now
        self.granted = trio.Event()
        self.slot: Slot | None = None

    def granted_slot(self) -> Slot | None:
        return self.slot


class SlotPool:
    """The slots of every backend and the fair queue in front of them. Not thread-safe."""

    def __init__(
        self,
        parallel: Mapping[str, int],
        *,
        queue_timeout: float,
        per_tenant: int,
        is_loaded: Callable[[str, str], bool] = lambda backend, model: False,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if any(n < 1 for n in parallel.values()):
            raise ValueError("every backend needs at least one slot")
        self._parallel = dict(parallel)
        self._position = {name: i for i, name in enumerate(parallel)}
        self._in_flight = dict.fromkeys(parallel, 0)
        self._queue: FairQueue[Hashable, _Waiter] = FairQueue()
        self._timeout = queue_timeout
        self._per_tenant = per_tenant
        self._is_loaded = is_loaded
        self.clock = clock
        self._mean_hold = INITIAL_HOLD
        self._changed = trio.Event()

    # --- reads ---

    @property
    def backends(self) -> list[str]:
        return list(self._parallel)

    def in_flight(self, backend: str) -> int:
        return self._in_flight[backend]

    def slots(self, backend: str) -> int:
        return self._parallel[backend]

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def waiting_by_label(self) -> dict[str, int]:
        """Requests waiting now per tenant label (for metrics)."""
        counts: dict[str, int] = {}
        for _, waiter in self._queue.items():
            counts[waiter.label] = counts.get(waiter.label, 0) + 1
        return counts

    @property
    def mean_hold(self) -> float:
        """Running mean of the slot-time of released requests (seconds)."""
        return self._mean_hold

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked after every change (tests, tools)."""
        while not predicate():
            await self._changed.wait()

    def _announce(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- acquire / release ---

    async def acquire(
        self,
        tenant: Hashable,
        *,
        weight: float,
        backends: Sequence[str],
        model: str,
        label: str = "",
    ) -> Slot:
        """A slot on one of `backends` (configured names), waiting fairly if none is free.

        Raises `QueueFullError` (the tenant has too many waiting) or `QueueTimeoutError`.
        Cancellation while waiting removes the request from the queue (nothing charged).
        """
        if not backends:
            raise ValueError("no backend to wait for")
        waiter = _Waiter(tuple(backends), model, label, self.clock())
        self._queue.push(tenant, waiter, weight=weight)
        self._dispatch()
        self._announce()
        if waiter.slot is not None:
            return waiter.slot
        if self._queue.depth(tenant) > self._per_tenant:
            self._queue.remove(tenant, waiter)
            self._announce()
            raise QueueFullError
        try:
            with trio.move_on_after(self._timeout):
                await waiter.granted.wait()
        except BaseException:
            self._abandon(tenant, waiter)
            raise
        granted = waiter.granted_slot()  # (re-read: the wait may have set it)
        if granted is None:  # timed out (a grant racing the deadline is kept)
            self._abandon(tenant, waiter)
            raise QueueTimeoutError(max(1.0, math.ceil(self._mean_hold)))
        return granted

    def _abandon(self, tenant: Hashable, waiter: _Waiter) -> None:
        if waiter.slot is not None:
            waiter.slot.release()
        else:
            self._queue.remove(tenant, waiter)
            self._announce()

    def _free(self, backend: str) -> bool:
        return self._in_flight.get(backend, 0) < self._parallel.get(backend, 0)

    def _eligible(self, waiter: _Waiter) -> bool:
        return any(self._free(b) for b in waiter.backends)

    def _dispatch(self) -> None:
        """Grant free slots to waiters, fairest first, until no waiter can use a free slot."""
        while len(self._queue):
            popped = self._queue.pop(cost=self._mean_hold, eligible=self._eligible)
            if popped is None:
                return
            tenant, waiter = popped
            options = [
                Option(
                    position=self._position.get(b, len(self._position)),
                    loaded=self._is_loaded(b, waiter.model),
                    in_flight=self._in_flight.get(b, 0),
                    free=self._free(b),
                )
                for b in waiter.backends
            ]
            index = choose(options)
            assert index is not None  # eligible: at least one is free
            backend = waiter.backends[index]
            self._in_flight[backend] += 1
            now = self.clock()
            waiter.slot = Slot(
                self, tenant, backend, cost=self._mean_hold, waited=now - waiter.enqueued_at
            )
            waiter.granted.set()

    def _release(self, slot: Slot) -> None:
        self._in_flight[slot.backend] -= 1
        held = max(0.0, self.clock() - slot.granted_at)
        self._queue.settle(slot.tenant, provisional=slot.cost, actual=held)
        if held > 0:
            self._mean_hold += _HOLD_SMOOTHING * (held - self._mean_hold)
        self._dispatch()
        self._announce()
