"""Big request bodies off the event loop: the largest stall a 32 MiB body causes another
tenant's request.

    .venv/bin/python bench/body_bench.py [--bodies 3] [--out bench/results/bodies.md]

The emulator and nzgw run as processes (as in gateway_bench.py). Tenant "probe" sends small
non-streamed /api/generate requests back to back on one keep-alive connection and records each
latency; meanwhile tenant "bulk" sends `--bodies` requests of 32 MiB (just under
NZGW_MAX_BODY_BYTES), one after another. nzgw decodes, checks and re-encodes bodies above
256 KiB in a worker thread (nzgw/http/bodies.py), so the probe's worst latency while the big
bodies are in flight shows what they cost everyone else. Not a test: numbers depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from nzgw.core.paths import RouteId
from nzgw.core.requests import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb  # a sibling script
import trio.lowlevel

MAX_BODY = 32 * 1024 * 1024


def start(work: Path) -> tuple[list[subprocess.Popen[bytes]], int, int, dict[str, str]]:
    emulator_port, nzgw_port = gb.free_port(), gb.free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/bench.db",
        "NZGW_LOG_LEVEL": "warning",
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{emulator_port}",
        "NZGW_BIND": f"127.0.0.1:{nzgw_port}",
        "NZGW_DISCOVERY_INTERVAL": "30",
        "NZGW_MAX_BODY_BYTES": str(MAX_BODY),
    }
    quiet = subprocess.DEVNULL
    emulator = subprocess.Popen(
        [sys.executable, "-m", "nzgw", "emulate-ollama", "--port", str(emulator_port)],
        env=env,
        stderr=quiet,
    )
    gb.nzgw("migrate", env=env)
    keys: dict[str, str] = {}
    for tenant in ("probe", "bulk"):
        gb.nzgw("create-tenant", "--name", tenant, env=env)
        created = gb.nzgw("create-key", "--tenant", tenant, "--name", tenant, "--json", env=env)
        keys[tenant] = json.loads(created)["key"]
    server = subprocess.Popen(
        [sys.executable, "-m", "nzgw", "serve"], env=env, cwd=work, stderr=quiet
    )
    return [emulator, server], emulator_port, nzgw_port, keys


def big_request(key: str) -> bytes:
    overhead = len(json.dumps({"model": "llama3", "prompt": "", "stream": False}))
    overhead += len(',"options":{"num_predict":1}')
    body = {
        "model": "llama3",
        "prompt": "a" * (MAX_BODY - overhead - 64),
        "stream": False,
        "options": {"num_predict": 1},
    }
    return gb.post("/api/generate", body, key)


async def measure(port: int, keys: dict[str, str], bodies: int) -> list[str]:
    await gb.wait_port(port)
    small = gb.post(
        "/api/generate",
        {"model": "llama3", "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
        keys["probe"],
    )
    probe = await gb.Client.connect(port)
    for _ in range(50):
        await probe.request(small)  # warm up
    quiet: list[float] = []
    for _ in range(300):
        quiet.append((await probe.request(small))[1])

    big = big_request(keys["bulk"])
    during: list[float] = []
    big_times: list[float] = []
    done = trio.Event()

    async def bulk() -> None:
        client = await gb.Client.connect(port)
        try:
            for _ in range(bodies):
                big_times.append((await client.request(big))[1])
        finally:
            await client.stream.aclose()
            done.set()

    async def probing() -> None:
        while not done.is_set():
            during.append((await probe.request(small))[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bulk)
        nursery.start_soon(probing)
    await probe.stream.aclose()

    def ms(values: list[float], q: float) -> str:
        return f"{gb.pct(values, q):.1f}"

    return [
        "| probe requests | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        f"| alone | {len(quiet)} | {ms(quiet, 0.5)} | {ms(quiet, 0.99)} | "
        f"{max(quiet) * 1000:.1f} |",
        f"| while {bodies} × 32 MiB bodies were sent | {len(during)} | {ms(during, 0.5)} | "
        f"{ms(during, 0.99)} | {max(during) * 1000:.1f} |",
        "",
        f"Each 32 MiB request took {', '.join(f'{t * 1000:.0f}' for t in big_times)} ms "
        "end to end (upload, check and re-encode in a worker thread, forward, answer).",
    ]


async def loop_gap(body: bytes, *, threaded: bool, rounds: int = 3) -> float:
    """In one process: the longest a 1 ms ticker waits while `prepare` runs `rounds` times."""
    work = functools.partial(prepare, RouteId.GENERATE, body, default_cap=16)
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.05)
        for _ in range(rounds):
            if threaded:
                await trio.to_thread.run_sync(work)
            else:
                work()
                await trio.lowlevel.checkpoint()
        done.set()
    return max(gaps)


def decoder_lines() -> list[str]:
    body = json.dumps({"model": "llama3", "prompt": "a" * (MAX_BODY - 100)}).encode()
    start = time.perf_counter()
    prepare(RouteId.GENERATE, body, default_cap=16)
    once = time.perf_counter() - start
    inline = trio.run(functools.partial(loop_gap, body, threaded=False))
    threaded = trio.run(functools.partial(loop_gap, body, threaded=True))
    return [
        "",
        "The decoder alone (`core.requests.prepare` on a 32 MiB body, one process, a 1 ms "
        "ticker on the Trio loop):",
        "",
        "| prepare() once | longest loop stall, inline | longest loop stall, worker thread |",
        "|---|---|---|",
        f"| {once * 1000:.0f} ms | {inline * 1000:.0f} ms | {threaded * 1000:.0f} ms |",
    ]


def main(bodies: int, out: Path | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="nzgw-body-bench-"))
    procs, _, port, keys = start(work)
    try:
        lines = trio.run(measure, port, keys, bodies)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    lines += decoder_lines()
    report = "\n".join(lines)
    print(report)
    if out is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.write_text(f"# body_bench, {stamp}, {os.cpu_count()} cores\n\n{report}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bodies", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    main(args.bodies, args.out)
