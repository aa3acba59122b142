"""What `nzgw dev` prints once it is ready (issue #18, item 6)."""

from __future__ import annotations

import pytest

from nzgw.cli.serve import _print_welcome


def test_the_python_examples_say_which_packages_they_need(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _print_welcome("http://127.0.0.1:8080", "nz_abcdefgh" + "x" * 40, emulator=True)
    text = capsys.readouterr().err
    needs = text.index("pip install ollama openai")
    assert needs < text.index("import ollama") and needs < text.index("import openai")
    assert "nz_abcdefgh" + "x" * 40 in text
