"""The open-file limit at start (`nzgw/cli/_rlimit.py`), on real `nzgw serve` / `nzgw dev`
processes started with a low limit: the soft limit is raised to the hard one (and logged), the
gateway then holds more connections than Linux's default 1,024 allows, and a hard limit below
`NZGW_MIN_OPEN_FILES` stops start-up with one line and exit status 2 before anything is created.

Each child gets its limits from a small wrapper that calls `setrlimit` and then `exec`s nzgw
(so the pid is the gateway's, and /proc/<pid>/limits is what it runs with)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from nzgw.cli._rlimit import wanted_soft_limit
from tests.process_log import ProcessLog
from tests.test_processes import env_for, free_port

LIMITED = """
import os, resource, sys
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
os.execv(sys.executable, [sys.executable, "-m", "nzgw", *sys.argv[3:]])
"""


def limited(soft: int, hard: int, *args: str) -> list[str]:
    return [sys.executable, "-c", LIMITED, str(soft), str(hard), *args]


def soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def test_the_soft_limit_goes_to_the_hard_limit() -> None:
    infinity = resource.RLIM_INFINITY
    assert wanted_soft_limit(1024, 8192, 4096) == 8192
    assert wanted_soft_limit(1024, 1024, 4096) == 1024  # cannot go further: the caller refuses
    assert wanted_soft_limit(9000, 9000, 0) == 9000
    assert wanted_soft_limit(256, infinity, 4096) == 4096  # macOS: a finite soft limit
    assert wanted_soft_limit(20000, infinity, 4096) == 20000  # never lowered
    assert wanted_soft_limit(infinity, infinity, 4096) == infinity


@pytest.mark.parametrize(
    ("hard", "minimum", "connections"),
    [
        (8192, None, 1200),  # the default minimum (8192) fits: more than 1,024 connections held
        (1024, "0", 0),  # no check: raised as far as it goes, and it serves
    ],
)
async def test_serve_raises_the_soft_limit_and_logs_it(
    tmp_path: Path, hard: int, minimum: str | None, connections: int
) -> None:
    own_soft, own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if connections and own_soft < connections + 100:
        # The clients need their sockets too.
        assert own_hard >= connections + 100, "this machine's hard limit is too low for the test"
        resource.setrlimit(resource.RLIMIT_NOFILE, (connections + 100, own_hard))
    port = free_port()
    env = env_for(
        tmp_path,
        NZGW_BIND=f"127.0.0.1:{port}",
        OLLAMA_BASE_URL="http://127.0.0.1:9",  # never reached: only /healthz is asked
        DATABASE_URL=f"sqlite:///{tmp_path}/s.db",
        NZGW_MIGRATE_ON_START="true",
        NZGW_LOG_FORMAT="json",
        NZGW_KEEP_ALIVE_TIMEOUT="600",  # answered connections stay open: each holds a socket
    )
    if minimum is not None:
        env["NZGW_MIN_OPEN_FILES"] = minimum
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                proc: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        limited(256, hard, "serve"),
                        cwd=tmp_path,
                        env=env,
                        check=False,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                )
                log = ProcessLog(process=proc)
                nursery.start_soon(log.read_stderr)
                (raised,) = await log.wait_logged("open-file limit raised")
                assert raised["open_files_from"] == 256 and raised["open_files"] == hard
                assert soft_limit_of(proc.pid) == hard
                await log.wait_logged("nzgw ready")
                await hold_connections(port, max(connections, 1))
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        assert proc.returncode == 0, log.lines[-5:]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (own_soft, own_hard))


async def hold_connections(port: int, count: int) -> None:
    """Open `count` connections, then ask /healthz on each while all stay open: with a soft
    limit of 1,024 the server cannot accept the last ones and this hangs."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        answered = 0

        async def ask(stream: trio.SocketStream) -> None:
            nonlocal answered
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some()
                assert data, "the server closed the connection"
                head += data
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
            answered += 1

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(ask, stream)
        assert answered == count
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.parametrize("command", ["serve", "dev"])
async def test_a_hard_limit_below_the_minimum_stops_start_with_one_line(
    tmp_path: Path, command: str
) -> None:
    env = env_for(
        tmp_path,
        NZGW_BIND=f"127.0.0.1:{free_port()}",
        DATABASE_URL=f"sqlite:///{tmp_path}/s.db",
        NZGW_MIGRATE_ON_START="true",
    )
    with trio.fail_after(60):
        result = await trio.run_process(
            limited(256, 1024, command), cwd=tmp_path, env=env, check=False, capture_stderr=True
        )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: NZGW_MIN_OPEN_FILES: the open-file limit is 1024")
    assert "below the 8192" in lines[0]
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "var").exists()  # nothing started
