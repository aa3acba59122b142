"""HTTP clients for the Ollama backends: one pool per purpose.

* Data plane (`OllamaBackend.open`: inference requests, relayed as they come): one
  `h11pool.H11Pool` per backend, a lean h11 client that costs well under half of httpcore's CPU
  per request and leaves no async generator behind when a client leaves mid-stream.
* Control plane (`OllamaBackend.get_json`: discovery and probes, a few small requests per tick,
  where speed does not matter): one `httpx.AsyncClient` shared by every backend, the HTTP client
  the project's design names; it brings TLS, redirects refused, and HTTP/1.1 keep-alive.

Every library exception is translated into `UpstreamError` here; nothing above this module
sees an httpx, httpcore or h11 type. Timeouts: the connect timeout is part of the clients'
configuration (like a driver setting); time to first byte and stalls are the caller's business
(`trio.fail_after` around calls). See docs/ARCHITECTURE.md ("Upstream clients").
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from nzgw.adapters.h11pool import H11Pool, H11Response, tcp_stream_factory
from nzgw.config import BackendConfig
from nzgw.ports import UpstreamError

CONTROL_PLANE_LIMIT = 16 * 1024 * 1024  # largest JSON document accepted from `get_json`
_CONTROL_PLANE_CONNECTIONS = 16  # the shared control-plane client's pool, for all backends


def host_header(url: str) -> bytes:
    """The Host header for a backend URL.

    Ollama bound to loopback answers 403 unless Host is `localhost`, an IP, or a few name
    patterns. A bare service name such as `ollama` (compose) is none of those, so single-label
    names are sent as `localhost:port`; real domain names and IPs are kept.
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


def open_control_client(*, connect_timeout: float) -> httpx.AsyncClient:
    """The control plane's client (enter it with `async with`). No overall timeout: callers
    bound each call (`trio.move_on_after`); connecting is bounded here."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=connect_timeout),
        limits=httpx.Limits(
            max_connections=_CONTROL_PLANE_CONNECTIONS,
            max_keepalive_connections=_CONTROL_PLANE_CONNECTIONS,
        ),
        follow_redirects=False,
        trust_env=False,  # never route backend traffic through an environment proxy
    )


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (else `UpstreamError`).

    Never `break` out of httpx's byte iterator: it is a chain of async generators, and one left
    suspended is finalised later by the garbage collector (trio warns). Past the limit, the
    scope is cancelled instead, so the next read unwinds the whole chain at once.
    """
    parts: list[bytes] = []
    size = 0
    with trio.CancelScope() as too_large:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                too_large.cancel()
                continue
            parts.append(chunk)
    if size > limit:
        raise UpstreamError("upstream body too large")
    return b"".join(parts)


class OllamaBackend:
    """One backend: its name (never shown to clients), URL, auth header and connection pool."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        pool_size: int,
        connect_timeout: float,
        control: httpx.AsyncClient | None = None,
    ) -> None:
        """`control`: the shared control-plane client; without one, `get_json` is unusable
        (a data-plane-only backend, as in the pool's tests). The caller owns `control`."""
        self.name = config.name
        self.url = config.url
        self._base = config.url.rstrip("/")
        self._base_headers: list[tuple[bytes, bytes]] = [(b"host", host_header(config.url))]
        if config.auth_token:
            self._base_headers.append(
                (b"authorization", b"Bearer " + config.auth_token.encode("latin-1"))
            )
        parts = urlsplit(config.url)
        self._data_plane = H11Pool(
            tcp_stream_factory(
                parts.hostname or "localhost",
                parts.port or (443 if parts.scheme == "https" else 80),
                tls=parts.scheme == "https",
            ),
            size=pool_size,
            connect_timeout=connect_timeout,
        )
        self._control = control

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

    async def get_json(self, path: str, *, limit: int = CONTROL_PLANE_LIMIT) -> Any:
        """GET a JSON document on the control plane (discovery, probes). Raises `UpstreamError`
        on any failure. On cancellation the connection is closed, nothing is left open."""
        if self._control is None:
            raise UpstreamError("no control-plane client")
        try:
            async with self._control.stream(
                "GET", self._base + path, headers=self._base_headers
            ) as response:
                body = await _read_limited(response, limit)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise UpstreamError(f"HTTP {response.status_code}")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise UpstreamError("invalid JSON from backend") from exc

    async def aclose(self) -> None:
        """Close the data plane's pool (the control-plane client belongs to the caller)."""
        with trio.CancelScope(shield=True):
            await self._data_plane.aclose()


@asynccontextmanager
async def open_backends(
    configs: Sequence[BackendConfig], *, pool_size: int, connect_timeout: float
) -> AsyncIterator[list[OllamaBackend]]:
    """One data-plane pool per backend and one control-plane client for them all, closed
    (shielded) when the block exits."""
    async with open_control_client(connect_timeout=connect_timeout) as control:
        backends = [
            OllamaBackend(c, pool_size=pool_size, connect_timeout=connect_timeout, control=control)
            for c in configs
        ]
        try:
            yield backends
        finally:
            for backend in backends:
                await backend.aclose()
