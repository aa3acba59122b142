"""Fair-queue benchmark: an interactive tenant's time to first token beside a flooding tenant.

    .venv/bin/python bench/fair_bench.py [--out bench/results/fair.md]

Real processes: the Ollama emulator (`nzgw emulate-ollama --parallel 2`, paced tokens: each
generation holds one of its 2 slots for about `first-token-delay + tokens x token-delay`) and
`nzgw serve` in front of it, with two tenants. The flood tenant keeps 50 streamed chats open
at once; the interactive tenant sends one streamed chat at a time. Measured: the interactive
tenant's time to first token (first body byte of the stream) alone, then beside the flood, in
two configurations of the same backend:

* `fifo`: nzgw's `parallel` larger than the emulator's slots, so requests queue in the
  emulator first come, first served (how nzgw behaved before the fair queue, and how Ollama
  queues);
* `fair`: `parallel` = the emulator's 2 slots, so requests wait in nzgw's tenant-fair queue.

Not a test: numbers depend on the machine and its load (it runs next to other work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from gateway_bench import free_port, nzgw, pct, wait_port  # run as bench/fair_bench.py

SLOTS = 2
FLOOD = 50
TOKENS = 10
TOKEN_DELAY = 0.01
FIRST_TOKEN_DELAY = 0.02


def chat_request(key: str) -> bytes:
    body = json.dumps(
        {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    return (
        f"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def one_stream(port: int, raw: bytes) -> float:
    """Send one streamed chat; return seconds to the first body byte (read it to the end)."""
    start = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        first = 0.0
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            if not first and b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1]:
                first = time.perf_counter() - start
                status = data.split(b" ", 2)[1]
                if status != b"200":
                    raise RuntimeError(f"HTTP {status!r}: {data[:300]!r}")
    return first


async def interactive(port: int, key: str, count: int) -> list[float]:
    raw = chat_request(key)
    return [await one_stream(port, raw) for _ in range(count)]


async def scenario(port: int, keys: dict[str, str], count: int, *, flood: bool) -> list[float]:
    result: list[float] = []
    async with trio.open_nursery() as nursery:
        if flood:
            raw = chat_request(keys["flood"])

            async def flooder() -> None:
                while True:
                    await one_stream(port, raw)

            for _ in range(FLOOD):
                nursery.start_soon(flooder)
            await trio.sleep(2.0)  # let the flood fill every queue first
        result = await interactive(port, keys["chat"], count)
        nursery.cancel_scope.cancel()
    return result


def run_config(work: Path, name: str, parallel: int, count: int) -> list[str]:
    ports = {"emulator": free_port(), "nzgw": free_port()}
    backends = [
        {"name": "gpu", "url": f"http://127.0.0.1:{ports['emulator']}", "parallel": parallel}
    ]
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/{name}.db",
        "NZGW_LOG_LEVEL": "warning",
        "OLLAMA_BACKENDS": json.dumps(backends),
        "NZGW_BIND": f"127.0.0.1:{ports['nzgw']}",
        "NZGW_DISCOVERY_INTERVAL": "30",
        "NZGW_QUEUE_TIMEOUT": "300",
    }
    quiet = subprocess.DEVNULL
    emulator = subprocess.Popen(
        [
            *(sys.executable, "-m", "nzgw", "emulate-ollama"),
            *("--port", str(ports["emulator"]), "--parallel", str(SLOTS)),
            *("--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY)),
            *("--first-token-delay", str(FIRST_TOKEN_DELAY)),
        ],
        env=env,
        stderr=quiet,
    )
    nzgw("migrate", env=env)
    keys: dict[str, str] = {}
    for tenant in ("flood", "chat"):
        nzgw("create-tenant", "--name", tenant, env=env)
        created = nzgw("create-key", "--tenant", tenant, "--name", tenant, "--json", env=env)
        keys[tenant] = json.loads(created)["key"]
    server = subprocess.Popen(
        [sys.executable, "-m", "nzgw", "serve"], env=env, cwd=work, stderr=quiet
    )
    lines: list[str] = []
    try:

        async def measure() -> None:
            await wait_port(ports["emulator"])
            await wait_port(ports["nzgw"])
            await interactive(ports["nzgw"], keys["chat"], 3)  # warm up
            for flood in (False, True):
                ttft = await scenario(ports["nzgw"], keys, count, flood=flood)
                lines.append(
                    f"| {name} (nzgw parallel={parallel}) | {'50 streams' if flood else 'none'} "
                    f"| {len(ttft)} | {pct(ttft, 0.5):.0f} | {pct(ttft, 0.99):.0f} "
                    f"| {max(ttft) * 1000:.0f} |"
                )
                print(lines[-1], flush=True)

        trio.run(measure)
    finally:
        for proc in (server, emulator):
            proc.terminate()
        for proc in (server, emulator):
            proc.wait(timeout=30)
    return lines


HEADER = (
    "| configuration | flood tenant | interactive requests | TTFT p50 ms | TTFT p99 ms "
    "| TTFT max ms |\n|---|---|---|---|---|---|"
)


def main(count: int, out: Path | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="nzgw-fair-bench-"))
    service = FIRST_TOKEN_DELAY + TOKENS * TOKEN_DELAY
    print(f"emulator: {SLOTS} slots, one generation ≈ {service * 1000:.0f} ms", flush=True)
    print(HEADER, flush=True)
    lines = [
        *run_config(work, "fifo", SLOTS * 64, count),
        *run_config(work, "fair", SLOTS, count),
    ]
    if out is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.write_text(
            f"# fair_bench, {stamp}, {os.cpu_count()} cores\n\n"
            f"Emulator: {SLOTS} slots, {TOKENS} tokens, first token after "
            f"{FIRST_TOKEN_DELAY * 1000:.0f} ms, then one every {TOKEN_DELAY * 1000:.0f} ms "
            f"(one generation ≈ {service * 1000:.0f} ms of slot time). Flood: {FLOOD} "
            "concurrent streamed chats of another tenant. Interactive: one streamed chat at a "
            "time; TTFT = time to the first body byte at the client.\n\n"
            + "\n".join([HEADER, *lines])
            + "\n"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="interactive requests per run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    main(args.requests, args.out)
