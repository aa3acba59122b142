"""The relay pump (nzgw/http/pump.py): the thread that carries committed streams' tokens.

Two levels: the pump itself over socket pairs (what it hands back and when, that nothing is
lost, reordered or touched after a hand-back), and `relay_to_client` with a real upstream
(`H11Pool` on a socket this test writes byte by byte) and a real `Relay`: the relay's timers
(stall, lease refresh, the shutdown cut), its cap and a malformed upstream work while the pump
carries the stream, as they do in the request's task (tests/test_relay.py)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing

from nzgw.adapters.h11pool import H11Pool, tcp_stream_factory
from nzgw.core import paths
from nzgw.core.framing import StreamKind, StreamWatcher
from nzgw.core.record import RequestInfo
from nzgw.http.fastrelay import relay_to_client
from nzgw.http.pump import (
    BLOCKED,
    CLIENT_GONE,
    FAILED,
    RECLAIMED,
    UPSTREAM,
    Carried,
    Pump,
    _Syscalls,
    open_pump,
)
from nzgw.services.drain import CUT_MESSAGE, StreamCut
from nzgw.services.forwarding import Relay

GUARD = 10  # a hang guard, not a bound: every wait below is on a condition


# --- The pump alone, over socket pairs ----------------------------------------------------


class Source:
    """A stream that passes bytes through, or raises, or asks to stop after `stop_after`."""

    def __init__(self, *, fail: bool = False, stop_after: int | None = None) -> None:
        self.fed: list[bytes] = []
        self.fail = fail
        self.stop_after = stop_after

    def pump_fd(self) -> int | None:
        return None

    def pump_feed(self, raw: bytes) -> tuple[bytes, bool]:
        if self.fail:
            raise RuntimeError("the stream's code failed")
        self.fed.append(raw)
        return raw, self.stop_after is None or len(self.fed) < self.stop_after


class Pair:
    """upstream (the pump reads `inner`), client (the pump writes `inner`): `outer` is ours."""

    def __init__(self) -> None:
        self.upstream_inner, self.upstream_outer = socket.socketpair()
        self.client_inner, self.client_outer = socket.socketpair()
        for sock in (self.upstream_inner, self.client_inner, self.client_outer):
            sock.setblocking(False)

    def carried(self, source: Source) -> Carried:
        return Carried(source, self.upstream_inner.fileno(), self.client_inner.fileno())

    def close(self) -> None:
        self.upstream_inner.close()
        self.upstream_outer.close()
        self.client_inner.close()
        self.client_outer.close()


def dechunk(data: bytes) -> list[bytes]:
    """The chunks of a chunked body (no last chunk needed)."""
    chunks = []
    while data:
        size, _, rest = data.partition(b"\r\n")
        length = int(size, 16)
        chunks.append(rest[:length])
        assert rest[length : length + 2] == b"\r\n"
        data = rest[length + 2 :]
    return chunks


async def read_client(pair: Pair, size: int) -> bytes:
    """`size` bytes from the client's end."""
    sock = trio.socket.from_stdlib_socket(pair.client_outer)
    data = b""
    while len(data) < size:
        data += await sock.recv(65536)
    return data


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


async def test_the_pump_carries_tokens_in_order_each_one_framed(pair: Pair) -> None:
    tokens = [b'{"token":%d}\n' % i for i in range(50)]
    source = Source(stop_after=len(tokens))
    with trio.fail_after(GUARD):
        async with open_pump() as pump, trio.open_nursery() as nursery:
            carried = pair.carried(source)
            nursery.start_soon(pump.carry, carried)
            received = b""
            for token in tokens:  # one write at a time, as a model emits them
                pair.upstream_outer.send(token)
                received += await read_client(pair, len(b"%x\r\n%b\r\n" % (len(token), token)))
    assert dechunk(received) == tokens
    assert carried.reason == UPSTREAM and carried.rest == b""


async def test_a_full_client_buffer_hands_back_the_rest_of_the_frame(pair: Pair) -> None:
    """Backpressure: the pump never waits on a client; what its buffer did not take comes
    back whole, and the pump stops reading upstream."""
    pair.client_inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * 1_000_000
    with trio.fail_after(GUARD):
        async with open_pump() as pump:
            pair.upstream_outer.send(big[:60_000])
            carried = pair.carried(Source())
            await pump.carry(carried)
    assert carried.reason == BLOCKED
    written = b""
    with pytest.raises(BlockingIOError):
        while True:
            written += pair.client_outer.recv(65536)
    (chunk,) = dechunk(written + carried.rest)
    assert chunk == big[: len(chunk)]  # the frame whole: what was written, then the rest


async def test_a_cancelled_carry_leaves_the_stream_untouched(pair: Pair) -> None:
    """After a cancelled `carry` returns, the pump reads and writes nothing more of it."""
    other = Pair()
    try:
        with trio.fail_after(GUARD):
            async with open_pump() as pump:
                carried = pair.carried(Source())
                with trio.CancelScope() as scope:
                    scope.cancel()  # cancelled at once: the pump has the stream, then not
                    await pump.carry(carried)
                assert scope.cancelled_caught and carried.reason == RECLAIMED
                pair.upstream_outer.send(b"after the hand-back")
                # The pump's loop turns on: another stream's token goes through it after
                # the first stream's bytes were waiting to be read.
                other.upstream_outer.send(b"other")
                await pump.carry(other.carried(Source(stop_after=1)))
                assert dechunk(await read_client(other, 10)) == [b"other"]
                assert pair.upstream_inner.recv(100) == b"after the hand-back"
    finally:
        other.close()
    with pytest.raises(BlockingIOError):
        pair.client_outer.recv(100)


async def test_a_client_gone_and_an_upstream_eof_are_handed_back(pair: Pair) -> None:
    with trio.fail_after(GUARD):
        async with open_pump() as pump:
            pair.client_outer.close()
            pair.upstream_outer.send(b"token")
            gone = pair.carried(Source())
            await pump.carry(gone)
            pair.upstream_outer.shutdown(socket.SHUT_WR)
            eof = pair.carried(Source())
            await pump.carry(eof)
    assert gone.reason == CLIENT_GONE
    assert eof.reason == UPSTREAM


async def test_a_failing_stream_is_handed_back_with_its_error(pair: Pair) -> None:
    with trio.fail_after(GUARD):
        async with open_pump() as pump:
            pair.upstream_outer.send(b"token")
            carried = pair.carried(Source(fail=True))
            await pump.carry(carried)
            # The pump carries on for other streams.
            pair.upstream_outer.send(b"next")
            after = pair.carried(Source(stop_after=1))
            await pump.carry(after)
    assert carried.reason == FAILED and isinstance(carried.error, RuntimeError)
    assert after.reason == UPSTREAM and dechunk(await read_client(pair, 9)) == [b"next"]


async def test_stopping_hands_back_every_stream_and_refuses_new_ones(pair: Pair) -> None:
    second = Pair()
    try:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                pump: Pump
                async with open_pump() as pump:
                    carried = pair.carried(Source())
                    nursery.start_soon(pump.carry, carried)
                    await trio.testing.wait_all_tasks_blocked()
                assert not pump.running
            late = second.carried(Source())
            await pump.carry(late)
        assert carried.reason == RECLAIMED and late.reason == RECLAIMED
    finally:
        second.close()


@pytest.mark.parametrize("failing", [1, 2], ids=["upstream copy", "client copy"])
async def test_without_descriptors_for_its_copies_the_stream_stays_with_its_task(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """EMFILE on a copy: `carry` returns at once (nothing carried, nothing left open)."""
    real_dup = os.dup
    made: list[int] = []

    def dup(fd: int) -> int:
        if len(made) + 1 == failing:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(real_dup(fd))
        return made[-1]

    monkeypatch.setattr(os, "dup", dup)  # the module the pump calls it from
    with trio.fail_after(GUARD):
        async with open_pump() as pump:
            carried = pair.carried(Source())
            await pump.carry(carried)
    assert carried.reason == RECLAIMED
    for fd in made:  # the copy made before the failure was closed
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_pumps_system_calls_behave_as_os_read_and_write() -> None:
    """`_Syscalls` (read(2)/write(2) with the GIL kept) reports what `os.read`/`os.write` do:
    the bytes, EOF, EAGAIN as BlockingIOError, a partial write, a reset peer as OSError."""
    calls = _Syscalls()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            calls.read(ours.fileno())
        theirs.send(b"token")
        assert calls.read(ours.fileno()) == b"token"
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = b"x" * 1_000_000
        written = calls.write(ours.fileno(), big)
        assert 0 < written < len(big)
        with pytest.raises(BlockingIOError):
            calls.write(ours.fileno(), big)
        theirs.shutdown(socket.SHUT_WR)
        assert calls.read(ours.fileno()) == b""
    left, right = socket.socketpair()
    with left:
        right.close()
        with pytest.raises(OSError) as failed:
            calls.write(left.fileno(), b"token")
        assert failed.value.errno in (errno.EPIPE, errno.ECONNRESET)


# --- relay_to_client with a real upstream and a real Relay --------------------------------


class Upstream:
    """A backend this test writes byte by byte: head, then chunks on demand."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.stream: trio.SocketStream | None = None
        self.connections = 0

    async def accept(self) -> trio.SocketStream:
        listener = trio.socket.from_stdlib_socket(self.listener)
        sock, _ = await listener.accept()
        self.connections += 1
        self.stream = trio.SocketStream(sock)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await self.stream.receive_some(65536)
        await self.stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        return self.stream

    def close(self) -> None:
        self.listener.close()
        if self.stream is not None:
            self.stream.socket.close()

    async def send(self, data: bytes, *, framed: bool = True) -> None:
        assert self.stream is not None
        await self.stream.send_all(b"%x\r\n%b\r\n" % (len(data), data) if framed else data)


def frame(i: int, *, done: bool = False) -> bytes:
    if done:
        return b'{"model":"m","message":{"role":"assistant","content":""},"done":true,' \
            b'"prompt_eval_count":3,"eval_count":%d}\n' % i  # fmt: skip
    return b'{"model":"m","message":{"role":"assistant","content":"tok%d"},"done":false}\n' % i


class Ticket:
    def __init__(self, every: float) -> None:
        self.headers: dict[str, str] = {}
        self.refresh_every = every
        self.refreshed = 0
        self.changed = trio.Event()

    async def refresh(self) -> None:
        self.refreshed += 1
        self.changed.set()
        self.changed = trio.Event()

    async def settle(self, info: RequestInfo) -> None:
        pass


def record() -> RequestInfo:
    route = paths.classify("POST", "/api/chat")
    assert isinstance(route, paths.Route)
    return RequestInfo("rid", "POST", route, "127.0.0.1", 0.0, time.time())


class Client:
    """The client's end of a relayed body, and what the relay pump fed."""

    def __init__(self) -> None:
        inner, self.outer = trio.socket.socketpair()
        self.stream = trio.SocketStream(inner)
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        self.connection.send(h11.Response(status_code=200, headers=[]))
        self.received = b""

    def close(self) -> None:
        self.stream.socket.close()
        self.outer.close()

    async def read_until(self, condition: Callable[[bytes], bool]) -> None:
        while not condition(self.received):
            data = await self.outer.recv(65536)
            assert data, "the relay closed the client"
            self.received += data

    def frames(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in b"".join(dechunk(self.received)).splitlines()]


class CountingRelay(Relay):
    """A `Relay` that counts what the pump fed it."""

    fed: list[int]

    def pump_feed(self, raw: bytes) -> tuple[bytes, bool]:
        self.fed.append(len(raw))
        return super().pump_feed(raw)


@asynccontextmanager
async def relaying(
    info: RequestInfo, **relay_options: object
) -> AsyncIterator[tuple[Upstream, Client, list[int]]]:
    """`relay_to_client` of a `Relay` on an upstream's first response, through a pump, in a
    task; yields (the upstream, the client, the sizes the pump fed the relay) once the first
    frame was sent; the block's end waits for the relay to end."""
    upstream, client = Upstream(), Client()
    try:
        async with _relaying(upstream, client, info, **relay_options) as fed:
            yield upstream, client, fed
    finally:
        upstream.close()
        client.close()


@asynccontextmanager
async def _relaying(
    upstream: Upstream, client: Client, info: RequestInfo, **relay_options: object
) -> AsyncIterator[list[int]]:
    pool = H11Pool(tcp_stream_factory("127.0.0.1", upstream.port, tls=False), size=1,
                   connect_timeout=5)  # fmt: skip
    fed: list[int] = []
    async with open_pump() as pump, trio.open_nursery() as nursery:
        accepted = trio.Event()

        async def serve() -> None:
            await upstream.accept()
            await upstream.send(frame(0))
            accepted.set()

        nursery.start_soon(serve)
        response = await pool.open(
            b"POST", b"/api/chat", [(b"host", b"b"), (b"content-length", b"2")], b"{}"
        )
        await accepted.wait()
        first = await response.receive_some()
        relay = CountingRelay(response, first, StreamWatcher(StreamKind.NDJSON), info,
                              StreamKind.NDJSON, **relay_options)  # type: ignore[arg-type]  # fmt: skip
        relay.fed = fed

        async def run() -> None:
            try:
                await relay_to_client(relay, client.connection, client.stream, trio.Lock(),
                                      pump=pump)  # fmt: skip
            finally:
                await relay.aclose()
                await response.aclose()

        nursery.start_soon(run)
        yield fed
    await pool.aclose()


async def test_a_relayed_stream_is_carried_by_the_pump_to_its_end() -> None:
    info = record()
    with trio.fail_after(GUARD):
        async with relaying(info) as (upstream, client, fed):
            for i in range(1, 20):
                await upstream.send(frame(i))
                token = b'tok%d"' % i
                await client.read_until(lambda got: token in got)  # noqa: B023
            await upstream.send(frame(20, done=True))
            await upstream.send(b"0\r\n\r\n", framed=False)
            await client.read_until(lambda got: b'"done":true' in got)
    assert len(fed) >= 19  # every token after the first went through the pump
    frames = client.frames()
    assert [f["message"]["content"] for f in frames[:-1]] == [f"tok{i}" for i in range(20)]  # type: ignore[index]
    assert frames[-1]["done"] is True
    assert info.outcome == "ok" and info.usage is not None and info.usage.completion_tokens == 20


async def test_a_stalled_upstream_is_cut_while_the_pump_carries_it() -> None:
    info = record()
    with trio.fail_after(GUARD):
        async with relaying(info, stall_timeout=0.3) as (upstream, client, fed):
            await upstream.send(frame(1))
            await client.read_until(lambda got: b"tok1" in got)
            # then nothing: the stall timer ends the stream
            await client.read_until(lambda got: b"stopped sending" in got)
    assert fed  # carried by the pump when it stalled
    assert client.frames()[-1] == {"error": "the model server stopped sending"}
    assert info.outcome == "upstream_truncated"


async def test_the_lease_is_refreshed_while_the_pump_carries_a_quiet_stream() -> None:
    info = record()
    ticket = Ticket(every=0.05)
    with trio.fail_after(GUARD):
        async with relaying(info, ticket=ticket) as (upstream, client, fed):
            await upstream.send(frame(1))
            await client.read_until(lambda got: b"tok1" in got)
            while ticket.refreshed < 3:  # no token meanwhile: refreshed by the timer alone
                await ticket.changed.wait()
            await upstream.send(frame(2, done=True))
            await upstream.send(b"0\r\n\r\n", framed=False)
            await client.read_until(lambda got: b'"done":true' in got)
    assert fed and info.outcome == "ok"
    assert client.frames()[-1]["done"] is True


async def test_a_malformed_chunk_read_by_the_pump_ends_the_stream_with_an_error_frame() -> None:
    info = record()
    with trio.fail_after(GUARD):
        async with relaying(info) as (upstream, client, fed):
            await upstream.send(frame(1))
            await client.read_until(lambda got: b"tok1" in got)
            await upstream.send(b"zz\r\nnot a chunk\r\n", framed=False)
            await client.read_until(lambda got: b"unexpectedly" in got)
            assert upstream.stream is not None
            assert await upstream.stream.receive_some(100) == b""  # the connection was closed
    assert len(fed) >= 2
    assert client.frames()[-1] == {"error": "the model server ended the stream unexpectedly"}
    assert info.outcome == "upstream_truncated"


async def test_the_reservation_cap_holds_while_the_pump_carries_the_stream() -> None:
    info = record()
    with trio.fail_after(GUARD):
        async with relaying(info, max_frames=3) as (upstream, client, fed):
            for i in range(1, 4):
                await upstream.send(frame(i))
            await client.read_until(lambda got: b"reservation" in got)
    frames = client.frames()
    assert frames[-1] == {"error": "this request used up its token reservation"}
    assert len(frames) == 5  # tok0..tok3, then the error
    assert fed and info.outcome == "reservation_exhausted"


async def test_the_shutdown_cut_ends_a_stream_the_pump_carries() -> None:
    info = record()
    cut = StreamCut()
    with trio.fail_after(GUARD):
        async with relaying(info, cut=cut) as (upstream, client, fed):
            await upstream.send(frame(1))
            await client.read_until(lambda got: b"tok1" in got)
            cut.cut()
            await client.read_until(lambda got: CUT_MESSAGE.encode() in got)
    assert fed and client.frames()[-1] == {"error": CUT_MESSAGE}
    assert info.outcome == "cancelled"


def test_a_serving_process_keeps_full_collections_rare() -> None:
    """`nzgw serve` freezes what exists before serving and collects the oldest generation
    after GC_OLDEST_AFTER collections of the middle one (nzgw/cli/serve.py, `tune_gc`)."""
    script = (
        "import gc; from nzgw.cli.serve import GC_OLDEST_AFTER, tune_gc; tune_gc(); "
        "print(gc.get_threshold()[2] == GC_OLDEST_AFTER > 10, gc.get_freeze_count() > 10_000)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    assert done.stdout.split() == [b"True", b"True"]
