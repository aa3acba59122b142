"""A tenant-fair queue: virtual-time fair queuing over tenants with weights. Pure; no I/O.

Policy (start-time fair queuing, adapted to slots whose cost is known only afterwards):

* Every tenant with requests waiting is a *flow*; its *tag* is `max(since, finish)`, where
  `finish` is the virtual time up to which the tenant has been served (its slot-time divided by
  its weight, summed) and `since` is the virtual time at which it last became backlogged.
* When a slot frees, the waiting request of the flow with the smallest tag goes next (ties: the
  flow whose head arrived first). So the next request comes from the tenant furthest below its
  fair share, and a tenant that was idle starts at the current virtual time: it cannot bank
  credit while idle, nor is it punished for having been busy long ago.
* Granting charges a provisional cost (`pop(cost=...)`, the caller's estimate of one request's
  slot-time); `settle` corrects it with the real slot-time when the slot is released. Long
  requests therefore cost more than short ones: shares are shares of slot-time, not of requests.
* The global virtual time is the largest tag granted so far (monotonic).

A `pop` may skip requests that cannot use the slot that freed (`eligible`): such a request
keeps its place; the flow's tag is per tenant, so the next eligible request of the same tenant
is served in its stead.

`remove` takes a request out without charging anything: a client that leaves gives its place
back at once and its tenant pays nothing for the wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class _Flow(Generic[T]):
    __slots__ = ("active", "finish", "queue", "since", "weight")

    def __init__(self, weight: float, now_v: float) -> None:
        self.weight = weight
        self.finish = now_v
        self.since = now_v
        self.queue: deque[tuple[int, T]] = deque()  # (arrival sequence, item)
        self.active = 0  # granted, not settled yet

    @property
    def tag(self) -> float:
        return max(self.since, self.finish)


def _always(_: object) -> bool:
    return True


class FairQueue(Generic[K, T]):
    """Waiting requests per tenant (`K`), served in weighted fair order. Not thread-safe."""

    def __init__(self) -> None:
        self._flows: dict[K, _Flow[T]] = {}
        self._vtime = 0.0
        self._seq = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def vtime(self) -> float:
        return self._vtime

    def depth(self, tenant: K) -> int:
        flow = self._flows.get(tenant)
        return len(flow.queue) if flow else 0

    def depths(self) -> dict[K, int]:
        """Requests waiting per tenant (tenants with none left out)."""
        return {t: len(f.queue) for t, f in self._flows.items() if f.queue}

    def items(self) -> Iterator[tuple[K, T]]:
        for tenant, flow in self._flows.items():
            for _, item in flow.queue:
                yield tenant, item

    def push(self, tenant: K, item: T, *, weight: float) -> None:
        """Queue `item` for `tenant` (weight > 0; the latest weight given is the tenant's)."""
        if not weight > 0:
            raise ValueError("weight must be > 0")
        flow = self._flows.get(tenant)
        if flow is None:
            flow = self._flows[tenant] = _Flow(weight, self._vtime)
        flow.weight = weight
        if not flow.queue:
            flow.since = self._vtime
        self._seq += 1
        flow.queue.append((self._seq, item))
        self._size += 1

    def remove(self, tenant: K, item: T) -> bool:
        """Take a waiting `item` out (its client left, or it timed out). Charges nothing."""
        flow = self._flows.get(tenant)
        if flow is None:
            return False
        for index, (_, queued) in enumerate(flow.queue):
            if queued is item:
                del flow.queue[index]
                self._size -= 1
                self._forget_if_idle(tenant, flow)
                return True
        return False

    def pop(self, *, cost: float, eligible: Callable[[T], bool] = _always) -> tuple[K, T] | None:
        """The next request to serve (charged `cost` provisionally), or None when no waiting
        request is `eligible`."""
        order = sorted(
            (
                (flow.tag, flow.queue[0][0], tenant)
                for tenant, flow in self._flows.items()
                if flow.queue
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        for tag, _, tenant in order:
            flow = self._flows[tenant]
            for index, (_, item) in enumerate(flow.queue):
                if eligible(item):
                    del flow.queue[index]
                    self._size -= 1
                    self._vtime = max(self._vtime, tag)
                    flow.finish = tag + cost / flow.weight
                    flow.since = self._vtime
                    flow.active += 1
                    return tenant, item
        return None

    def settle(self, tenant: K, *, provisional: float, actual: float) -> None:
        """A granted request released its slot after `actual` slot-time: correct its charge."""
        flow = self._flows.get(tenant)
        if flow is None:  # pragma: no cover - a flow with grants outstanding is never forgotten
            return
        flow.finish += (actual - provisional) / flow.weight
        flow.active = max(0, flow.active - 1)
        self._forget_if_idle(tenant, flow)

    def _forget_if_idle(self, tenant: K, flow: _Flow[T]) -> None:
        # A flow with nothing waiting, nothing in flight and no credit beyond the current
        # virtual time behaves exactly like a new one: drop it, so tenants do not accumulate.
        if not flow.queue and not flow.active and flow.finish <= self._vtime:
            del self._flows[tenant]
