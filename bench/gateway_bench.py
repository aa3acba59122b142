"""Gateway benchmark: added latency and server CPU per request and per relayed chunk.

    bin/nzgw --help >/dev/null   # (sync the venv once)
    .venv/bin/python bench/gateway_bench.py [--requests 2000] [--out bench/results/latest.md]
    .venv/bin/python bench/gateway_bench.py --whole-only --concurrency 1 --rounds 5 \
        --baseline /path/to/other/checkout      # A/B: two nzgw builds, rows interleaved

Three servers run as separate processes, each measured on its own:
  * the Ollama emulator (the upstream), `nzgw emulate-ollama`;
  * nzgw in front of it (`nzgw serve`, SQLite store, in-process counters, one key);
  * the floor: a trivial quart-trio POST endpoint on hypercorn's trio worker, i.e. what the
    framework alone costs per request.
The load generator is this process: keep-alive HTTP/1.1 clients on raw Trio sockets (cheaper
than httpx, so the client is not what is measured). Server CPU comes from each process's own
CPU time (/proc/PID/stat), read before and after each run, divided by the requests (or
chunks). Not a test: numbers depend on the machine; run it on a quiet one.

`--baseline DIR` adds a second nzgw process running the `nzgw` package of another checkout
(same store, same key), and `--rounds N` repeats every row N times, the targets interleaved:
an A/B of two builds minutes apart on a shared machine, each row its own measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

FLOOR_APP = """
import sys, trio, hypercorn.config, hypercorn.trio
from quart import request
from quart_trio import QuartTrio
app = QuartTrio("floor")
@app.post("/api/chat")
async def chat():
    body = await request.get_data()
    return b'{"model":"m","message":{"role":"assistant","content":"ok"},"done":true}', 200, {
        "content-type": "application/json; charset=utf-8"}
config = hypercorn.config.Config()
config.bind = [sys.argv[1]]
config.accesslog = None
trio.run(hypercorn.trio.serve, app, config)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


class Client:
    """One keep-alive HTTP/1.1 connection; answers are read to the end (chunked or not)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    async def request(self, raw: bytes) -> tuple[float, float, int, int]:
        """Send `raw`; return (time to first body byte, total time, body chunks, NDJSON frames)."""
        start = time.perf_counter()
        await self.stream.send_all(raw)
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {head!r} {self.buffer[:200]!r}")
        headers = head.lower()
        chunks = frames = 0
        first = 0.0
        if b"transfer-encoding: chunked" in headers:
            while True:
                while b"\r\n" not in self.buffer:
                    await self._fill()
                size_line, _, rest = self.buffer.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if not first and size:
                    first = time.perf_counter() - start
                while len(rest) < size + 2:
                    await self._fill()
                    size_line, _, rest = self.buffer.partition(b"\r\n")
                frames += rest[:size].count(b"\n")
                self.buffer = rest[size + 2 :]
                if size == 0:
                    break
                chunks += 1
        else:
            length = int(headers.split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(self.buffer) < length:
                await self._fill()
            first = time.perf_counter() - start
            self.buffer = self.buffer[length:]
            chunks = frames = 1
        return first, time.perf_counter() - start, chunks, frames


def post(path: str, body: dict[str, object], key: str | None = None) -> bytes:
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def run_load(
    port: int, raw: bytes, *, requests: int, concurrency: int
) -> tuple[list[float], list[float], int, int]:
    ttfb: list[float] = []
    total: list[float] = []
    chunks = frames = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, chunks, frames
        client = await Client.connect(port)
        try:
            while remaining > 0:
                remaining -= 1
                try:
                    first, whole, seen, lines = await client.request(raw)
                except ConnectionError:
                    # hypercorn closes a keep-alive connection after 1000 requests: reconnect.
                    await client.stream.aclose()
                    client = await Client.connect(port)
                    first, whole, seen, lines = await client.request(raw)
                ttfb.append(first)
                total.append(whole)
                chunks += seen
                frames += lines
        finally:
            await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return ttfb, total, chunks, frames


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def wait_port(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


Measure = Callable[[], Awaitable[tuple[list[float], list[float], int, int]]]


async def measured(pid: int, run: Measure) -> tuple[list[float], list[float], int, int, float]:
    before = cpu_seconds(pid)
    ttfb, total, chunks, frames = await run()
    return ttfb, total, chunks, frames, cpu_seconds(pid) - before


def nzgw(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "nzgw", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return result.stdout


def start_servers(
    work: Path, baseline: Path | None = None
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, int], str]:
    """The emulator, the floor and nzgw (and the baseline's nzgw) as processes; returns them,
    their ports and a key."""
    ports = {"emulator": free_port(), "nzgw": free_port(), "floor": free_port()}
    if baseline is not None:
        ports["baseline"] = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work}/bench.db",
        "NZGW_LOG_LEVEL": "warning",
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{ports['emulator']}",
        "NZGW_BIND": f"127.0.0.1:{ports['nzgw']}",
        "NZGW_DISCOVERY_INTERVAL": "30",
        # Measure the relay, not the fair queue: as many backend slots as clients, and no
        # bound on bodies in progress (32 clients share one key from one address).
        "OLLAMA_PARALLEL": "64",
        "NZGW_MAX_BODY_UPLOADS_PER_KEY": "0",
        "NZGW_MAX_BODY_UPLOADS_PER_CLIENT": "0",
    }
    (work / "floor_app.py").write_text(FLOOR_APP)
    quiet = subprocess.DEVNULL
    procs = {
        "emulator": subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nzgw",
                "emulate-ollama",
                "--port",
                str(ports["emulator"]),
                "--tokens",
                "200",
            ],
            env=env,
            stderr=quiet,
        ),
        "floor": subprocess.Popen(
            [sys.executable, str(work / "floor_app.py"), f"127.0.0.1:{ports['floor']}"],
            cwd=work,
            env=env,
            stderr=quiet,
        ),
    }
    nzgw("migrate", env=env)
    nzgw("create-tenant", "--name", "bench", env=env)
    created = nzgw("create-key", "--tenant", "bench", "--name", "bench", "--json", env=env)
    procs["nzgw"] = subprocess.Popen(
        [sys.executable, "-m", "nzgw", "serve"],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=work,
        stderr=quiet,
    )
    if baseline is not None:
        procs["baseline"] = subprocess.Popen(
            [sys.executable, "-m", "nzgw", "serve"],
            env={**env, "PYTHONPATH": str(baseline), "NZGW_BIND": f"127.0.0.1:{ports['baseline']}"},
            cwd=work,
            stderr=quiet,
        )
    return procs, ports, json.loads(created)["key"]


HEADER = (
    "| what | conc. | requests | p50 ms | p99 ms | TTFB p50 ms | req/s | server CPU ms/req "
    "| server CPU µs per relayed chunk / per frame |\n|---|---|---|---|---|---|---|---|---|"
)


async def measure_all(
    pids: dict[str, int],
    ports: dict[str, int],
    key: str,
    n: int,
    *,
    concurrency: tuple[int, ...] = (1, 32),
    rounds: int = 1,
    whole_only: bool = False,
) -> list[str]:
    for port in ports.values():
        await wait_port(port)
    chat = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "Hello there"}],
        "stream": False,
        "options": {"num_predict": 8},
    }
    stream = {**chat, "stream": True, "options": {"num_predict": 200}}
    lines: list[str] = []

    async def row(name: str, server: str, raw: bytes, conc: int, count: int) -> None:
        pid, port = pids[server], ports[server]
        await run_load(port, raw, requests=min(count, 50), concurrency=conc)  # warm up
        ttfb, total, chunks, frames, cpu = await measured(
            pid, lambda: run_load(port, raw, requests=count, concurrency=conc)
        )
        streamed = frames > count
        per_chunk = f"{cpu / chunks * 1e6:.1f} / {cpu / frames * 1e6:.1f}" if streamed else "-"
        lines.append(
            f"| {name} | {conc} | {count} | {pct(total, 0.5):.2f} | {pct(total, 0.99):.2f} | "
            f"{pct(ttfb, 0.5):.2f} | {count / sum(total) * conc:.0f} | "
            f"{cpu / count * 1000:.3f} | {per_chunk} |"
        )
        print(lines[-1], flush=True)

    print(HEADER)
    for _ in range(rounds):
        for conc in concurrency:
            await row("floor: quart-trio POST", "floor", post("/api/chat", chat), conc, n)
            await row("emulator direct, whole", "emulator", post("/api/chat", chat), conc, n)
            await row("nzgw → emulator, whole", "nzgw", post("/api/chat", chat, key), conc, n)
            if "baseline" in ports:
                raw = post("/api/chat", chat, key)
                await row("baseline nzgw → emulator, whole", "baseline", raw, conc, n)
            if whole_only:
                continue
            await row(
                "emulator direct, stream 200", "emulator", post("/api/chat", stream), conc, n // 10
            )
            await row(
                "nzgw → emulator, stream 200", "nzgw", post("/api/chat", stream, key), conc, n // 10
            )
    return lines


def main(
    requests: int,
    out: Path | None,
    *,
    baseline: Path | None = None,
    concurrency: tuple[int, ...] = (1, 32),
    rounds: int = 1,
    whole_only: bool = False,
) -> None:
    work = Path(tempfile.mkdtemp(prefix="nzgw-bench-"))
    procs, ports, key = start_servers(work, baseline)
    try:
        pids = {name: proc.pid for name, proc in procs.items()}
        lines = trio.run(
            partial(
                measure_all,
                concurrency=concurrency,
                rounds=rounds,
                whole_only=whole_only,
            ),
            pids,
            ports,
            key,
            requests,
        )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
    if out is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        report = "\n".join([HEADER, *lines])
        out.write_text(f"# gateway_bench, {stamp}, {os.cpu_count()} cores\n\n{report}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's root")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--whole-only", action="store_true", help="no streamed rows")
    args = parser.parse_args()
    main(
        args.requests,
        args.out,
        baseline=args.baseline,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        rounds=args.rounds,
        whole_only=args.whole_only,
    )
