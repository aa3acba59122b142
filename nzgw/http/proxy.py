"""The HTTP glue of the data plane: authenticate, read and check the body, admit, then hand the
request to the forwarder (`nzgw.services.forwarding`: failover, relay, accounting) and turn its
answer into a Quart response.

Everything that must be released is registered on the request's cleanup stack (`cleanup`,
owned by the connection, http/asgi.py), passed down explicitly. Settlement (usage, counters,
audit) is the `_finish` callback that `app._dispatch` registered first, so it runs last: after
the upstream was closed, with the tokens seen so far.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from datetime import datetime
from types import MappingProxyType
from typing import Any

import trio
from quart import Response, request

from nzgw.core import framing, paths
from nzgw.core.disclosure import trim_ps_entry
from nzgw.core.models import Principal
from nzgw.core.names import InvalidModelNameError, allowed_models, normalize_model_name
from nzgw.core.surfaces import JSON_UTF8, Surface, error_response
from nzgw.http.bodies import prepare_body
from nzgw.http.fastrelay import RelayResponse
from nzgw.http.gateway import OLLAMA_API_VERSION, Gateway, Refused, RequestInfo
from nzgw.http.uploads import HANDOVER_ROUNDS, UploadsBusyError, arrived_whole
from nzgw.ports import CountersUnavailableError, StoreError, Ticket
from nzgw.services.forwarding import FORBIDDEN_MODEL
from nzgw.services.identity import AuthBusyError, AuthenticationError, AuthThrottledError

R = paths.RouteId

UPLOADS_BUSY = "too many request bodies in progress, try again"
BODY_TIMEOUT = "the request body did not arrive in time"
RETRY_SOON = MappingProxyType({"Retry-After": "1"})
CLOSE = MappingProxyType({"Connection": "close"})

_STREAM_KIND = framing.STREAM_KINDS
_MODEL_ROUTES = frozenset({*_STREAM_KIND, R.EMBED, R.EMBEDDINGS, R.V1_EMBEDDINGS, R.SHOW})


def error(
    surface: Surface,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
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


async def handle_route(
    gateway: Gateway, info: RequestInfo, route: paths.Route, cleanup: AsyncExitStack
) -> Response:
    surface = route.surface
    try:
        principal = await _authenticate(gateway, info)
        if route.route is R.V1_COUNT_TOKENS:
            return await _count_tokens(gateway, info, principal)
        if route.route in _MODEL_ROUTES:
            return await _model_request(gateway, info, route, principal, cleanup)
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
    key, client = info.key_prefix or "", info.client
    # A body that arrived whole takes no upload slot and needs no deadline: reading it cannot
    # wait (http/uploads.py). Only a key or client at its bound gives the handover a few rounds.
    rounds = HANDOVER_ROUNDS if gateway.uploads.full(key, client) else 0
    if await arrived_whole(request.body, rounds=rounds):
        await _collect(parts, limit)
        return b"".join(parts)
    try:
        with (
            gateway.uploads.receiving(key, client),
            trio.move_on_after(config.body_timeout or math.inf) as deadline,
        ):
            await _collect(parts, limit)
    except UploadsBusyError:
        raise Refused(429, UPLOADS_BUSY, refusal="body_uploads", headers=RETRY_SOON) from None
    if deadline.cancelled_caught:
        raise Refused(408, BODY_TIMEOUT, refusal="body_timeout", headers=CLOSE)
    return b"".join(parts)


async def _collect(parts: list[bytes], limit: int) -> None:
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"request body larger than {limit} bytes", refusal="too_large")
        parts.append(chunk)


async def _model_request(
    gateway: Gateway,
    info: RequestInfo,
    route: paths.Route,
    principal: Principal,
    cleanup: AsyncExitStack,
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

    headers: dict[str, str] = {}
    ticket: Ticket | None = None
    if gateway.admitter is not None:
        ticket = await gateway.admitter.admit(
            principal, model=name, reserve_tokens=reservation.tokens, info=info
        )
        headers.update(ticket.headers)
        cleanup.push_async_callback(ticket.settle, info)

    forwarder = gateway.forwarder
    opened = await forwarder.open(info, cleanup, route, name, prepared.body, stream=stream)
    response: Response
    if info.queue_wait is not None and gateway.config.queue_wait_header:
        headers["X-Queue-Wait-Ms"] = str(round(info.queue_wait * 1000))
    if stream and opened.response.status == 200:
        relay = forwarder.relay(
            opened,
            info,
            cleanup,
            _STREAM_KIND[route.route],
            strip_usage=prepared.strip_usage,
            ticket=ticket,
            output_cap=reservation.output_cap,
        )
        streams = gateway.metrics.streams_in_flight
        streams.inc()  # until the connection is done with the request
        cleanup.callback(streams.dec)
        # The one place a streamed answer's response object is made; the fast path's hook:
        # the connection may write this body itself (http/fastrelay.py).
        response = RelayResponse(relay, 200, content_type=opened.content_type)
        cache_control = opened.response.header(b"cache-control")
        if cache_control:
            response.headers["Cache-Control"] = cache_control.decode("latin-1")
    else:
        whole = await forwarder.read_whole(
            opened, info, route.route, prepared, limit=gateway.config.max_body_bytes * 4
        )
        response = Response(whole.body, whole.status, content_type=whole.content_type)
    for key, value in headers.items():
        response.headers[key] = value
    return response
