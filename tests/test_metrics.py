"""Prometheus metrics: the /metrics listener on its own socket, and the numbers moving with traffic.

Rules of this module:

- Each gateway owns its metrics (`Gateway.metrics`): a test asserts on the absolute numbers of
  its own gateway, whatever other tests in this process did.
- Traffic is waited for with `Harness.wait_finished` (the metrics hook runs before the harness
  hook in each request's settlement), never with sleeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import trio

from nzgw.http.metrics import (
    GatewayMetrics,
    LiveCollector,
    render,
)
from nzgw.ports import (
    ConflictError,
    CountersUnavailableError,
    NotFoundError,
    StoreUnavailableError,
)
from nzgw.services.registry import Registry
from nzgw.testing import EmulatorSettings, Fault
from tests.harness import Harness, open_harness
from tests.metrics_samples import parse_exposition, sample_sum

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: Harness) -> Samples:
    bound = h.running.metrics
    assert bound is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{bound.host}:{bound.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse_exposition(response.text)


def chat(stream: bool) -> dict[str, object]:
    return {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def fast(_: int) -> EmulatorSettings:
    return EmulatorSettings(tokens_per_reply=6, token_delay=0)


async def test_a_scrape_after_traffic_finds_the_counters_moved(tmp_path: Path) -> None:
    async with open_harness(tmp_path, backends=2, settings=fast, metrics_bind="127.0.0.1:0") as h:
        assert h.running.metrics is not None
        assert h.running.metrics.port not in (0, h.running.bound.port)  # its own socket
        before = await scrape(h)
        assert sample_sum(before, "nzgw_requests_total") == 0  # this gateway's own numbers
        c = h.client

        async with c.stream("POST", "/api/chat", json=chat(True), headers=h.auth) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert len(lines) == 7  # six tokens and the final frame
        r2 = await c.post("/v1/chat/completions", json=chat(False), headers=h.auth)
        assert r2.status_code == 200
        assert (await c.post("/api/chat", json=chat(False))).status_code == 401
        assert (await c.post("/api/pull", json={"model": "x"}, headers=h.auth)).status_code == 403
        unknown = {**chat(False), "model": "no-such-model"}
        assert (await c.post("/api/chat", json=unknown, headers=h.auth)).status_code == 403
        # Failover: the first backend answers 500 for the model, the second serves it.
        h.emulators[0].settings.model_faults["llama3"] = Fault.HTTP_500
        assert (await c.post("/api/chat", json=chat(False), headers=h.auth)).status_code == 200
        h.emulators[0].settings.model_faults.clear()
        with trio.fail_after(10):
            infos = await h.wait_finished(6)
        after = await scrape(h)

    def moved(name: str, **labels: str) -> float:
        return sample_sum(after, name, **labels)

    ok = {"status": "200", "refusal": ""}
    assert moved("nzgw_requests_total", surface="native", route="chat", **ok) == 2
    assert moved("nzgw_requests_total", surface="openai", route="v1.chat", **ok) == 1
    assert moved("nzgw_requests_total", status="401", refusal="auth") == 1
    assert moved("nzgw_requests_total", status="403", refusal="blocked_endpoint") == 1
    assert moved("nzgw_requests_total", status="403", refusal="forbidden_model") == 1
    assert moved("nzgw_requests_total") == 6
    assert moved("nzgw_request_duration_seconds_count") == 6
    assert moved("nzgw_upstream_first_byte_seconds_count") == 3  # the three forwarded
    assert moved("nzgw_upstream_first_byte_seconds_count", route="chat") == 2

    prompt = sum(i.usage.prompt_tokens for i in infos if i.usage is not None)
    completion = sum(i.usage.completion_tokens for i in infos if i.usage is not None)
    assert completion >= 3 * 6
    assert moved("nzgw_tokens_total", tenant="acme", kind="completion") == completion
    assert moved("nzgw_tokens_total", tenant="acme", kind="prompt") == prompt

    assert moved("nzgw_backend_failures_total", backend="backend-0", reason="http_5xx") == 1
    assert moved("nzgw_backend_failures_total") == 1
    assert moved("nzgw_failovers_total") == 1
    assert sample_sum(after, "nzgw_streams_in_flight") == 0
    for backend in ("backend-0", "backend-1"):
        assert sample_sum(after, "nzgw_backend_up", backend=backend) == 1
        assert sample_sum(after, "nzgw_backend_healthy", backend=backend) == 1
        assert sample_sum(after, "nzgw_backend_models", backend=backend) == 3
    assert ("nzgw_flush_backlog", frozenset({("queue", "usage")})) in after
    assert ("nzgw_flush_backlog", frozenset({("queue", "audit")})) in after
    assert sample_sum(after, "nzgw_worker_info", pid=str(os.getpid())) == 1
    assert sample_sum(after, "process_cpu_seconds_total") > 0


async def test_streams_in_flight_counts_a_stream_until_it_ends(tmp_path: Path) -> None:
    def slow(_: int) -> EmulatorSettings:
        return EmulatorSettings(tokens_per_reply=1000, token_delay=0.05)

    async with open_harness(tmp_path, settings=slow, metrics_bind="127.0.0.1:0") as h:
        before = await scrape(h)
        # A raw socket: httpx leaves generators unclosed when a stream is abandoned.
        payload = json.dumps(chat(True)).encode()
        async with await trio.open_tcp_stream("127.0.0.1", h.running.bound.port) as stream:
            head = f"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {h.key}\r\n"
            head += f"Content-Length: {len(payload)}\r\n\r\n"
            await stream.send_all(head.encode() + payload)
            answer = await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 200 ")  # committed: the stream is relaying
            during = await scrape(h)
        # The client left mid-stream: the request settles as cancelled.
        with trio.fail_after(10):
            (info,) = await h.wait_finished(1)
        after = await scrape(h)
    assert info.status == 200 and info.outcome == "cancelled"
    assert sample_sum(before, "nzgw_streams_in_flight") == 0
    assert sample_sum(during, "nzgw_streams_in_flight") == 1
    assert sample_sum(after, "nzgw_streams_in_flight") == 0


async def test_backend_health_is_read_at_scrape_time(tmp_path: Path) -> None:
    async with open_harness(tmp_path, backends=2, settings=fast, metrics_bind="127.0.0.1:0") as h:
        registry = h.running.gateway.registry
        assert isinstance(registry, Registry)
        h.emulators[1].settings.fault = Fault.REFUSE
        with trio.fail_after(10):
            await registry.wait_published(2)  # a round that started after the change
        samples = await scrape(h)
    assert sample_sum(samples, "nzgw_backend_up", backend="backend-0") == 1
    assert sample_sum(samples, "nzgw_backend_up", backend="backend-1") == 0
    assert sample_sum(samples, "nzgw_backend_healthy", backend="backend-1") == 0
    assert sample_sum(samples, "nzgw_backend_models", backend="backend-1") == 3  # last known


async def test_the_listener_answers_get_and_head_on_metrics_only(tmp_path: Path) -> None:
    async with open_harness(tmp_path, metrics_bind="127.0.0.1:0") as h:
        bound = h.running.metrics
        assert bound is not None
        base = f"http://{bound.host}:{bound.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).status_code == 404
            assert (await client.get("/api/chat")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
            head = await client.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["content-length"]) > 0
            assert head.headers["connection"] == "close"
        # Garbage, then a client that leaves half-way: neither disturbs the next scrape.
        stream = await trio.open_tcp_stream(bound.host, bound.port)
        await stream.send_all(b"\x00\x01 not http\r\n\r\n")
        assert await stream.receive_some() == b""  # closed on us
        await stream.aclose()
        stream = await trio.open_tcp_stream(bound.host, bound.port)
        await stream.send_all(b"GET /metr")
        await stream.aclose()
        assert ("nzgw_streams_in_flight", frozenset()) in await scrape(h)
        # The public port does not serve metrics.
        assert (await h.client.get("/metrics")).status_code == 404


async def test_no_listener_without_metrics_bind(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        assert h.running.metrics is None


# --- failures of the store and the counter store ----------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.answer: BaseException | None = None
        self.name = "fake"

    async def get_tenant(self, name: str) -> str:
        if self.answer is not None:
            raise self.answer
        return name

    def sync_method(self) -> int:
        return 7


async def test_store_and_counter_failures_are_counted_by_operation() -> None:
    metrics = GatewayMetrics()
    fake = FakeStore()
    store = metrics.watch_store(fake)
    assert await store.get_tenant("a") == "a"
    assert store.sync_method() == 7 and store.name == "fake"
    for answer in (NotFoundError("x"), ConflictError("x"), StoreUnavailableError("down")):
        fake.answer = answer
        with pytest.raises(type(answer)):  # the failure propagates unchanged
            await store.get_tenant("a")
    failing = FakeStore()
    failing.answer = CountersUnavailableError("down")
    counters = metrics.watch_counters(failing)
    for _ in range(2):
        with pytest.raises(CountersUnavailableError):
            await counters.get_tenant("a")
    samples = parse_exposition(render(metrics).decode())
    # Not-found and conflict are answers; only the unavailable store counts as a failure.
    assert sample_sum(samples, "nzgw_store_errors_total", operation="get_tenant") == 1
    assert sample_sum(samples, "nzgw_counters_errors_total", operation="get_tenant") == 2
    assert "get_tenant" in vars(store)  # wrapped once, then served from the instance


def test_a_failing_backlog_gauge_does_not_fail_the_scrape() -> None:
    def broken() -> int:
        raise RuntimeError("boom")

    live = LiveCollector()
    live.track_backlog("usage", lambda: 3)
    live.track_backlog("audit", broken)
    samples = parse_exposition(render(GatewayMetrics(), live).decode())
    assert sample_sum(samples, "nzgw_flush_backlog", queue="usage") == 3
    assert ("nzgw_flush_backlog", frozenset({("queue", "audit")})) not in samples


def test_the_process_metrics_name_this_worker() -> None:
    samples = parse_exposition(render(GatewayMetrics(pid=4242, worker=3)).decode())
    assert sample_sum(samples, "nzgw_worker_info", pid="4242", worker="3") == 1
    assert sample_sum(samples, "nzgw_worker_info") == 1  # one series: this process
    alone = parse_exposition(render(GatewayMetrics(pid=4242)).decode())
    assert sample_sum(alone, "nzgw_worker_info", pid="4242", worker="") == 1


async def test_the_relay_pumps_counters_move_with_a_paced_stream(tmp_path: Path) -> None:
    """A stream whose tokens come one at a time is carried by the relay pump: /metrics says
    how often and how many frames it wrote (nzgw/http/pump.py)."""
    paced = EmulatorSettings(tokens_per_reply=20, token_delay=0.01)
    async with open_harness(tmp_path, settings=lambda _: paced, metrics_bind="127.0.0.1:0") as h:
        before = await scrape(h)
        async with h.client.stream("POST", "/api/chat", json=chat(True), headers=h.auth) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert len(lines) == 21
        with trio.fail_after(10):
            await h.wait_finished(1)
        after = await scrape(h)
    assert sample_sum(before, "nzgw_relay_pump_carries_total") == 0
    assert sample_sum(after, "nzgw_relay_pump_carries_total") >= 1
    assert sample_sum(after, "nzgw_relay_pump_frames_total") >= 1
    assert sample_sum(after, "nzgw_relay_pump_uncopied_total") == 0
