"""What `serve` says about itself while it starts and while it stops.

Starting can take seconds (a PostgreSQL pool, Redis, a first discovery round against slow
backends, several workers on a loaded machine), so each step is logged as it completes, with
the time since the start. Stopping is logged too: that the gateway is draining, how many
requests are in flight, when the grace period ends; then whether the grace period ran out with
requests still running (they are cancelled), and when the drain is over.

Log lines carry names and numbers only: the store's kind, never its URL (it may hold a
password), and no backend URL.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from nzgw.http.gateway import Gateway
from nzgw.services.registry import Registry

log = logging.getLogger("nzgw.server")


class StartupLog:
    """Logs each completed start-up step with `step_ms` (since this object was made)."""

    def __init__(self) -> None:
        self._started = trio.current_time()

    def since(self) -> dict[str, float]:
        return {"step_ms": round((trio.current_time() - self._started) * 1000, 1)}

    def done(self, step: str, **fields: Any) -> None:
        log.info(step, extra={**fields, **self.since()})


def store_kind(database_url: str) -> str:
    """`postgresql` or `sqlite`: what to log instead of the URL (which may hold a password)."""
    scheme = database_url.split(":", 1)[0].lower()
    return "postgresql" if scheme in {"postgres", "postgresql"} else scheme


def discovered(registry: Registry[Any]) -> dict[str, int]:
    """Backends up and models listed after a discovery round (for the start-up log)."""
    states = registry.snapshot.backends
    return {
        "backends_up": sum(1 for s in states if s.healthy),
        "backends": len(states),
        "models": len(registry.list_models(lambda _name: True)),
    }


def report_drain(gateway: Gateway, grace: float, nursery: trio.Nursery) -> None:
    """Log that the drain begins; if requests are still in flight when the grace period ends,
    log that too (from a task in `nursery`, which the caller cancels once the drain is over)."""
    ends = datetime.now(UTC) + timedelta(seconds=grace)
    log.info(
        "draining: no new connections; in-flight requests get the grace period to finish",
        extra={
            "in_flight": gateway.in_flight,
            "grace_seconds": grace,
            "grace_ends": ends.isoformat(timespec="seconds"),
        },
    )

    async def grace_over() -> None:
        await trio.sleep(grace)
        if gateway.in_flight:
            log.warning(
                "grace period over: cancelling the requests still in flight",
                extra={"in_flight": gateway.in_flight},
            )

    nursery.start_soon(grace_over)
