"""The hang guard of tests/conftest.py: every Trio test runs under it, and it fires."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import HangGuardError, guarded_run


def test_the_guard_cancels_a_hanging_test_on_wall_clock_time() -> None:
    clock = trio.testing.MockClock()  # frozen virtual time: only the real-time guard can fire
    with pytest.raises(HangGuardError, match=r"0\.2 s hang guard"):
        guarded_run(0.2)(trio.sleep_forever, clock=clock)


def test_the_guard_returns_what_a_finished_test_returns() -> None:
    async def quick() -> int:
        await trio.lowlevel.checkpoint()
        return 7

    assert guarded_run(30)(quick) == 7


async def test_trio_tests_run_under_the_guard(request: pytest.FixtureRequest) -> None:
    marker = next(request.node.iter_markers("trio"))
    assert marker.kwargs["run"].__qualname__ == "guarded_run.<locals>.run"


@pytest.mark.hang_guard(12)
async def test_a_marker_sets_the_guard(request: pytest.FixtureRequest) -> None:
    run = next(request.node.iter_markers("trio")).kwargs["run"]
    assert run.__closure__ is not None
    assert 12.0 in [cell.cell_contents for cell in run.__closure__]
