"""Backend discovery: poll every backend each tick, publish one snapshot per round.

One round polls all backends in parallel; each backend's poll (`/api/tags`, `/api/ps` and
`/api/version`, themselves in parallel) is bounded by `poll_timeout`, so a round lasts at most
`poll_timeout` whatever one stalled backend does, and the others' results are published with
the round, never later. Ticks are on a fixed grid: a round starts at `start + k * interval`;
a round that overruns (only possible when `poll_timeout > interval`) skips the ticks it
missed instead of drifting or bunching.

Health: a backend is healthy when both `/api/tags` and `/api/ps` answered in time with the
documented shape. `/api/version` is informational: its failure alone does not take a backend
down (a version of `None` is reported instead).

Cancellation: `run_discovery` and `poll_once` can be cancelled at any point; they own no
resource (each adapter call releases its connection when cancelled) and publish nothing
partial (publishing is one synchronous call after a round completed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs
import trio

from nzgw.ports import PolledBackend, UpstreamError
from nzgw.services.registry import (
    BackendState,
    Registry,
    Snapshot,
    build_snapshot,
    parse_model_list,
)

log = logging.getLogger("nzgw.discovery")

TAGS, PS, VERSION = "/api/tags", "/api/ps", "/api/version"


async def poll_backend(backend: PolledBackend, *, poll_timeout: float) -> BackendState:
    """Poll one backend once, within `poll_timeout` seconds. Never raises `UpstreamError`."""
    started = trio.current_time()
    answers: dict[str, Any] = {}
    errors: dict[str, UpstreamError] = {}

    async def fetch(path: str, give_up: trio.CancelScope) -> None:
        try:
            answers[path] = await backend.get_json(path)
        except UpstreamError as exc:
            errors[path] = exc
            if path != VERSION:  # the backend is down: no need to wait for the rest
                give_up.cancel()

    with trio.move_on_after(poll_timeout):
        async with trio.open_nursery() as nursery:
            for path in (TAGS, PS, VERSION):
                nursery.start_soon(fetch, path, nursery.cancel_scope)
    finished = trio.current_time()

    version_answer = answers.get(VERSION)
    version = version_answer.get("version") if isinstance(version_answer, dict) else None
    version = version if isinstance(version, str) else None
    # Errors first: after one required endpoint failed, the others were cancelled on purpose.
    for path in (TAGS, PS):
        if path in errors:
            return BackendState.down(
                backend.name, "upstream", f"{path}: {errors[path]}", polled_at=started
            )
    for path in (TAGS, PS):
        if path not in answers:
            return BackendState.down(
                backend.name,
                "timeout",
                f"{path}: no answer within {poll_timeout:g} s",
                polled_at=started,
            )
    try:
        models = parse_model_list(answers[TAGS], order_field="modified_at")
        loaded = parse_model_list(answers[PS], order_field="expires_at")
    except ValueError as exc:
        return BackendState.down(
            backend.name, "invalid", f"unexpected answer: {exc}", polled_at=started
        )
    return BackendState(
        name=backend.name,
        healthy=True,
        error=None,
        detail="",
        version=version,
        models=models,
        loaded=loaded,
        polled_at=started,
        latency=finished - started,
    )


def _keep_last_known(state: BackendState, previous: Snapshot | None) -> BackendState:
    """A backend that is down keeps its last known model list and version (see registry)."""
    if state.healthy or previous is None:
        return state
    before = previous.by_name.get(state.name)
    if before is None or not before.models:
        return state
    return attrs.evolve(state, models=before.models, version=state.version or before.version)


async def poll_once(
    backends: Sequence[PolledBackend],
    *,
    poll_timeout: float,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Poll every backend in parallel once; return the resulting snapshot (not published).

    Takes at most `poll_timeout` seconds. Backends that are down keep the model lists they
    had in `previous`. Used by `run_discovery` and by the operator CLI.
    """
    if not poll_timeout > 0:
        raise ValueError("poll_timeout must be > 0")
    taken_at = trio.current_time()
    states: list[BackendState | None] = [None] * len(backends)

    async def poll_into(index: int, backend: PolledBackend) -> None:
        states[index] = await poll_backend(backend, poll_timeout=poll_timeout)

    async with trio.open_nursery() as nursery:
        for index, backend in enumerate(backends):
            nursery.start_soon(poll_into, index, backend)
    done = [s for s in states if s is not None]
    assert len(done) == len(backends)
    return build_snapshot([_keep_last_known(s, previous) for s in done], taken_at=taken_at)


async def run_discovery(
    registry: Registry[Any],
    backends: Sequence[PolledBackend],
    *,
    interval: float,
    poll_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Poll `backends` every `interval` seconds and publish each round to `registry`. Never returns.

    `task_status.started()` is called once the first round is published (also when every
    backend is down: the registry then reports not ready), so `await nursery.start(...)` makes
    the gateway ready only after the first snapshot exists.
    """
    if not interval > 0:
        raise ValueError("interval must be > 0")
    if [b.name for b in backends] != [b.name for b in registry.backends]:
        raise ValueError("discovery must poll exactly the registry's backends, in its order")
    next_tick = trio.current_time()
    started = False
    while True:
        snapshot = await poll_once(backends, poll_timeout=poll_timeout, previous=registry.snapshot)
        registry.publish(snapshot)
        if not started:
            task_status.started()
            started = True
        next_tick += interval
        now = trio.current_time()
        if next_tick < now:
            missed = math.ceil((now - next_tick) / interval)
            log.warning("discovery round overran; skipping %d tick(s)", missed)
            next_tick += missed * interval
        await trio.sleep_until(next_tick)
