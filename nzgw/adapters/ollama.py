"""HTTP clients for one Ollama backend.

Two pools per backend: the data plane (`open`: inference requests, relayed as they come) runs
on `h11pool.H11Pool`, a lean h11 client measured at well under half of httpcore's CPU per
request; the control plane (`get_json`: discovery and probes, a few requests per tick) uses
httpcore's connection pool directly. Every library exception is translated into
`UpstreamError` here; nothing above this module sees an httpcore or h11 type.

Timeouts: the connect timeout is part of the pool's configuration (like a driver setting);
time to first byte and stalls are the caller's business (`trio.fail_after` around calls).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import httpcore
import trio

from nzgw.adapters.h11pool import H11Pool, H11Response
from nzgw.config import BackendConfig
from nzgw.ports import UpstreamError

_HTTPCORE_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    OSError,
)


def host_header(url: str) -> bytes:
    """The Host header for a backend URL.

    Ollama bound to loopback answers 403 unless Host is `localhost`, an IP, or a few name
    patterns (reference §0.6). A bare service name such as `ollama` (compose) is none of those,
    so single-label names are sent as `localhost:port`; real domain names and IPs are kept.
    """
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    if not is_ip and "." not in host:
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    default_port = 443 if parts.scheme == "https" else 80
    return (host if port == default_port else f"{host}:{port}").encode("ascii")


class UpstreamResponse:
    """An open upstream response. Read it with `receive_some`; always `aclose` it.

    Closing a response that was not read to the end closes its connection (it never goes back
    to the pool half-read), which is how Ollama learns to stop generating.
    """

    __slots__ = ("_chunks", "_finished", "_response", "headers", "status")

    def __init__(self, response: httpcore.Response) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.headers)
        self._chunks: AsyncIterator[bytes] = response.aiter_stream()
        self._finished = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def receive_some(self) -> bytes:
        """The next chunk as the socket delivered it; `b""` at the end. Raises `UpstreamError`."""
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._finished = True
            return b""
        except _HTTPCORE_ERRORS as exc:
            self._finished = True
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def read_all(self, limit: int) -> bytes:
        """The whole remaining body (at most `limit` bytes, else `UpstreamError`)."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.receive_some():
            size += len(chunk)
            if size > limit:
                raise UpstreamError("upstream body too large")
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection. Safe to call twice; shielded: cleanup must not be skipped.

        httpcore streams through four nested async generators. Closing the response closes the
        connection, but generators left suspended mid-body would be finalised later by the
        garbage collector (trio warns). So after the close, one more read is made: it fails at
        the bottom on the closed connection and unwinds every layer now, deterministically.
        """
        with trio.CancelScope(shield=True):
            with suppress(*_HTTPCORE_ERRORS):
                await self._response.aclose()
            if not self._finished:
                self._finished = True
                with suppress(StopAsyncIteration, RuntimeError, *_HTTPCORE_ERRORS):
                    await self._chunks.__anext__()


class OllamaBackend:
    """One backend: its name (never shown to clients), URL, auth header and connection pool."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        pool_size: int,
        connect_timeout: float,
        keepalive_expiry: float = 30.0,
    ) -> None:
        self.name = config.name
        self.url = config.url
        self._base = config.url.encode("ascii")
        self._base_headers: list[tuple[bytes, bytes]] = [(b"host", host_header(config.url))]
        if config.auth_token:
            self._base_headers.append(
                (b"authorization", b"Bearer " + config.auth_token.encode("latin-1"))
            )
        self._extensions: dict[str, Any] = {"timeout": {"connect": connect_timeout}}
        parts = urlsplit(config.url)
        self._data_plane = H11Pool(
            parts.hostname or "localhost",
            parts.port or (443 if parts.scheme == "https" else 80),
            tls=parts.scheme == "https",
            size=pool_size,
            connect_timeout=connect_timeout,
        )
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=pool_size,
            keepalive_expiry=keepalive_expiry,
            retries=0,
        )

    async def open(
        self,
        method: bytes,
        path: bytes,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> H11Response:
        """Send a request on the data plane's pool; return once the status line and headers
        arrived. Raises `UpstreamError` on any transport failure. On cancellation nothing is
        left open."""
        request_headers = [*self._base_headers, *headers]
        if body or method == b"POST":
            request_headers.append((b"content-length", str(len(body)).encode()))
        return await self._data_plane.open(method, path, request_headers, body)

    async def get_json(self, path: str, *, limit: int = 16 * 1024 * 1024) -> Any:
        """GET a JSON document (discovery, probes). Raises `UpstreamError` on any failure."""
        request = httpcore.Request(
            b"GET",
            self._base + path.encode("ascii"),
            headers=self._base_headers,
            extensions=self._extensions,
        )
        try:
            response = UpstreamResponse(await self._pool.handle_async_request(request))
        except _HTTPCORE_ERRORS as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        try:
            body = await response.read_all(limit)
        finally:
            await response.aclose()
        if response.status != 200:
            raise UpstreamError(f"HTTP {response.status}")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamError("invalid JSON from backend") from exc

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._pool.aclose()
            await self._data_plane.aclose()


@asynccontextmanager
async def open_backends(
    configs: Sequence[BackendConfig], *, pool_size: int, connect_timeout: float
) -> AsyncIterator[list[OllamaBackend]]:
    """One pooled client per backend, closed (shielded) when the block exits."""
    backends = [
        OllamaBackend(c, pool_size=pool_size, connect_timeout=connect_timeout) for c in configs
    ]
    try:
        yield backends
    finally:
        for backend in backends:
            await backend.aclose()
