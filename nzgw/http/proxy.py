"""The data plane: authenticate, check, admit, forward with failover, relay, settle.

Ownership on the request path (who closes what, also on cancellation):

* Every upstream response is registered on the request's cleanup stack (`request_cleanup()`)
  the moment it exists, before its first chunk is read. The connection closes that stack in its
  `finally`, shielded, so an upstream is closed whether the client left before the first byte,
  mid-stream, after the handler returned but before Quart sent the body, or never.
* Settlement (usage, counters, audit) is the `_finish` callback that `app._dispatch` registered
  first, so it runs last: after the upstream was closed, with the tokens seen so far.
* Failover happens only before anything was committed to the client: the status line of a
  stream is sent only after its first chunk arrived from a backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import Any

import attrs
import trio
from quart import Response, request

from nzgw.core import framing, paths
from nzgw.core.audit import PROMPT_LOG_MAX_BYTES
from nzgw.core.disclosure import trim_ps_entry, trim_show_body
from nzgw.core.framing import StreamKind, StreamWatcher, Usage
from nzgw.core.models import Principal
from nzgw.core.names import InvalidModelNameError, allowed_models, normalize_model_name
from nzgw.core.requests import Prepared
from nzgw.core.surfaces import JSON_UTF8, Surface, error_response, stream_error_frame
from nzgw.http.asgi import request_cleanup
from nzgw.http.bodies import prepare_body
from nzgw.http.drain import CUT_MESSAGE, StreamCut
from nzgw.http.fastrelay import RelayResponse
from nzgw.http.gateway import OLLAMA_API_VERSION, Gateway, Refused, RequestInfo, Ticket
from nzgw.http.metrics import METRICS
from nzgw.http.queueing import BackendAttempts
from nzgw.http.uploads import UploadsBusyError
from nzgw.ports import CountersUnavailableError, StoreError, UpstreamError, UpstreamResponse
from nzgw.services.identity import AuthBusyError, AuthenticationError, AuthThrottledError

R = paths.RouteId

# Frames a stream may carry beyond its output cap: role, finish, usage, done, and the
# structure events of /v1/responses and /v1/messages.
FRAME_SLACK = 32

UPLOADS_BUSY = "too many request bodies in progress, try again"
BODY_TIMEOUT = "the request body did not arrive in time"
RETRY_SOON = {"Retry-After": "1"}
CLOSE = {"Connection": "close"}

# One message for "unknown", "not on any backend" and "not allowed": no existence disclosure.
FORBIDDEN_MODEL = "model not available for this key"

_STREAM_KIND = framing.STREAM_KINDS
_MODEL_ROUTES = frozenset({*_STREAM_KIND, R.EMBED, R.EMBEDDINGS, R.V1_EMBEDDINGS, R.SHOW})


def error(
    surface: Surface,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
    error_type: str | None = None,
    request_id: str | None = None,
) -> Response:
    body, content_type = error_response(
        surface, status, message, code=code, error_type=error_type, request_id=request_id
    )
    response = Response(body, status, content_type=content_type)
    if headers:
        for name, value in headers.items():
            response.headers[name] = value
    return response


def _json(doc: Any, status: int = 200) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(body, status, content_type=JSON_UTF8)


def _presented_key() -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    api_key = request.headers.get("x-api-key", "").strip()
    return api_key or None


def _allowed(principal: Principal) -> Callable[[str], bool]:
    return allowed_models(principal.key.allowed_models, principal.tenant.allowed_models)


async def handle_route(gateway: Gateway, info: RequestInfo, route: paths.Route) -> Response:
    surface = route.surface
    try:
        principal = await _authenticate(gateway, info)
        if route.route is R.V1_COUNT_TOKENS:
            return await _count_tokens(gateway, info, principal)
        if route.route in _MODEL_ROUTES:
            return await _model_request(gateway, info, route, principal)
        return _listing(gateway, info, route, principal)
    except Refused as refused:
        info.refusal = refused.refusal
        info.outcome = "refused"
        return error(
            surface,
            refused.status,
            refused.message,
            refused.headers,
            code=refused.code,
            error_type=refused.error_type,
            request_id=info.request_id,
        )


async def _authenticate(gateway: Gateway, info: RequestInfo) -> Principal:
    presented = _presented_key()
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if presented is None:
        raise Refused(401, "missing API key", refusal="auth", headers=unauthorized)
    try:
        principal = await gateway.authenticator.authenticate(presented, info.client)
    except AuthThrottledError as exc:
        retry = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))}
        raise Refused(
            429, "too many failed authentications", refusal="auth_throttled", headers=retry
        ) from None
    except AuthenticationError:
        raise Refused(401, "invalid API key", refusal="auth", headers=unauthorized) from None
    except AuthBusyError as exc:
        retry = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))}
        raise Refused(503, "service busy, try again", refusal="auth_busy", headers=retry) from None
    except StoreError:
        raise Refused(503, "service unavailable, try again", refusal="store_unavailable") from None
    except CountersUnavailableError:  # the failure throttle's store: fail closed
        raise Refused(
            503,
            "service unavailable, try again",
            refusal="counters_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    info.principal = principal
    return principal


def _listing(
    gateway: Gateway, info: RequestInfo, route: paths.Route, principal: Principal
) -> Response:
    allowed = _allowed(principal)
    registry = gateway.registry
    if route.route is R.VERSION:
        return _json({"version": OLLAMA_API_VERSION})
    if route.route is R.TAGS:
        return _json({"models": registry.list_models(allowed)})
    if route.route is R.PS:
        loaded = registry.list_loaded(allowed)
        if principal.key.allowed_models or principal.tenant.allowed_models:
            loaded = [trim_ps_entry(entry) for entry in loaded]  # not theirs: no timing
        return _json({"models": loaded})
    if route.route is R.V1_MODELS:
        data = [_openai_model(m["name"], m) for m in registry.list_models(allowed)]
        return _json({"object": "list", "data": data or None})
    if route.route is R.V1_MODEL:
        asked = route.params.get("model", "")
        name = _checked_model(gateway, info, asked, allowed)
        for entry in registry.list_models(lambda n: n == name):
            # The id the list shows (`llama3:latest`), whatever spelling was asked for.
            return _json(_openai_model(str(entry.get("name", name)), entry))
        raise Refused(403, FORBIDDEN_MODEL, refusal="forbidden_model")
    raise Refused(404, "not found", refusal="not_found")  # pragma: no cover - table is closed


def _openai_model(model_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    created = 0
    modified = entry.get("modified_at")
    if isinstance(modified, str):
        try:
            created = int(datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
    name = str(entry.get("name", model_id))
    namespace = name.split("/")[-2] if name.count("/") >= 1 else "library"
    return {"id": model_id, "object": "model", "created": created, "owned_by": namespace}


def _checked_model(
    gateway: Gateway, info: RequestInfo, model: Any, allowed: Callable[[str], bool]
) -> str:
    if not isinstance(model, str) or not model:
        raise Refused(400, "model is required", refusal="bad_request")
    try:
        name = normalize_model_name(model)
    except InvalidModelNameError:
        raise Refused(400, "invalid model name", refusal="bad_request") from None
    info.model = name
    if not allowed(name) or not gateway.registry.hosts(name):
        raise Refused(403, FORBIDDEN_MODEL, refusal="forbidden_model")
    return name


async def _count_tokens(gateway: Gateway, info: RequestInfo, principal: Principal) -> Response:
    """Anthropic's `POST /v1/messages/count_tokens`, answered here (Ollama has no such
    endpoint) with an ESTIMATE: the same one admission reserves for the prompt (the checked
    body's bytes / 4, inline images excluded). Nothing is forwarded or charged; the model must
    be allowed."""
    body = await _read_body(gateway, info)
    prepared = await prepare_body(gateway, R.V1_MESSAGES, body, principal)
    _checked_model(gateway, info, prepared.model, _allowed(principal))
    return _json({"input_tokens": prepared.reservation.prompt_estimate})


async def _read_body(gateway: Gateway, info: RequestInfo) -> bytes:
    """The whole body: at most NZGW_MAX_BODY_BYTES, within NZGW_BODY_TIMEOUT, and only while the
    key and the client address are under their bound of bodies in progress (http/uploads.py)."""
    config = gateway.config
    limit = config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Refused(413, f"request body larger than {limit} bytes", refusal="too_large")
    parts: list[bytes] = []
    size = 0
    try:
        with (
            gateway.uploads.receiving(info.key_prefix or "", info.client),
            trio.move_on_after(config.body_timeout or math.inf) as deadline,
        ):
            async for chunk in request.body:
                size += len(chunk)
                if size > limit:
                    raise Refused(
                        413, f"request body larger than {limit} bytes", refusal="too_large"
                    )
                parts.append(chunk)
    except UploadsBusyError:
        raise Refused(429, UPLOADS_BUSY, refusal="body_uploads", headers=RETRY_SOON) from None
    if deadline.cancelled_caught:
        raise Refused(408, BODY_TIMEOUT, refusal="body_timeout", headers=CLOSE)
    return b"".join(parts)


async def _model_request(
    gateway: Gateway, info: RequestInfo, route: paths.Route, principal: Principal
) -> Response:
    body = await _read_body(gateway, info)
    prepared = await prepare_body(gateway, route.route, body, principal)
    name = _checked_model(gateway, info, prepared.model, _allowed(principal))
    if principal.key.log_prompts:
        info.request_body = body
    stream = prepared.stream
    info.streamed = stream
    reservation = prepared.reservation
    info.prompt_estimate = reservation.prompt_estimate
    strip_usage = prepared.strip_usage
    body = prepared.body

    headers: dict[str, str] = {}
    ticket: Ticket | None = None
    if gateway.admitter is not None:
        ticket = await gateway.admitter.admit(
            principal, model=name, reserve_tokens=reservation.tokens, info=info
        )
        headers.update(ticket.headers)
        request_cleanup().push_async_callback(ticket.settle, info)

    upstream = await _open_with_failover(gateway, info, route, name, body, stream)
    response: Response
    if info.queue_wait is not None and gateway.config.queue_wait_header:
        headers["X-Queue-Wait-Ms"] = str(round(info.queue_wait * 1000))
    if stream and upstream.response.status == 200:
        kind = _STREAM_KIND[route.route]
        watcher = StreamWatcher(kind, strip_usage=strip_usage)
        relay = Relay(
            upstream.response,
            upstream.first,
            watcher,
            info,
            kind,
            ticket=ticket,
            max_frames=reservation.output_cap + FRAME_SLACK if ticket else None,
            stall_timeout=gateway.config.upstream_first_byte_timeout,
            cut=gateway.stream_cut,
        )
        METRICS.streams_in_flight.inc()  # until the connection is done with the request
        request_cleanup().callback(METRICS.streams_in_flight.dec)
        # The fast path's hook: the connection may write this body itself (http/fastrelay.py).
        response = RelayResponse(relay, 200, content_type=_content_type(upstream.response))
        cache_control = upstream.response.header(b"cache-control")
        if cache_control:
            response.headers["Cache-Control"] = cache_control.decode("latin-1")
    else:
        response = await _buffered(gateway, info, route, upstream, prepared)
    for key, value in headers.items():
        response.headers[key] = value
    return response


class _Opened:
    __slots__ = ("first", "response")

    def __init__(self, response: UpstreamResponse, first: bytes) -> None:
        self.response = response
        self.first = first


def _is_model_not_found(status: int, body: bytes) -> bool:
    return status == 404 and b"not found" in body


async def _open_with_failover(
    gateway: Gateway,
    info: RequestInfo,
    route: paths.Route,
    model: str,
    body: bytes,
    stream: bool,
) -> _Opened:
    """The first backend that answers usefully, tried in priority order.

    A transport error, a timeout to the first byte, a 5xx (Ollama's 503 "busy" included), an
    empty stream, or a 404 for the model (a stale snapshot) moves on to the next backend. The
    whole loop runs in the request's cancel scope: a client that leaves cancels every attempt.
    With backend slots, each attempt first waits for a slot in the fair queue (`BackendAttempts`).
    """
    registry = gateway.registry
    stack = request_cleanup()
    headers = [(b"content-type", b"application/json")]
    timeout = gateway.config.upstream_first_byte_timeout
    path = route.path.encode("ascii")
    attempts = not_found = 0
    async for backend in BackendAttempts(gateway, info, model, generates=route.route is not R.SHOW):
        attempts += 1
        response: UpstreamResponse | None = None
        try:
            with trio.fail_after(timeout):
                response = await backend.open(b"POST", path, body=body, headers=headers)
                stack.push_async_callback(response.aclose)
                if response.status >= 500 or response.status == 404:
                    error_body = await response.read_all(64 * 1024)
                    if response.status >= 500 or _is_model_not_found(404, error_body):
                        await response.aclose()
                        if response.status == 404:
                            not_found += 1  # a stale snapshot, not a sick backend
                            METRICS.backend_failed(backend.name, "not_found")
                        else:
                            registry.record_failure(backend.name)
                            METRICS.backend_failed(backend.name, "http_5xx")
                        continue
                    return _Opened(_Replayed(response, error_body), b"")
                first = await response.receive_some() if stream and response.status == 200 else b""
                if stream and response.status == 200 and not first:
                    await response.aclose()
                    registry.record_failure(backend.name)
                    METRICS.backend_failed(backend.name, "empty")
                    continue
        except (UpstreamError, trio.TooSlowError) as exc:
            if response is not None:
                await response.aclose()
            registry.record_failure(backend.name)
            METRICS.backend_failed(
                backend.name, "timeout" if isinstance(exc, trio.TooSlowError) else "transport"
            )
            continue
        registry.record_success(backend.name)
        if attempts > 1:
            METRICS.failovers.inc()
        info.backend = backend.name
        info.first_byte = trio.current_time()
        return _Opened(response, first)
    if not attempts or not_found < attempts:
        info.outcome = "upstream_failed"
        raise Refused(
            503, "the model is temporarily unavailable, try again", refusal="backend_failure"
        )
    # Every backend thought to host it said 404: it is gone. The same answer as forbidden.
    raise Refused(403, FORBIDDEN_MODEL, refusal="forbidden_model")


class _Replayed:
    """An upstream error response whose body was already read (kept for pass-through)."""

    def __init__(self, response: UpstreamResponse, body: bytes) -> None:
        self._response = response
        self._body = body
        self.status = response.status
        self.headers = response.headers

    def header(self, name: bytes) -> bytes | None:
        return self._response.header(name)

    async def receive_some(self) -> bytes:
        body, self._body = self._body, b""
        return body

    async def read_all(self, limit: int) -> bytes:
        return await self.receive_some()

    async def aclose(self) -> None:
        await self._response.aclose()


def _content_type(response: UpstreamResponse) -> str:
    value = response.header(b"content-type")
    return value.decode("latin-1") if value else "application/json"


async def _buffered(
    gateway: Gateway, info: RequestInfo, route: paths.Route, upstream: _Opened, prepared: Prepared
) -> Response:
    """A whole (non-streaming or error) answer: read it, account for it, pass it on.

    Held to the reservation like a stream: an answer with more output tokens than the cap
    nzgw reserved and forwarded (a backend that ignored it) is withheld, and charged the cap."""
    response = upstream.response
    body = upstream.first + await response.read_all(gateway.config.max_body_bytes * 4)
    await response.aclose()
    if response.status == 200:
        usage = info.usage = framing.usage_from_body(route.route, body)
        cap = prepared.reservation.output_cap
        if cap and usage is not None and usage.completion_tokens > cap:
            info.usage = attrs.evolve(usage, completion_tokens=cap)
            info.outcome = "reservation_exhausted"
            raise Refused(
                502, "this request used up its token reservation", refusal="reservation_exhausted"
            )
        if route.route is R.SHOW:
            body = trim_show_body(body, prepared.model)
    if info.request_body is not None:
        info.response_text = body.decode("utf-8", "replace")
    return Response(body, response.status, content_type=_content_type(response))


class Relay:
    """The body of a streamed answer: upstream chunks as they arrive, watched, not re-encoded.

    A plain async iterator (no generator), so that no cancel scope is ever held across a
    `yield` and closing it is explicit. The upstream response itself is closed by the request's
    cleanup stack; this object only decides what the client sees.
    """

    __slots__ = (
        "_cut",
        "_done",
        "_first",
        "_info",
        "_kept",
        "_kind",
        "_max_frames",
        "_next_refresh",
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
        # Until the stream ends: a stream the client left, or shutdown cut, stays "cancelled".
        info.outcome = "cancelled"
        # Prompt logging (the key opted in): the bytes relayed, as relayed (frames, not text),
        # up to a bound; handed to the audit by the request's cleanup, before settlement.
        self._kept: bytearray | None = None
        if info.request_body is not None:
            self._kept = bytearray()
            request_cleanup().callback(self._keep_response)

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._first is not None:
                data, self._first = self._first, None
            elif self._done:
                raise StopAsyncIteration
            else:
                data = b""
                with trio.move_on_after(self._stall_timeout) as stall, suppress(UpstreamError):
                    if self._cut is None:
                        data = await self._upstream.receive_some()
                    else:
                        with self._cut.watch(stall):
                            data = await self._upstream.receive_some()
                if stall.cancelled_caught:
                    if self._cut is not None and self._cut.happened:
                        tail = self._end(CUT_MESSAGE)
                        self._info.outcome = "cancelled"  # cut by the shutdown, as before
                        return tail
                    return self._end("the model server stopped sending")
                if not data:
                    return self._end()
                if trio.current_time() >= self._next_refresh and self._ticket is not None:
                    await self._ticket.refresh()
                    self._next_refresh = trio.current_time() + self._ticket.refresh_every
            out = self._watcher.feed(data)
            self._info.usage = self._watcher.usage()
            if self._max_frames is not None and self._watcher.frames > self._max_frames:
                # The backend ignored the output cap: stop at the reservation, charge what came.
                self._info.outcome = "reservation_exhausted"
                return out + self._end("this request used up its token reservation")
            if out:
                if self._kept is not None:
                    self._kept += out[: PROMPT_LOG_MAX_BYTES - len(self._kept)]
                return out

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
        info.usage = watcher.usage() or Usage(0, watcher.frames, reported=False)
        if not tail:
            raise StopAsyncIteration
        if self._kept is not None:
            self._kept += tail[: PROMPT_LOG_MAX_BYTES - len(self._kept)]
        return tail

    def _keep_response(self) -> None:
        if self._kept is not None:
            self._info.response_text = self._kept.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Called by Quart when the body is done or abandoned; the stack closes upstream."""
        if not self._done:
            self._info.usage = self._watcher.usage() or Usage(0, self._watcher.frames, False)
