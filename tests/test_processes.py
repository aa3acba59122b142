"""The two ways people start nzgw, as real processes: `nzgw dev` on an empty directory and
`nzgw serve`; both stop cleanly (exit 0) on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import IO

import httpx
import trio

from nzgw.testing import open_emulator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_answer(url: str, proc: trio.Process) -> None:
    """Poll `url` until it answers 200 (a separate process: there is no event to wait on)."""
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            while True:
                assert proc.returncode is None, "the server exited"
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


async def start_nzgw(
    nursery: trio.Nursery,
    *args: str,
    cwd: Path,
    env: dict[str, str],
    stderr: int | IO[bytes] = subprocess.DEVNULL,
) -> trio.Process:
    """`python -m nzgw ARGS` as a child of `nursery` (which waits for it to exit)."""
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, "-m", "nzgw", *args],
            cwd=cwd,
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    )
    return proc


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("NZGW_", "OLLAMA_"))}
    keep.pop("DATABASE_URL", None)
    keep.pop("REDIS_URL", None)
    return {**keep, "NZGW_ENV_FILE": str(tmp_path / "none.env"), **extra}


def serve_env(tmp_path: Path, port: int, backend_url: str, **extra: str) -> dict[str, str]:
    """`env_for` a `serve` on 127.0.0.1:`port` in front of `backend_url`, SQLite in tmp_path."""
    return env_for(
        tmp_path,
        NZGW_BIND=f"127.0.0.1:{port}",
        OLLAMA_BASE_URL=backend_url,
        DATABASE_URL=f"sqlite:///{tmp_path}/nzgw.db",
        **extra,
    )


async def run_dev(tmp_path: Path, port: int) -> tuple[str, int]:
    """Start `nzgw dev` in tmp_path, list models with its key, stop it; (key, exit code)."""
    env = env_for(tmp_path, NZGW_BIND=f"127.0.0.1:{port}")
    async with trio.open_nursery() as nursery:
        proc = await start_nzgw(nursery, "dev", cwd=tmp_path, env=env)
        url = f"http://127.0.0.1:{port}"
        await wait_answer(f"{url}/healthz", proc)
        key_file = tmp_path / "var" / "dev-key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        await wait_answer(f"{url}/readyz", proc)
        async with httpx.AsyncClient() as client:
            tags = await client.get(f"{url}/api/tags", headers={"Authorization": f"Bearer {key}"})
            assert tags.status_code == 200 and tags.json()["models"]
            chat = await client.post(
                f"{url}/api/chat",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "llama3",
                    "stream": False,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert chat.status_code == 200 and chat.json()["done"] is True
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await proc.wait()
    assert proc.returncode is not None
    return key, proc.returncode


async def test_dev_needs_nothing_but_python_and_keeps_its_key(tmp_path: Path) -> None:
    first_key, code = await run_dev(tmp_path, free_port())
    assert code == 0
    assert (tmp_path / "var" / "nzgw.db").exists()
    second_key, code = await run_dev(tmp_path, free_port())
    assert code == 0 and second_key == first_key  # the same dev key on every start


async def test_dev_issues_a_new_working_key_when_its_file_is_lost(tmp_path: Path) -> None:
    first_key, code = await run_dev(tmp_path, free_port())
    assert code == 0
    (tmp_path / "var" / "dev-key").unlink()  # the key named "dev" exists, its secret is gone
    second_key, code = await run_dev(tmp_path, free_port())  # run_dev checks that it works
    assert code == 0 and second_key != first_key


async def test_serve_drains_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    async with open_emulator() as emu:
        env = serve_env(tmp_path, port, emu.url, NZGW_MIGRATE_ON_START="true")
        async with trio.open_nursery() as nursery:
            proc = await start_nzgw(nursery, "serve", cwd=tmp_path, env=env)
            await wait_answer(f"http://127.0.0.1:{port}/readyz", proc)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await proc.wait()
        assert proc.returncode == 0
