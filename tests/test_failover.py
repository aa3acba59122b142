"""Several backends (issue 6): routing by model and priority, failover before the first byte
for every fault kind with exactly one clean answer, cancellation during failover, readiness."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from nzgw.core.failover import Failure
from nzgw.testing import EmulatorSettings, Fault, default_models
from tests.harness import open_harness

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
REPLY = "".join(f"tok{i} " for i in range(8))


def three(_: int) -> EmulatorSettings:
    return EmulatorSettings()


def _served_by(h: object, path: str) -> list[int]:
    emulators = h.emulators  # type: ignore[attr-defined]
    return [i for i, e in enumerate(emulators) if any(r.path == path for r in e.requests)]


async def test_union_listing_and_routing_by_model_and_priority(tmp_path: Path) -> None:
    def models(i: int) -> EmulatorSettings:
        base = {m.name: m for m in default_models()}
        own = [
            [base["llama3:latest"]],
            [base["qwen3:latest"], base["llama3:latest"]],
            [base["all-minilm:latest"]],
        ][i]
        return EmulatorSettings(models=list(own))

    async with open_harness(tmp_path, backends=3, settings=models) as h:
        tags = (await h.client.get("/api/tags", headers=h.auth)).json()["models"]
        assert sorted(m["name"] for m in tags) == [
            "all-minilm:latest",
            "llama3:latest",
            "qwen3:latest",
        ]
        for model, expected in [("llama3", 0), ("qwen3", 1), ("all-minilm", 2)]:
            path = "/api/embed" if model == "all-minilm" else "/api/chat"
            body = (
                {"model": model, "input": "x"}
                if model == "all-minilm"
                else {**CHAT, "model": model, "stream": False}
            )
            response = await h.client.post(path, json=body, headers=h.auth)
            assert response.status_code == 200
            served = [
                i
                for i, e in enumerate(h.emulators)
                if any(model.encode() in r.body for r in e.requests if r.path == path)
            ]
            assert served == [expected]


FAULTS = [
    Fault.REFUSE,
    Fault.HTTP_500,
    Fault.BUSY_503,
    Fault.CLOSE_BEFORE_FIRST_BYTE,
    Fault.STALL,
    "404",
]
# How the request record names each fault's failed attempt.
KIND = {
    Fault.REFUSE: Failure.TRANSPORT,
    Fault.HTTP_500: Failure.HTTP_5XX,
    Fault.BUSY_503: Failure.HTTP_5XX,
    Fault.CLOSE_BEFORE_FIRST_BYTE: Failure.TRANSPORT,
    Fault.STALL: Failure.TIMEOUT,
    "404": Failure.NOT_FOUND,
}


@pytest.mark.parametrize("fault", FAULTS, ids=str)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_failover_before_the_first_byte(
    tmp_path: Path, fault: Fault | str, stream: bool
) -> None:
    # A long discovery interval: the snapshot still believes backend 0 is fine.
    async with open_harness(
        tmp_path, backends=3, settings=three, discovery_interval=60, upstream_first_byte_timeout=0.3
    ) as h:
        first = h.emulators[0].settings
        if fault == "404":
            first.models = [m for m in first.models if m.name != "llama3:latest"]
        elif fault is Fault.REFUSE:
            first.fault = Fault.REFUSE
        else:
            assert isinstance(fault, Fault)
            first.model_faults["llama3"] = fault
        response = await h.client.post("/api/chat", json={**CHAT, "stream": stream}, headers=h.auth)
        assert response.status_code == 200
        frames = [json.loads(line) for line in response.text.splitlines()]
        assert "".join(f["message"]["content"] for f in frames) == REPLY
        assert [f["done"] for f in frames].count(True) == 1  # one clean answer, no second one
        assert _served_by(h, "/api/chat") == ([0, 1] if fault is not Fault.REFUSE else [1])
        assert h.emulators[1].requests[-1].completed
        with trio.fail_after(10):
            (info,) = await h.wait_finished(1)
        assert info.backend == "backend-1" and info.outcome == "ok"
        # The cause is kept on the record (for the log and the audit), never sent to the client.
        (failed,) = info.failed_attempts
        assert (failed.backend, failed.kind) == ("backend-0", KIND[fault])
        assert failed.elapsed >= (0.3 if fault is Fault.STALL else 0.0)
        assert b"backend-0" not in response.content


async def test_all_backends_failing_is_a_503_without_backend_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nzgw.forwarding")
    async with open_harness(tmp_path, backends=2, discovery_interval=60) as h:
        for emu in h.emulators:
            emu.settings.model_faults["llama3"] = Fault.HTTP_500
        response = await h.client.post("/v1/chat/completions", json=CHAT, headers=h.auth)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "api_error"
        assert b"backend-" not in response.content and b"127.0.0.1" not in response.content
        assert not any("backend" in v for v in response.headers.values())
        with trio.fail_after(10):
            (info,) = await h.wait_finished(1)
    # Each failed attempt: on the record, and one log line with the request id.
    assert info.refusal == "backend_failure"
    kept = [(a.backend, a.kind) for a in info.failed_attempts]
    assert kept == [("backend-0", Failure.HTTP_5XX), ("backend-1", Failure.HTTP_5XX)]
    lines = [r for r in caplog.records if r.getMessage() == "backend attempt failed"]
    logged = [(r.__dict__["backend"], r.__dict__["kind"], r.__dict__["request_id"]) for r in lines]
    assert logged == [(b, "http_5xx", info.request_id) for b in ("backend-0", "backend-1")]
    assert all(r.__dict__["elapsed_ms"] >= 0 for r in lines)
    assert response.headers["x-request-id"] == info.request_id


async def test_a_model_gone_from_every_backend_is_the_forbidden_403(tmp_path: Path) -> None:
    async with open_harness(tmp_path, backends=2, discovery_interval=60) as h:
        forbidden = await h.client.post("/api/chat", json={**CHAT, "model": "nope"}, headers=h.auth)
        for emu in h.emulators:
            emu.settings.models = [m for m in emu.settings.models if m.name != "llama3:latest"]
        gone = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
        assert gone.status_code == forbidden.status_code == 403
        assert gone.content == forbidden.content


async def test_client_leaving_during_failover_closes_every_attempt(tmp_path: Path) -> None:
    def stalled(_: int) -> EmulatorSettings:
        return EmulatorSettings(model_faults={"llama3": Fault.STALL})

    async with open_harness(
        tmp_path,
        backends=3,
        settings=stalled,
        discovery_interval=60,
        upstream_first_byte_timeout=0.5,
    ) as h:
        payload = json.dumps(CHAT).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        await stream.send_all(
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + h.key.encode()
            + b"\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        second = h.emulators[1]
        with trio.fail_after(5):
            await second.wait_until(lambda: any(r.path == "/api/chat" for r in second.requests))
        await stream.aclose()
        left_at = trio.current_time()
        with trio.fail_after(2):
            await h.wait_finished(1)
        attempts = [
            c
            for e in h.emulators
            for c in e.connections
            if any(r.path == "/api/chat" for r in c.requests)
        ]
        assert len(attempts) == 2  # the third backend was never tried
        for conn in attempts:
            assert conn.closed_at is not None and conn.closed_at - left_at < 0.05 + 0.5


async def test_readyz_is_503_only_when_every_backend_is_down(tmp_path: Path) -> None:
    async with open_harness(tmp_path, backends=3, settings=three, discovery_interval=0.1) as h:
        registry = h.running.gateway.registry

        async def ready_after_round() -> int:
            await registry.wait_published(rounds=2)  # type: ignore[attr-defined]
            return (await h.client.get("/readyz")).status_code

        with trio.fail_after(5):
            h.emulators[0].settings.fault = Fault.REFUSE
            h.emulators[1].settings.fault = Fault.REFUSE
            assert await ready_after_round() == 200
            response = await h.client.post(
                "/api/chat", json={**CHAT, "stream": False}, headers=h.auth
            )
            assert response.status_code == 200 and _served_by(h, "/api/chat") == [2]
            h.emulators[2].settings.fault = Fault.REFUSE
            assert await ready_after_round() == 503
            h.emulators[1].settings.fault = Fault.NONE
            assert await ready_after_round() == 200
