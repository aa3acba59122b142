"""The Ollama emulator: a light HTTP/1.1 server on raw Trio sockets and h11.

`open_emulator()` runs one in the caller's Trio run (tests, benchmarks); `serve_emulator()` is the
long-lived task form (`bin/nzgw emulate-ollama`). What to answer is decided by the sans-IO
`_emu_api.respond`; this module only moves bytes, paces tokens, acts faults out and keeps the
connection log that tests assert on.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket as stdlib_socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, Final, NoReturn

import attrs
import h11
import trio

from nzgw.testing._emu_api import respond
from nzgw.testing._emu_config import EmulatorSettings, Fault
from nzgw.testing._emu_handling import Context, Request
from nzgw.testing._emu_render import Clock
from nzgw.testing._emu_wire import Reply, TokenDue

_RECEIVE_SIZE: Final = 65_536
_BACKLOG: Final = 4_096
#: Go's net/http sends a body written in one go with Content-Length below this size, else chunked.
_CHUNKING_THRESHOLD: Final = 2_048
_ACCEPT_CAPACITY_ERRORS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.define(eq=False)
class RequestRecord:
    """One request as the emulator received it. Times are `trio.current_time()`."""

    method: str
    #: The request target as sent (path and query, undecoded).
    target: str
    #: The decoded path, without the query.
    path: str
    #: Header names are lowercase.
    headers: list[tuple[str, str]]
    body: bytes
    started_at: float
    finished_at: float | None = None
    #: The response went out whole (terminator included).
    completed: bool = False
    #: The status sent, `None` when no status line was sent.
    status: int | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@attrs.define(eq=False)
class ConnectionRecord:
    id: int
    opened_at: float
    closed_at: float | None = None
    #: The peer closed (or reset) the connection; False when the emulator closed it.
    closed_by_peer: bool = False
    requests: list[RequestRecord] = attrs.Factory(list)


@attrs.define(eq=False)
class _Connection:
    stream: trio.SocketStream
    record: ConnectionRecord
    #: Waiting for the first byte of the next request (REFUSE closes such connections).
    idle: bool = False
    peer_left: bool = False


class Emulator:
    """A running emulated Ollama and its connection log.

    `connections` and `requests` only grow. Wait on them with `wait_until(predicate)` or
    `wait_connection_closed(id)`: both re-check after every change of the log, no sleeping.
    """

    def __init__(self, settings: EmulatorSettings, *, host: str, port: int) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.connections: list[ConnectionRecord] = []
        self.requests: list[RequestRecord] = []
        self._live: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._blobs: set[str] = set()
        self._clock = Clock(now=trio.current_time, wall_ns=time.time_ns)
        self._family = stdlib_socket.AF_INET
        self._address: tuple[Any, ...] = ()
        self._loopback = True
        self._listener: trio.socket.SocketType | None = None
        self._listening = trio.Event()
        #: While REFUSE holds the port: bound, not listening (a connect gets a RST).
        self._reserved: stdlib_socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def connection(self, connection_id: int) -> ConnectionRecord:
        for record in self.connections:
            if record.id == connection_id:
                return record
        raise KeyError(f"no connection {connection_id}")

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; it is re-evaluated after every change of the log
        (connection opened or closed, request started or finished). No timeout: wrap it."""
        while not predicate():
            await self._changed.wait()

    async def wait_connection_closed(self, connection_id: int) -> ConnectionRecord:
        record = self.connection(connection_id)
        await self.wait_until(lambda: record.closed_at is not None)
        return record

    # -- listening ----------------------------------------------------------------------------

    async def _bind(self) -> None:
        infos = await trio.socket.getaddrinfo(
            self.host, self.port, type=stdlib_socket.SOCK_STREAM, flags=stdlib_socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        sock = self._bound_socket(family, address)
        self._family = family
        self._address = sock.getsockname()
        self.port = int(self._address[1])
        self._loopback = ipaddress.ip_address(str(self._address[0])).is_loopback
        if self.settings.fault is Fault.REFUSE:
            self._reserved = sock
        else:
            self._listen_on(sock)

    @staticmethod
    def _bound_socket(family: int, address: tuple[Any, ...]) -> stdlib_socket.socket:
        sock = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen_on(self, sock: stdlib_socket.socket) -> None:
        sock.listen(_BACKLOG)
        self._listener = trio.socket.from_stdlib_socket(sock)
        self._listening.set()

    def _fault_changed(self, old: Fault, new: Fault) -> None:
        # Called synchronously by `settings.fault = …`, so the change holds for the very next
        # connect. Closing a Trio socket wakes the task blocked on it with ClosedResourceError.
        if new is Fault.REFUSE and old is not Fault.REFUSE and self._listener is not None:
            listener, self._listener = self._listener, None
            self._listening = trio.Event()
            listener.close()
            try:
                self._reserved = self._bound_socket(self._family, self._address)
            except OSError:
                self._reserved = None  # the port is free meanwhile; connects are still refused
            for connection in list(self._live.values()):
                if connection.idle:
                    connection.stream.socket.close()
        elif old is Fault.REFUSE and new is not Fault.REFUSE and self._listener is None:
            sock, self._reserved = self._reserved, None
            self._listen_on(sock or self._bound_socket(self._family, self._address))

    async def _accept_forever(self, nursery: trio.Nursery) -> NoReturn:
        while True:
            listener = self._listener
            if listener is None:
                await self._listening.wait()
                continue
            try:
                sock, _ = await listener.accept()
            except trio.ClosedResourceError:
                continue
            except OSError as exc:
                if listener is not self._listener:
                    continue
                if exc.errno in _ACCEPT_CAPACITY_ERRORS:
                    await trio.sleep(0.01)
                    continue
                raise
            nursery.start_soon(self._serve_connection, sock)

    def _close_sockets(self) -> None:
        for sock in (self._listener, self._reserved):
            if sock is not None:
                sock.close()
        self._listener = self._reserved = None

    # -- connections ---------------------------------------------------------------------------

    def _announce(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        record = ConnectionRecord(id=next(self._ids), opened_at=trio.current_time())
        connection = _Connection(stream, record)
        self.connections.append(record)
        self._live[record.id] = connection
        self._announce()
        try:
            await self._converse(connection)
        except* trio.BrokenResourceError:  # also from inside `_watching_peer`'s nursery
            connection.peer_left = True
        except* trio.ClosedResourceError:
            pass  # closed under us by REFUSE
        finally:
            # Synchronous close: it happens even when this task is being cancelled.
            stream.socket.close()
            now = trio.current_time()
            record.closed_at = now
            record.closed_by_peer = connection.peer_left
            for request in record.requests:
                if request.finished_at is None:
                    request.finished_at = now
            del self._live[record.id]
            self._announce()

    async def _converse(self, connection: _Connection) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            received = await self._receive_request(conn, connection)
            if received is None:
                return
            head, record = received
            request = Request(
                method=record.method,
                path=record.path,
                body=record.body,
                host=record.header("host") or "",
                query=urllib.parse.urlsplit(record.target).query,
            )
            context = Context(
                settings=self.settings,
                clock=self._clock,
                blobs=self._blobs,
                started_at=record.started_at,
                bound_to_loopback=self._loopback,
            )
            reply = respond(request, context)
            sent_whole = await self._answer(conn, connection, head, record, reply)
            if not sent_whole or conn.our_state is not h11.DONE:
                return
            if conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _receive_request(
        self, conn: h11.Connection, connection: _Connection
    ) -> tuple[h11.Request, RequestRecord] | None:
        head: h11.Request | None = None
        record: RequestRecord | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                await self._reject_malformed(conn, connection)
                return None
            if event is h11.NEED_DATA:
                if head is None and not conn.trailing_data[0]:
                    if self.settings.fault is Fault.REFUSE:
                        return None
                    connection.idle = True
                if conn.they_are_waiting_for_100_continue:
                    continue_ = h11.InformationalResponse(status_code=100, headers=[])
                    await connection.stream.send_all(conn.send(continue_))
                data = await connection.stream.receive_some(_RECEIVE_SIZE)
                connection.idle = False
                if not data:
                    connection.peer_left = True
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                record = self._record_request(connection, event)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None and record is not None
                record.body = bytes(body)
                return head, record
            else:  # ConnectionClosed (or PAUSED, which cannot happen before a request)
                return None

    def _record_request(self, connection: _Connection, head: h11.Request) -> RequestRecord:
        target = head.target.decode("latin-1")
        path = urllib.parse.urlsplit(target).path if not target.startswith("/") else target
        path = urllib.parse.unquote(path.partition("?")[0])
        record = RequestRecord(
            method=head.method.decode("latin-1"),
            target=target,
            path=path,
            headers=[
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers
            ],
            body=b"",
            started_at=trio.current_time(),
        )
        connection.record.requests.append(record)
        self.requests.append(record)
        self._announce()
        return record

    async def _reject_malformed(self, conn: h11.Connection, connection: _Connection) -> None:
        if connection.peer_left:
            return
        body = b"400 Bad Request"
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
        ]
        try:
            data = conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await connection.stream.send_all(data)

    # -- answering ----------------------------------------------------------------------------

    async def _answer(
        self,
        conn: h11.Connection,
        connection: _Connection,
        head: h11.Request,
        record: RequestRecord,
        reply: Reply,
    ) -> bool:
        """Act the reply out; True when it went out whole and the connection may carry on."""
        sent_whole = False
        if reply.fault is Fault.STALL:
            await self._watching_peer(conn, connection, trio.sleep_forever)
        elif reply.fault is not Fault.CLOSE_BEFORE_FIRST_BYTE:
            record.status = reply.status
            is_head = head.method == b"HEAD"
            paced = self.settings.first_token_delay > 0 or self.settings.token_delay > 0
            if reply.chunks is None and reply.fault is None:
                await connection.stream.send_all(self._whole(conn, reply, reply.body, is_head))
                sent_whole = True
            elif not paced and reply.fault is None:
                # Nothing to wait for but the socket: a peer that leaves shows up as a send
                # error or at the next read. Skipping the watcher keeps the fast path fast.
                sent_whole = await self._send_paced(conn, connection, reply, is_head)
            else:

                async def send() -> None:
                    nonlocal sent_whole
                    sent_whole = await self._send_paced(conn, connection, reply, is_head)

                await self._watching_peer(conn, connection, send)
        record.completed = sent_whole
        record.finished_at = trio.current_time()
        self._announce()
        return sent_whole

    async def _watching_peer(
        self, conn: h11.Connection, connection: _Connection, job: Callable[[], Awaitable[object]]
    ) -> None:
        """Run `job` while a sibling reads the socket: if the peer leaves, the job is cancelled at
        once, wherever it waits (token delay, stall, a blocked send)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_peer, conn, connection, nursery.cancel_scope)
            await job()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_peer(
        conn: h11.Connection, connection: _Connection, scope: trio.CancelScope
    ) -> None:
        while True:
            try:
                data = await connection.stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                connection.peer_left = True
                scope.cancel()
                return
            conn.receive_data(data)  # a pipelined request: kept for the next cycle

    async def _send_paced(
        self, conn: h11.Connection, connection: _Connection, reply: Reply, is_head: bool
    ) -> bool:
        """Pace the reply's chunks (token delays), send them; False when DIE_MID_STREAM cut it."""
        settings = self.settings
        dying = reply.fault is Fault.DIE_MID_STREAM
        chunks = reply.chunks if reply.chunks is not None else iter((reply.body,))
        tokens = frames = 0
        parts: list[bytes] = []
        pending_head = conn.send(self._head(reply, content_length=None)) if reply.streamed else b""
        for chunk in chunks:
            if isinstance(chunk, TokenDue):
                delay = settings.first_token_delay if tokens == 0 else settings.token_delay
                tokens += 1
                if delay > 0:
                    await trio.sleep(delay)
                continue
            if not reply.streamed:
                parts.append(chunk)
                continue
            if dying and frames >= settings.die_after_frames:
                break
            await connection.stream.send_all(pending_head + conn.send(h11.Data(data=chunk)))
            pending_head = b""
            frames += 1
        if reply.streamed:
            if dying:
                await connection.stream.send_all(pending_head)
                return False
            await connection.stream.send_all(pending_head + conn.send(h11.EndOfMessage()))
            return True
        body = b"".join(parts)
        if dying:
            data = conn.send(self._head(reply, content_length=len(body)))
            if not is_head:
                data += conn.send(h11.Data(data=body[: len(body) // 2]))
            await connection.stream.send_all(data)
            return False
        await connection.stream.send_all(self._whole(conn, reply, body, is_head))
        return True

    def _whole(self, conn: h11.Connection, reply: Reply, body: bytes, is_head: bool) -> bytes:
        fits = is_head or len(body) <= _CHUNKING_THRESHOLD
        data = conn.send(self._head(reply, content_length=len(body) if fits else None))
        if body and not is_head:
            data += conn.send(h11.Data(data=body))
        return data + conn.send(h11.EndOfMessage())

    @staticmethod
    def _head(reply: Reply, *, content_length: int | None) -> h11.Response:
        headers: list[tuple[str, str]] = []
        if reply.content_type is not None:
            headers.append(("Content-Type", reply.content_type))
        headers += reply.headers
        headers.append(("Date", _http_date()))
        if content_length is not None:
            headers.append(("Content-Length", str(content_length)))
        try:
            reason = HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=reply.status, headers=headers, reason=reason)

    # -- running ----------------------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[Emulator]) -> NoReturn:
        await self._bind()
        self.settings._add_fault_listener(self._fault_changed)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_forever, nursery)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self.settings._remove_fault_listener(self._fault_changed)
            self._close_sockets()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


async def serve_emulator(
    settings: EmulatorSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 11434,
    task_status: trio.TaskStatus[Emulator] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve an emulated Ollama until cancelled. `task_status.started(emulator)` once it listens
    (or, when started with REFUSE, holds its port). Cancelling it closes every connection."""
    emulator = Emulator(
        settings if settings is not None else EmulatorSettings(), host=host, port=port
    )
    await emulator._run(task_status)


@asynccontextmanager
async def open_emulator(
    settings: EmulatorSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Emulator]:
    """An emulated Ollama serving in the background while the block runs (port 0: any free
    port, read `emulator.port` / `emulator.url`). Leaving the block closes every connection."""
    async with trio.open_nursery() as nursery:
        emulator: Emulator = await nursery.start(
            partial(serve_emulator, settings, host=host, port=port)
        )
        try:
            yield emulator
        finally:
            nursery.cancel_scope.cancel()
