"""Backend slots and the fair queue through a whole gateway (tests/harness.py) over HTTP.

Rules: requests are held in flight with the emulator's `hold` gate and released by setting it,
so nothing depends on timing; queue states are awaited with `SlotPool.wait_until` and
`Emulator.wait_until` (re-checked on every change, no sleeping); `fail_after` is a hang guard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing

from nzgw.core.models import Limits
from nzgw.http.metrics import LiveCollector, render
from nzgw.services.slots import SlotPool
from nzgw.testing import Emulator, EmulatorSettings, open_emulator
from nzgw.testing._emu_config import Fault, default_models
from tests.harness import Harness, open_harness
from tests.metrics_samples import parse_exposition, sample_sum

CHAT: dict[str, Any] = {
    "model": "llama3",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": False,
}


# Discovery polls get min(interval, 5 s) to answer: a busy test machine must not take the
# emulator out of rotation in the middle of a test.
SLOW_DISCOVERY = 5.0


async def reached(emulator: Emulator, count: int, results: list[httpx.Response]) -> None:
    """Wait until `count` chats reached the emulator; fail at once if a request was answered
    without reaching it."""
    before = len(results)
    await emulator.wait_until(lambda: chats(emulator) >= count or len(results) > before)
    assert chats(emulator) == count, [r.text for r in results]


def held(hold: trio.Event) -> Any:
    return lambda i: EmulatorSettings(hold=hold)


def held_harness(tmp_path: Path, hold: trio.Event, **overrides: Any) -> Any:
    """One emulated backend (1 slot) whose generations wait for `hold`."""
    return open_harness(
        tmp_path, discovery_interval=SLOW_DISCOVERY, settings=held(hold), **overrides
    )


def two_backends(
    tmp_path: Path, settings: Callable[[int], EmulatorSettings], fields: dict[str, Any]
) -> Any:
    """Two emulated backends with the same `fields` (`"index"`: the backend's index)."""
    return open_harness(
        tmp_path,
        discovery_interval=SLOW_DISCOVERY,
        backends=2,
        settings=settings,
        backend_fields=lambda i: {k: i if v == "index" else v for k, v in fields.items()},
    )


async def hold_one(
    h: Harness, nursery: trio.Nursery, results: list[httpx.Response], key: str | None = None
) -> None:
    """Start a chat and wait until it holds the backend (its answer lands in `results`)."""
    nursery.start_soon(post, h, results, key)
    await reached(h.emulator, 1, results)


def chats(emulator: Emulator) -> int:
    """Inference requests the emulator received (discovery polls it too)."""
    return sum(1 for r in emulator.requests if r.path == "/api/chat")


def slots_of(h: Harness) -> SlotPool:
    pool = h.running.gateway.slots
    assert pool is not None
    return pool


async def post(
    h: Harness, results: list[httpx.Response], key: str | None = None, path: str = "/api/chat"
) -> None:
    auth = {"Authorization": f"Bearer {key}"} if key else h.auth
    results.append(await h.client.post(path, json=CHAT, headers=auth))


async def test_a_queued_request_counts_for_concurrency_and_pays_nothing_for_waiting(
    tmp_path: Path,
) -> None:
    """Decision: a request holds its concurrency lease from admission, also while it waits
    for a slot; waiting adds nothing to what it is charged."""
    hold = trio.Event()
    with trio.fail_after(60):
        async with held_harness(tmp_path, hold) as h:
            key = await h.new_key(name="two", limits=Limits(concurrent_requests=2))
            pool = slots_of(h)
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                await hold_one(h, nursery, results, key)
                nursery.start_soon(post, h, results, key)
                await pool.wait_until(lambda: pool.waiting == 1)
                third = await h.client.post("/api/chat", json=CHAT, headers=_auth(key))
                assert third.status_code == 429
                assert "concurrent requests" in third.json()["error"]
                assert chats(h.emulator) == 1  # the backend never had two at once
                hold.set()
            assert [r.status_code for r in results] == [200, 200]
            waits = [int(r.headers["x-queue-wait-ms"]) for r in results]
            scraped = parse_exposition(render(h.running.gateway.metrics).decode())
            assert sample_sum(scraped, "nzgw_queue_wait_seconds_count", tenant="acme") >= 2
            assert waits[0] == 0 and waits[1] >= 0
            infos = await h.wait_finished(3)
            answered = [i for i in infos if i.status == 200]
            assert len(answered) == 2
            assert answered[0].usage == answered[1].usage  # same prompt, same charge
            assert answered[1].queue_wait is not None
            refused = [i for i in infos if i.status == 429]
            assert [i.refusal for i in refused] == ["limit_concurrent_requests"]
            assert pool.in_flight("backend-0") == 0


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_queue_full_is_429_in_the_callers_shape(tmp_path: Path) -> None:
    hold = trio.Event()
    with trio.fail_after(60):
        async with held_harness(tmp_path, hold, queue_per_tenant=0) as h:
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                await hold_one(h, nursery, results)
                # /api/show reads metadata: it takes no slot, so it is answered at once.
                show = await h.client.post("/api/show", json={"model": "llama3"}, headers=h.auth)
                assert show.status_code == 200 and "x-queue-wait-ms" not in show.headers
                native = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
                openai = await h.client.post(
                    "/v1/chat/completions", json={**CHAT, "stream": True}, headers=h.auth
                )
                hold.set()
            assert results[0].status_code == 200
            assert native.status_code == 429 and int(native.headers["retry-after"]) >= 1
            assert set(native.json()) == {"error"} and "waiting" in native.json()["error"]
            assert openai.status_code == 429 and int(openai.headers["retry-after"]) >= 1
            assert openai.json()["error"]["code"] == "rate_limit_exceeded"
            for body in (native.text, openai.text):
                assert "backend" not in body and "127.0.0.1" not in body
            infos = await h.wait_finished(4)
            assert sorted(i.refusal or "" for i in infos) == ["", "", "queue_full", "queue_full"]
            assert chats(h.emulator) == 1


async def test_queue_timeout_is_503_with_retry_after_and_settles(tmp_path: Path) -> None:
    hold = trio.Event()
    with trio.fail_after(60):
        async with held_harness(tmp_path, hold, queue_timeout=0.2) as h:
            key = await h.new_key(name="one", limits=Limits(concurrent_requests=2))
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                await hold_one(h, nursery, results, key)
                timed_out = await h.client.post("/api/chat", json=CHAT, headers=_auth(key))
                assert timed_out.status_code == 503
                assert int(timed_out.headers["retry-after"]) >= 1
                assert timed_out.json() == {"error": "the model is busy, try again"}
                # It gave its concurrency lease back: with the first still running, the next
                # one is admitted again (it queues and times out too, instead of a 429).
                again = await h.client.post("/api/chat", json=CHAT, headers=_auth(key))
                assert again.status_code == 503 and "busy" in again.text
                hold.set()
            assert [r.status_code for r in results] == [200]
            infos = await h.wait_finished(3)
            assert sorted(i.refusal or "" for i in infos) == ["", "queue_timeout", "queue_timeout"]


async def test_a_client_that_leaves_while_queued_frees_its_place_at_once(
    tmp_path: Path,
) -> None:
    hold = trio.Event()
    with trio.fail_after(60):
        async with held_harness(tmp_path, hold) as h:
            pool = slots_of(h)
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                await hold_one(h, nursery, results)
                leaving = trio.CancelScope()

                async def leave() -> None:
                    with leaving:
                        await post(h, results)

                nursery.start_soon(leave)
                await pool.wait_until(lambda: pool.waiting == 1)
                live = LiveCollector()
                live.track_slots(pool)
                scraped = parse_exposition(render(h.running.gateway.metrics, live).decode())
                assert sample_sum(scraped, "nzgw_queue_depth", tenant="acme") == 1
                assert sample_sum(scraped, "nzgw_backend_slots_busy", backend="backend-0") == 1
                assert sample_sum(scraped, "nzgw_backend_slots", backend="backend-0") == 1
                leaving.cancel()  # the client closes its connection
                await pool.wait_until(lambda: pool.waiting == 0)
                scraped = parse_exposition(render(h.running.gateway.metrics, live).decode())
                assert sample_sum(scraped, "nzgw_queue_depth", tenant="acme") == 0
                hold.set()
            await post(h, results)
            assert [r.status_code for r in results] == [200, 200]
            assert chats(h.emulator) == 2  # the one that left never reached it
            infos = await h.wait_finished(3)
            assert sorted(i.outcome for i in infos) == ["cancelled", "ok", "ok"]
            assert pool.in_flight("backend-0") == 0


async def test_equal_backends_all_traffic_to_the_loaded_one_until_it_is_busy(
    tmp_path: Path,
) -> None:
    hold = trio.Event()

    def settings(i: int) -> EmulatorSettings:
        # llama3 is loaded (listed by /api/ps) on backend-1 only.
        models = [attrs.evolve(m, loaded=i == 1) for m in default_models()]
        return EmulatorSettings(models=models, hold=hold)

    with trio.fail_after(60):
        async with two_backends(tmp_path, settings, {"parallel": 2, "priority": 0}) as h:
            cold, warm = h.emulators
            pool = slots_of(h)
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(post, h, results)
                await warm.wait_until(lambda: chats(warm) == 2)
                assert not chats(cold)  # all traffic to the loaded one...
                nursery.start_soon(post, h, results)
                await cold.wait_until(lambda: chats(cold) == 1)  # ...until it is busy
                assert pool.in_flight("backend-1") == 2 and pool.in_flight("backend-0") == 1
                hold.set()
            assert [r.status_code for r in results] == [200] * 3
            assert pool.in_flight("backend-0") == pool.in_flight("backend-1") == 0


async def test_failover_across_tiers_releases_every_slot(tmp_path: Path) -> None:
    def settings(i: int) -> EmulatorSettings:
        return EmulatorSettings(model_faults={"*": Fault.HTTP_500} if i == 0 else {})

    with trio.fail_after(60):
        async with two_backends(tmp_path, settings, {"priority": "index"}) as h:
            pool = slots_of(h)
            response = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
            assert response.status_code == 200
            assert chats(h.emulators[0]) == chats(h.emulators[1]) == 1
            infos = await h.wait_finished(1)
            assert infos[-1].backend == "backend-1"
            assert pool.in_flight("backend-0") == pool.in_flight("backend-1") == 0


async def test_the_emulator_runs_num_parallel_generations_first_come_first_served() -> None:
    hold = trio.Event()
    settings = EmulatorSettings(num_parallel=2, hold=hold)
    with trio.fail_after(60):
        async with open_emulator(settings) as emulator, httpx.AsyncClient() as client:
            results: list[int] = []

            async def one() -> None:
                response = await client.post(f"{emulator.url}/api/chat", json=CHAT)
                results.append(response.status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
                await emulator.wait_until(lambda: chats(emulator) == 4)
                await trio.testing.wait_all_tasks_blocked()
                assert emulator.generating == 2  # two wait for a slot, as in Ollama
                hold.set()
            assert results == [200] * 4
            assert emulator.peak_generating == 2 and emulator.generating == 0


async def test_never_more_in_flight_on_a_backend_than_its_slots(tmp_path: Path) -> None:
    hold = trio.Event()
    with trio.fail_after(60):
        async with open_harness(
            tmp_path,
            discovery_interval=SLOW_DISCOVERY,
            settings=lambda i: EmulatorSettings(hold=hold, num_parallel=100),
            backend_fields=lambda i: {"parallel": 2},
        ) as h:
            pool = slots_of(h)
            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(post, h, results)
                await pool.wait_until(lambda: pool.waiting == 8)
                await h.emulator.wait_until(lambda: chats(h.emulator) == 2)
                hold.set()
            assert [r.status_code for r in results] == [200] * 10
            assert chats(h.emulator) == 10
            assert h.emulator.peak_generating == 2  # the other 8 waited in nzgw, not in Ollama
