"""Logging set-up: what operators see at INFO."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from nzgw.logs import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


@pytest.mark.usefixtures("restore_logging")
def test_discovery_polls_do_not_flood_the_info_log() -> None:
    """httpx logs each request at INFO; discovery polls every backend three times per tick."""
    setup_logging("text", "INFO")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
    assert logging.getLogger("nzgw.server").isEnabledFor(logging.INFO)
