"""Issue #14, findings 6 and 7, as real processes: `var/` is 0700 and the database files 0600
(also when an older version left them open); `nzgw dev` on a busy port prints one line and
exits 2; `nzgw dev` notices that its key was revoked and issues a new one, saying so."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nzgw.adapters.stores import open_store
from nzgw.config import test_config
from nzgw.core.models import Status
from nzgw.ports import KeyChanges
from tests.harness import FAST_ARGON2
from tests.test_processes import env_for, free_port, run_dev


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_dev_files_are_private_and_a_revoked_key_is_replaced(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    os.chmod(var, 0o755)  # as an older nzgw left it
    first, code = await run_dev(tmp_path, free_port())
    assert code == 0
    assert _mode(var) == 0o700
    files = [p for p in var.iterdir() if p.name.startswith("nzgw.db")]
    assert files and all(_mode(p) == 0o600 for p in files), {p.name: _mode(p) for p in files}
    # A database made world-readable by hand is made private again on the next start.
    os.chmod(var / "nzgw.db", 0o644)

    url = f"sqlite:///{var / 'nzgw.db'}"
    with trio.fail_after(30):
        async with open_store(url) as store:
            await store.update_key(first[:11], KeyChanges(status=Status.REVOKED))
    second, code = await run_dev(tmp_path, free_port())  # run_dev checks the key works
    assert code == 0 and second != first
    assert (var / "dev-key").read_text().strip() == second
    assert _mode(var / "nzgw.db") == 0o600


def test_dev_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "nzgw", "dev"],
            cwd=tmp_path,
            env=env_for(tmp_path, NZGW_BIND=f"127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("Error: NZGW_BIND:") and str(port) in lines[0]


async def test_dev_says_why_it_replaced_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nzgw.cli.serve import _ensure_dev_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").mkdir(mode=0o700)
    config = test_config(argon2=FAST_ARGON2)
    with trio.fail_after(30):
        async with open_store(f"sqlite:///{tmp_path}/var/d.db") as store:
            await store.migrate()
            first = await _ensure_dev_key(store, config)
            assert await _ensure_dev_key(store, config) == first
            assert "no longer works" not in capsys.readouterr().err
            await store.update_key(first[:11], KeyChanges(status=Status.REVOKED))
            second = await _ensure_dev_key(store, config)
    assert second != first
    assert "dev key in var/dev-key no longer works (revoked); issuing a new one" in (
        capsys.readouterr().err
    )
