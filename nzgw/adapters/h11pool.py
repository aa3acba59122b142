"""The data plane's HTTP/1.1 client: a small connection pool over Trio streams and h11.

Why not httpx/httpcore here (httpx serves discovery and probes): measured on this stack, one
proxied request costs 0.28 ms of client CPU through httpcore's pool against 0.11 ms with h11
driven directly, and httpcore streams a body through four nested async generators, which, when
a client leaves mid-stream, are left suspended for the garbage collector. This client has no
generators: a response is an object with `receive_some()` and `aclose()`; the request goes out
in one write; everything the socket already delivered is returned in one piece, so a backend
faster than the client produces fewer, larger relays instead of one send per frame.

Ownership: a connection belongs to exactly one response from `open()` until the response has
been read to its end (then it goes back to the pool, if h11 says it can be reused) or closed
(then the socket is closed, which is how Ollama learns to stop generating). Cancellation at any
point closes the socket; nothing half-read ever returns to the pool.

No task of its own: the pool's bookkeeping (`_checkout_idle`, `_done`) is synchronous and
returns the connections to close; the caller awaits those closes, shielded, in its own task
(as httpcore's pool does). The network layer is a `StreamFactory`: `tcp_stream_factory` in
production, an in-memory stream in tests.

A chunked body (every Ollama stream) is decoded here, not by h11 (`_Chunked`): h11's event
machinery was a fifth of the relay's CPU per token (docs/ARCHITECTURE.md, "The relay fast
path"). h11 still writes the request and parses the status line and headers; at the end of a
chunked body the connection gets a fresh h11 state machine if h11 said it may be kept alive.

Every transport failure (OSError, a closed or broken stream, an h11 protocol error, a malformed
chunk) is raised as `UpstreamError`. Timeouts are the caller's, except connecting, which is
bounded here.
"""

from __future__ import annotations

import os
import select
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress

import h11
import trio

from nzgw.ports import UpstreamError

_READ_SIZE = 65536
_MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer field longer than this is malformed
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_IDLE = 64  # idle connections kept per backend

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)

StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]
"""Opens one new byte stream to the backend (raises OSError when it cannot)."""


def tcp_stream_factory(host: str, port: int, *, tls: bool) -> StreamFactory:
    """The production network layer: TCP, or TLS over TCP with the system's trust store."""
    ssl_context = ssl.create_default_context() if tls else None

    async def open_stream() -> trio.abc.Stream:
        if ssl_context is not None:
            return await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl_context, https_compatible=True
            )
        return await trio.open_tcp_stream(host, port)

    return open_stream


class _Connection:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def looks_alive(self) -> bool:
        """An idle keep-alive connection is usable if the server has not closed it (a
        readable idle socket means EOF or garbage: either way, do not reuse it)."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # TLS: trust h11's state; a dead one fails before any response byte
            return True
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    async def read(self) -> bytes:
        """The next bytes the backend sent (`b""` at EOF). A plain socket: one wait until it is
        readable (the relay's checkpoint) and one `read`, without the layers of Trio's
        `SocketStream.receive_some` (a try-read that fails for every paced token, then the
        wait, then the read); any other stream (TLS, tests) through its own API."""
        stream = self.stream
        if type(stream) is trio.SocketStream:
            sock = stream.socket
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("the connection was closed")
            await trio.lowlevel.wait_readable(sock)
            with suppress(BlockingIOError):  # readable without data: the stream's own way
                return os.read(sock.fileno(), _READ_SIZE)
        return bytes(await stream.receive_some(_READ_SIZE))

    async def write(self, data: bytes) -> None:
        """Send `data` whole. A plain socket: straight into it when its buffer takes it all
        (the usual case for a request), without the two scheduling rounds of Trio's
        `send_all`; the wait for the response that follows is the checkpoint. What does not fit
        (or any other stream) goes through `send_all`."""
        stream = self.stream
        sent = 0
        if type(stream) is trio.SocketStream:
            try:
                sent = os.write(stream.socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
        await stream.send_all(memoryview(data)[sent:])

    async def receive(self, eof_message: str) -> None:
        """Feed h11 with what the socket delivers next; EOF is `UpstreamError(eof_message)`."""
        data = await self.read()
        if not data:
            raise UpstreamError(eof_message)
        self.h11.receive_data(data)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), suppress(*_TRANSPORT_ERRORS):
            await self.stream.aclose()


async def _close_all(connections: Iterable[_Connection]) -> None:
    """Close connections the pool gave up, in the caller's task (each close is shielded)."""
    for conn in connections:
        await conn.aclose()


class _Chunked:
    """The chunked transfer coding (RFC 9112, 7.1), decoded from a buffer: sans-IO."""

    __slots__ = ("_remaining", "_state", "buffer", "done")

    _SIZE, _DATA, _CRLF, _TRAILER = range(4)

    def __init__(self, buffered: bytes) -> None:
        self.buffer = bytearray(buffered)
        self.done = False  # the last chunk and the trailer section were read
        self._remaining = 0
        self._state = self._SIZE

    def decode(self) -> bytes:
        """The body bytes the buffer holds (consumed); raises UpstreamError when malformed."""
        buffer = self.buffer
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - pos)
                if not take:
                    break
                out.append(bytes(buffer[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = self._CRLF
            elif state == self._CRLF:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise UpstreamError("malformed chunk: no CRLF after the data")
                pos += 2
                self._state = self._SIZE
            else:
                eol = buffer.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise UpstreamError("malformed chunk: line too long")
                    break
                line = bytes(buffer[pos:eol])
                pos = eol + 2
                if state == self._TRAILER:
                    self.done = not line  # an empty line ends the trailer section
                    continue
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not size or len(size) > 16 or not _HEX.issuperset(size):
                    raise UpstreamError("malformed chunk size")
                self._remaining = int(size, 16)
                self._state = self._DATA if self._remaining else self._TRAILER
        del buffer[:pos]
        return b"".join(out)


def _is_chunked(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    if status < 200 or status in (204, 304):
        return False  # no body, whatever the headers say
    return any(k == b"transfer-encoding" and v.lower() == b"chunked" for k, v in headers)


class H11Response:
    """An upstream response: status and headers are known; read the body with `receive_some`
    and always `aclose` (a no-op once the body was read to the end)."""

    __slots__ = ("_broken", "_chunked", "_conn", "_pool", "headers", "status")

    def __init__(
        self,
        pool: H11Pool,
        conn: _Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        chunked: bool = False,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        # A chunked body is decoded by `_Chunked` from what h11 had already buffered on.
        self._chunked = _Chunked(conn.h11.trailing_data[0]) if chunked else None
        self._broken: UpstreamError | None = None  # malformed framing the relay pump read

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def receive_some(self) -> bytes:
        """The body bytes available now (at least one), or `b""` at the end."""
        conn = self._conn
        if conn is None:
            return b""
        try:
            if self._chunked is not None:
                return await self._receive_chunked(conn, self._chunked)
            return await self._receive_h11(conn)
        except _TRANSPORT_ERRORS as exc:
            await self.aclose()
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise

    async def _receive_h11(self, conn: _Connection) -> bytes:
        parts: list[bytes] = []
        while True:
            event = conn.h11.next_event()
            if type(event) is h11.Data:
                parts.append(event.data)
                continue
            if event is h11.NEED_DATA:
                if parts:
                    break  # deliver what we have; read more on the next call
                await conn.receive("connection closed before the end of the response")
                continue
            if type(event) is h11.EndOfMessage:
                await self._release_finished()
                break
            raise UpstreamError(f"unexpected {type(event).__name__} from the backend")
        return b"".join(parts)

    async def _receive_chunked(self, conn: _Connection, chunked: _Chunked) -> bytes:
        if self._broken is not None:
            raise self._broken
        while True:
            data = chunked.decode()
            if chunked.done:
                # Kept alive only as h11 allows (our side DONE, not MUST_CLOSE) and with
                # nothing after the body (a backend never sends ahead).
                reusable = not chunked.buffer and conn.h11.our_state is h11.DONE
                if reusable:
                    conn.h11 = h11.Connection(h11.CLIENT)
                await self._release_finished(reusable=reusable)
                return data
            if data:
                return data
            received = await conn.read()
            if not received:
                raise UpstreamError("connection closed before the end of the response")
            chunked.buffer += received

    def raw_body(self) -> H11Response:
        return self

    def pump_fd(self) -> int | None:
        """The socket the relay pump may read this body from (`nzgw.ports.RawBody`): a plain
        socket and a chunked body not yet ended; None otherwise."""
        conn = self._conn
        chunked = self._chunked
        if conn is None or chunked is None or chunked.done or self._broken is not None:
            return None
        stream = conn.stream
        if type(stream) is not trio.SocketStream:
            return None
        fd = stream.socket.fileno()
        return fd if fd >= 0 else None

    def feed_nowait(self, raw: bytes) -> bytes:
        """The body bytes in `raw`, read off `pump_fd` by the relay pump. The last chunk and
        malformed framing are reported by the next `receive_some` (which releases or closes
        the connection in the request's task)."""
        chunked = self._chunked
        assert chunked is not None  # pump_fd offered the socket only for a chunked body
        chunked.buffer += raw
        try:
            return chunked.decode()
        except UpstreamError as exc:
            self._broken = exc
            return b""

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while chunk := await self.receive_some():
            size += len(chunk)
            if size > limit:
                await self.aclose()
                raise UpstreamError("upstream body too large")
            parts.append(chunk)
        return b"".join(parts)

    async def _release_finished(self, *, reusable: bool = True) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and (to_close := self._pool._done(conn, reusable=reusable)):
            await _close_all(to_close)

    async def aclose(self) -> None:
        """Close the response; an unfinished one closes its connection. Idempotent, shielded."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_all(self._pool._done(conn, reusable=False))


class H11Pool:
    """Keep-alive connections to one backend, at most `size` in use at once."""

    def __init__(self, open_stream: StreamFactory, *, size: int, connect_timeout: float) -> None:
        self._open_stream = open_stream
        self._idle: deque[_Connection] = deque()
        self._slots = trio.Semaphore(size)
        self._connect_timeout = connect_timeout
        self._closed = False

    async def _connect(self) -> _Connection:
        with trio.move_on_after(self._connect_timeout) as scope:
            try:
                stream = await self._open_stream()
            except OSError as exc:
                raise UpstreamError(f"connect: {exc}") from exc
        if scope.cancelled_caught:
            raise UpstreamError("connect: timed out")
        return _Connection(stream)

    def _checkout_idle(self) -> tuple[_Connection | None, list[_Connection]]:
        """A reusable idle connection (or None), and the stale ones found on the way: the
        caller closes those."""
        stale: list[_Connection] = []
        while self._idle:
            conn = self._idle.pop()
            if conn.h11.our_state is h11.IDLE and conn.looks_alive():
                return conn, stale
            stale.append(conn)
        return None, stale

    def _done(self, conn: _Connection, *, reusable: bool) -> list[_Connection]:
        """Give back a response's connection and its slot; return what the caller must close
        (the connection itself unless it went back to the idle list)."""
        self._slots.release()
        if not reusable or self._closed:
            return [conn]
        try:
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return [conn]
        if conn.h11.our_state is h11.IDLE and len(self._idle) < _MAX_IDLE:
            self._idle.append(conn)
            return []
        return [conn]

    async def open(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> H11Response:
        """Send the request (in one write) and wait for the status line and headers."""
        await self._slots.acquire()
        conn: _Connection | None = None
        handed_over = False
        try:
            conn, stale = self._checkout_idle()
            if stale:
                await _close_all(stale)
            if conn is None:
                conn = await self._connect()
            request = h11.Request(method=method, target=target, headers=headers)
            data = conn.h11.send(request) or b""
            if body:
                data += conn.h11.send(h11.Data(data=body)) or b""
            data += conn.h11.send(h11.EndOfMessage()) or b""
            await conn.write(data)
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    await conn.receive("connection closed before the response")
                    continue
                if type(event) is h11.InformationalResponse:
                    continue
                if type(event) is h11.Response:
                    headers = list(event.headers)
                    chunked = method != b"HEAD" and _is_chunked(event.status_code, headers)
                    response = H11Response(self, conn, event.status_code, headers, chunked=chunked)
                    handed_over = True  # the response owns the connection and the slot now
                    return response
                raise UpstreamError(f"unexpected {type(event).__name__} from the backend")
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not handed_over:  # failed or cancelled before a response took ownership
                self._slots.release()
                if conn is not None:
                    await conn.aclose()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            await self._idle.pop().aclose()
