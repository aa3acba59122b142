"""System binaries some tests need (from Debian packages that `.ci/run` installs when missing)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str, what: str) -> str:
    """The tool's path; skipped with the reason without it, or failed under `CI=true`."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not found (Debian: apt-get install {package})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true: {what} must run")
        pytest.skip(reason)
    return path
