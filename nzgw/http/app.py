"""The QuartTrio application: dispatch, gateway endpoints, request ids and the request log.

Routing does not go through werkzeug: its slash merging and redirects are exactly the kind of
path interpretation a gateway must not leave to chance. Every request target is classified by
the sans-IO `nzgw.core.paths.classify` (an allowlist), and only the canonical path of a matched
route is ever forwarded upstream.

Quart's per-request machinery that nzgw does not use is skipped while nothing uses it
(`GatewayApp.handle_request`): no application context, session, signals or before/after-request
hooks per request, only the request context that `quart.request` reads. Registering a hook
brings Quart's full path back. A whole answer leaves as one ASGI body message
(`nzgw.http.asgi.GatewayHTTPConnection`; README "Performance").
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import trio
from quart import Request, Response, request
from quart.ctx import RequestContext
from quart.globals import _cv_request
from quart.signals import request_finished, request_started
from quart_trio import QuartTrio

from nzgw import __version__
from nzgw.core import paths
from nzgw.core.audit import AUDIT_QUEUE_FULL
from nzgw.core.edge import check_request
from nzgw.core.surfaces import Surface, error_response
from nzgw.http.asgi import GatewayHTTPConnection, RequestScope, request_scope
from nzgw.http.audit import is_probe
from nzgw.http.gateway import Gateway, RequestInfo
from nzgw.http.proxy import error, handle_route

log = logging.getLogger("nzgw.access")

INTERNAL_ERROR = "internal_error"  # the audit's refusal reason for a contained failure


class GatewayApp(QuartTrio):
    asgi_http_class = GatewayHTTPConnection

    def __init__(self, gateway: Gateway) -> None:
        super().__init__("nzgw")
        self.gateway = gateway
        # Streams are bounded by our own timeouts; Quart's 60 s default would cut every
        # longer generation silently (docs/ARCHITECTURE.md, trap 3).
        self.config["RESPONSE_TIMEOUT"] = None
        self.config["BODY_TIMEOUT"] = None
        # The body limit is enforced while reading (413 in the caller's shape), not by Quart.
        self.config["MAX_CONTENT_LENGTH"] = None
        self.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    async def handle_request(self, request: Request) -> Any:
        """Quart's, without the machinery nzgw does not use (module docstring): the request
        context is set for `quart.request`, `_dispatch` answers, errors go where Quart sends
        them. With any hook or signal receiver registered, Quart's full path."""
        if self._hooked():
            return await super().handle_request(request)
        token = _cv_request.set(RequestContext(self, request))
        try:
            return await _dispatch(self.gateway)
        except BaseExceptionGroup as group:  # as QuartTrio.handle_request
            errors, _ = group.split(trio.Cancelled)
            if errors is not None:
                raise errors from None
            return await self.handle_exception(group)  # type: ignore[arg-type]
        except Exception as exc:
            return await self.handle_exception(exc)
        finally:
            _cv_request.reset(token)

    def _hooked(self) -> bool:
        return bool(
            any(self.before_request_funcs.values())
            or any(self.after_request_funcs.values())
            or any(self.teardown_request_funcs.values())
            or any(self.url_value_preprocessors.values())
            or request_started.receivers
            or request_finished.receivers
        )

    async def dispatch_request(self, request_context: RequestContext | None = None) -> Any:
        return await _dispatch(self.gateway)

    def create_url_adapter(self, request: Any) -> None:
        # Routing is `nzgw.core.paths` (module docstring): werkzeug's URL adapter, built and
        # matched for every request by Quart, would only be thrown away.
        return None

    async def handle_exception(self, error: Exception) -> Any:
        log.exception("unhandled error")
        body, content_type = error_response(Surface.GATEWAY, 500, "internal error")
        return Response(body, 500, content_type=content_type)


def create_app(gateway: Gateway) -> GatewayApp:
    return GatewayApp(gateway)


def _client_address(gateway: Gateway) -> str:
    client = request.scope.get("client")
    address = str(client[0]) if client else ""
    if address and address in gateway.config.trusted_proxies:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded:
            # The right-most entry is the one our trusted proxy appended.
            address = forwarded.rsplit(",", 1)[-1].strip() or address
    return address


async def _dispatch(gateway: Gateway) -> Response:
    started = trio.current_time()
    request_id = os.urandom(8).hex()
    owned = request_scope(request.scope)
    owned.request_id = request_id
    raw_target: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    query = request.scope.get("query_string") or b""
    if query:
        raw_target += b"?" + query
    decision = paths.classify(request.method, raw_target)
    info = RequestInfo(
        request_id=request_id,
        method=request.method,
        decision=decision,
        client=_client_address(gateway),
        started=started,
        wall_started=time.time(),
        target=raw_target,
    )
    gateway.in_flight += 1  # until _finish, which the stack runs whatever happens
    owned.cleanup.push_async_callback(_finish, gateway, info)
    try:
        response = await _respond(gateway, info, owned)
    except Exception:
        # Contained: this request gets a 500 in its surface's shape; the connection, the
        # process and every other request carry on (README "Security", "The edge").
        log.exception("request failed", extra={"request_id": request_id})
        info.refusal, info.outcome = INTERNAL_ERROR, "error"
        response = error(decision.surface, 500, "internal error", request_id=request_id)
        response.headers["Connection"] = "close"
    info.status = response.status_code
    response.headers["X-Request-Id"] = request_id
    if decision.surface is Surface.ANTHROPIC:
        response.headers["request-id"] = request_id  # what the Anthropic SDKs read
    return response


async def _respond(gateway: Gateway, info: RequestInfo, owned: RequestScope) -> Response:
    decision = info.decision
    refused = check_request(request.scope.get("http_version", ""), request.scope["headers"])
    if refused is not None:
        info.refusal, info.outcome = refused.refusal, "refused"
        response = error(
            decision.surface, refused.status, refused.message, request_id=info.request_id
        )
        if refused.close:
            response.headers["Connection"] = "close"
        return response
    if gateway.audit is not None and gateway.audit.refusing and not is_probe(decision):
        # Fail closed: no room to audit this request. Probes still answer (readyz says 503).
        info.refusal, info.outcome = AUDIT_QUEUE_FULL, "refused"
        return error(decision.surface, 503, "service unavailable, try again", {"Retry-After": "1"})
    if isinstance(decision, paths.Blocked):
        info.refusal = "blocked_endpoint"
        return error(decision.surface, 403, "this endpoint is disabled on this gateway")
    if isinstance(decision, paths.NotFound):
        info.refusal = "not_found"
        return Response(b"404 page not found", 404, content_type="text/plain")
    if isinstance(decision, paths.MethodNotAllowed):
        info.refusal = "method_not_allowed"
        return Response(b"405 method not allowed", 405, content_type="text/plain")
    route = decision
    if route.route is paths.RouteId.HEALTHZ:
        return Response(b'{"status":"ok"}', 200, content_type="application/json")
    if route.route is paths.RouteId.READYZ:
        return await _readyz(gateway)
    if route.route is paths.RouteId.ROOT:
        body = b"" if request.method == "HEAD" else b"Ollama is running"
        return Response(body, 200, content_type="text/plain; charset=utf-8")
    return await handle_route(gateway, info, route, owned.cleanup)


async def _readyz(gateway: Gateway) -> Response:
    missing = await gateway.missing_dependencies()
    if missing:
        body = json.dumps({"status": "unavailable", "missing": missing}).encode()
        return Response(body, 503, content_type="application/json")
    return Response(b'{"status":"ready"}', 200, content_type="application/json")


async def _finish(gateway: Gateway, info: RequestInfo) -> None:
    """Runs in the connection's shielded cleanup, after the last byte (or the disconnect)."""
    gateway.in_flight -= 1
    info.finished = trio.current_time()
    if info.status == 0:
        # No response was produced: the client left (or shutdown cut in) before the answer.
        info.status = 499
        info.outcome = "cancelled"
    await gateway.request_finished(info)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "request",
            extra={
                "request_id": info.request_id,
                "method": info.method,
                "path": info.log_path,
                "status": info.status,
                "latency_ms": round((info.finished - info.started) * 1000, 2),
                "tenant": info.tenant_name,
                "key_prefix": info.key_prefix,
                "model": info.model,
                "refusal": info.refusal,
                "client": info.client,
                "version": __version__,
            },
        )
