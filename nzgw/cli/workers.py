"""`NZGW_WORKERS=N`: N gateway processes on one port (SO_REUSEPORT), each its own `trio.run`
with its own root nursery, under one supervising parent.

The supervisor (`run_workers`) only starts, signals and waits:

* **Signals.** It forwards the first SIGTERM or SIGINT to every worker, once: a worker that
  already drains would die at once on a second SIGTERM (its signal receiver is gone by then,
  so the default action applies). Workers run in their own process group, so a terminal's
  Ctrl-C reaches the supervisor only, and the workers hear it once, from it.
* **A worker that dies** (or exits) while nobody asked it to takes the whole group down: the
  supervisor stops the others (SIGTERM: they drain) and exits non-zero, so that whatever runs
  nzgw (the container runtime, systemd) restarts it whole rather than leaving it running at
  reduced capacity without anyone noticing.
* **A supervisor that dies** (SIGKILL, OOM) takes the workers down: each holds the read end of
  a pipe whose only write end the supervisor holds; end-of-file there is a shutdown trigger,
  like SIGTERM, so orphaned workers drain and exit instead of serving on without supervision.
* **Exit status:** 0 when every worker drained cleanly after a signal; else the worst worker
  status, a death by signal N counting as 128 + N (the shell's convention), and a worker that
  exited unasked counting at least 1. Workers still running `graceful_timeout + KILL_GRACE`
  seconds after they were told to stop are killed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping

import attrs
import trio

from nzgw.config import Config
from nzgw.server import wait_for_signal

log = logging.getLogger("nzgw.workers")

#: Set by the supervisor in each worker's environment: "<index>:<lifeline fd>".
WORKER_ENV = "NZGW_WORKER_PROCESS"

#: Seconds a worker gets beyond its own graceful timeout before it is killed.
KILL_GRACE = 15.0


@attrs.frozen
class Worker:
    """What a worker process knows about its place under the supervisor."""

    index: int
    lifeline_fd: int

    def configure(self, config: Config) -> Config:
        """The worker's own configuration: its metrics listener is on port + index (each worker
        has its own numbers; port 0 stays 0)."""
        if not config.metrics_bind:
            return config
        host, _, port = config.metrics_bind.rpartition(":")
        if int(port) == 0:
            return config
        return attrs.evolve(config, metrics_bind=f"{host}:{int(port) + self.index}")

    async def shutdown_trigger(self) -> None:
        """Return on the first SIGTERM or SIGINT, or when the supervisor is gone."""
        async with trio.open_nursery() as nursery:

            async def signalled() -> None:
                await wait_for_signal()
                nursery.cancel_scope.cancel()

            async def orphaned() -> None:
                async with trio.lowlevel.FdStream(self.lifeline_fd) as lifeline:
                    while await lifeline.receive_some():
                        pass
                log.warning("the worker supervisor is gone; shutting down")
                nursery.cancel_scope.cancel()

            nursery.start_soon(signalled)
            nursery.start_soon(orphaned)


def current_worker(environ: Mapping[str, str] | None = None) -> Worker | None:
    """The `Worker` this process is, or None when it was not started by `run_workers`."""
    value = (os.environ if environ is None else environ).get(WORKER_ENV, "")
    index, sep, fd = value.partition(":")
    if not sep or not index.isdigit() or not fd.isdigit():
        return None
    return Worker(int(index), int(fd))


def run_workers(count: int, *, graceful_timeout: float) -> int:
    """Run `count` workers (`python -m nzgw serve`) until they are all gone; the exit status."""
    return trio.run(_supervise, count, graceful_timeout)


async def _supervise(count: int, graceful_timeout: float) -> int:
    statuses: list[int] = []
    stopping = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Signals that arrive while the workers start wait in `signals`, and are forwarded to
        # all of them as soon as they run.
        workers = await _spawn(count)
        async with trio.open_nursery() as nursery:

            def stop_all(signum: int) -> None:
                nonlocal stopping
                stopping = True
                for process in workers:
                    if process.returncode is None:
                        process.send_signal(signum)
                nursery.start_soon(kill_stragglers)

            async def kill_stragglers() -> None:
                await trio.sleep(graceful_timeout + KILL_GRACE)
                for process in workers:
                    if process.returncode is None:
                        log.error("worker pid %d did not stop in time; killing it", process.pid)
                        process.kill()

            async def forward_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stopping:
                        log.info("already stopping", extra={"signal": name})
                    else:
                        log.info("stopping workers", extra={"signal": name})
                        stop_all(signum)

            async def watch(index: int, process: trio.Process) -> None:
                status = _exit_status(await process.wait())
                if not stopping:
                    log.error(
                        "worker %d (pid %d) exited unasked with status %d; stopping the others",
                        index,
                        process.pid,
                        status,
                    )
                    status = status or 1
                    stop_all(signal.SIGTERM)
                statuses.append(status)

            nursery.start_soon(forward_signals)
            async with trio.open_nursery() as watchers:
                for index, process in enumerate(workers):
                    watchers.start_soon(watch, index, process)
            nursery.cancel_scope.cancel()  # every worker is gone: stop forwarding and timers
    return max(statuses, default=0)


async def _spawn(count: int) -> list[trio.Process]:
    """Start the workers, each in its own process group, each with the lifeline's read end.

    The write end stays open in this process, unused, until it exits (fds are created
    non-inheritable, so no worker holds it): its closing is how the workers learn that the
    supervisor is gone.
    """
    lifeline_read, _lifeline_write = os.pipe()
    workers: list[trio.Process] = []
    try:
        for index in range(count):
            workers.append(
                await trio.lowlevel.open_process(
                    [sys.executable, "-m", "nzgw", "serve"],
                    env={**os.environ, WORKER_ENV: f"{index}:{lifeline_read}"},
                    pass_fds=(lifeline_read,),
                    process_group=0,
                )
            )
    except BaseException:
        for process in workers:
            process.kill()
        raise
    finally:
        os.close(lifeline_read)
    return workers


def _exit_status(returncode: int) -> int:
    """A process's exit status the way a shell reports it: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode
