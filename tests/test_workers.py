"""`NZGW_WORKERS=N`: N gateway processes on one port, sharing Redis and the store, supervised.

Rules of this module:

- Every gateway is a real `python -m nzgw serve` (the supervisor), started with
  `trio.lowlevel.open_process` in `tmp_path` (so no `.env` of the checkout is read), logging
  JSON lines to one stderr pipe that the supervisor and its workers share. Readiness is the
  workers' "nzgw ready" lines (each names its pid and its metrics address), never a sleep; "every
  process is gone" is that pipe's end-of-file (no writer is left).
- Redis is a redis-server of each test's own (free port): nzgw's key names are fixed and every
  fresh store numbers its tenants from 1, so a shared server flushed or used by a parallel run
  would count in, or wipe, the window under test. No redis-server: the test is skipped, but with
  `CI=true` it fails.
- The Ollama emulator runs in the test's own Trio run; the store is a SQLite file that the
  test prepares (tenant and key) before the gateway starts.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from nzgw.adapters.stores import open_store
from nzgw.cli.workers import WORKER_ENV, Worker, current_worker
from nzgw.config import test_config
from nzgw.core.models import Limits
from nzgw.ports import NewKey
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import EmulatorSettings, open_emulator
from tests.counters.conftest import own_redis_server
from tests.harness import FAST_ARGON2
from tests.metrics_samples import parse_exposition, sample_sum
from tests.process_log import ProcessLog, open_nzgw, reap, run_nzgw

RPM = 30


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A redis-server of this test's own: the shared one is flushed and written by parallel
    runs (nzgw's key names are fixed, every fresh store numbers its tenants from 1)."""
    with own_redis_server() as server:
        yield server.url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define(eq=False, kw_only=True)
class Supervised(ProcessLog):
    """A running `nzgw serve` supervisor and what its processes logged so far."""

    port: int
    key: str


@asynccontextmanager
async def supervised(tmp_path: Path, redis_url: str, **extra: str) -> AsyncIterator[Supervised]:
    """The emulator, a store with one key (`Supervised.key`), and `nzgw serve`, 2 workers."""
    database_url = f"sqlite:///{tmp_path}/nzgw.db"
    async with open_store(database_url) as store:
        await store.migrate()
        tenant = await store.create_tenant("acme")
        template = NewKey(tenant.id, "k", "", "", limits=Limits(requests_per_minute=RPM))
        key, _ = await issue_key(store, KeyHasher(FAST_ARGON2), template)
    async with open_emulator(EmulatorSettings(tokens_per_reply=3, token_delay=0)) as emu:
        port = _free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "NZGW_WORKERS": "2",
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "NZGW_BIND": f"127.0.0.1:{port}",
            "NZGW_METRICS_BIND": "127.0.0.1:0",
            "OLLAMA_BASE_URL": emu.url,
            "NZGW_LOG_FORMAT": "json",
            "NZGW_MIGRATE_ON_START": "true",
            "NZGW_GRACEFUL_TIMEOUT": "5",
            "NZGW_DISCOVERY_INTERVAL": "0.5",
            "NZGW_FLUSH_INTERVAL": "0.2",
            **extra,
        }
        process = await open_nzgw("serve", env=env, cwd=tmp_path)
        running = Supervised(process=process, port=port, key=key)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(running.read_stderr)
                yield running
                with trio.fail_after(30):
                    await running.eof.wait()
        finally:
            await reap(process)


async def scrape(address: str) -> Mapping[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{address}/metrics")
    response.raise_for_status()
    return parse_exposition(response.text)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _not_running(pid: int) -> bool:
    """Gone, or a zombie that whoever adopted it has not reaped yet."""
    if _gone(pid):
        return True
    status = Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" in status


@pytest.mark.redis
async def test_two_workers_serve_one_port_and_share_the_counters(
    tmp_path: Path, redis_url: str
) -> None:
    async with supervised(tmp_path, redis_url) as gw:
        with trio.fail_after(30):
            ready = await gw.wait_logged("nzgw ready", 2)
        pids = {line["pid"] for line in ready}
        assert len(pids) == 2 and gw.process.pid not in pids
        assert {line["bind"] for line in ready} == {f"127.0.0.1:{gw.port}"}

        key = gw.key
        body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        statuses: collections.Counter[int] = collections.Counter()
        # No keep-alive: every request is a new connection, which the kernel hands to either
        # worker (SO_REUSEPORT). 40 connections all landing on one worker: p = 2**-39.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.port}", limits=no_reuse, timeout=30
        ) as client:
            for _ in range(RPM + 10):
                answer = await client.post(
                    "/api/chat",
                    json={**body, "stream": False},
                    headers={"Authorization": f"Bearer {key}"},
                )
                statuses[answer.status_code] += 1
        # One requests-per-minute window across both processes: it lives in Redis.
        assert statuses == {200: RPM, 429: 10}

        served: dict[str, float] = {}
        refused = 0.0
        indexes: set[str] = set()
        for line in ready:
            samples = await scrape(line["metrics"])
            (info,) = [labels for name, labels in samples if name == "nzgw_worker_info"]
            assert dict(info)["pid"] == str(line["pid"])  # the numbers name their process
            indexes.add(dict(info)["worker"])  # and its index (run_server's `worker`)
            served[dict(info)["pid"]] = sample_sum(
                samples, "nzgw_requests_total", route="chat", status="200"
            )
            refused += sample_sum(samples, "nzgw_requests_total", route="chat", status="429")
        assert set(served) == {str(pid) for pid in pids}
        assert indexes == {str(i) for i in range(len(pids))}
        assert all(count > 0 for count in served.values()), served  # both processes answered
        assert sum(served.values()) == RPM and refused == 10

        gw.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await gw.process.wait() == 0
            await gw.eof.wait()
    assert len(gw.logged("stopping workers")) == 1
    assert len(gw.logged("shutting down")) == 2  # each worker heard it once
    assert all(_gone(pid) for pid in pids)


@pytest.mark.redis
async def test_a_worker_that_dies_takes_the_group_down(tmp_path: Path, redis_url: str) -> None:
    async with supervised(tmp_path, redis_url) as gw:
        with trio.fail_after(30):
            ready = await gw.wait_logged("nzgw ready", 2)
        victim, survivor = (line["pid"] for line in ready)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            assert await gw.process.wait() == 128 + signal.SIGKILL
            await gw.eof.wait()
    (error,) = [line for line in gw.lines if line.get("level") == "error"]
    assert f"(pid {victim}) exited unasked with status 137" in error["msg"]
    assert len(gw.logged("shutting down")) == 1  # the survivor drained on SIGTERM
    assert _gone(survivor)


@pytest.mark.redis
async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path, redis_url: str) -> None:
    async with supervised(tmp_path, redis_url) as gw:
        with trio.fail_after(30):
            ready = await gw.wait_logged("nzgw ready", 2)
        gw.process.kill()  # SIGKILL: no chance to forward anything
        with trio.fail_after(30):
            await gw.process.wait()
            await gw.eof.wait()  # the workers, which share the pipe, are gone too
    assert len(gw.logged("the worker supervisor is gone; shutting down")) == 2
    # Orphans are reaped by whoever adopted them; they must at least no longer run.
    assert all(_not_running(line["pid"]) for line in ready)


def test_embedded_counters_refuse_several_workers_at_start(tmp_path: Path) -> None:
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NZGW_WORKERS": "2"}
    env["NZGW_BIND"] = f"127.0.0.1:{port}"
    result = run_nzgw(["serve"], env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: NZGW_WORKERS: more than one worker needs REDIS_URL "
        "(in-process counters cannot be shared between processes)"
    ]
    with socket.socket() as probe:  # nothing was started: the port is still free
        probe.bind(("127.0.0.1", port))
    assert not (tmp_path / "var").exists()


def test_a_worker_knows_its_index_and_takes_its_own_metrics_port() -> None:
    assert current_worker({}) is None
    assert current_worker({WORKER_ENV: "1"}) is None  # the old flag form is not a worker
    worker = current_worker({WORKER_ENV: "3:7"})
    assert worker == Worker(index=3, lifeline_fd=7)
    config = test_config(metrics_bind="10.0.0.5:9100")
    assert worker.configure(config).metrics_bind == "10.0.0.5:9103"
    assert worker.configure(test_config(metrics_bind="127.0.0.1:0")).metrics_bind.endswith(":0")
    assert worker.configure(test_config()).metrics_bind == ""
