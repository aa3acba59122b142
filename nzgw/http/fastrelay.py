"""The relay fast path: a committed stream's body goes from the upstream socket to the client's
socket without Quart's body iteration, ASGI messages, hypercorn's stream events and h11's event
machinery for every chunk (docs/ARCHITECTURE.md, "The relay fast path").

How it fits in the card's stack:

* nzgw's own hypercorn connection (`nzgw.http.edge`) offers the ASGI scope extension
  `RELAY_EXTENSION`: `{"relay": <coroutine function taking the body>}`.
* The data plane answers a committed stream with a `RelayResponse` (a Quart `Response`).
* The ASGI connection class (`nzgw.http.asgi`) sends its status line and headers the normal way
  (hypercorn and h11 choose the framing: chunked for HTTP/1.1, close-delimited for HTTP/1.0),
  hands the body to the extension, then ends the body the normal way (h11 writes the last
  chunk, hypercorn logs and recycles the keep-alive connection).
* `relay_to_client` writes every piece the body yields to the client's socket, framed. The
  body is the data plane's `Relay`: the framing watcher, the stall and grace-cut error frames
  and the reservation cap all live there, so both paths carry the same bytes.

Without the extension (the Quart test client, stock hypercorn) a `RelayResponse` is an ordinary
streamed `Response`: the slow path, same bytes.

Guarantees, as on the slow path:

* **Shielding**: a write goes straight into the socket when its buffer has room (no
  checkpoint: nothing to cancel); what does not fit is written by Trio, shielded, so a
  cancellation never leaves half a chunk on the wire. A write cannot block forever (the
  listener's `TCP_USER_TIMEOUT`, http/listen.py).
* **Backpressure**: a client that reads slowly blocks the write, so the relay stops reading
  upstream and TCP pushes back on the backend.
* **Cancellation**: a client that leaves is seen by hypercorn's reader, quart-trio cancels the
  request, the relay's wait for upstream is cancelled; the request's cleanup stack closes the
  upstream and settles (http/asgi.py). A write that fails (the client reset the connection)
  ends the relay the same way, a little earlier.
* **Exclusive writes**: the connection's send lock is held for the whole body, so nothing else
  of hypercorn's writes into the middle of it.
* **The first frame**: no checkpoint between the head and the first piece, so a client that
  leaves right after the head still gets (and is charged for) the frame that committed it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, cast, runtime_checkable

import h11
import trio
from quart import Response

from nzgw.http.pump import BLOCKED, CLIENT_GONE, FAILED, Carried, Pump, PumpSource

RELAY_EXTENSION = "nzgw.relay"

RelayFunction = Callable[[AsyncIterator[bytes]], Awaitable[None]]
"""Writes a response body to the client (the status line and headers were sent already)."""

_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class RelayResponse(Response):
    """A committed stream: Quart sends it like any streamed response, unless the connection
    offers `RELAY_EXTENSION` (then http/asgi.py hands `body` to it)."""

    def __init__(self, body: AsyncIterator[bytes], status: int, *, content_type: str) -> None:
        super().__init__(body, status, content_type=content_type)
        self.relay_body = body


def relay_of(scope: Any) -> RelayFunction | None:
    """The connection's relay function, if it offers one."""
    extension = (scope.get("extensions") or {}).get(RELAY_EXTENSION)
    return extension["relay"] if extension else None


async def relay_to_client(
    body: AsyncIterator[bytes],
    connection: h11.Connection,
    stream: trio.abc.SendStream,
    send_lock: trio.Lock,
    *,
    head: bytes = b"",
    pump: Pump | None = None,
) -> None:
    """Write `body` to the client: `connection` has produced the response head (`head`, the
    bytes of it not written yet, go out with the first piece) and is in SEND_BODY. The first
    piece goes through h11, which shows the framing it chose: chunked (HTTP/1.1, no
    Content-Length) is then framed here, any other framing stays with h11. A chunked body
    that `pump` can carry goes through it between the pieces Trio takes (`_pumped`).
    Returns when the body ends or the client is gone."""
    # No checkpoint before the first piece is written (as on the slow path): a stream whose
    # head went out always carries its first frame, and the watcher always counts it.
    try:
        send_lock.acquire_nowait()
    except trio.WouldBlock:
        await send_lock.acquire()
    try:
        chunked: bool | None = None  # unknown until the first piece
        pumpable = (
            pump is not None and type(stream) is trio.SocketStream and isinstance(body, Pumped)
        )
        async for data in body:
            if not data:
                continue
            if chunked:
                frame = b"%x\r\n%b\r\n" % (len(data), data)
            else:
                frame = connection.send(h11.Data(data=data)) or b""
                if chunked is None:
                    chunked = frame == b"%x\r\n%b\r\n" % (len(data), data)
            if head:
                frame, head = head + frame, b""
            if not await _write(stream, frame):
                return  # the client is gone: hypercorn's reader sees it too, ends the request
            if chunked and pumpable:
                assert pump is not None and isinstance(stream, trio.SocketStream)
                if not await _pumped(cast(Pumped, body), pump, stream):
                    return
        if head:  # an empty body: the head goes out alone (h11 ends the body after us)
            await _write(stream, head)
    finally:
        send_lock.release()


@runtime_checkable
class Pumped(PumpSource, Protocol):
    """A body the relay pump can carry, with the timers it runs in the request's task
    (`nzgw.services.forwarding.Relay`)."""

    def pump_scope(self, *, restart: bool) -> trio.CancelScope: ...

    def pump_unscope(self, scope: trio.CancelScope) -> None: ...

    async def pump_wake(self) -> bytes: ...


async def _pumped(body: Pumped, pump: Pump, stream: trio.SocketStream) -> bool:
    """Let the pump carry `body` for as long as it can; False when the client is gone.
    Returns True when the body needs the request's task for its next piece (its end, an
    upstream error, a pump that stopped): the caller's `async for` takes it."""
    restart = True
    while pump.running:
        upstream_fd = body.pump_fd()
        client_fd = stream.socket.fileno()
        if upstream_fd is None or client_fd < 0:
            return True
        carried = Carried(body, upstream_fd, client_fd)
        scope = body.pump_scope(restart=restart)
        try:
            with scope:
                await pump.carry(carried)
        finally:
            body.pump_unscope(scope)
        restart = True
        if carried.rest and not await _write(stream, carried.rest):
            return False  # the client's buffer was full: its rest waited for the client
        if carried.reason == CLIENT_GONE:
            return False
        if carried.reason == FAILED:
            assert carried.error is not None
            raise carried.error
        if scope.cancelled_caught:  # the stall timer, the ticket's refresh, the cut
            if tail := await body.pump_wake():
                frame = b"%x\r\n%b\r\n" % (len(tail), tail)
                return await _write(stream, frame)  # the body has ended
            restart = False  # only the refresh was due: the stall timer runs on
            continue
        if carried.reason != BLOCKED:
            return True
    return True


async def _write(stream: trio.abc.SendStream, frame: bytes) -> bool:
    """Write `frame` whole; False when the client is gone.

    Straight into the socket first: a frame the socket buffer takes (the usual case for a
    token) costs one `write` and no trip through Trio's scheduler (the read from upstream
    that produced it was the relay's checkpoint). What does not fit goes through Trio,
    shielded, waiting for the client to read (backpressure)."""
    sent = 0
    if type(stream) is trio.SocketStream:
        try:
            sent = os.write(stream.socket.fileno(), frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, broken pipe, or closed by hypercorn (EBADF)
            return False
        if sent == len(frame):
            return True
    try:
        with trio.CancelScope(shield=True):
            await stream.send_all(memoryview(frame)[sent:])
    except _CLIENT_GONE:
        return False
    return True
