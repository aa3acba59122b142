"""The public listener's connections: HTTP/1.1 only, and nothing one connection does escapes it.

hypercorn's trio worker (`hypercorn.trio.run.worker_serve`) is reproduced here, narrowed to
what nzgw uses (plain sockets we bound ourselves, no TLS, no QUIC), for two changes that its
configuration cannot express:

1. **HTTP/1.1 only**, with no setting to turn HTTP/2 back on. Stock hypercorn switches a plain
   connection to HTTP/2 on a prior-knowledge preface (`PRI * HTTP/2.0`) or an `Upgrade: h2c`
   request, and its HTTP/2 path raised out of the connection task on a non-ASCII `:path`.
   HTTP/2 towards clients is the TLS proxy's job (Caddy talks HTTP/1.1 to nzgw).
   `EdgeH11Protocol` never switches: `Upgrade` is ignored (the request is answered as
   HTTP/1.1), WebSocket requests are plain HTTP requests that the application refuses, and a
   `PRI` preface is a request with version 2.0 that the application refuses with 505
   (`nzgw.core.edge`).
   Requests that `nzgw.core.edge.check_request` says must close the connection (the preface,
   `Content-Length` with `Transfer-Encoding`) get `Connection: close` on their answer here,
   whatever the application sends.
2. **Containment.** hypercorn runs every connection in the server nursery: an exception from
   one connection's protocol code cancelled the whole server and left `run_server`.
   `EdgeTCPServer.run` catches whatever a connection raises (not cancellation), answers 500 if
   the connection can still carry an answer, logs it once and closes only that connection.
   Exceptions of a request handler are caught earlier, in the application (500 in the
   caller's shape, with the request id: `nzgw.http.app`).
3. **The relay fast path.** Every request's scope offers `nzgw.http.fastrelay.RELAY_EXTENSION`:
   a committed stream's body is written by `relay_to_client` straight to this connection's
   socket, under its send lock (docs/ARCHITECTURE.md, "The relay fast path").
   A response's head is held until its first body bytes (or its end) and goes out in the
   same write: one segment, one wake-up of the client, for a whole answer and for a stream's
   head and first frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import h11
import hypercorn.config
import trio
from hypercorn.events import RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Request, Response
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import ShutdownError, parse_socket_addr, raise_shutdown, wrap_app

from nzgw.core.edge import check_request
from nzgw.core.surfaces import Surface, error_response
from nzgw.http.asgi import split_errors
from nzgw.http.fastrelay import RELAY_EXTENSION, RelayFunction, relay_to_client
from nzgw.http.pump import Pump, open_pump

log = logging.getLogger("nzgw.http")

_CLOSE = (b"connection", b"close")


class EdgeHTTPStream(HTTPStream):
    """hypercorn's HTTP stream whose application sees the relay extension (docstring, 3)."""

    def __init__(self, *args: Any, relay: RelayFunction) -> None:
        super().__init__(*args)
        self._inner_app = self.app
        self._relay = {"relay": relay}
        self.app = self._app_with_relay

    async def _app_with_relay(
        self,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        scope["extensions"][RELAY_EXTENSION] = self._relay  # type: ignore[typeddict-item]
        await self._inner_app(scope, receive, send, sync_spawn, call_soon)


class EdgeH11Protocol(H11Protocol):
    """hypercorn's HTTP/1 protocol without its protocol switches (module docstring, 1), with
    the relay fast path (3)."""

    _must_close = False

    def __init__(
        self,
        *args: Any,
        client_stream: trio.abc.SendStream,
        send_lock: trio.Lock,
        pump: Pump | None,
    ):
        super().__init__(*args)
        self._client_stream = client_stream
        self._send_lock = send_lock
        self._pump = pump
        self._head = b""  # a response head not written yet (module docstring, 3)

    async def relay(self, body: AsyncIterator[bytes]) -> None:
        """Write a response body straight to the client (`nzgw.http.fastrelay`)."""
        connection = self.connection
        if not isinstance(connection, h11.Connection):  # pragma: no cover - no WebSocket here
            raise RuntimeError("no HTTP/1 connection to relay on")
        head, self._head = self._head, b""
        await relay_to_client(
            body, connection, self._client_stream, self._send_lock, head=head, pump=self._pump
        )

    async def _send_h11_event(self, event: Any) -> None:
        # hypercorn's, with the head held for the first body bytes (module docstring, 3).
        try:
            data = self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if type(event) is h11.Response:
            self._head = data
            return
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            await self.send(RawData(data=data))

    async def _check_protocol(self, event: h11.Request) -> None:
        # Stock hypercorn raises here to switch to HTTP/2 (h2c upgrade, prior knowledge).
        verdict = check_request(event.http_version, event.headers)
        self._must_close = verdict is not None and verdict.close

    async def _create_stream(self, request: h11.Request) -> None:
        # Every request is an HTTP request: no WebSocket stream, whatever its headers say.
        self.stream = EdgeHTTPStream(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.ssl,
            self.client,
            self.server,
            self.stream_send,
            STREAM_ID,
            relay=self.relay,
        )
        headers = (
            request.headers.raw_items()
            if self.config.h11_pass_raw_headers
            else list(request.headers)
        )
        await self.stream.handle(
            Request(
                stream_id=STREAM_ID,
                headers=headers,
                http_version=request.http_version.decode(),
                method=request.method.decode("ascii").upper(),
                raw_path=request.target,
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()

    async def stream_send(self, event: StreamEvent) -> None:
        if (
            self._must_close
            and isinstance(event, Response)
            and event.status_code >= 200
            and _CLOSE not in event.headers
        ):
            event = Response(
                stream_id=event.stream_id,
                headers=[*event.headers, _CLOSE],
                status_code=event.status_code,
            )
        await super().stream_send(event)


class EdgeProtocol(ProtocolWrapper):
    """A connection that speaks HTTP/1 only, whatever the client asks for."""

    def __init__(
        self,
        *args: Any,
        client_stream: trio.abc.SendStream,
        send_lock: trio.Lock,
        pump: Pump | None,
    ) -> None:
        super().__init__(*args)
        self.protocol = EdgeH11Protocol(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
            client_stream=client_stream,
            send_lock=send_lock,
            pump=pump,
        )

    async def handle(self, event: Any) -> None:
        await self.protocol.handle(event)


class EdgeTCPServer(TCPServer):
    """One accepted connection (plain TCP), contained (module docstring, 2)."""

    def __init__(self, *args: Any, pump: Pump | None = None) -> None:
        super().__init__(*args)
        self._pump = pump

    async def run(self) -> None:
        try:
            await self._serve()
        except (Exception, BaseExceptionGroup) as exc:
            errors, rest = split_errors(exc)
            if errors is not None and not _socket_errors_only(errors):
                await self._contain(errors)
            if rest is not None:
                raise rest from None
        finally:
            await self._close()

    async def _serve(self) -> None:
        # TCPServer.run for a plain socket, with our protocol.
        sock = self.stream.socket
        client = parse_socket_addr(sock.family, sock.getpeername())
        server = parse_socket_addr(sock.family, sock.getsockname())
        async with TaskGroup() as task_group:
            self._task_group = task_group
            self.protocol = EdgeProtocol(
                self.app,
                self.config,
                self.context,
                task_group,
                ConnectionState(self.state),
                False,
                client,
                server,
                self.protocol_send,
                "http/1.1",
                client_stream=self.stream,
                send_lock=self.send_lock,
                pump=self._pump,
            )
            await self.protocol.initiate()
            await self.idle_task.restart(self._task_group, self._idle_timeout)
            await self._read_data()

    async def _contain(self, error: BaseException) -> None:
        connection_id = os.urandom(8).hex()
        log.error(
            "connection failed; closed it",
            exc_info=error,
            extra={"connection_id": connection_id},
        )
        inner = getattr(getattr(self, "protocol", None), "protocol", None)
        if not (
            isinstance(inner, H11Protocol)
            and isinstance(inner.connection, h11.Connection)
            and inner.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}
        ):
            return  # an answer already started: closing is all that is left
        body, content_type = error_response(Surface.GATEWAY, 500, "internal error")
        head = (
            f"HTTP/1.1 500 Internal Server Error\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {connection_id}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        # Shielded (we may be here because of a cancellation elsewhere) and bounded.
        with (
            trio.CancelScope(shield=True, deadline=trio.current_time() + 1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self.stream.send_all(head + body)


def _socket_errors_only(error: BaseException) -> bool:
    """The peer went away (hypercorn's own `except OSError: pass`, also inside a group)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(OSError)[1] is None
    return isinstance(error, OSError)


async def serve_edge(
    app: Any,
    config: hypercorn.config.Config,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    relay_pump: bool = True,
    on_pump: Callable[[Pump], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on the listening `sock` until `shutdown_trigger` returns; then give in-flight
    requests `config.graceful_timeout` seconds and cancel what is left. Committed streams go
    through the relay pump (`nzgw.http.pump`) unless `relay_pump` is False; `on_pump` is shown
    the pump when it runs (its counters for /metrics).

    hypercorn's `worker_serve`, narrowed: one plain socket, the lifespan protocol around it,
    and `EdgeTCPServer` for every connection.
    """
    wrapped: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        # The relay pump outlives every connection: it stops after the server nursery.
        pumping = open_pump() if relay_pump else contextlib.nullcontext(None)
        async with pumping as pump, trio.open_nursery() as server_nursery:
            if pump is not None and on_pump is not None:
                on_pump(pump)
            sock.listen(config.backlog)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            handler = partial(
                EdgeTCPServer,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                pump=pump,
            )
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            handler,
                            [listener],
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
