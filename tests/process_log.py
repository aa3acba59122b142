"""Child processes of the tests: a process's JSON log lines on stderr, collected as they come,
with waits on them; `open_nzgw` and `reap` for a long-running one; and `run_nzgw`, a command run
to its end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio


@attrs.define(eq=False, kw_only=True)
class ProcessLog:
    process: trio.Process
    lines: list[dict[str, Any]] = attrs.Factory(list)
    eof: trio.Event = attrs.Factory(trio.Event)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def read_stderr(self) -> None:
        """Collect stderr until the process closes it (run it in a nursery)."""
        assert self.process.stderr is not None
        buffer = b""
        while chunk := await self.process.stderr.receive_some():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"msg": line.decode(errors="replace")})
            self._notify()
        self.eof.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, check: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Return once `check(lines)` is true; fails if the process ends first."""
        while not check(self.lines):
            if self.eof.is_set():
                raise AssertionError(f"exited before the condition held: {self.lines[-10:]}")
            await self._changed.wait()

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("msg") == msg]

    async def wait_logged(self, msg: str, count: int = 1) -> list[dict[str, Any]]:
        """The lines with this message, once there are `count`; fails if the process ends first."""
        while len(self.logged(msg)) < count:
            if self.eof.is_set():
                raise AssertionError(f"exited before logging {msg!r}: {self.lines[-10:]}")
            await self._changed.wait()
        return self.logged(msg)


def run_nzgw(
    args: list[str], *, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`python -m nzgw <args>` to its end (60 s at most), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "nzgw", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def open_nzgw(command: str, *, env: dict[str, str], cwd: Path) -> trio.Process:
    """`python -m nzgw <command>` in the background, its stderr piped (read it with ProcessLog)."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "nzgw", command], env=env, cwd=cwd, stderr=subprocess.PIPE
    )


async def reap(process: trio.Process) -> None:
    """Kill `process` if it still runs, wait for it and close its stderr; shielded (a test's
    cleanup, also when the test was cancelled)."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()
