"""The command table: every command named in `COMMANDS` loads and has help, and the tool
starts without importing the server stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from nzgw.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_loads_and_has_help(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")


def test_help_lists_every_command_without_importing_the_server() -> None:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom nzgw.cli import main\n"
        "out = CliRunner().invoke(main, ['--help']).output\n"
        "assert 'quart' not in sys.modules and 'coredis' not in sys.modules, 'eager import'\n"
        "print(out)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout
