"""The body phase: how long a request body may take, and how many may be arriving at once.

A client that trickles a body holds a connection (and a file descriptor) for as long as it
likes; the concurrency limit cannot see it, because admission happens after the body is read.
So, around the body read (README "Security", "The edge"):

* the whole body must arrive within `NZGW_BODY_TIMEOUT` seconds (408, the connection closes);
* at most `NZGW_MAX_BODY_UPLOADS_PER_KEY` requests of one key and
  `NZGW_MAX_BODY_UPLOADS_PER_CLIENT` requests from one client address may be in their body
  phase at the same time in one process (429 with `Retry-After: 1`, before any byte of the
  body is read; the connection closes because its body was not read).

The counts are per process: with `NZGW_WORKERS=N` a client can hold N times as many.

A body that has already arrived whole (a small body comes in the packets of its headers)
holds nothing and takes no slot: under a burst the event loop gets to reading such bodies late,
and counting them refused well-behaved requests of a key with 429 although no byte was still on
its way. When the bounds are full, a request first gives the server's tasks a few scheduling
rounds to hand over what its socket already delivered (`arrived_whole`), and is refused only if
its body is still incomplete then.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import attrs
import trio


class UploadsBusyError(Exception):
    """The key or the client address already has its bound of bodies in progress."""


@attrs.define(eq=False)
class UploadGate:
    """Counts requests in their body phase, per key and per client address."""

    per_key: int  # 0: no bound
    per_client: int
    _keys: Counter[str] = attrs.field(factory=Counter, init=False)
    _clients: Counter[str] = attrs.field(factory=Counter, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    @contextlib.contextmanager
    def receiving(self, key: str, client: str) -> Iterator[None]:
        """Hold one body slot of `key` and of `client` for the block; `UploadsBusyError` when
        either is full. Synchronous bookkeeping: released on any exit, cancellation included."""
        if self.full(key, client):
            raise UploadsBusyError
        self._keys[key] += 1
        self._clients[client] += 1
        self._announce()
        try:
            yield
        finally:
            _release(self._keys, key)
            _release(self._clients, client)
            self._announce()

    def full(self, key: str, client: str) -> bool:
        """`receiving(key, client)` would refuse now."""
        return bool(
            (self.per_key and self._keys[key] >= self.per_key)
            or (self.per_client and self._clients[client] >= self.per_client)
        )

    def in_progress(self, *, key: str | None = None, client: str | None = None) -> int:
        return self._keys[key] if key is not None else self._clients[client or ""]

    async def wait_changed(self) -> None:
        """Return after the next change of any count (no timeout: wrap it)."""
        await self._changed.wait()

    def _announce(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


HANDOVER_ROUNDS = 8
"""Scheduling rounds a request whose bounds are full waits for its body to be handed over
(hypercorn's connection task and Quart's message task each pass every ASGI message on with a
checkpoint): rounds, not seconds, so a busy loop does not turn a whole body into a refusal."""


async def arrived_whole(body: object, *, rounds: int = 0) -> bool:
    """True when `body` (a Quart request body) holds the whole body: the server has delivered
    its last part (Quart's `Body._complete`), so reading it cannot trickle. Waits up to `rounds`
    scheduling rounds for that."""
    complete = getattr(body, "_complete", None)
    if complete is None:
        return False
    for _ in range(rounds):
        if complete.is_set():
            break
        await trio.lowlevel.checkpoint()
    return bool(complete.is_set())


def _release(counts: Counter[str], name: str) -> None:
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]
