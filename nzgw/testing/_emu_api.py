"""Sans-IO: route one HTTP request of the emulated Ollama to its handler and decide the reply.

`respond(request, context) -> Reply` does no I/O and never waits; the server acts the reply out
(pacing tokens, faults). Validation order, status codes and error texts follow
reference/ollama-api.md; where the reference is silent, Ollama's Go code (routes.go, middleware/).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
from collections.abc import Callable
from typing import Final

import attrs

from nzgw.testing import _emu_compat as compat
from nzgw.testing import _emu_native as native
from nzgw.testing._emu_config import Fault
from nzgw.testing._emu_handling import Context, Request
from nzgw.testing._emu_wire import (
    BUSY_MESSAGE,
    RUNNER_DIED_MESSAGE,
    Rejected,
    Reply,
    anthropic_error,
    native_error,
    openai_error,
    router_method_not_allowed,
    router_not_found,
)


class Surface(enum.Enum):
    NATIVE = "native"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def respond(request: Request, context: Context) -> Reply:
    """The reply to one request. Transport faults strike every request (a broken server does not
    route); HTTP faults only requests that reach a handler (the router still answers 404/405)."""
    settings = context.settings
    fault = settings.fault
    if fault in (Fault.REFUSE, Fault.CLOSE_BEFORE_FIRST_BYTE, Fault.STALL):
        return _misbehave(fault)
    reply = _route(request, context)
    transport_fault = Fault.DIE_MID_STREAM if fault is Fault.DIE_MID_STREAM else context.fault
    if transport_fault is not None:
        reply = attrs.evolve(reply, fault=transport_fault)
    return reply


def _route(request: Request, context: Context) -> Reply:
    settings = context.settings
    if settings.check_host and context.bound_to_loopback and not _host_allowed(request.host):
        return Reply(403)
    if request.method == "OPTIONS" and settings.check_host and context.bound_to_loopback:
        return Reply(204)
    methods = _routes_for(request.path)
    if methods is None:
        return _redirect_trailing_slash(request) or router_not_found()
    route = methods.get(request.method)
    if route is None:
        return router_method_not_allowed()
    handler, surface = route
    if settings.fault in (Fault.HTTP_500, Fault.BUSY_503):
        return _fault_error(surface, settings.fault)
    try:
        return handler(request, context)
    except Rejected as rejected:
        return rejected.reply


def _redirect_trailing_slash(request: Request) -> Reply | None:
    """gin's RedirectTrailingSlash: `/api/tags/` → 301 (GET) or 307 (other methods)."""
    bare = request.path[:-1]
    if not request.path.endswith("/") or request.method not in _ROUTES.get(bare, {}):
        return None
    location = bare + (f"?{request.query}" if request.query else "")
    if request.method in ("GET", "HEAD"):
        body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
        return Reply(301, "text/html; charset=utf-8", body, headers=(("Location", location),))
    return Reply(307, headers=(("Location", location),))


def _misbehave(fault: Fault) -> Reply:
    if fault is Fault.REFUSE:
        fault = Fault.CLOSE_BEFORE_FIRST_BYTE
    return Reply(500, fault=fault)


def _fault_error(surface: Surface, fault: Fault) -> Reply:
    status, message = (503, BUSY_MESSAGE) if fault is Fault.BUSY_503 else (500, RUNNER_DIED_MESSAGE)
    if surface is Surface.OPENAI:
        return openai_error(status, message)
    if surface is Surface.ANTHROPIC:
        return anthropic_error(status, message)
    return native_error(status, message)


@functools.cache
def _hostname() -> str:
    return socket.gethostname().lower()


def _host_allowed(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("", "localhost") or host == _hostname():
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.endswith((".localhost", ".local", ".internal"))
    return address.is_loopback or address.is_private or address.is_unspecified


# ------------------------------------------------------------------------------------------------
# The router (gin: exact paths, one-segment parameters, 405 for a known path and another method).

Handler = Callable[[Request, Context], Reply]
Route = tuple[Handler, Surface]

_N, _O, _A = Surface.NATIVE, Surface.OPENAI, Surface.ANTHROPIC
_ROUTES: Final[dict[str, dict[str, Route]]] = {
    "/": {"GET": (native.root, _N), "HEAD": (native.root, _N)},
    "/api/version": {"GET": (native.version, _N), "HEAD": (native.version, _N)},
    "/api/tags": {"GET": (native.tags, _N), "HEAD": (native.tags, _N)},
    "/api/ps": {"GET": (native.ps, _N)},
    "/api/show": {"POST": (native.show, _N)},
    "/api/generate": {"POST": (native.generate, _N)},
    "/api/chat": {"POST": (native.chat, _N)},
    "/api/embed": {"POST": (native.embed, _N)},
    "/api/embeddings": {"POST": (native.embeddings, _N)},
    "/api/pull": {"POST": (native.pull, _N)},
    "/api/push": {"POST": (native.push, _N)},
    "/api/create": {"POST": (native.create, _N)},
    "/api/copy": {"POST": (native.copy, _N)},
    "/api/delete": {"DELETE": (native.delete, _N)},
    "/v1/chat/completions": {"POST": (compat.chat_completions, _O)},
    "/v1/completions": {"POST": (compat.completions, _O)},
    "/v1/embeddings": {"POST": (compat.embeddings_v1, _O)},
    "/v1/models": {"GET": (compat.list_models_v1, _O)},
    "/v1/responses": {"POST": (compat.create_response, _O)},
    "/v1/messages": {"POST": (compat.create_message, _A)},
}
_PARAMETER_ROUTES: Final[dict[str, dict[str, Route]]] = {
    "/api/blobs/": {"HEAD": (native.head_blob, _N), "POST": (native.create_blob, _N)},
    "/v1/models/": {"GET": (compat.retrieve_model_v1, _O)},
}


def _routes_for(path: str) -> dict[str, Route] | None:
    methods = _ROUTES.get(path)
    if methods is not None:
        return methods
    for prefix, parameter_methods in _PARAMETER_ROUTES.items():
        if path.startswith(prefix):
            parameter = path[len(prefix) :]
            if parameter and "/" not in parameter:
                return parameter_methods
    return None
