"""Discovery: tick timing on virtual time with fake backends, then against real emulators.

Rules:
- Timing tests run on `MockClock(autojump_threshold=0)` (pytest-trio's `autojump_clock`) and
  assert exact virtual times. No sleep is used to synchronise: fake backends decide what to do
  from the virtual time of each call, and the registry records when each round was published.
- The emulator tests run three in-process Ollama emulators (`nzgw.testing`) on real time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from nzgw.adapters.ollama import OllamaBackend, open_backends
from nzgw.config import BackendConfig
from nzgw.ports import UpstreamError
from nzgw.services.discovery import poll_backend, poll_once, run_discovery
from nzgw.services.registry import Registry, Snapshot
from nzgw.testing import (
    EmulatedModel,
    Emulator,
    EmulatorSettings,
    Fault,
    model_named,
    open_emulator,
)

INTERVAL = 10.0
POLL_TIMEOUT = 2.0


def tag(name: str, digest: str = "a" * 64) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": "2026-01-01T00:00:00Z", "digest": digest}


class FakeBackend:
    """A backend whose behaviour is a function of the virtual time of each call.

    `mode(now)` returns "ok", "fail" (UpstreamError), "stall" (never answers) or "slow"
    (answers after `delay` seconds).
    """

    def __init__(
        self,
        name: str,
        models: list[str] | None = None,
        *,
        mode: Callable[[float], str] = lambda _now: "ok",
        delay: float = 0.0,
        broken_paths: tuple[str, ...] = (),
        stalled_paths: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.models = [tag(m) for m in models or []]
        self.mode = mode
        self.delay = delay
        self.broken_paths = broken_paths
        self.stalled_paths = stalled_paths
        self.calls: list[tuple[float, str]] = []

    def tick_times(self) -> list[float]:
        return [t for t, path in self.calls if path == "/api/tags"]

    async def get_json(self, path: str) -> Any:
        now = trio.current_time()
        self.calls.append((now, path))
        mode = self.mode(now)
        if mode == "stall" or path in self.stalled_paths:
            await trio.sleep_forever()
        if mode == "slow":
            await trio.sleep(self.delay)
        if mode == "fail" or path in self.broken_paths:
            raise UpstreamError("ConnectError: [Errno 111] Connection refused")
        if path == "/api/tags":
            return {"models": self.models}
        if path == "/api/ps":
            return {"models": []}
        if path == "/api/version":
            return {"version": "0.33.0"}
        raise AssertionError(path)


class RecordingRegistry(Registry[FakeBackend]):
    def __init__(self, backends: list[FakeBackend], **kwargs: Any) -> None:
        super().__init__(backends, **kwargs)
        self.published: list[tuple[float, Snapshot]] = []

    def publish(self, snapshot: Snapshot) -> None:
        self.published.append((trio.current_time(), snapshot))
        super().publish(snapshot)

    def health_at(self, index: int) -> dict[str, bool]:
        return {s.name: s.healthy for s in self.published[index][1].backends}


async def start(
    nursery: trio.Nursery,
    backends: list[FakeBackend],
    *,
    interval: float = INTERVAL,
    poll_timeout: float = POLL_TIMEOUT,
) -> RecordingRegistry:
    registry = RecordingRegistry(backends)
    await nursery.start(
        lambda task_status: run_discovery(
            registry,
            backends,
            interval=interval,
            poll_timeout=poll_timeout,
            task_status=task_status,
        )
    )
    return registry


def between(start: float, stop: float, inside: str) -> Callable[[float], str]:
    return lambda now: inside if start <= now < stop else "ok"


# --- timing on virtual time -----------------------------------------------------------------


async def test_started_only_after_the_first_round(autojump_clock: trio.testing.MockClock) -> None:
    slow = FakeBackend("slow", ["m"], mode=lambda _now: "slow", delay=1.5)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        registry = await start(nursery, [slow])
        assert trio.current_time() == t0 + 1.5
        assert [t for t, _ in registry.published] == [t0 + 1.5]
        assert registry.snapshot.taken_at == t0
        assert registry.ready()
        assert registry.candidates("m:latest") == [slow]
        nursery.cancel_scope.cancel()


async def test_started_even_when_every_backend_is_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dead = FakeBackend("dead", mode=lambda _now: "fail")
    async with trio.open_nursery() as nursery:
        registry = await start(nursery, [dead])
        assert not registry.ready()
        assert registry.snapshot.backends[0].error == "upstream"
        nursery.cancel_scope.cancel()


async def test_ticks_on_a_fixed_schedule(autojump_clock: trio.testing.MockClock) -> None:
    fast = FakeBackend("fast", ["m"])
    slow = FakeBackend("slow", ["m"], mode=lambda _now: "slow", delay=1.5)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        registry = await start(nursery, [fast, slow])
        await trio.sleep_until(t0 + 35)
        nursery.cancel_scope.cancel()
    # Rounds start at t0 + k * interval, not at end of the previous round + interval.
    expected = [t0, t0 + 10, t0 + 20, t0 + 30]
    assert fast.tick_times() == expected
    assert slow.tick_times() == expected
    assert [t for t, _ in registry.published] == [t + 1.5 for t in expected]
    # Each round polls the three endpoints of every backend at the same instant.
    assert sorted(p for t, p in fast.calls if t == t0) == ["/api/ps", "/api/tags", "/api/version"]


async def test_a_stalled_backend_cannot_delay_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fast = FakeBackend("fast", ["m"])
    stalled = FakeBackend("stalled", ["m"], mode=lambda _now: "stall")
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        registry = await start(nursery, [stalled, fast])
        assert trio.current_time() == t0 + POLL_TIMEOUT
        await trio.sleep_until(t0 + 25)
        nursery.cancel_scope.cancel()
    assert [t for t, _ in registry.published] == [t0 + 2, t0 + 12, t0 + 22]
    assert fast.tick_times() == [t0, t0 + 10, t0 + 20]
    for _, snapshot in registry.published:
        fast_state, stalled_state = snapshot.by_name["fast"], snapshot.by_name["stalled"]
        assert fast_state.healthy and fast_state.latency == 0.0
        assert not stalled_state.healthy and stalled_state.error == "timeout"
    assert registry.candidates("m:latest") == [fast]


async def test_down_then_back_within_one_tick(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    flaky = FakeBackend("flaky", ["m"], mode=between(t0 + 15, t0 + 35, "fail"))
    other = FakeBackend("other", ["m"])
    async with trio.open_nursery() as nursery:
        registry = await start(nursery, [flaky, other])
        await trio.sleep_until(t0 + 45)
        nursery.cancel_scope.cancel()
    # Down from t0+15: the round at t0+20 marks it down; back at t0+35: the round at t0+40
    # puts it back in rotation.
    times = [t - t0 for t, _ in registry.published]
    assert times == [0, 10, 20, 30, 40]
    assert [registry.health_at(i)["flaky"] for i in range(5)] == [True, True, False, False, True]
    down_state = registry.published[2][1].by_name["flaky"]
    assert down_state.error == "upstream" and "refused" in down_state.detail
    # While down it kept its last known list: hosts, but not a candidate.
    assert down_state.models.keys() == {"m:latest"}
    assert registry.candidates("m:latest") == [flaky, other]


async def test_overrunning_rounds_skip_missed_ticks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled = FakeBackend("stalled", mode=lambda _now: "stall")
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await start(nursery, [stalled], interval=10, poll_timeout=25)
        await trio.sleep_until(t0 + 65)
        nursery.cancel_scope.cancel()
    assert stalled.tick_times() == [t0, t0 + 30, t0 + 60]


async def test_breaker_closes_after_a_round_started_after_the_trip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = FakeBackend("slow", ["m"], mode=lambda _now: "slow", delay=1.0)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        registry = await start(nursery, [slow])
        await trio.sleep_until(t0 + 10.5)  # the round of t0+10 is in flight
        for _ in range(3):
            registry.record_failure("slow")
        assert not registry.ready()
        await trio.sleep_until(t0 + 11.5)  # that round was published: proves nothing
        assert [t - t0 for t, _ in registry.published] == [1, 11]
        assert not registry.ready()
        await trio.sleep_until(t0 + 21.5)  # the round of t0+20 started after the trip
        assert registry.ready()
        nursery.cancel_scope.cancel()


async def test_cancelled_round_publishes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    slow = FakeBackend("slow", ["m"], mode=lambda now: "slow" if now > t0 else "ok", delay=1.0)
    registry = RecordingRegistry([slow])
    with trio.move_on_after(10.5):
        await run_discovery(registry, [slow], interval=10, poll_timeout=5)
    assert len(registry.published) == 1


async def test_version_is_informational(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend("b", ["m"], broken_paths=("/api/version",))
    state = await poll_backend(backend, poll_timeout=1)
    assert state.healthy and state.version is None
    backend = FakeBackend("b", ["m"], broken_paths=("/api/ps",))
    state = await poll_backend(backend, poll_timeout=1)
    assert not state.healthy and state.error == "upstream"
    assert state.detail.startswith("/api/ps: ")


async def test_a_failed_endpoint_ends_the_poll_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    for broken, stalled in [("/api/tags", "/api/ps"), ("/api/ps", "/api/tags")]:
        backend = FakeBackend(
            "b", ["m"], broken_paths=(broken,), stalled_paths=("/api/version", stalled)
        )
        state = await poll_backend(backend, poll_timeout=5)
        assert trio.current_time() == t0
        assert state.error == "upstream" and state.detail.startswith(f"{broken}: ")
    # A stalled /api/version alone costs the poll its timeout but not the backend's health.
    backend = FakeBackend("b", ["m"], stalled_paths=("/api/version",))
    state = await poll_backend(backend, poll_timeout=5)
    assert trio.current_time() == t0 + 5
    assert state.healthy and state.version is None and state.latency == 5


async def test_unexpected_answer_marks_down(autojump_clock: trio.testing.MockClock) -> None:
    class Weird(FakeBackend):
        async def get_json(self, path: str) -> Any:
            return ["not", "an", "object"]

    state = await poll_backend(Weird("w"), poll_timeout=1)
    assert not state.healthy and state.error == "invalid"


async def test_bad_arguments_are_refused() -> None:
    backend = FakeBackend("a")
    registry = RecordingRegistry([backend])
    with pytest.raises(ValueError):
        await run_discovery(registry, [backend], interval=0, poll_timeout=1)
    with pytest.raises(ValueError):
        await run_discovery(registry, [backend], interval=1, poll_timeout=0)
    with pytest.raises(ValueError):
        await run_discovery(registry, [FakeBackend("b")], interval=1, poll_timeout=1)
    with pytest.raises(ValueError):
        await poll_once([backend], poll_timeout=-1)


# --- three real emulators -------------------------------------------------------------------

DIGEST_OTHER = "c" * 64


def emulated(name: str, day: int, **changes: Any) -> EmulatedModel:
    return attrs.evolve(
        model_named(name), modified_at=datetime(2026, 5, day, tzinfo=UTC), **changes
    )


@asynccontextmanager
async def three_backends() -> AsyncIterator[tuple[list[Emulator], list[OllamaBackend]]]:
    """Emulators a, b, c (priority order). llama3 on a and b (different digests), qwen3 on a
    and c, mistral only on b, all-minilm only on c; llama3 is loaded on a and b."""
    models = {
        "a": [emulated("llama3", 10), emulated("qwen3", 8)],
        "b": [emulated("llama3", 10, digest=DIGEST_OTHER), emulated("mistral", 9)],
        "c": [emulated("qwen3", 8), emulated("all-minilm", 1)],
    }
    async with AsyncExitStack() as stack:
        emulators = [
            await stack.enter_async_context(open_emulator(EmulatorSettings(models=m)))
            for m in models.values()
        ]
        backends = await stack.enter_async_context(
            open_backends(
                [BackendConfig(n, e.url) for n, e in zip(models, emulators, strict=True)],
                pool_size=4,
                connect_timeout=5,
            )
        )
        yield emulators, backends


def names(backends: list[OllamaBackend]) -> list[str]:
    return [b.name for b in backends]


def allow_all(_name: str) -> bool:
    return True


async def test_emulators_union_and_priority(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nzgw.registry")
    async with three_backends() as (_emulators, backends):
        registry = Registry(backends)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(run_discovery, registry, backends, interval=60, poll_timeout=5)
            )
            nursery.cancel_scope.cancel()
    assert registry.ready()
    assert [s.version for s in registry.snapshot.backends] == ["0.33.0-rc2"] * 3
    # De-duplicated union, newest first; llama3 is a's entry (first in priority).
    listed = registry.list_models(allow_all)
    assert [m["name"] for m in listed] == [
        "llama3:latest",
        "mistral:latest",
        "qwen3:latest",
        "all-minilm:latest",
    ]
    assert listed[0]["digest"] != DIGEST_OTHER
    assert [m["name"] for m in registry.list_models(lambda n: n.startswith("q"))] == [
        "qwen3:latest"
    ]
    assert [m["name"] for m in registry.list_loaded(allow_all)] == ["llama3:latest"]
    assert names(registry.candidates("llama3:latest")) == ["a", "b"]
    assert names(registry.candidates("qwen3:latest")) == ["a", "c"]
    assert names(registry.candidates("mistral:latest")) == ["b"]
    assert names(registry.candidates("all-minilm:latest")) == ["c"]
    assert registry.candidates("nope:latest") == []
    warnings = [r.getMessage() for r in caplog.records if "digests" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("model llama3:latest ")


async def test_emulator_faults_mark_a_backend_down_and_back() -> None:
    async with three_backends() as (emulators, backends):
        registry = Registry(backends)

        async def round_() -> Snapshot:
            snapshot = await poll_once(backends, poll_timeout=0.5, previous=registry.snapshot)
            registry.publish(snapshot)
            return snapshot

        await round_()
        assert names(registry.candidates("llama3:latest")) == ["a", "b"]

        emulators[1].settings.fault = Fault.REFUSE
        b = (await round_()).by_name["b"]
        assert not b.healthy and b.error == "upstream"
        assert names(registry.candidates("llama3:latest")) == ["a"]
        assert registry.candidates("mistral:latest") == []
        assert registry.hosts("mistral:latest")  # last known list
        assert "mistral:latest" not in [m["name"] for m in registry.list_models(allow_all)]

        emulators[1].settings.fault = Fault.NONE
        assert (await round_()).by_name["b"].healthy
        assert names(registry.candidates("mistral:latest")) == ["b"]

        emulators[2].settings.fault = Fault.HTTP_500
        c = (await round_()).by_name["c"]
        assert not c.healthy and c.error == "upstream" and "HTTP 500" in c.detail

        emulators[0].settings.fault = Fault.STALL
        a = (await round_()).by_name["a"]
        assert not a.healthy and a.error == "timeout"
        assert names(registry.candidates("llama3:latest")) == ["b"]
        assert registry.ready()

        emulators[1].settings.fault = Fault.REFUSE
        await round_()
        assert not registry.ready()
