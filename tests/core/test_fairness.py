"""The tenant-fair queue and the choice among equal backends, synchronously.

Rules: no Trio; a "slot" is simulated by hand (grant with `pop`, release with `settle`), the
clock is a float. Shares are measured in slot-time, as the queue charges it.
"""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nzgw.core.balance import Option, choose, tiers
from nzgw.core.fairness import FairQueue


def simulate(
    weights: dict[str, float],
    service: dict[str, float],
    *,
    slots: int,
    horizon: float,
) -> dict[str, float]:
    """Every tenant always has requests waiting; return each tenant's slot-time up to horizon."""
    queue: FairQueue[str, int] = FairQueue()
    for tenant, weight in weights.items():
        for n in range(3):
            queue.push(tenant, n, weight=weight)
    used = dict.fromkeys(weights, 0.0)
    running: list[tuple[float, str]] = []
    now = 0.0
    free = slots
    while now < horizon:
        while free:
            popped = queue.pop(cost=1.0)
            assert popped is not None
            tenant, _ = popped
            queue.push(tenant, 0, weight=weights[tenant])  # the flood never ends
            heapq.heappush(running, (now + service[tenant], tenant))
            free -= 1
        now, tenant = heapq.heappop(running)
        used[tenant] += service[tenant]
        queue.settle(tenant, provisional=1.0, actual=service[tenant])
        free += 1
    return used


@pytest.mark.parametrize(
    ("weights", "service", "slots"),
    [
        ({"a": 1, "b": 1}, {"a": 1.0, "b": 1.0}, 1),
        ({"a": 3, "b": 1}, {"a": 1.0, "b": 1.0}, 2),
        ({"a": 1, "b": 1}, {"a": 4.0, "b": 1.0}, 4),  # long requests cost more, not more turns
        ({"a": 2, "b": 1, "c": 1}, {"a": 0.5, "b": 2.0, "c": 1.0}, 3),
    ],
)
def test_long_run_slot_time_matches_weights(
    weights: dict[str, float], service: dict[str, float], slots: int
) -> None:
    used = simulate(weights, service, slots=slots, horizon=5000.0)
    total = sum(used.values())
    for tenant, weight in weights.items():
        share = used[tenant] / total
        target = weight / sum(weights.values())
        assert abs(share - target) <= 0.05 * target, (tenant, share, target)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 8), min_size=2, max_size=4),
    slots=st.integers(1, 4),
)
def test_shares_match_any_weights(weights: list[int], slots: int) -> None:
    named = {f"t{i}": float(w) for i, w in enumerate(weights)}
    used = simulate(named, dict.fromkeys(named, 1.0), slots=slots, horizon=3000.0)
    total = sum(used.values())
    for tenant, weight in named.items():
        target = weight / sum(named.values())
        assert abs(used[tenant] / total - target) <= 0.05 * target + 0.002


def test_a_tenant_arriving_late_goes_before_a_flood() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for n in range(50):
        queue.push("flood", f"f{n}", weight=1)
    for _ in range(10):  # the flood has been served for a while
        popped = queue.pop(cost=1.0)
        assert popped is not None
        queue.settle(popped[0], provisional=1.0, actual=1.0)
    queue.push("chat", "c0", weight=1)
    assert queue.pop(cost=1.0) == ("chat", "c0")


def test_idle_tenant_banks_no_credit() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for n in range(20):
        queue.push("a", f"a{n}", weight=1)
    for _ in range(10):
        popped = queue.pop(cost=1.0)
        assert popped is not None
        queue.settle("a", provisional=1.0, actual=1.0)
    # b was idle all along: it goes first once, then they alternate (no burst of 10 for b).
    for n in range(5):
        queue.push("b", f"b{n}", weight=1)
    got = []
    for _ in range(6):
        popped = queue.pop(cost=1.0)
        assert popped is not None
        got.append(popped[0])
        queue.settle(popped[0], provisional=1.0, actual=1.0)
    assert got == ["b", "a", "b", "a", "b", "a"]


def test_remove_gives_the_place_back_and_charges_nothing() -> None:
    queue: FairQueue[str, str] = FairQueue()
    queue.push("a", "a0", weight=1)
    queue.push("a", "a1", weight=1)
    queue.push("b", "b0", weight=1)
    assert queue.remove("a", "a0")
    assert not queue.remove("a", "a0")
    assert queue.depths() == {"a": 1, "b": 1}
    assert len(queue) == 2
    # a was charged nothing for a0: equal tags, and a1 arrived before b0
    assert queue.pop(cost=1.0) == ("a", "a1")
    assert queue.pop(cost=1.0) == ("b", "b0")
    assert queue.pop(cost=1.0) is None


def test_pop_skips_ineligible_requests_without_losing_their_place() -> None:
    queue: FairQueue[str, str] = FairQueue()
    queue.push("a", "a-only-x", weight=1)
    queue.push("a", "a-any", weight=1)
    queue.push("b", "b-any", weight=1)
    assert queue.pop(cost=1.0, eligible=lambda item: item.endswith("any")) == ("a", "a-any")
    assert queue.pop(cost=1.0) == ("b", "b-any")
    assert queue.pop(cost=1.0) == ("a", "a-only-x")


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FairQueue[str, str]().push("a", "x", weight=0)


def test_choose_prefers_loaded_then_fewest_in_flight_then_position() -> None:
    assert choose([]) is None
    assert choose([Option(0, True, 1, False)]) is None
    options = [
        Option(0, False, 0, True),
        Option(1, True, 3, True),
        Option(2, True, 1, True),
        Option(3, True, 1, True),
    ]
    assert choose(options) == 2
    assert choose([Option(0, False, 2, True), Option(1, False, 1, True)]) == 1
    assert choose([Option(0, False, 1, True), Option(1, False, 1, True)]) == 0
    # the loaded one is busy: the cold one with a free slot is taken
    assert choose([Option(0, True, 2, False), Option(1, False, 0, True)]) == 1


def test_tiers_group_by_priority_keeping_order() -> None:
    items = [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 5)]
    assert tiers(items, lambda item: item[1]) == [
        [("b", 0), ("d", 0)],
        [("a", 1), ("c", 1)],
        [("e", 5)],
    ]
    assert tiers([], lambda item: 0) == []
