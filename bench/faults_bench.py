"""Fail-closed latency of admissions when Redis dies or freezes (the tight figures that the test
suite no longer asserts: a test cannot bound wall-clock time on a loaded machine).

    .venv/bin/python bench/faults_bench.py [--timeout 0.5] [--calls 200]

Starts its own redis-server on a free port (never a shared one), seeds one tenant, then for
each fault (SIGSTOP, SIGKILL) runs `calls` admissions from 20 concurrent tasks through the
`Limiter` and reports how long the refusals took: p50, p99, max (seconds). Expected: about
NZGW_COUNTERS_TIMEOUT for a frozen Redis (silence is the signal), near 0 for a killed one
(connection refused). A benchmark, not a test: numbers vary per machine and load.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import time
from datetime import UTC, datetime

import trio
from counters_bench import NullLedger

from nzgw.adapters.redis import open_redis_counters
from nzgw.core.models import ApiKey, Limits, Principal, Tenant
from nzgw.ports import CountersUnavailableError
from nzgw.services.limiter import Limiter


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return process


async def _refusals(limiter: Limiter, who: Principal, calls: int) -> list[float]:
    took: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.monotonic()
            try:
                await limiter.admit(who, model="bench", reserve_tokens=1)
            except CountersUnavailableError:
                took.append(time.monotonic() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(worker, calls // 20)
    return took


def _row(what: str, took: list[float]) -> str:
    q = statistics.quantiles(took, n=100)
    return f"| {what} | {len(took)} | {q[49]:.3f} | {q[98]:.3f} | {max(took):.3f} |"


async def main(call_timeout: float, calls: int) -> None:
    who = Principal(ApiKey(10, 1, "k", "p", "h", limits=Limits()), Tenant(1, "bench"))
    rows = []
    for fault in ("SIGSTOP", "SIGKILL"):
        port = _free_port()
        process = _start(port)
        try:
            async with open_redis_counters(
                f"redis://127.0.0.1:{port}/0", call_timeout=call_timeout
            ) as counters:
                limiter = Limiter(counters, NullLedger(), now=lambda: datetime.now(UTC))
                assert (await limiter.admit(who, model="bench", reserve_tokens=1)).admitted
                process.send_signal(signal.SIGSTOP if fault == "SIGSTOP" else signal.SIGKILL)
                rows.append(
                    _row(
                        f"Redis {fault}, timeout {call_timeout} s",
                        await _refusals(limiter, who, calls),
                    )
                )
        finally:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()
    print("| fault | refusals | p50 s | p99 s | max s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    trio.run(main, args.timeout, args.calls)
