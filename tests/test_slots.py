"""Backend slots and the tenant-fair queue (`nzgw.services.slots`) on virtual time.

Rules: every test runs on `MockClock(autojump_threshold=0)` (time only moves when every task
waits), so waits are asserted exactly, never against the wall clock; `fail_after` is only a
hang guard. "Service time" is how long a simulated request holds its slot.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio.testing

from nzgw.services.slots import QueueFullError, QueueTimeoutError, Slot, SlotPool

SERVICE = 1.0  # seconds one request holds its slot


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def pool(
    parallel: dict[str, int],
    *,
    queue_timeout: float = 1000.0,
    per_tenant: int = 1000,
    is_loaded: Callable[[str, str], bool] = lambda b, m: False,
) -> SlotPool:
    return SlotPool(
        parallel, queue_timeout=queue_timeout, per_tenant=per_tenant, is_loaded=is_loaded
    )


class Load:
    """Tenants sending requests in closed loops; records waits, slot-time and peak in-flight."""

    def __init__(self, slots: SlotPool, backends: list[str]) -> None:
        self.slots = slots
        self.backends = backends
        self.waits: dict[str, list[float]] = {}
        self.used: dict[str, float] = {}
        self.peak: dict[str, int] = dict.fromkeys(backends, 0)
        self.until = 0.0
        self.start_counting = 0.0

    async def client(self, tenant: str, weight: float, *, think: float = 0.0) -> None:
        while trio.current_time() < self.until:
            asked = trio.current_time()
            slot = await self.slots.acquire(
                tenant, weight=weight, backends=self.backends, model="m", label=tenant
            )
            self.waits.setdefault(tenant, []).append(trio.current_time() - asked)
            assert slot.waited == pytest.approx(trio.current_time() - asked)
            for name in self.backends:
                self.peak[name] = max(self.peak[name], self.slots.in_flight(name))
            await trio.sleep(SERVICE)
            if trio.current_time() > self.start_counting:
                self.used[tenant] = self.used.get(tenant, 0.0) + SERVICE
            slot.release()
            if think:
                await trio.sleep(think)


@pytest.mark.parametrize(
    ("parallel", "think", "joins_at"),
    [(1, 0.0, 3.5), (2, 0.0, 3.5), (4, 0.0, 3.5), (2, 3.3, 2.25)],
)
async def test_interactive_tenant_waits_at_most_one_service_time_beside_a_flood(
    autojump_clock: trio.testing.MockClock, parallel: int, think: float, joins_at: float
) -> None:
    slots = pool({"gpu": parallel})
    load = Load(slots, ["gpu"])
    load.until = 500.0
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(load.client, "flood", 1.0)
            await trio.sleep(joins_at)  # the flood has the backend and a deep queue
            nursery.start_soon(partial(load.client, "chat", 1.0, think=think))
    chat = load.waits["chat"]
    assert len(chat) >= 100
    # An idle system answers at once; beside the flood, the interactive tenant waits for the
    # next slot to free and then goes first: never more than one service time. With think
    # time it arrives at odd moments and still never waits behind a flood request.
    assert max(chat) <= SERVICE
    # Under FIFO it would wait behind the ~50 queued flood requests every time.
    assert max(load.waits["flood"]) >= 40 * SERVICE / parallel
    assert load.peak["gpu"] == parallel  # never more in flight than the slots


@pytest.mark.parametrize(
    ("weights", "parallel"),
    [({"a": 1, "b": 1}, 1), ({"a": 3, "b": 1}, 4), ({"a": 1, "b": 2, "c": 5}, 3)],
)
async def test_long_run_share_of_slots_matches_weights(
    autojump_clock: trio.testing.MockClock, weights: dict[str, float], parallel: int
) -> None:
    slots = pool({"gpu": parallel})
    load = Load(slots, ["gpu"])
    load.until = 2000.0
    load.start_counting = 20.0
    with trio.fail_after(100_000):
        async with trio.open_nursery() as nursery:
            for tenant, weight in weights.items():
                for _ in range(20):  # every tenant floods
                    nursery.start_soon(load.client, tenant, weight)
    total = sum(load.used.values())
    for tenant, weight in weights.items():
        target = weight / sum(weights.values())
        assert abs(load.used[tenant] / total - target) <= 0.05 * target, (tenant, load.used)


async def test_a_client_that_leaves_gives_its_place_back_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = pool({"gpu": 1})
    holder = await slots.acquire("a", weight=1, backends=["gpu"], model="m")
    got: dict[str, Slot] = {}

    async def wait(name: str, tenant: str, scope: trio.CancelScope) -> None:
        with scope:
            got[name] = await slots.acquire(tenant, weight=1, backends=["gpu"], model="m")

    leaving, staying = trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "leaving", "a", leaving)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "staying", "b", staying)
            await trio.testing.wait_all_tasks_blocked()
            assert slots.waiting == 2
            leaving.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert slots.waiting == 1  # its place is free at once, not at a timeout
            assert slots.waiting_by_label() == {"": 1}
            holder.release()
            await trio.testing.wait_all_tasks_blocked()
            assert "staying" in got and "leaving" not in got
            assert got["staying"].waited == 0.0  # virtual time never moved
            got["staying"].release()
    assert slots.in_flight("gpu") == 0 and slots.waiting == 0


async def test_a_slot_granted_to_a_client_that_just_left_goes_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = pool({"gpu": 1})
    holder = await slots.acquire("a", weight=1, backends=["gpu"], model="m")
    got: list[Slot] = []
    scope = trio.CancelScope()

    async def wait(tenant: str, cancel: trio.CancelScope | None) -> None:
        with cancel or trio.CancelScope():
            got.append(await slots.acquire(tenant, weight=1, backends=["gpu"], model="m"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "b", scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "c", None)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # b's client leaves; before its task runs again...
            holder.release()  # ...the slot is granted to its waiter, still in the queue
            await trio.testing.wait_all_tasks_blocked()
            assert len(got) == 1 and got[0].tenant == "c"  # b's slot went on to c
            assert slots.in_flight("gpu") == 1
            got[0].release()
    assert slots.in_flight("gpu") == 0


async def test_queue_timeout_and_per_tenant_queue_length(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = pool({"gpu": 1}, queue_timeout=7.0, per_tenant=2)
    holder = await slots.acquire("a", weight=1, backends=["gpu"], model="m")
    outcomes: list[tuple[str, float]] = []

    async def wait(tenant: str) -> None:
        try:
            await slots.acquire(tenant, weight=1, backends=["gpu"], model="m")
        except QueueFullError:
            outcomes.append(("full", trio.current_time()))
        except QueueTimeoutError as exc:
            assert exc.retry_after >= 1
            outcomes.append(("timeout", trio.current_time()))

    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wait, "b")
                await trio.testing.wait_all_tasks_blocked()
            assert outcomes == [("full", start)]  # the third of b is refused at once
            nursery.start_soon(wait, "c")  # another tenant still queues
    assert sorted(outcomes) == [
        ("full", start),
        ("timeout", start + 7.0),
        ("timeout", start + 7.0),
        ("timeout", start + 7.0),
    ]
    assert slots.waiting == 0
    holder.release()
    assert slots.in_flight("gpu") == 0


async def test_equal_backends_prefer_the_loaded_one_until_it_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = pool({"cold": 2, "warm": 2}, is_loaded=lambda b, m: b == "warm")
    both = ["cold", "warm"]
    first = [await slots.acquire("a", weight=1, backends=both, model="m") for _ in range(2)]
    assert [s.backend for s in first] == ["warm", "warm"]
    third = await slots.acquire("a", weight=1, backends=both, model="m")
    assert third.backend == "cold"  # the loaded one is busy: the other takes it
    first[0].release()
    fourth = await slots.acquire("a", weight=1, backends=both, model="m")
    assert fourth.backend == "warm"
    # Nothing loaded anywhere: fewest in flight, then configuration order.
    plain = pool({"x": 2, "y": 2})
    picks = [
        (await plain.acquire("a", weight=1, backends=["x", "y"], model="m")).backend
        for _ in range(4)
    ]
    assert picks == ["x", "y", "x", "y"]


async def test_a_waiter_gets_a_slot_only_on_its_own_backends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = pool({"a": 1, "b": 1})
    on_a = await slots.acquire("t1", weight=1, backends=["a"], model="m")
    on_b = await slots.acquire("t1", weight=1, backends=["b"], model="m")
    got: list[str] = []

    async def wait(tenant: str, backends: list[str]) -> None:
        got.append((await slots.acquire(tenant, weight=1, backends=backends, model="m")).backend)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "t1", ["a"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "t2", ["b"])
            await trio.testing.wait_all_tasks_blocked()
            on_b.release()  # t1 is first in line but cannot use b: t2 gets it
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["b"]
            on_a.release()
    assert got == ["b", "a"]
