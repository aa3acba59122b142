"""The global bound on cold key verifications (store lookup + Argon2id), shared by all clients.

The failure throttle bounds what ONE address may cost; this gate bounds what ALL of them may
cost together, so that a flood from many addresses cannot queue seconds of Argon2id work in
front of an honest client's first request:

- at most `slots` verifications run at once (the Argon2id worker threads);
- at most `queue_max` wait for a slot; beyond that `GateFullError` is raised at once (HTTP:
  503 with `Retry-After`), so the queue, and the wait in it, stay bounded;
- a free slot goes to the waiter whose address asked for the fewest cold verifications lately
  (a count that includes the requests still waiting and decays with `half_life`), then to the
  earliest; when the queue is full, a newcomer from an address with fewer than the worst
  waiter's takes its place (the worst gets `GateFullError`). So an address that has not been
  verifying — the honest client with a new key — is neither refused nor kept waiting by
  addresses that flood: it waits for the verifications already running, whatever the queue
  holds (an address sharing the flooders' count is served in arrival order);
- with two slots or more, one is kept for "light" addresses (at most `LIGHT` cold verifications
  lately): addresses that flood never hold every slot, so a new client does not even wait for
  the verifications already running, and its own runs beside at most `slots - 1` of theirs.

Cached keys never come here. Not thread-safe: one gate per `trio.run`.
"""

from __future__ import annotations

import itertools
import math

import attrs
import trio

LIGHT = 3.0  # an address that asked for at most this many cold verifications lately


class GateFullError(Exception):
    """Too many cold verifications waiting; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many key verifications in progress")
        self.retry_after = retry_after


@attrs.define(eq=False)
class _Waiter:
    address: str
    seq: int
    event: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False
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
        self._heavy_slots = slots - 1 if slots > 1 else slots  # one kept for light addresses
        self._waiters: list[_Waiter] = []  # at most queue_max: scanned, not sorted
        self._seq = itertools.count()
        self._usage: dict[str, _Usage] = {}
        self.refused = 0  # GateFullError raised (for metrics and tests)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, address: str) -> None:
        """Take a slot for a verification on behalf of `address` (a throttle key).

        Raises `GateFullError` at once when `queue_max` others are waiting and none of them
        is worse, or later, when a better newcomer takes this waiter's place. On cancellation
        while waiting nothing is held (a slot granted in that instant is handed on).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        now = trio.current_time()
        mine = self._charge(address, now)
        if not self._waiters and self._running < self._limit(mine):
            self._running += 1  # a free slot, nobody ahead
            return
        if len(self._waiters) >= self.queue_max and not self._evict_worse_than(mine, now):
            self.refused += 1
            raise GateFullError(1.0)
        waiter = _Waiter(address, next(self._seq))
        self._waiters.append(waiter)
        self._dispatch(now)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()  # granted as we were cancelled: pass the slot on
            elif not waiter.evicted:
                self._waiters.remove(waiter)
            raise
        if waiter.evicted:
            self.refused += 1
            raise GateFullError(1.0)

    def release(self) -> None:
        """Give a slot back; the best waiter gets it. Never blocks."""
        self._running -= 1
        self._dispatch(trio.current_time())

    def _dispatch(self, now: float) -> None:
        """Start the best waiters while there are slots they may use."""
        while self._waiters:
            best = min(self._waiters, key=lambda w: (self._usage_of(w.address, now), w.seq))
            if self._running >= self._limit(self._usage_of(best.address, now)):
                return
            self._waiters.remove(best)
            best.granted = True
            self._running += 1
            best.event.set()

    def _limit(self, usage: float) -> int:
        """Slots an address with this usage may start in: all but one unless it is light."""
        return self.slots if usage <= LIGHT else self._heavy_slots

    def _evict_worse_than(self, usage: float, now: float) -> bool:
        """Refuse the worst waiter if its address asked for more than `usage`; True if done."""
        if not self._waiters:
            return False
        worst = max(self._waiters, key=lambda w: (self._usage_of(w.address, now), w.seq))
        if self._usage_of(worst.address, now) <= usage:
            return False
        self._waiters.remove(worst)
        worst.evicted = True
        worst.event.set()
        return True

    # --- priority: how much an address asked for lately ----------------------------------------

    def _usage_of(self, address: str, now: float) -> float:
        usage = self._usage.get(address)
        if usage is None:
            return 0.0
        return usage.value * math.exp2(-(now - usage.updated) / self._half_life)

    def _charge(self, address: str, now: float) -> float:
        """Count one more request of `address`; return its decayed count, this one included."""
        usage = self._usage.pop(address, None)  # re-inserted last: dict order = recency
        if usage is None:
            if len(self._usage) >= self._max_tracked:
                self._prune(now)
            usage = _Usage(0.0, now)
        else:
            usage.value *= math.exp2(-(now - usage.updated) / self._half_life)
            usage.updated = now
        usage.value += 1.0
        self._usage[address] = usage
        return usage.value

    def _prune(self, now: float) -> None:
        waiting = {w.address for w in self._waiters}
        faded = [
            address
            for address, u in self._usage.items()
            if address not in waiting
            and u.value * math.exp2(-(now - u.updated) / self._half_life) < 0.5
        ]
        for address in faded:
            del self._usage[address]
        excess = len(self._usage) - self._max_tracked + 1
        for address in list(self._usage)[: max(0, excess)]:
            del self._usage[address]
