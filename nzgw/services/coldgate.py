"""The global bound on cold key verifications (store lookup + Argon2id), shared by all clients.

The failure throttle bounds what ONE address may cost; this gate bounds what ALL of them may
cost together, so that a flood from many addresses cannot queue seconds of Argon2id work in
front of an honest client's first request:

- at most `slots` verifications run at once (the Argon2id worker threads);
- at most `queue_max` wait for a slot; beyond that `GateFullError` is raised at once (HTTP:
  503 with `Retry-After`), so the queue, and the wait in it, stay bounded;
- the priority of a request is how many cold verifications its address asked for lately (a
  count decaying with `half_life`; lower goes first, then the earlier). A free slot goes to the
  best waiter; when the queue is full, a newcomer better than the worst waiter takes its place
  (the worst gets `GateFullError`). So an address that has not been verifying — the honest
  client with a new key — is neither refused nor kept waiting by addresses that flood: it
  waits for the verifications already running, whatever the queue holds.

Cached keys never come here. Not thread-safe: one gate per `trio.run`.
"""

from __future__ import annotations

import heapq
import itertools
import math

import attrs
import trio


class GateFullError(Exception):
    """Too many cold verifications waiting; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many key verifications in progress")
        self.retry_after = retry_after


@attrs.define(eq=False)
class _Waiter:
    event: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False
    abandoned: bool = False  # cancelled or evicted: skip it in the heap
    evicted: bool = False


@attrs.define
class _Usage:
    value: float
    updated: float


class ColdGate:
    """See the module docstring. `acquire` then, always, `release` (use `try/finally`)."""

    def __init__(
        self,
        slots: int,
        queue_max: int,
        *,
        half_life: float = 60.0,
        max_tracked: int = 100_000,
    ) -> None:
        if slots < 1 or queue_max < 0:
            raise ValueError("slots >= 1 and queue_max >= 0")
        self.slots = slots
        self.queue_max = queue_max
        self._half_life = half_life
        self._max_tracked = max_tracked
        self._running = 0
        self._waiting = 0
        self._heap: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._usage: dict[str, _Usage] = {}
        self.refused = 0  # GateFullError raised (for metrics and tests)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self, address: str) -> None:
        """Take a slot for a verification on behalf of `address` (a throttle key).

        Raises `GateFullError` at once when `queue_max` others are waiting and none of them
        is worse, or later, when a better newcomer takes this waiter's place. On cancellation
        while waiting nothing is held (a slot granted in that instant is handed on).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._running < self.slots and self._waiting == 0:
            self._charge(address)
            self._running += 1
            return
        priority = self._priority(address)
        if self._waiting >= self.queue_max and not self._evict_worse_than(priority):
            self.refused += 1
            raise GateFullError(1.0)
        waiter = _Waiter()
        heapq.heappush(self._heap, (self._charge(address), next(self._seq), waiter))
        self._waiting += 1
        try:
            await waiter.event.wait()
            if waiter.evicted:
                self.refused += 1
                raise GateFullError(1.0)
        except GateFullError:
            raise
        except BaseException:
            if waiter.granted:
                self.release()  # granted as we were cancelled: pass the slot on
            elif not waiter.abandoned:  # (an evicted waiter is off the count already)
                waiter.abandoned = True
                self._waiting -= 1
                self._compact()
            raise

    def release(self) -> None:
        """Give a slot back; the next waiter (by priority) gets it. Never blocks."""
        self._running -= 1
        while self._heap and self._running < self.slots:
            _, _, waiter = heapq.heappop(self._heap)
            if waiter.abandoned:
                continue
            waiter.granted = True
            self._waiting -= 1
            self._running += 1
            waiter.event.set()

    def _evict_worse_than(self, priority: float) -> bool:
        """Refuse the worst waiter if its priority is worse than `priority`; True if done."""
        live = [entry for entry in self._heap if not entry[2].abandoned]
        if not live:
            return False
        worst = max(live, key=lambda entry: (entry[0], entry[1]))
        if worst[0] <= priority:
            return False
        waiter = worst[2]
        waiter.abandoned = waiter.evicted = True
        self._waiting -= 1
        waiter.event.set()
        self._compact()
        return True

    # --- priority: how much an address asked for lately ----------------------------------------

    def _priority(self, address: str) -> float:
        """The address's decayed count now (0.0 for one not seen lately)."""
        usage = self._usage.get(address)
        if usage is None:
            return 0.0
        return usage.value * math.exp2(-(trio.current_time() - usage.updated) / self._half_life)

    def _charge(self, address: str) -> float:
        """The address's decayed count before this request; counts this one."""
        now = trio.current_time()
        usage = self._usage.pop(address, None)  # re-inserted last: dict order = recency
        if usage is None:
            if len(self._usage) >= self._max_tracked:
                self._prune(now)
            usage = _Usage(0.0, now)
        else:
            usage.value *= math.exp2(-(now - usage.updated) / self._half_life)
            usage.updated = now
        before = usage.value
        usage.value += 1.0
        self._usage[address] = usage
        return before

    def _prune(self, now: float) -> None:
        faded = [
            address
            for address, u in self._usage.items()
            if u.value * math.exp2(-(now - u.updated) / self._half_life) < 0.5
        ]
        for address in faded:
            del self._usage[address]
        excess = len(self._usage) - self._max_tracked + 1
        for address in list(self._usage)[: max(0, excess)]:
            del self._usage[address]

    def _compact(self) -> None:
        """Drop abandoned entries once they outnumber the live ones (bounded memory)."""
        if len(self._heap) > 2 * self._waiting + 16:
            self._heap = [entry for entry in self._heap if not entry[2].abandoned]
            heapq.heapify(self._heap)
