"""A TCP proxy a test puts between nzgw and a real server, to fake the server's faults without
touching the shared server itself: `freeze()` stops forwarding (a hung server: connections stay
open, nothing answers), `thaw()` forwards again; `cut()` closes every connection and refuses
new ones (the server is down), `restore()` accepts again."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial

import attrs
import trio


@attrs.define
class TcpProxy:
    target: tuple[str, int]
    port: int = 0
    _flowing: trio.Event = attrs.Factory(trio.Event)
    _down: bool = False
    _connections: set[trio.CancelScope] = attrs.Factory(set)
    forwarded: int = 0  # connections accepted and forwarded

    def __attrs_post_init__(self) -> None:
        self._flowing.set()

    def freeze(self) -> None:
        self._flowing = trio.Event()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        self._down = True
        for scope in list(self._connections):
            scope.cancel()

    def restore(self) -> None:
        self._down = False

    def url_for(self, url: str) -> str:
        """`url` (scheme://user@host:port/db) with host and port replaced by the proxy's."""
        scheme, rest = url.split("://", 1)
        netloc, _, path = rest.partition("/")
        user, at, _hostport = netloc.rpartition("@")
        return f"{scheme}://{user}{at}127.0.0.1:{self.port}/{path}"

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            both.cancel()  # one side ended: end the other

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self._down:
                return
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            self.forwarded += 1
            scope = trio.CancelScope()
            self._connections.add(scope)
            try:
                with scope:
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            finally:
                self._connections.discard(scope)


@contextlib.asynccontextmanager
async def open_tcp_proxy(host: str, port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy((host, port))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            proxy.thaw()
            nursery.cancel_scope.cancel()
