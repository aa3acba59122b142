"""The relay pump: one thread per process that carries committed streams' tokens from upstream
sockets to client sockets (docs/ARCHITECTURE.md, "The relay pump").

Why a thread: a paced token costs one wake-up of whoever relays it. Through Trio's run loop
that wake-up (its scheduler, a readiness wait, the task's step) costs ~3× the read and the
write themselves (bench/results/pump.md); a plain `epoll` loop pays only for the system calls
and the token's own work. The pump is that loop: it waits on every stream it carries at once,
and for a token it reads the upstream socket, lets the stream decode and watch the bytes
(`PumpSource.pump_feed`, the same code as the Trio path), frames them and writes them to the
client socket, without Trio. The GIL is free while it waits.

Ownership, the whole protocol: a stream is either Trio's or the pump's, never both.

* `Pump.carry` hands a stream to the pump and waits until the pump hands it back. The pump
  hands it back exactly once per `carry`: when the upstream needs Trio (the end of the body,
  EOF, an error, a malformed chunk, the reservation cap), when the client's socket buffer is
  full (the rest of the frame is returned; Trio writes it, waiting for the client:
  backpressure), when the client is gone, or when Trio asks for it back.
* Trio asks for it back when the `carry` is cancelled (the client left, a stall or refresh
  deadline, the shutdown cut) and waits, shielded, for the hand-back: after `carry` returns or
  raises, the pump no longer touches the stream. The pump answers within one loop turn: none
  of its calls blocks (non-blocking sockets).
* The pump works on duplicates of the two sockets (`os.dup`), closed when the stream is
  handed back: a socket closed by its owner meanwhile (hypercorn closing a connection) cannot
  have its descriptor number reused under the pump by another connection.
* A frame is written whole or handed back with its rest, so a client never sees half a frame
  followed by anything else.

The GIL: the pump's reads and writes are non-blocking, and it makes them without letting go of
the GIL (`_Syscalls`: read(2) and write(2) through `ctypes.PyDLL`, which keeps it). Python's
own `os.read`/`os.write` let go around every call; with the request tasks' thread busy
(admissions, settlements, a collection of the young generation) each of the pump's three
calls per token then waits for that thread's switch interval (5 ms) to get the GIL back: the
convoy effect. Measured with 1,000 streams: chunk delay p99 395 ms with `os.read`/`os.write`,
12 ms with the GIL kept (bench/results/pump.md). The pump lets go where it waits: in
`epoll_wait`.

Lifetime: `open_pump` runs the thread in a task of the caller's nursery (`trio.to_thread`, a
limiter of its own) and stops it when the block ends; streams still carried then are handed
back first. Nothing outlives the server that opened it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import AsyncIterator
from typing import Protocol

import attrs
import trio

log = logging.getLogger("nzgw.http")


_READ_SIZE = 65536
_EPOLLIN = select.EPOLLIN
# Hand-back reasons (`Carried.reason`).
UPSTREAM = "upstream"  # the stream needs Trio: its end, EOF, an error, or it asked to stop
BLOCKED = "blocked"  # the client's buffer is full: `Carried.rest` waits to be written
CLIENT_GONE = "client_gone"  # the client's socket failed (reset, broken pipe)
RECLAIMED = "reclaimed"  # Trio asked for it back
FAILED = "failed"  # the stream's own code raised in the pump (logged; Trio ends the stream)


class PumpSource(Protocol):
    """A stream the pump can carry (`nzgw.services.forwarding.Relay`)."""

    def pump_fd(self) -> int | None:
        """The upstream socket to read raw body bytes from, or None when the stream cannot be
        carried now (TLS, not chunked, ended, bytes pending in Trio's hands)."""
        ...

    def pump_feed(self, raw: bytes) -> tuple[bytes, bool]:
        """Called in the pump's thread with bytes read off the upstream socket: the bytes for
        the client (unframed) and whether the pump may go on (False: hand the stream back
        after writing them)."""
        ...


class _Syscalls:
    """Non-blocking read(2) and write(2) on sockets, the GIL kept (module docstring, "The
    GIL": `ctypes.PyDLL`, unlike `CDLL`, does not release it; Linux only, like
    `select.epoll`); errors as `os.read` and `os.write` raise them (`BlockingIOError` for
    EAGAIN). One per pump: its read buffer."""

    def __init__(self) -> None:
        libc = ctypes.PyDLL(None, use_errno=True)
        self._read = libc.read
        self._read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        self._read.restype = ctypes.c_ssize_t
        self._write = libc.write
        self._write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
        self._write.restype = ctypes.c_ssize_t
        self._buffer = ctypes.create_string_buffer(_READ_SIZE)

    def read(self, fd: int) -> bytes:
        while True:
            count: int = self._read(fd, self._buffer, _READ_SIZE)
            if count >= 0:
                return ctypes.string_at(self._buffer, count)
            _raise_unless_interrupted()

    def write(self, fd: int, data: bytes) -> int:
        while True:
            count: int = self._write(fd, data, len(data))
            if count >= 0:
                return count
            _raise_unless_interrupted()


def _copy(fd: int) -> int:
    """A duplicate of `fd` for the pump, or -1 when the process has no descriptor left."""
    try:
        return os.dup(fd)
    except OSError:
        return -1


def _raise_unless_interrupted() -> None:
    code = ctypes.get_errno()
    if code != errno.EINTR:
        raise OSError(code, os.strerror(code))  # BlockingIOError for EAGAIN: OSError's own


@attrs.define(eq=False)
class Carried:
    """One `carry` of a stream: what the pump and the request's task share about it."""

    source: PumpSource
    upstream_fd: int
    client_fd: int
    reason: str = ""  # why the pump handed it back
    rest: bytes = b""  # the part of a frame the client's buffer did not take: write it next
    error: Exception | None = None  # FAILED: what the stream's code raised
    done: trio.Event = attrs.field(factory=trio.Event, repr=False)
    # The pump's own descriptors for the two sockets (module docstring, "Ownership").
    pump_upstream: int = -1
    pump_client: int = -1


class Pump:
    """The pump's thread and its streams. `carry` from Trio; everything else is the thread's."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _EPOLLIN)
        self._commands: collections.deque[tuple[bool, Carried]] = collections.deque()
        self._carried: dict[int, Carried] = {}  # the thread's: by its upstream descriptor
        self._stopping = False
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()  # `_stopping` and the command queue, against the thread
        self._io = _Syscalls()
        # Counted for /metrics (read at scrape time; each written by one thread only).
        self.carried_total = 0  # carries begun (Trio's thread)
        self.uncopied_total = 0  # carries refused for want of descriptors (Trio's thread)
        self.frames_total = 0  # frames the pump wrote (the pump's thread)

    @property
    def running(self) -> bool:
        return not self._stopping

    # --- the request's task ----------------------------------------------------------------

    async def carry(self, carried: Carried) -> None:
        """Let the pump carry `carried.source` until it hands it back; `carried` says why and
        what is left to write. Cancellation asks for the stream back and waits for it,
        shielded, then propagates: afterwards the pump no longer touches the stream. Without
        descriptors for its copies (EMFILE) the stream stays with the task (RECLAIMED)."""
        carried.pump_upstream = _copy(carried.upstream_fd)
        carried.pump_client = _copy(carried.client_fd) if carried.pump_upstream >= 0 else -1
        try:
            if carried.pump_client < 0 or not self._command(True, carried):
                # No descriptors for the copies, or the pump stopped: the task goes on alone.
                self.uncopied_total += carried.pump_client < 0
                carried.reason = RECLAIMED
                return
            self.carried_total += 1
            try:
                await carried.done.wait()
            except BaseException:
                self._command(False, carried)
                with trio.CancelScope(shield=True):
                    await carried.done.wait()
                raise
        finally:
            for fd in (carried.pump_client, carried.pump_upstream):
                if fd >= 0:
                    os.close(fd)

    def _command(self, add: bool, carried: Carried) -> bool:
        with self._lock:
            if add and self._stopping:
                return False
            self._commands.append((add, carried))
        self._wake()
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._wake_w, b"w")

    def stop(self) -> None:
        """Ask the thread to hand back every stream and end."""
        with self._lock:
            self._stopping = True
        self._wake()

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the pump's thread ----------------------------------------------------------------

    def run(self) -> None:
        """The thread's loop; returns after `stop`, every stream handed back. A failure of the
        loop itself is logged and ends the pump the same way: streams go on in their tasks."""
        try:
            self._loop()
        except Exception:
            log.exception("relay pump failed; streams go on without it")
        finally:
            with self._lock:
                self._stopping = True
                commands = list(self._commands)
                self._commands.clear()
            for job in [*self._carried.values(), *(job for add, job in commands if add)]:
                self._hand_back(job, RECLAIMED)

    def _loop(self) -> None:
        epoll = self._epoll
        wake_r = self._wake_r
        carried = self._carried
        while True:
            for fd, _ in epoll.poll():
                if fd == wake_r:
                    if self._take_commands():
                        return
                    continue
                job = carried.get(fd)
                if job is not None:
                    self._step(job)

    def _take_commands(self) -> bool:
        """Apply the requests' commands; True when the pump is stopping."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
            stopping = self._stopping
        for add, job in commands:
            if add:
                self._carried[job.pump_upstream] = job
                self._epoll.register(job.pump_upstream, _EPOLLIN)
            elif self._carried.get(job.pump_upstream) is job:
                self._hand_back(job, RECLAIMED)
        return stopping

    def _step(self, job: Carried) -> None:
        try:
            raw = self._io.read(job.pump_upstream)
        except BlockingIOError:
            return
        except OSError:
            raw = b""  # Trio reads again and sees the error (or EOF) itself
        if not raw:
            self._hand_back(job, UPSTREAM)
            return
        try:
            data, more = job.source.pump_feed(raw)
        except Exception as exc:  # a bug in the stream's code: Trio ends the stream
            job.error = exc
            self._hand_back(job, FAILED)
            return
        if data:
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            try:
                sent = self._io.write(job.pump_client, frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                    log.warning("relay pump: client write failed", extra={"errno": exc.errno})
                self._hand_back(job, CLIENT_GONE)
                return
            self.frames_total += 1
            if sent < len(frame):
                job.rest = frame[sent:]
                self._hand_back(job, BLOCKED)
                return
        if not more:
            self._hand_back(job, UPSTREAM)

    def _hand_back(self, job: Carried, reason: str) -> None:
        if self._carried.pop(job.pump_upstream, None) is job:
            self._epoll.unregister(job.pump_upstream)
        job.reason = reason
        self._token.run_sync_soon(job.done.set)


@contextlib.asynccontextmanager
async def open_pump() -> AsyncIterator[Pump]:
    """A pump whose thread runs while the block does (module docstring, "Lifetime")."""
    pump = Pump()
    try:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await trio.to_thread.run_sync(pump.run, limiter=trio.CapacityLimiter(1))

            nursery.start_soon(run)
            try:
                yield pump
            finally:
                pump.stop()
    finally:
        pump.close()
