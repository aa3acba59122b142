"""The data plane below HTTP: forward to the first backend that answers usefully, relay, account.

No Quart, no global, no ContextVar: the HTTP glue (`nzgw.http.proxy`) passes in the request
record (`RequestInfo`) and the request's cleanup stack, and turns what comes back into a
response. Ownership (docs/ARCHITECTURE.md, "Ownership on the request path"):

* Every upstream response is registered on the request's cleanup stack the moment it exists,
  before its first chunk is read. The connection closes that stack in its `finally`, shielded,
  so an upstream is closed whether the client left before the first byte, mid-stream, after the
  handler returned but before the body was sent, or never.
* Failover happens only before anything was committed to the client (the verdict is
  `nzgw.core.failover`): the status line of a stream is sent only after its first chunk
  arrived from a backend. Each failed attempt is logged (backend, kind, elapsed, request id)
  and kept on the request record; clients never see which backend failed.
"""

from __future__ import annotations

import logging
import math
from contextlib import AsyncExitStack

import attrs
import trio

from nzgw.core import framing, paths
from nzgw.core.audit import PROMPT_LOG_MAX_BYTES
from nzgw.core.disclosure import trim_show_body
from nzgw.core.failover import (
    ERROR_BODY_LIMIT,
    Failure,
    model_gone,
    reads_error_body,
    status_verdict,
    stream_verdict,
)
from nzgw.core.framing import StreamKind, StreamWatcher, Usage
from nzgw.core.record import FailedAttempt, Refused, RequestInfo
from nzgw.core.requests import Prepared
from nzgw.core.surfaces import stream_error_frame
from nzgw.ports import (
    ForwardingMetrics,
    RawBody,
    RegistryPort,
    Ticket,
    UpstreamError,
    UpstreamResponse,
    raw_body_of,
)
from nzgw.services.attempts import BackendAttempts, WrappedResponse
from nzgw.services.drain import CUT_MESSAGE, StreamCut
from nzgw.services.slots import SlotPool

log = logging.getLogger("nzgw.forwarding")

# Frames a stream may carry beyond its output cap: role, finish, usage, done, and the
# structure events of /v1/responses and /v1/messages.
FRAME_SLACK = 32

# One message for "unknown", "not on any backend" and "not allowed": no existence disclosure.
FORBIDDEN_MODEL = "model not available for this key"
UNAVAILABLE = "the model is temporarily unavailable, try again"

_JSON_HEADERS = ((b"content-type", b"application/json"),)


@attrs.frozen
class Opened:
    """The backend's answer, committed to: its response and, for a stream, its first chunk."""

    response: UpstreamResponse
    first: bytes

    @property
    def content_type(self) -> str:
        value = self.response.header(b"content-type")
        return value.decode("latin-1") if value else "application/json"


@attrs.frozen
class Buffered:
    """A whole (non-streaming or error) answer, read and accounted for."""

    status: int
    body: bytes
    content_type: str


@attrs.frozen
class Forwarder:
    """Opens a request on its backends with failover, and relays or reads the answer."""

    registry: RegistryPort
    metrics: ForwardingMetrics
    slots: SlotPool | None = None  # backend slots and the fair queue; None: no queueing
    first_byte_timeout: float = 300.0  # NZGW_UPSTREAM_FIRST_BYTE_TIMEOUT
    stream_cut: StreamCut | None = None  # streams left at the end of the drain: error frame

    async def open(
        self,
        info: RequestInfo,
        cleanup: AsyncExitStack,
        route: paths.Route,
        model: str,
        body: bytes,
        *,
        stream: bool,
    ) -> Opened:
        """The first backend that answers usefully, tried in priority order.

        The whole loop runs in the request's cancel scope: a client that leaves cancels every
        attempt. With backend slots, each attempt first waits for a slot in the fair queue
        (`BackendAttempts`). Raises `Refused`: 503 when no backend answered, 403 when every
        backend tried said the model is not there."""
        path = route.path.encode("ascii")
        attempts = not_found = 0
        backends = BackendAttempts(
            self.registry,
            self.slots,
            self.metrics,
            info,
            cleanup,
            model,
            generates=route.route is not paths.RouteId.SHOW,
        )
        async for backend in backends:
            attempts += 1
            started = trio.current_time()
            response: UpstreamResponse | None = None
            failure: Failure | None = None
            try:
                with trio.fail_after(self.first_byte_timeout):
                    response = await backend.open(b"POST", path, body=body, headers=_JSON_HEADERS)
                    cleanup.push_async_callback(response.aclose)
                    first = b""
                    if reads_error_body(response.status):
                        error_body = await response.read_all(ERROR_BODY_LIMIT)
                        failure = status_verdict(response.status, error_body)
                        if failure is None:  # the backend's own answer: passed through
                            response = _Replayed(response, error_body)
                    elif stream and response.status == 200:
                        first = await response.receive_some()
                        failure = stream_verdict(first)
            except (UpstreamError, trio.TooSlowError) as exc:
                failure = (
                    Failure.TIMEOUT if isinstance(exc, trio.TooSlowError) else Failure.TRANSPORT
                )
            if failure is not None:
                if response is not None:
                    await response.aclose()
                self._failed(info, backend.name, failure, trio.current_time() - started)
                if failure is Failure.NOT_FOUND:
                    not_found += 1  # a stale snapshot, not a sick backend
                continue
            assert response is not None
            self.registry.record_success(backend.name)
            if attempts > 1:
                self.metrics.failed_over()
            info.backend = backend.name
            info.first_byte = trio.current_time()
            return Opened(response, first)
        if model_gone(attempts, not_found):
            # Every backend thought to host it said 404: it is gone. The same answer as forbidden.
            raise Refused(403, FORBIDDEN_MODEL, refusal="forbidden_model")
        info.outcome = "upstream_failed"
        raise Refused(503, UNAVAILABLE, refusal="backend_failure")

    def _failed(self, info: RequestInfo, backend: str, kind: Failure, elapsed: float) -> None:
        if kind.backend_sick:
            self.registry.record_failure(backend)
        self.metrics.backend_failed(backend, kind.value)
        info.failed_attempts.append(FailedAttempt(backend, kind, elapsed))
        log.warning(
            "backend attempt failed",
            extra={
                "request_id": info.request_id,
                "backend": backend,
                "kind": kind.value,
                "elapsed_ms": round(elapsed * 1000, 2),
            },
        )

    def relay(
        self,
        opened: Opened,
        info: RequestInfo,
        cleanup: AsyncExitStack,
        kind: StreamKind,
        *,
        strip_usage: bool,
        ticket: Ticket | None,
        output_cap: int,
    ) -> Relay:
        """The body of a streamed 200. With prompt logging, the relayed bytes are handed to the
        record by the request's cleanup (before settlement, which was registered first)."""
        relay = Relay(
            opened.response,
            opened.first,
            StreamWatcher(kind, strip_usage=strip_usage),
            info,
            kind,
            ticket=ticket,
            max_frames=output_cap + FRAME_SLACK if ticket else None,
            stall_timeout=self.first_byte_timeout,
            cut=self.stream_cut,
        )
        if info.request_body is not None:
            cleanup.callback(relay.keep_response)
        return relay

    async def read_whole(
        self,
        opened: Opened,
        info: RequestInfo,
        route: paths.RouteId,
        prepared: Prepared,
        *,
        limit: int,
    ) -> Buffered:
        """A whole (non-streaming or error) answer: read it, account for it.

        Held to the reservation like a stream: an answer with more output tokens than the cap
        nzgw reserved and forwarded (a backend that ignored it) is withheld, and charged the
        cap."""
        response = opened.response
        body = opened.first + await response.read_all(limit)
        await response.aclose()
        if response.status == 200:
            usage = info.usage = framing.usage_from_body(route, body)
            cap = prepared.reservation.output_cap
            if cap and usage is not None and usage.completion_tokens > cap:
                info.usage = attrs.evolve(usage, completion_tokens=cap)
                info.outcome = "reservation_exhausted"
                raise Refused(
                    502,
                    "this request used up its token reservation",
                    refusal="reservation_exhausted",
                )
            if route is paths.RouteId.SHOW:
                body = trim_show_body(body, prepared.model)
        if info.request_body is not None:
            info.response_text = body.decode("utf-8", "replace")
        return Buffered(response.status, body, opened.content_type)


class _Replayed(WrappedResponse):
    """An upstream error response whose body was already read (kept for pass-through)."""

    __slots__ = ("_body",)

    def __init__(self, response: UpstreamResponse, body: bytes) -> None:
        super().__init__(response)
        self._body = body

    async def receive_some(self) -> bytes:
        body, self._body = self._body, b""
        return body

    async def read_all(self, limit: int) -> bytes:
        return await self.receive_some()

    def raw_body(self) -> None:
        return None  # its body is in memory


class Relay:
    """The body of a streamed answer: upstream chunks as they arrive, watched, not re-encoded.

    A plain async iterator (no generator), so that no cancel scope is ever held across a
    `yield` and closing it is explicit. The upstream response itself is closed by the request's
    cleanup stack; this object only decides what the client sees.
    """

    __slots__ = (
        "_clock",
        "_cut",
        "_done",
        "_first",
        "_info",
        "_kept",
        "_kind",
        "_max_frames",
        "_next_refresh",
        "_raw",
        "_read_at",
        "_stall_timeout",
        "_ticket",
        "_upstream",
        "_watcher",
    )

    def __init__(
        self,
        upstream: UpstreamResponse,
        first: bytes,
        watcher: StreamWatcher,
        info: RequestInfo,
        kind: StreamKind,
        *,
        ticket: Ticket | None = None,
        max_frames: int | None = None,
        stall_timeout: float = 300.0,
        cut: StreamCut | None = None,
    ) -> None:
        self._upstream = upstream
        self._cut = cut
        self._ticket = ticket
        self._max_frames = max_frames
        self._stall_timeout = stall_timeout
        self._next_refresh = trio.current_time() + ticket.refresh_every if ticket else math.inf
        self._first: bytes | None = first
        self._watcher = watcher
        self._info = info
        self._kind = kind
        self._done = False
        # The relay pump's last upstream read, on Trio's clock (read from the pump's thread).
        self._clock = trio.lowlevel.current_clock()
        self._read_at = 0.0
        self._raw: RawBody | None = None  # the upstream's raw body while the pump carries it
        # Until the stream ends: a stream the client left, or shutdown cut, stays "cancelled".
        info.outcome = "cancelled"
        # Prompt logging (the key opted in): the bytes relayed, as relayed (frames, not text),
        # up to a bound; handed to the record by `keep_response`.
        self._kept: bytearray | None = bytearray() if info.request_body is not None else None

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._first is not None:
                data, self._first = self._first, None
            elif self._done:
                raise StopAsyncIteration
            else:
                # The stall timer and the shutdown cut, without a context manager per token
                # beyond the cancel scope itself (the relay's hot path).
                data = b""
                stall = trio.CancelScope(deadline=trio.current_time() + self._stall_timeout)
                cut = self._cut
                if cut is not None:
                    cut.enter(stall)
                try:
                    with stall:
                        data = await self._upstream.receive_some()
                except UpstreamError:
                    data = b""
                finally:
                    if cut is not None:
                        cut.leave(stall)
                if stall.cancelled_caught:
                    return self._stopped()
                if not data:
                    return self._end()
                await self._refresh_if_due()
            if out := self._watch(data):
                return out

    def _stopped(self) -> bytes:
        """The end of a stream whose wait was cancelled: by the shutdown cut, or the stall
        timer."""
        if self._cut is not None and self._cut.happened:
            tail = self._end(CUT_MESSAGE)
            self._info.outcome = "cancelled"  # cut by the shutdown, as before
            return tail
        return self._end("the model server stopped sending")

    async def _refresh_if_due(self) -> None:
        if self._ticket is not None and trio.current_time() >= self._next_refresh:
            await self._ticket.refresh()
            self._next_refresh = trio.current_time() + self._ticket.refresh_every

    def _watch(self, data: bytes) -> bytes:
        """The client's bytes of upstream body bytes: watched, capped, kept for the prompt log."""
        out = self._watcher.feed(data)
        self._info.usage = self._watcher.usage()
        if self._max_frames is not None and self._watcher.frames > self._max_frames:
            # The backend ignored the output cap: stop at the reservation, charge what came.
            self._info.outcome = "reservation_exhausted"
            return out + self._end("this request used up its token reservation")
        if out and self._kept is not None:
            self._kept += out[: PROMPT_LOG_MAX_BYTES - len(self._kept)]
        return out

    # The relay pump (`nzgw.http.pump`): the same steps as `__anext__`, the upstream read and
    # the watching in the pump's thread, the timers and the end in the request's task.

    def pump_fd(self) -> int | None:
        """The upstream socket the pump may read now (`nzgw.http.pump.PumpSource`)."""
        if self._done or self._first is not None:
            return None
        self._raw = raw = raw_body_of(self._upstream)  # for `pump_feed`, once per carry
        return raw.pump_fd() if raw is not None else None

    def pump_feed(self, raw: bytes) -> tuple[bytes, bool]:
        """In the pump's thread: the client's bytes of `raw`, and whether the pump goes on."""
        self._read_at = self._clock.current_time()
        body = self._raw
        assert body is not None  # pump_fd offered the socket
        data = body.feed_nowait(raw)
        more = body.pump_fd() is not None
        if not data:
            return b"", more
        out = self._watch(data)
        return out, more and not self._done

    def pump_scope(self, *, restart: bool) -> trio.CancelScope:
        """The request task's wait while the pump carries the stream: cancelled at the stall
        timer (restarted, as a read from upstream restarts it, unless `restart` is False),
        the ticket's refresh and the shutdown cut. `pump_unscope` it afterwards."""
        if restart:
            self._read_at = trio.current_time()
        stall_at = self._read_at + self._stall_timeout
        scope = trio.CancelScope(deadline=min(stall_at, self._next_refresh))
        if self._cut is not None:
            self._cut.enter(scope)
        return scope

    def pump_unscope(self, scope: trio.CancelScope) -> None:
        if self._cut is not None:
            self._cut.leave(scope)

    async def pump_wake(self) -> bytes:
        """After `pump_scope` was cancelled: the stream's last bytes when it is cut or stalled
        (then it has ended), else the ticket refreshed when due and `b""`."""
        cut = self._cut is not None and self._cut.happened
        if cut or trio.current_time() - self._read_at >= self._stall_timeout:
            return self._stopped()
        await self._refresh_if_due()
        return b""

    def _end(self, cut: str | None = None) -> bytes:
        """The last bytes for the client: what the watcher held back, and an error frame when
        the stream did not end properly (or `cut` says why nzgw ends it)."""
        self._done = True
        watcher = self._watcher
        tail = watcher.flush()
        info = self._info
        if cut is None and watcher.completed and watcher.upstream_error is None:
            info.outcome = "ok"
        else:
            if info.outcome != "reservation_exhausted":
                info.outcome = "upstream_truncated"
            message = (
                cut or watcher.upstream_error or "the model server ended the stream unexpectedly"
            )
            tail += stream_error_frame(self._kind, message)
        info.usage = self._usage_so_far()
        if not tail:
            raise StopAsyncIteration
        if self._kept is not None:
            self._kept += tail[: PROMPT_LOG_MAX_BYTES - len(self._kept)]
        return tail

    def _usage_so_far(self) -> Usage:
        """The usage the stream reported, or its frames counted as completion tokens."""
        watcher = self._watcher
        return watcher.usage() or Usage(0, watcher.frames, reported=False)

    def keep_response(self) -> None:
        """Hand the relayed bytes kept for the prompt log to the request record."""
        if self._kept is not None:
            self._info.response_text = self._kept.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Called by Quart when the body is done or abandoned; the stack closes upstream."""
        if not self._done:
            self._info.usage = self._usage_so_far()
