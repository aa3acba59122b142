"""`bin/_bootstrap.sh` says what it is doing while it sets up `.venv` (issue #18, item 3).

Run on a copy of the script in a scratch root whose `pdm` is a stub (no network, no real
install); the project venv is really created, with this interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = "".join(f'[[package]]\nname = "p{i}"\nversion = "1"\n\n' for i in range(3))
STUB_PDM = """#!/bin/sh
echo "stub pdm $*"
echo "  + Install p0 1 successful"
"""


def _bootstrap(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", "-c", 'source "$1/bin/_bootstrap.sh"', "-", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_first_run_reports_each_step_and_a_second_run_is_silent(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    shutil.copy(ROOT / "bin" / "_bootstrap.sh", tmp_path / "bin" / "_bootstrap.sh")
    (tmp_path / "pdm.lock").write_text(LOCK)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    pdm = tmp_path / ".venv-tools" / "bin" / "pdm"
    pdm.parent.mkdir(parents=True)
    pdm.write_text(STUB_PDM)
    pdm.chmod(0o755)

    first = _bootstrap(tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    expected = [
        "nzgw: first run: setting up the environment",
        "nzgw: [2/3] creating the project environment .venv",
        "nzgw: [3/3] pdm sync: installing into .venv what it lacks of the 3 locked packages",
        "stub pdm sync --clean -G dev --venv in-project",  # pdm's own progress is shown
        "nzgw: .venv is ready (3 packages,",
    ]
    at = [next(i for i, line in enumerate(lines) if line.startswith(e)) for e in expected]
    assert at == sorted(at), first.stderr

    second = _bootstrap(tmp_path)
    assert second.returncode == 0 and second.stderr == ""  # nothing changed: nothing to say

    (tmp_path / "pdm.lock").write_text(LOCK + '[[package]]\nname = "p3"\n')
    third = _bootstrap(tmp_path)
    assert third.stderr.splitlines()[0].startswith(
        "nzgw: pdm.lock, pyproject.toml or bin/_bootstrap.sh changed: syncing .venv (4 packages"
    )
