"""`nzgw probe-ollama` and `nzgw list-models` as an operator runs them.

Rules: every command runs as a real subprocess (`python -m nzgw ...`, through
`trio.run_process`) while the emulators serve in this test's own Trio run; the subprocess gets
a clean environment (no inherited OLLAMA_* / NZGW_* / DATABASE_URL / REDIS_URL) and an empty
working directory, so no `.env` is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio

from nzgw.testing import (
    EmulatedModel,
    Emulator,
    EmulatorSettings,
    Fault,
    model_named,
    open_emulator,
)

DIGEST_OTHER = "d" * 64


def emulated(name: str, day: int, **changes: Any) -> EmulatedModel:
    return attrs.evolve(
        model_named(name), modified_at=datetime(2026, 5, day, tzinfo=UTC), **changes
    )


MODELS = {
    "alpha": [emulated("llama3", 10), emulated("qwen3", 8)],
    "beta": [emulated("llama3", 10, digest=DIGEST_OTHER), emulated("mistral", 9)],
    "gamma": [emulated("qwen3", 8), emulated("all-minilm", 1)],
}


@asynccontextmanager
async def emulators() -> AsyncIterator[list[Emulator]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_emulator(EmulatorSettings(models=list(m))))
            for m in MODELS.values()
        ]


def backends_env(emus: list[Emulator], *, token: str = "") -> str:
    return json.dumps(
        [
            {"name": name, "url": emu.url, "auth_token": token}
            for name, emu in zip(MODELS, emus, strict=True)
        ]
    )


async def nzgw(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OLLAMA_", "NZGW_")) and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    return await trio.run_process(
        [sys.executable, "-m", "nzgw", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_probe_all_up(tmp_path: Path) -> None:
    async with emulators() as emus:
        result = await nzgw(
            tmp_path,
            "probe-ollama",
            "--json",
            OLLAMA_BACKENDS=backends_env(emus, token="s3cret-token"),
        )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    rows = report["backends"]
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
    assert [r["url"] for r in rows] == [e.url for e in emus]
    assert all(r["up"] and r["version"] == "0.33.0-rc2" for r in rows)
    assert [r["models"] for r in rows] == [2, 2, 2]
    assert all(r["latency_ms"] >= 0 and r["error"] is None for r in rows)
    assert b"s3cret" not in result.stdout + result.stderr


async def test_probe_fails_when_one_backend_is_down(tmp_path: Path) -> None:
    async with emulators() as emus:
        emus[1].settings.fault = Fault.REFUSE
        result = await nzgw(tmp_path, "probe-ollama", "--json", OLLAMA_BACKENDS=backends_env(emus))
        text = await nzgw(tmp_path, "probe-ollama", OLLAMA_BACKENDS=backends_env(emus))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [r["up"] for r in report["backends"]] == [True, False, True]
    beta = report["backends"][1]
    assert beta["error"] == "upstream" and beta["models"] is None and beta["latency_ms"] is None
    assert text.returncode == 1
    lines = text.stdout.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("alpha") and " up " in lines[0] and "2 models" in lines[0]
    assert lines[1].startswith("beta") and "DOWN" in lines[1]


async def test_probe_default_backend_from_base_url(tmp_path: Path) -> None:
    async with open_emulator() as emu:
        result = await nzgw(tmp_path, "probe-ollama", "--json", OLLAMA_BASE_URL=emu.url)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["backends"]
    assert row["name"] == "default" and row["models"] == 3


async def test_list_models_grouped_then_union(tmp_path: Path) -> None:
    async with emulators() as emus:
        result = await nzgw(tmp_path, "list-models", "--json", OLLAMA_BACKENDS=backends_env(emus))
        text = await nzgw(tmp_path, "list-models", OLLAMA_BACKENDS=backends_env(emus))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    grouped = {b["name"]: [m["name"] for m in b["models"]] for b in doc["backends"]}
    assert grouped == {
        "alpha": ["llama3:latest", "qwen3:latest"],
        "beta": ["llama3:latest", "mistral:latest"],
        "gamma": ["qwen3:latest", "all-minilm:latest"],
    }
    assert doc["backends"][1]["models"][0]["digest"] == DIGEST_OTHER
    assert doc["union"] == ["llama3:latest", "mistral:latest", "qwen3:latest", "all-minilm:latest"]
    assert doc["union_count"] == 4
    assert text.returncode == 0
    lines = text.stdout.decode().splitlines()
    assert lines[0] == "alpha: up"
    assert lines[-1] == "4 distinct models on the backends that are up"
    # The columns line up across every backend: each starts where its header's does.
    headers = [line for line in lines if line.lstrip().startswith("MODEL")]
    rows = [line for line in lines if line.startswith("  ") and line not in headers]
    assert len(headers) == 3 and len(set(headers)) == 1 and len(rows) == 6
    for column in ("DIGEST", "LOADED"):
        start = headers[0].index(column)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows), column
    assert {row.split()[0] for row in rows} == set(doc["union"])


async def test_list_models_with_a_backend_down(tmp_path: Path) -> None:
    async with emulators() as emus:
        emus[2].settings.fault = Fault.HTTP_500
        result = await nzgw(tmp_path, "list-models", "--json", OLLAMA_BACKENDS=backends_env(emus))
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert [b["up"] for b in doc["backends"]] == [True, True, False]
    assert doc["backends"][2]["models"] == []
    assert doc["union_count"] == 3


async def test_invalid_config_exits_2_with_one_line(tmp_path: Path) -> None:
    for command in ("probe-ollama", "list-models"):
        result = await nzgw(tmp_path, command, OLLAMA_BACKENDS='[{"name": "x"}]')
        assert result.returncode == 2
        assert result.stdout == b""
        (line,) = result.stderr.decode().splitlines()
        assert line.endswith("OLLAMA_BACKENDS: item 0: 'url' is missing")
