"""Issue #14, finding 1: Argon2id work has a global bound, and a flood from many addresses cannot
keep an honest client's cold key waiting or refused.

Rules: the gate's own tests run on virtual time (`MockClock(autojump_threshold=0)`); the flood
runs on the real clock (Argon2id runs in worker threads, which an autojumping clock would jump
over) with a cache trusted for an hour, under a generous `fail_after` hang guard. The store is
the in-memory fake of `tests/test_identity.py`; cold verifications are held inside the gate by
closing the fake store's `gate` (its `find_key` waits), so the queue is observed in a known
state and the ORDER in which verifications start is asserted, never a duration. The timing
figure is the benchmark's (`bench/auth_bench.py --flood`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from nzgw.core.keys import generate_key
from nzgw.core.models import Principal
from nzgw.http.metrics import render
from nzgw.ports import Store
from nzgw.services.coldgate import ColdGate, GateFullError
from nzgw.services.identity import (
    AuthBusyError,
    AuthenticationError,
    Authenticator,
    KeyHasher,
)
from tests.harness import Harness, open_harness
from tests.metrics_samples import parse_exposition, sample_sum
from tests.test_audit import CHAT, flushed_rows
from tests.test_identity import FAST, FakeStore, WallClock, counting

ADDRESSES = [f"127.0.0.{i}" for i in range(2, 62)]  # 60 loopback source addresses
PER_ADDRESS = 20
SLOTS = 2
QUEUE_MAX = 8


class OrderedStore(FakeStore):
    """Records the order in which verifications reach the store (inside the gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    async def find_key(self, prefix: str) -> Principal | None:
        self.order.append(prefix)
        return await super().find_key(prefix)


@pytest.fixture
def events() -> collections.Counter[str]:
    """What the fixture's authenticator reported (AuthEvent values)."""
    return collections.Counter()


@pytest.fixture
def flood_auth(
    events: collections.Counter[str],
) -> Iterator[tuple[OrderedStore, Authenticator, KeyHasher]]:
    store = OrderedStore()
    hasher = KeyHasher(FAST)
    auth = Authenticator(
        cast(Store, store),
        hasher=hasher,
        max_concurrency=SLOTS,
        queue_max=QUEUE_MAX,
        cache_ttl=600.0,
        fail_limit=PER_ADDRESS,
        max_staleness=3600.0,
        wall_clock=WallClock(),
        events=counting(events),
    )
    yield store, auth, hasher


async def test_the_flood_is_bounded_and_a_new_client_goes_first(
    flood_auth: tuple[OrderedStore, Authenticator, KeyHasher],
    events: collections.Counter[str],
) -> None:
    store, auth, hasher = flood_auth
    cached = store.add(hasher)
    cold = store.add(hasher)
    auth.epoch_observed(0, trio.current_time())
    await auth.authenticate(cached, "192.0.2.50")  # warm: in the cache from now on
    outcomes: dict[str, int] = {"refused": 0, "busy": 0}

    async def attempt(address: str) -> None:
        try:
            await auth.authenticate(generate_key()[0], address)
        except AuthBusyError as exc:
            assert exc.retry_after >= 1.0
            outcomes["busy"] += 1
        except AuthenticationError:
            outcomes["refused"] += 1

    with trio.fail_after(60):
        store.gate = trio.Event()  # hold the verifications that get a slot
        async with trio.open_nursery() as nursery:
            for address in ADDRESSES:  # 60 × 20 wrong keys, all at once
                for _ in range(PER_ADDRESS):
                    nursery.start_soon(attempt, address)
            await trio.testing.wait_all_tasks_blocked()
            # The bound: SLOTS running, QUEUE_MAX waiting, every other attempt refused at once.
            assert (auth.gate.running, auth.gate.waiting) == (SLOTS, QUEUE_MAX)
            assert outcomes["busy"] == len(ADDRESSES) * PER_ADDRESS - SLOTS - QUEUE_MAX
            # A busy gateway is not the client's fault: the throttle allowance was given back.
            assert events["throttled"] == 0
            # Cached keys are unaffected.
            hits = events["cache_hit"]
            assert (await auth.authenticate(cached, "192.0.2.50")).key.prefix == cached[:11]
            assert events["cache_hit"] == hits + 1
            # A valid cold key from an address that has not been failing: admitted (a flooder
            # is refused in its place) and verified next, before any queued flooder.
            result: list[Principal] = []

            async def honest() -> None:
                result.append(await auth.authenticate(cold, "127.0.0.200"))

            nursery.start_soon(honest)
            await trio.testing.wait_all_tasks_blocked()
            assert auth.gate.waiting == QUEUE_MAX
            started = len(store.order)
            store.gate.set()
        assert result and result[0].key.prefix == cold[:11]
        assert store.order[started - SLOTS :].index(cold[:11]) == SLOTS  # right after those running
        assert auth.gate.running == 0 and auth.gate.waiting == 0


async def test_the_gate_hands_a_slot_on_when_a_waiter_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ColdGate(1, 4)
    order: list[str] = []

    async def verify(address: str, hold: trio.Event) -> None:
        await gate.acquire(address)
        try:
            order.append(address)
            await hold.wait()
        finally:
            gate.release()

    with trio.fail_after(10):
        hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify, "a", hold)
            await trio.testing.wait_all_tasks_blocked()
            # A waiter that goes away while waiting holds nothing.
            doomed = trio.CancelScope()
            nursery.start_soon(_cancelled_waiter, gate, doomed)
            await trio.testing.wait_all_tasks_blocked()
            assert gate.waiting == 1
            doomed.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert gate.waiting == 0
            nursery.start_soon(verify, "b", hold)
            await trio.testing.wait_all_tasks_blocked()
            hold.set()
        assert order == ["a", "b"] and gate.running == 0


async def _cancelled_waiter(gate: ColdGate, scope: trio.CancelScope) -> None:
    with scope:
        await gate.acquire("c")
        gate.release()  # pragma: no cover (cancelled before a slot)


async def test_a_full_queue_refuses_equals_and_takes_better_newcomers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ColdGate(1, 1)
    hold = trio.Event()
    refused: list[str] = []

    async def verify(address: str) -> None:
        try:
            await gate.acquire(address)
        except GateFullError:
            refused.append(address)
            return
        try:
            await hold.wait()
        finally:
            gate.release()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for address in ("x", "x", "x"):  # running, waiting, refused (3 is not fewer than 3)
                nursery.start_soon(verify, address)
                await trio.testing.wait_all_tasks_blocked()
            assert refused == ["x"]
            nursery.start_soon(verify, "new")  # 1 < 3: takes the waiter's place
            await trio.testing.wait_all_tasks_blocked()
            assert refused == ["x", "x"] and gate.waiting == 1
            nursery.start_soon(verify, "other")  # 1 is not fewer than 1: refused
            await trio.testing.wait_all_tasks_blocked()
            assert refused == ["x", "x", "other"]
            hold.set()
        assert gate.refused == 3 and gate.running == 0 and gate.waiting == 0


async def test_over_http_a_full_queue_is_503_with_retry_after_and_audited(tmp_path: Path) -> None:
    async with open_harness(tmp_path, argon2_max_concurrency=1, auth_queue_max=0) as h:
        gate = h.running.authenticator.gate
        with trio.fail_after(30):
            cold = await h.new_key(name="cold")
            bearer = {"Authorization": f"Bearer {cold}"}
            await caught_up(h)  # the creations seen: nothing will drop cache entries now
            await h.client.post("/api/chat", json=CHAT, headers=h.auth)  # cached from now on
            await gate.acquire("203.0.113.9")  # the only slot: a verification in progress
            try:
                answers = [
                    await h.client.post(path, json=CHAT, headers=bearer)
                    for path in ("/api/chat", "/v1/chat/completions", "/v1/messages")
                ]
                cached = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
            finally:
                gate.release()
            again = await h.client.post("/api/chat", json=CHAT, headers=bearer)
            rows = await flushed_rows(h, 6)
        for answer in answers:
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert "www-authenticate" not in answer.headers
        assert answers[0].json() == {"error": "service busy, try again"}
        assert answers[1].json()["error"]["message"] == "service busy, try again"
        assert answers[2].json()["type"] == "error"
        assert cached.status_code == 200 and again.status_code == 200
        refused = [r.event for r in rows if r.event.refusal == "auth_busy"]
        assert [(e.status, e.outcome) for e in refused] == [(503, "refused")] * 3
        samples = parse_exposition(render(h.running.gateway.metrics).decode())
        assert sample_sum(samples, "nzgw_auth_events_total", event="busy") == 3
        # Not counted against the client.
        assert sample_sum(samples, "nzgw_auth_events_total", event="failure") == 0


async def caught_up(h: Harness) -> None:
    """Wait until the gateway's revocation watch has read every change made so far."""
    epoch = await h.running.store.revocation_epoch()
    # The watch has no event to wait on: poll its position (the caller holds a fail_after).
    while (h.running.authenticator.feed_position or -1) < epoch:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def test_a_flooding_address_never_holds_the_last_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ColdGate(2, 8)
    started: list[str] = []
    holds: dict[int, trio.Event] = {}

    async def verify(n: int, address: str) -> None:
        await gate.acquire(address)
        try:
            started.append(address)
            holds[n] = trio.Event()
            await holds[n].wait()
        finally:
            gate.release()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(6):  # x asks 6 times: light for its first 3, then heavy
                nursery.start_soon(verify, n, "x")
                await trio.testing.wait_all_tasks_blocked()
            assert started == ["x", "x"] and gate.waiting == 4
            holds[0].set()
            await trio.testing.wait_all_tasks_blocked()
            # x is heavy now: it may not take the freed slot, which stays for a light address.
            assert started == ["x", "x"] and gate.running == 1
            nursery.start_soon(verify, 6, "y")
            await trio.testing.wait_all_tasks_blocked()
            assert started == ["x", "x", "y"] and gate.running == 2
            while gate.running or gate.waiting:  # let everything finish
                for event in list(holds.values()):
                    event.set()
                await trio.testing.wait_all_tasks_blocked()
        assert started.count("x") == 6 and gate.running == 0
