"""Streams still running when the graceful drain ends get an error frame, not a broken body.

At the end of `graceful_timeout` the server cancels what is left; a stream cut there ends in a
truncated chunked body that clients report as a transport error. A little before that moment
(`cut_margin`) the `StreamCut` cancels each relay's wait for its next upstream chunk; the relay
then sends an error frame in its surface's stream shape and ends the body properly.
"""

from __future__ import annotations

import trio

CUT_MESSAGE = "the gateway is shutting down; the stream was cut"


def cut_margin(graceful_timeout: float) -> float:
    """How long before the hard cancel streams are cut: time to send the frame and close."""
    return min(1.0, graceful_timeout / 10)


class StreamCut:
    """The relays' waits, registered while they wait; `cut` cancels them all."""

    __slots__ = ("_waits", "happened")

    def __init__(self) -> None:
        self._waits: set[trio.CancelScope] = set()
        self.happened = False

    def enter(self, scope: trio.CancelScope) -> None:
        """Register `scope` (a relay's wait) until `leave`; cancelled at once after a cut.
        Two plain calls, not a context manager: a relay does this for every token."""
        if self.happened:
            scope.cancel()
        self._waits.add(scope)

    def leave(self, scope: trio.CancelScope) -> None:
        self._waits.discard(scope)

    def cut(self) -> None:
        self.happened = True
        for scope in list(self._waits):
            scope.cancel()

    async def run(
        self,
        shutdown_started: trio.Event,
        *,
        graceful_timeout: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Cut the streams `graceful_timeout - cut_margin` after the shutdown started; returns
        then (or never, when there is no shutdown before it is cancelled)."""
        task_status.started()
        await shutdown_started.wait()
        await trio.sleep(max(0.0, graceful_timeout - cut_margin(graceful_timeout)))
        self.cut()
