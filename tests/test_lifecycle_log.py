"""What `serve` logs while it starts and stops (issue #18, item 4).

The whole server runs in-process (`tests/harness.py`); the records are read with `caplog`.
The grace-period report is tested alone on virtual time (`MockClock`), since in the real
server the grace period's end and hypercorn's cancellation race by design.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from nzgw.config import test_config
from nzgw.http.gateway import Gateway
from nzgw.http.lifecycle import report_drain, store_kind
from nzgw.testing import Fault
from tests.harness import open_harness

STEPS = [
    "port bound",
    "store opened",
    "migrations checked",
    "counters and backend clients opened",
    "spool replayed",
    "first discovery round done",
    "service tasks started",
    "nzgw ready",
]


def _server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    # ("migrations applied" names the migrations, when there were any: not a step of its own)
    return [
        r
        for r in caplog.records
        if r.name == "nzgw.server" and r.getMessage() != "migrations applied"
    ]


async def test_start_up_steps_then_the_drain_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nzgw.server")
    async with open_harness(tmp_path, graceful_timeout=1.0) as h:
        messages = [r.getMessage() for r in _server_records(caplog)]
        assert messages == STEPS
        by_message = {r.getMessage(): r for r in _server_records(caplog)}
        assert by_message["store opened"].store == "sqlite"  # type: ignore[attr-defined]
        found = by_message["first discovery round done"]
        assert (found.backends_up, found.backends, found.models) == (1, 1, 3)  # type: ignore[attr-defined]
        elapsed = [r.step_ms for r in _server_records(caplog)]  # type: ignore[attr-defined]
        assert elapsed == sorted(elapsed)
        assert str(tmp_path) not in caplog.text  # the store's kind, never its URL

        # One request in flight (its model stalls) when the shutdown comes.
        h.emulator.settings.model_faults["qwen3"] = Fault.STALL
        body = {"model": "qwen3", "messages": [{"role": "user", "content": "x"}]}

        async def stalled() -> None:
            with contextlib.suppress(httpx.HTTPError):  # cut when the grace period ends
                await h.client.post("/api/chat", json=body, headers=h.auth)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalled)
            with trio.fail_after(30):
                await h.emulator.wait_until(
                    lambda: any(b"qwen3" in r.body for r in h.emulator.requests)
                )
                assert h.running.gateway.in_flight == 1
                before = datetime.now(UTC)
                h.shutdown.set()
                await h.stopped.wait()
            nursery.cancel_scope.cancel()

    records = _server_records(caplog)
    messages = [r.getMessage() for r in records]
    draining = next(r for r in records if r.getMessage().startswith("draining"))
    assert draining.in_flight == 1 and draining.grace_seconds == 1.0  # type: ignore[attr-defined]
    ends = datetime.fromisoformat(draining.grace_ends)  # type: ignore[attr-defined]
    assert before - timedelta(seconds=1) <= ends <= datetime.now(UTC) + timedelta(seconds=2)
    tail = [m for m in messages[len(STEPS) :] if not m.startswith("grace period over")]
    assert tail[1:] == ["drained", "service tasks stopped", "stopped"]
    assert next(r for r in records if r.getMessage() == "drained").in_flight == 0  # type: ignore[attr-defined]


def _gateway() -> Gateway:
    return Gateway(test_config(), authenticator=None, registry=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("left_at_grace_end", [0, 2])
async def test_the_end_of_the_grace_period_is_reported_only_with_requests_left(
    left_at_grace_end: int, caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    caplog.set_level(logging.INFO, logger="nzgw.server")
    gateway = _gateway()
    gateway.in_flight = 3
    async with trio.open_nursery() as nursery:
        report_drain(gateway, 30.0, nursery)
        (draining,) = _server_records(caplog)
        assert draining.in_flight == 3 and draining.grace_seconds == 30.0  # type: ignore[attr-defined]
        await trio.sleep(29.9)
        assert len(_server_records(caplog)) == 1
        gateway.in_flight = left_at_grace_end
        await trio.sleep(0.2)
    over = [r for r in _server_records(caplog) if r.getMessage().startswith("grace period over")]
    if left_at_grace_end:
        assert [r.in_flight for r in over] == [2]  # type: ignore[attr-defined]
        assert over[0].levelno == logging.WARNING
    else:
        assert over == []


def test_store_kind_never_carries_the_url() -> None:
    assert store_kind("postgresql://nzgw:s3cret@db/nzgw") == "postgresql"
    assert store_kind("postgres://nzgw:s3cret@db/nzgw") == "postgresql"
    assert store_kind("sqlite:///./var/nzgw.db") == "sqlite"
