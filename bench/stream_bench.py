"""Stream benchmark: what relaying a model's tokens costs, nzgw against a bare reverse proxy.

    bin/nzgw --help >/dev/null   # (sync the venv once)
    .venv/bin/python bench/stream_bench.py                        # the full run (~5 min)
    .venv/bin/python bench/stream_bench.py --streams 50 --duration 5 --note "quick run"

Two scenarios, each against every target, one target at a time:

* **paced**: a few concurrent streams whose upstream writes one token per write, paced like a
  model (default 8 streams × 250 tokens, one every 10 ms), so no proxy can coalesce them: the
  server CPU divided by the relayed frames is the cost of one token on its way through.
* **slow**: many concurrent slow streams (default 1,000 at 10 tokens/s for 30 s), started
  together: completed and failed streams (with the status), chunk delay, CPU, memory.

Targets (`--targets`, default all): `direct` (the fake upstream itself, the delay baseline),
`nginx` (Debian's nginx as a plain `proxy_pass` with `proxy_buffering off`, one worker, its own
config on a free port; installed with apt-get when missing and run as root), `floor` (a bare
quart-trio relay app on hypercorn's trio worker: the stack nzgw is built on, nothing else),
`nzgw` (`nzgw serve` embedded: SQLite + in-process counters), `nzgw-pg-redis` (a scratch
PostgreSQL database on 127.0.0.1:5432, `nzgw migrate`, and a private `redis-server` on a free
port), `nzgw-2-workers` (the same with `NZGW_WORKERS=2`).

The load: a fake Ollama upstream and the streaming clients, separate processes, by default
`bench/streamload` (Go, standard library only, built here with `go build` offline: a few µs
per frame, so that 1,000 streams do not make the load generator the bottleneck); `--load
python` uses this file's own upstream (`--upstream PORT`) and clients in this process instead
(~100 µs per frame: fine for the paced scenario and ~100 slow streams, not for 1,000 on 2
cores). Each stream's frames are scheduled at fixed times from the moment its request
arrived, and each frame carries its scheduled time (`"t"`). The clients take their receive
time for every frame: **chunk delay** = receive time - scheduled time, so it includes every
hop and the upstream's and clients' own lateness (the `direct`
row). **Server CPU** is the CPU time of the server process and all its descendants (nginx's
and nzgw's workers included), from /proc: every thread's schedstat run time (nanoseconds),
checked against /proc/PID/stat's utime + stime (clock ticks, which also count exited threads
and reaped children), read before and after each scenario and divided by the frames the
clients received (each frame is one upstream write). **RSS** is the peak of each server
process, sampled every 0.5 s. On a loaded machine delays grow with the load; CPU per frame
much less (it is the server's own time, not the time it waited for a core).

Bounded: every stream and scenario has a deadline, every server is stopped (and the scratch
database dropped) at the end, only loopback addresses are used. Writes `--out` (Markdown,
default bench/results/streams.md) and the same numbers as JSON beside it. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio
from gateway_bench import free_port, nzgw  # bench/ is the script's directory: on sys.path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
MODEL = "bench"
ALL_TARGETS = (
    "direct",
    "nginx",
    "floor",
    "nzgw",
    "nzgw-no-pump",
    "nzgw-pg-redis",
    "nzgw-2-workers",
)


# --- the fake upstream (a separate process: `stream_bench.py --upstream PORT`) ----------------


@dataclass
class Pace:
    tokens: int = 10
    interval: float = 0.01
    first: float = 0.0


def _json_answer(payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


TAGS = {
    "models": [
        {
            "name": f"{MODEL}:latest",
            "model": f"{MODEL}:latest",
            "modified_at": "2026-01-01T00:00:00Z",
            "size": 1,
            "digest": "0" * 64,
            "details": {"format": "gguf", "family": "bench", "parameter_size": "1B"},
        }
    ]
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _frame(scheduled: float) -> bytes:
    return (
        b'{"t":%.6f,"model":"%s","created_at":"2026-01-01T00:00:00Z",'
        b'"message":{"role":"assistant","content":"tok "},"done":false}\n'
        % (scheduled, MODEL.encode())
    )


def _final(tokens: int) -> bytes:
    return (
        json.dumps(
            {
                "model": MODEL,
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "total_duration": 1,
                "load_duration": 1,
                "prompt_eval_count": 8,
                "prompt_eval_duration": 1,
                "eval_count": tokens,
                "eval_duration": 1,
            }
        ).encode()
        + b"\n"
    )


async def _stream_answer(stream: trio.abc.Stream, pace: Pace, arrived: float) -> None:
    """One write per frame at its scheduled time; the head goes with the first frame."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for index in range(pace.tokens):
        scheduled = arrived + pace.first + index * pace.interval
        await trio.sleep(max(0.0, scheduled - time.monotonic()))
        await stream.send_all(head + _chunk(_frame(scheduled)))
        head = b""
    await trio.sleep(
        max(0.0, arrived + pace.first + pace.tokens * pace.interval - time.monotonic())
    )
    await stream.send_all(head + _chunk(_final(pace.tokens)) + b"0\r\n\r\n")


async def _upstream_connection(stream: trio.abc.Stream, pace: Pace) -> None:
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            arrived = time.monotonic()
            request_line, *header_lines = head.split(b"\r\n")
            method, target = request_line.split(b" ")[:2]
            length = 0
            for line in header_lines:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            path = target.split(b"?")[0]
            if method == b"POST" and path in (b"/api/chat", b"/api/generate"):
                await _stream_answer(stream, pace, arrived)
            elif method == b"POST" and path == b"/bench/pace":
                settings = json.loads(body)
                pace.tokens = int(settings["tokens"])
                pace.interval = float(settings["interval"])
                pace.first = float(settings["first"])
                await stream.send_all(_json_answer({"ok": True}))
            elif path == b"/api/tags":
                await stream.send_all(_json_answer(TAGS))
            elif path == b"/api/ps":
                await stream.send_all(_json_answer({"models": []}))
            elif path == b"/api/version":
                await stream.send_all(_json_answer({"version": "0.12.6"}))
            else:
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client (a proxy) went away
    finally:
        await stream.aclose()


def run_upstream(port: int) -> None:
    pace = Pace()

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)

        async def handler(stream: trio.SocketStream) -> None:
            await _upstream_connection(stream, pace)

        await trio.serve_listeners(handler, listeners)

    trio.run(main)


# --- the floor: a bare quart-trio relay (run as a script, like bench/gateway_bench.py) ---------

FLOOR_APP = """
import sys, trio, hypercorn.config, hypercorn.trio
from quart import Response, request
from quart_trio import QuartTrio

UPSTREAM = int(sys.argv[2])
app = QuartTrio("floor")
app.config["RESPONSE_TIMEOUT"] = None  # Quart's 60 s default would cut long streams

@app.post("/api/chat")
async def chat():
    body = await request.get_data()
    stream = await trio.open_tcp_stream("127.0.0.1", UPSTREAM)
    await stream.send_all(
        b"POST /api/chat HTTP/1.1\\r\\nHost: upstream\\r\\nContent-Type: application/json\\r\\n"
        b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body
    )
    buffer = b""
    while b"\\r\\n\\r\\n" not in buffer:
        buffer += await stream.receive_some(65536)
    head, _, buffer = buffer.partition(b"\\r\\n\\r\\n")

    async def relay():
        nonlocal buffer
        try:
            while True:  # chunked framing: one upstream chunk, one ASGI send
                while b"\\r\\n" not in buffer:
                    buffer += await stream.receive_some(65536)
                size_line, _, rest = buffer.partition(b"\\r\\n")
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    rest += await stream.receive_some(65536)
                buffer = rest[size + 2:]
                if size == 0:
                    return
                yield rest[:size]
        finally:
            stream.socket.close()

    return Response(relay(), content_type="application/x-ndjson")

config = hypercorn.config.Config()
config.bind = [sys.argv[1]]
config.accesslog = None
config.backlog = 4096
trio.run(hypercorn.trio.serve, app, config)
"""


# --- processes, CPU and memory from /proc ------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of a process tree, two ways: /proc/PID/stat's utime + stime (+ cutime +
    cstime of reaped children), exact but in clock ticks (10 ms), and the sum of every live
    thread's /proc/PID/task/TID/schedstat run time, in nanoseconds but blind to threads that
    exited. `cpu_between` uses the fine one unless the coarse one saw more."""

    ticks: float
    threads: float
    processes: int


def tree_cpu(pid: int) -> CpuSample:
    ticks = 0
    nanoseconds = 0
    members = process_tree(pid)
    for member in members:
        try:
            fields = _stat_fields(member)
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
        for task in tasks:
            try:
                nanoseconds += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
        # Children already reaped are known in ticks only.
        nanoseconds += (int(fields[13]) + int(fields[14])) * 1_000_000_000 // CLK_TCK
    return CpuSample(ticks / CLK_TCK, nanoseconds / 1e9, len(members))


def cpu_between(before: CpuSample, after: CpuSample) -> float:
    fine = after.threads - before.threads
    coarse = after.ticks - before.ticks
    # Each process's tick count is off by up to one tick at either end.
    if coarse - fine > 2 * max(before.processes, after.processes) / CLK_TCK:
        return coarse  # threads exited in between: the fine sum lost their time
    return fine


def rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Server:
    name: str
    port: int
    pid: int
    headers: bytes = b""  # extra request headers (the API key)


@contextmanager
def running(argv: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> Iterator[int]:
    """A server process for the block's duration: SIGTERM at the end, SIGKILL after 30 s."""
    with log.open("ab") as log_file:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log_file, stderr=log_file)
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(port: int, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            raise RuntimeError(f"server pid {pid} exited before it listened on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def raise_own_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the client -----------------------------------------------------------------------------------


@dataclass
class StreamsResult:
    streams: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    chunks: int = 0  # chunked-encoding chunks received (a proxy may coalesce frames)
    frames: int = 0  # NDJSON frames received: the upstream wrote each one on its own
    delays: list[float] = field(default_factory=list)
    first_delays: list[float] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1


class _CutError(Exception):
    """The server closed the connection before the answer was complete."""


@dataclass
class _Reader:
    stream: trio.SocketStream
    buffer: bytes = b""
    received_at: float = 0.0

    async def until(self, enough: Callable[[bytes], bool]) -> None:
        """Receive until `enough(buffer)`; `received_at` is when the last bytes came."""
        while not enough(self.buffer):
            data = await self.stream.receive_some(65536)
            if not data:
                raise _CutError
            self.received_at = time.monotonic()
            self.buffer += data

    def take(self, count: int) -> bytes:
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken


async def one_stream(port: int, request: bytes, tokens: int, result: StreamsResult) -> None:
    """Send one streamed chat request and read it to the end, noting each frame's delay."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = _Reader(stream)
    frames = 0
    done = False
    try:
        await stream.send_all(request)
        try:
            await reader.until(lambda b: b"\r\n\r\n" in b)
        except _CutError:
            result.fail("closed before the answer")
            return
        head = reader.take(reader.buffer.index(b"\r\n\r\n") + 4)
        status = head.split(b" ", 2)[1].decode()
        if status != "200":
            result.fail(f"HTTP {status}")
            return
        lines = b""
        while True:  # chunked framing
            await reader.until(lambda b: b"\r\n" in b)
            size_line = reader.take(reader.buffer.index(b"\r\n") + 2)
            size = int(size_line.split(b";")[0], 16)
            await reader.until(lambda b: len(b) >= size + 2)  # noqa: B023 (awaited at once)
            data = reader.take(size + 2)[:size]
            if size == 0:
                break
            result.chunks += 1
            *complete, lines = (lines + data).split(b"\n")
            for line in complete:
                if line.startswith(b'{"t":'):
                    delay = reader.received_at - float(line[5 : line.index(b",")])
                    if frames == 0:
                        result.first_delays.append(delay)
                    result.delays.append(delay)
                    frames += 1
                    result.frames += 1
                elif line.strip():
                    frame = json.loads(line)
                    if "error" in frame:
                        result.fail("error frame")
                        return
                    done = frame.get("done") is True
                    result.frames += 1
    except _CutError:
        result.fail("cut mid-stream")
        return
    finally:
        await stream.aclose()
    if done and frames == tokens:
        result.completed += 1
    else:
        result.fail(f"incomplete ({frames}/{tokens} frames, done={done})")


TTFT_PACE = Pace(tokens=3, interval=0.01, first=0.02)


async def time_to_first_token(bench: Bench, server: Server, count: int) -> list[float]:
    """`count` streams one after the other (nothing else running): for each, the seconds from
    connecting to the first frame's arrival minus the model's own first-token time
    (`TTFT_PACE.first`)."""
    await set_pace(bench.upstream_port, TTFT_PACE)
    request = chat_request(server, TTFT_PACE.tokens)
    end_to_end: list[float] = []
    for _ in range(count):
        with trio.fail_after(30):
            started = time.monotonic()
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            reader = _Reader(stream)
            try:
                await stream.send_all(request)
                await reader.until(lambda b: b'{"t":' in b)
                end_to_end.append(reader.received_at - started - TTFT_PACE.first)
                await reader.until(lambda b: b'"done":true' in b and b"0\r\n\r\n" in b)
            finally:
                await stream.aclose()
    return end_to_end


def chat_request(server: Server, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "stream": True,
            "options": {"num_predict": tokens},
        }
    ).encode()
    return (
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + server.headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


async def set_pace(upstream_port: int, pace: Pace) -> None:
    body = json.dumps(asdict(pace)).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    try:
        await stream.send_all(
            b"POST /bench/pace HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        answer = b""
        while b'"ok"' not in answer:
            data = await stream.receive_some()
            if not data:
                raise RuntimeError("the upstream did not take the pace")
            answer += data
    finally:
        await stream.aclose()


@dataclass
class Measured:
    target: str
    scenario: str
    streams: int
    tokens: int
    interval_ms: float
    completed: int
    failed: dict[str, int]
    frames: int
    chunks: int
    cpu_s: float
    cpu_us_per_frame: float | None
    delay_p50_ms: float | None
    delay_p99_ms: float | None
    first_delay_p50_ms: float | None
    steady_delay_p99_ms: float | None
    peak_rss_mb: list[float]
    wall_s: float


def pct_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class ClientSummary:
    completed: int
    failed: dict[str, int]
    frames: int
    chunks: int
    delay_p50_ms: float | None
    delay_p99_ms: float | None
    first_delay_p50_ms: float | None
    steady_delay_p99_ms: float | None = None  # `--load go` only


async def python_clients(server: Server, pace: Pace, streams: int, ramp: float) -> ClientSummary:
    """The streams from this process (`--load python`)."""
    request = chat_request(server, pace.tokens)
    result = StreamsResult(streams=streams)

    async def bounded_stream(delay: float) -> None:
        await trio.sleep(delay)
        with trio.move_on_after(pace.first + pace.tokens * pace.interval + 60) as scope:
            try:
                await one_stream(server.port, request, pace.tokens, result)
            except (OSError, trio.BrokenResourceError, ValueError) as exc:
                result.fail(type(exc).__name__)
        if scope.cancelled_caught:
            result.fail("timed out")

    async with trio.open_nursery() as clients:
        for index in range(streams):
            clients.start_soon(bounded_stream, ramp * index / streams)
    return ClientSummary(
        completed=result.completed,
        failed=result.failed,
        frames=result.frames,
        chunks=result.chunks,
        delay_p50_ms=pct_ms(result.delays, 0.5),
        delay_p99_ms=pct_ms(result.delays, 0.99),
        first_delay_p50_ms=pct_ms(result.first_delays, 0.5),
    )


async def go_clients(
    binary: str, server: Server, pace: Pace, streams: int, ramp: float
) -> ClientSummary:
    """The streams from `streamload client` (`--load go`), a process of its own."""
    argv = [
        binary, "client", "-port", str(server.port), "-streams", str(streams),
        "-tokens", str(pace.tokens), "-ramp", str(ramp),
        "-deadline", str(pace.first + pace.tokens * pace.interval + 60),
    ]  # fmt: skip
    if server.headers:
        argv += ["-header", server.headers.decode().strip()]
    done = await trio.run_process(argv, capture_stdout=True)
    data = json.loads(done.stdout)
    return ClientSummary(**{name: data.get(name) for name in ClientSummary.__dataclass_fields__})


async def measure(
    bench: Bench, server: Server, scenario: str, streams: int, pace: Pace, ramp: float
) -> Measured:
    """Run `streams` concurrent streams through `server`, started over `ramp` seconds."""
    await set_pace(bench.upstream_port, pace)
    peaks: dict[int, float] = {}

    async def sample_rss() -> None:
        while True:
            for pid in process_tree(server.pid):
                peaks[pid] = max(peaks.get(pid, 0.0), rss_mb(pid))
            await trio.sleep(0.5)

    cpu_before = tree_cpu(server.pid)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        if bench.load_binary:
            summary = await go_clients(bench.load_binary, server, pace, streams, ramp)
        else:
            summary = await python_clients(server, pace, streams, ramp)
        nursery.cancel_scope.cancel()
    wall = time.monotonic() - started
    cpu = cpu_between(cpu_before, tree_cpu(server.pid))
    return Measured(
        target=server.name,
        scenario=scenario,
        streams=streams,
        tokens=pace.tokens,
        interval_ms=pace.interval * 1000,
        completed=summary.completed,
        failed=summary.failed,
        frames=summary.frames,
        chunks=summary.chunks,
        cpu_s=round(cpu, 3),
        cpu_us_per_frame=round(cpu / summary.frames * 1e6, 1) if summary.frames else None,
        delay_p50_ms=summary.delay_p50_ms,
        delay_p99_ms=summary.delay_p99_ms,
        first_delay_p50_ms=summary.first_delay_p50_ms,
        steady_delay_p99_ms=summary.steady_delay_p99_ms,
        peak_rss_mb=sorted((round(v, 1) for v in peaks.values()), reverse=True),
        wall_s=round(wall, 2),
    )


# --- the targets ------------------------------------------------------------------------------


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 65536;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
{user}
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream ollama {{
        server 127.0.0.1:{upstream};
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("nginx is missing: apt-get install nginx-light (as root)")
    print("== apt-get install nginx-light", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found:
        raise RuntimeError("nginx is still missing after apt-get install nginx-light")
    return found


def create_key(env: dict[str, str]) -> bytes:
    nzgw("migrate", env=env)
    nzgw("create-tenant", "--name", "bench", env=env)
    created = nzgw("create-key", "--tenant", "bench", "--name", "bench", "--json", env=env)
    key: str = json.loads(created)["key"]
    return f"Authorization: Bearer {key}\r\n".encode()


@dataclass
class Bench:
    work: Path
    upstream_port: int
    streams: int
    stack: ExitStack
    pg_admin: str
    redis_url: str
    upstream_pid: int
    load_binary: str  # `streamload` (--load go), or "" for this process's Python load
    _pg_url: str = ""
    _keys: dict[str, bytes] = field(default_factory=dict)

    def nzgw_env(self, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("NZGW_", "OLLAMA_"))}
        keep.pop("DATABASE_URL", None)
        keep.pop("REDIS_URL", None)
        return {
            **keep,
            "PYTHONPATH": str(ROOT),
            "NZGW_ENV_FILE": str(self.work / "none.env"),
            "OLLAMA_BASE_URL": f"http://127.0.0.1:{self.upstream_port}",
            "NZGW_LOG_LEVEL": "warning",
            "NZGW_DISCOVERY_INTERVAL": "30",
            # One upstream connection per concurrent stream (the pool's default is 256).
            "NZGW_UPSTREAM_POOL_SIZE": str(max(256, self.streams + 64)),
            # The fake upstream serves every stream at once: give it a slot per stream (the
            # default, 1, queues all but one in the tenant-fair queue: 429 past 512 waiting,
            # 503 after NZGW_QUEUE_TIMEOUT), as an operator sets OLLAMA_PARALLEL to the
            # backend's OLLAMA_NUM_PARALLEL. No bound on bodies in progress per key or per
            # client either: every stream is one key from one address.
            "OLLAMA_PARALLEL": str(self.streams + 64),
            "NZGW_MAX_BODY_UPLOADS_PER_KEY": "0",
            "NZGW_MAX_BODY_UPLOADS_PER_CLIENT": "0",
            **extra,
        }

    def pg_url(self) -> str:
        """A scratch PostgreSQL database (dropped at the end), created on first use."""
        if not self._pg_url:
            name = f"nzgw_bench_{secrets.token_hex(4)}"
            admin = self.pg_admin.rsplit("/", 1)[0]
            subprocess.run(["createdb", "--maintenance-db", self.pg_admin, name], check=True)
            self.stack.callback(
                subprocess.run,
                ["dropdb", "--force", "--maintenance-db", self.pg_admin, name],
                check=False,
            )
            self._pg_url = f"{admin}/{name}"
        return self._pg_url

    def redis(self) -> str:
        """`--redis-url`, or a private redis-server on a free port for this run."""
        if not self.redis_url:
            port = free_port()
            argv = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--maxmemory-policy", "noeviction",
            ]  # fmt: skip
            pid = self.stack.enter_context(
                running(argv, env=dict(os.environ), cwd=self.work, log=self.work / "redis.log")
            )
            wait_port(port, pid)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self.redis_url

    @contextmanager
    def target(self, name: str) -> Iterator[Server]:
        port = free_port()
        work = self.work
        if name == "direct":
            yield Server(name, self.upstream_port, self.upstream_pid)
            return
        if name == "nginx":
            user = "user root root;" if os.geteuid() == 0 else ""
            conf = work / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(work=work, upstream=self.upstream_port, port=port, user=user)
            )
            argv = [nginx_binary(), "-p", str(work), "-c", str(conf), "-g", "daemon off;"]
            env = dict(os.environ)
        elif name == "floor":
            script = work / "floor_app.py"
            script.write_text(FLOOR_APP)
            argv = [sys.executable, str(script), f"127.0.0.1:{port}", str(self.upstream_port)]
            env = dict(os.environ)
        else:
            env = self.nzgw_env(NZGW_BIND=f"127.0.0.1:{port}")
            if name in ("nzgw", "nzgw-no-pump"):
                env["DATABASE_URL"] = f"sqlite:///{work}/bench.db"
                if name == "nzgw-no-pump":  # tokens relayed in each request's task
                    env["NZGW_RELAY_PUMP"] = "false"
            else:
                env["DATABASE_URL"] = self.pg_url()
                env["REDIS_URL"] = self.redis()
                if name == "nzgw-2-workers":
                    env["NZGW_WORKERS"] = "2"
            if env["DATABASE_URL"] not in self._keys:
                self._keys[env["DATABASE_URL"]] = create_key(env)
            headers = self._keys[env["DATABASE_URL"]]
            argv = [sys.executable, "-m", "nzgw", "serve"]
        with running(argv, env=env, cwd=work, log=work / f"{name}.log") as pid:
            wait_port(port, pid)
            server = Server(name, port, pid)
            if name.startswith("nzgw"):
                server.headers = headers
                wait_ready(port)
            yield server


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Until /readyz answers 200 (the first discovery round is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.2)
    raise RuntimeError(f"nzgw on {port} not ready after {timeout} s")


# --- the report -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(
    rows: list[Measured], args: argparse.Namespace, load: tuple[str, str], skipped: list[str]
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# stream_bench, {stamp}, {os.cpu_count()} cores",
        "",
        f"Load average at start / end: {load[0]} / {load[1]}.",
    ]
    if args.note:
        lines += ["", f"**Note:** {args.note}"]
    lines += [
        "",
        f"- paced: {args.paced_streams} concurrent streams × {args.paced_tokens} tokens, one "
        f"write every {args.paced_interval * 1000:g} ms",
        f"- slow: {args.streams} concurrent streams × {args.rate:g} tokens/s × "
        f"{args.duration:g} s, started over {args.ramp:g} s",
        f"- load (fake upstream and clients): {args.load}",
        "",
        "Server CPU: the target's processes (workers included) per frame relayed (each frame "
        "is one upstream write; `chunks` counts what the clients received, fewer when a proxy "
        "coalesced frames that waited). Delay: client receive time minus the upstream's "
        "scheduled emit time. The `direct` row is the fake upstream and the client alone: its "
        "delays are theirs (every other row includes them), its CPU is the upstream's own. "
        "Steady p99: the frames scheduled a second after the last stream's first frame, when "
        "every stream runs and none is being admitted (`--load go` only). "
        "RSS: peak per process, MB.",
        "",
        f"- ttft: {args.ttft_streams} streams one after the other (a new connection each); "
        "delay = time from connecting to the first frame's arrival minus the model's own "
        f"{TTFT_PACE.first * 1000:g} ms to its first token (connect, request, the target's "
        "checks, the first frame's way back): the `ttft` rows' p50 minus the `direct` row's "
        "is the target's time-to-first-token overhead.",
        "",
        "| target | scenario | completed | failed | frames / chunks | server CPU µs/frame "
        "| delay p50 ms | delay p99 ms | steady p99 ms | first frame p50 ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        failed = ", ".join(f"{n}× {why}" for why, n in sorted(row.failed.items())) or "0"
        cpu = "-" if row.cpu_us_per_frame is None else f"{row.cpu_us_per_frame:.0f}"
        rss = " + ".join(f"{v:.0f}" for v in row.peak_rss_mb)
        lines.append(
            f"| {row.target} | {row.scenario} | {row.completed}/{row.streams} | {failed} "
            f"| {row.frames} / {row.chunks} | {cpu} | {_ms(row.delay_p50_ms)} "
            f"| {_ms(row.delay_p99_ms)} | {_ms(row.steady_delay_p99_ms)} "
            f"| {_ms(row.first_delay_p50_ms)} | {rss} |"
        )
    if skipped:
        lines += ["", "Not measured:", *(f"- {why}" for why in skipped)]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def run_all(
    bench: Bench, args: argparse.Namespace, progress: Callable[[str], None], skipped: list[str]
) -> list[Measured]:
    rows: list[Measured] = []
    paced = Pace(tokens=args.paced_tokens, interval=args.paced_interval, first=0.05)
    slow = Pace(tokens=max(1, round(args.rate * args.duration)), interval=1 / args.rate, first=0.05)
    for name in args.targets:
        progress(f"== {name}")
        try:
            with bench.target(name) as server:
                # One warm-up stream (imports, pools, caches), not measured.
                await measure(bench, server, "warm-up", 1, Pace(5, 0.001, 0.0), 0.0)
                for scenario, streams, pace, ramp in (
                    ("paced", args.paced_streams, paced, 0.0),
                    ("slow", args.streams, slow, args.ramp),
                ):
                    with trio.fail_after(pace.first + pace.tokens * pace.interval + ramp + 180):
                        row = await measure(bench, server, scenario, streams, pace, ramp)
                    rows.append(row)
                    progress(json.dumps(asdict(row)))
                if args.ttft_streams:
                    cpu_before = tree_cpu(server.pid)
                    started = time.monotonic()
                    end_to_end = await time_to_first_token(bench, server, args.ttft_streams)
                    cpu = cpu_between(cpu_before, tree_cpu(server.pid))
                    row = Measured(
                        target=server.name,
                        scenario="ttft",
                        streams=args.ttft_streams,
                        tokens=TTFT_PACE.tokens,
                        interval_ms=TTFT_PACE.interval * 1000,
                        completed=len(end_to_end),
                        failed={},
                        frames=len(end_to_end) * TTFT_PACE.tokens,
                        chunks=0,
                        cpu_s=round(cpu, 3),
                        cpu_us_per_frame=None,
                        delay_p50_ms=pct_ms(end_to_end, 0.5),
                        delay_p99_ms=pct_ms(end_to_end, 0.99),
                        first_delay_p50_ms=None,
                        steady_delay_p99_ms=None,
                        peak_rss_mb=[],
                        wall_s=round(time.monotonic() - started, 2),
                    )
                    rows.append(row)
                    progress(json.dumps(asdict(row)))
        except (RuntimeError, OSError, subprocess.SubprocessError, trio.TooSlowError) as exc:
            # The other targets still run; the report says what was missing and why.
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
            progress(f"!! {skipped[-1]}")
    return rows


def build_streamload(work: Path) -> str:
    """`go build` bench/streamload (standard library only: no download) into `work`."""
    binary = work / "streamload"
    env = {
        **os.environ,
        "GOCACHE": str(work / "go-cache"),
        "GOPATH": str(work / "go-path"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    source = ROOT / "bench" / "streamload" / "main.go"
    print("== go build bench/streamload", flush=True)
    subprocess.run(
        ["go", "build", "-o", str(binary), str(source)], env=env, cwd=work, check=True, timeout=600
    )
    return str(binary)


def main(args: argparse.Namespace) -> None:
    raise_own_open_file_limit()
    work = Path(tempfile.mkdtemp(prefix="nzgw-stream-bench-"))
    work.chmod(0o755)  # nginx's workers read their configuration's directory
    load_start = loadavg()
    with ExitStack() as stack:
        load_binary = build_streamload(work) if args.load == "go" else ""
        upstream_port = free_port()
        if load_binary:
            upstream = [load_binary, "upstream", "-port", str(upstream_port)]
        else:
            upstream = [sys.executable, str(Path(__file__).resolve()), "--upstream"]
            upstream.append(str(upstream_port))
        upstream_pid = stack.enter_context(
            running(
                upstream,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=work,
                log=work / "upstream.log",
            )
        )
        wait_port(upstream_port, upstream_pid)
        bench = Bench(
            work=work,
            upstream_port=upstream_port,
            streams=args.streams,
            stack=stack,
            pg_admin=args.pg_admin,
            redis_url=args.redis_url,
            upstream_pid=upstream_pid,
            load_binary=load_binary,
        )
        skipped: list[str] = []
        rows = trio.run(run_all, bench, args, lambda line: print(line, flush=True), skipped)
    text = report(rows, args, (load_start, loadavg()), skipped)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "parameters": {k: str(v) for k, v in vars(args).items() if k != "out"},
                "rows": [asdict(r) for r in rows],
                "not_measured": skipped,
            },
            indent=1,
        )
        + "\n"
    )
    shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated")
    parser.add_argument("--paced-streams", type=int, default=8)
    parser.add_argument("--paced-tokens", type=int, default=250)
    parser.add_argument("--paced-interval", type=float, default=0.01, help="seconds")
    parser.add_argument("--streams", type=int, default=1000, help="slow streams at once")
    parser.add_argument("--rate", type=float, default=10.0, help="tokens/s per slow stream")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per slow stream")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds to start them over")
    parser.add_argument(
        "--ttft-streams",
        type=int,
        default=100,
        help="streams one after the other for time to first token (0: skip)",
    )
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="", help="default: a private redis-server")
    parser.add_argument(
        "--load",
        choices=("go", "python"),
        default="go" if shutil.which("go") else "python",
        help="the fake upstream and the clients: bench/streamload in Go (default when `go` is "
        "installed: a few µs per frame) or this script (Python: ~100 µs per frame, the "
        "bottleneck beyond ~100 slow streams on 2 cores)",
    )
    parser.add_argument("--note", default="", help="a caveat written into the report")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "streams.md")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.upstream:
        run_upstream(arguments.upstream)
    else:
        main(arguments)
