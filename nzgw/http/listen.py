"""The public listener: sockets we create ourselves, then hand to hypercorn's trio worker.

We bind the socket ourselves (rather than letting hypercorn parse a bind string) for three
reasons: tests bind port 0 and need the real port; several worker processes share one port
with SO_REUSEPORT; and TCP_USER_TIMEOUT on the listening socket is inherited by every accepted
connection. That last one is how a client that stops reading but keeps its socket open is cut:
hypercorn shields its socket writes, so no cancellation can reach a `send_all` stuck on a full
window, but the kernel aborts the connection once sent data stays unacknowledged that long, the
write fails, and the request is cancelled like any other disconnect (docs/ARCHITECTURE.md, trap 4).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import hypercorn.config
import trio

from nzgw.config import Config
from nzgw.http.edge import serve_edge
from nzgw.http.pump import Pump


@attrs.frozen
class Bound:
    host: str
    port: int


def bind_socket(bind: str, *, stall_timeout: float, reuse_port: bool = False) -> socket.socket:
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT") and stall_timeout > 0:
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(stall_timeout * 1000))
            )
        sock.bind((host, int(port)))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.graceful_timeout = config.graceful_timeout
    hc.keep_alive_timeout = config.keep_alive_timeout
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")  # through our handlers, once
    hc.backlog = 1024
    # Headers of a request must arrive within this; bodies are bounded by max_body_bytes.
    hc.h11_max_incomplete_size = 64 * 1024
    return hc


async def serve_http(
    app: Any,
    config: Config,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    on_pump: Callable[[Pump], None] | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `sock` until `shutdown_trigger` returns; then drain in-flight requests
    for `graceful_timeout` seconds and cancel what is left. Returns when all is done."""
    host, port = sock.getsockname()[:2]
    hc = hypercorn_config(config)

    async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The edge owns `sock` from here (nzgw/http/edge.py: HTTP/1.1 only, contained).
        await serve_edge(
            app,
            hc,
            sock,
            shutdown_trigger=shutdown_trigger,
            relay_pump=config.relay_pump,
            on_pump=on_pump,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        task_status.started(Bound(host, port))
