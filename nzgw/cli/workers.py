"""`NZGW_WORKERS=N`: N gateway processes on one port (SO_REUSEPORT), each its own `trio.run`
with its own root nursery. The parent only supervises: it forwards SIGTERM/SIGINT, waits for
every worker to drain, and exits with the worst exit status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

WORKER_ENV = "NZGW_WORKER_PROCESS"


def run_workers(count: int) -> int:
    env = {**os.environ, WORKER_ENV: "1"}
    workers = [
        subprocess.Popen([sys.executable, "-m", "nzgw", "serve"], env=env) for _ in range(count)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [worker.wait() for worker in workers]
    return max((abs(code) for code in codes), default=0)
