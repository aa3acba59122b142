"""The data plane's connection pool against the emulator: reuse, and what happens to the
connection and the pool slot when a request fails, is cancelled or is abandoned half-read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import h11
import pytest
import trio
import trio.testing

from nzgw.adapters.h11pool import _MAX_CHUNK_LINE, H11Pool, H11Response, _Chunked
from nzgw.adapters.ollama import OllamaBackend
from nzgw.config import BackendConfig
from nzgw.ports import UpstreamError
from nzgw.testing import EmulatorSettings, Fault, open_emulator

CHAT = json.dumps(
    {"model": "llama3", "messages": [{"role": "user", "content": "x"}], "stream": True}
).encode()
JSON = [(b"content-type", b"application/json")]


def backend(url: str, size: int = 1) -> OllamaBackend:
    return OllamaBackend(BackendConfig("b", url), pool_size=size, connect_timeout=1.0)


async def read_whole(b: OllamaBackend) -> bytes:
    response = await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
    assert response.status == 200
    return await response.read_all(1 << 20)


async def test_sequential_requests_reuse_one_connection() -> None:
    async with open_emulator() as emu:
        b = backend(emu.url)
        for _ in range(5):
            assert b'"done":true' in await read_whole(b)
        chats = [c for c in emu.connections if any(r.path == "/api/chat" for r in c.requests)]
        assert len(chats) == 1 and len(chats[0].requests) == 5
        await b.aclose()


async def test_abandoned_response_closes_its_connection_and_frees_the_slot() -> None:
    async with open_emulator(EmulatorSettings(tokens_per_reply=1000, token_delay=0.01)) as emu:
        b = backend(emu.url, size=1)
        response = await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
        assert await response.receive_some()
        await response.aclose()
        first = next(c for c in emu.connections if c.requests and c.requests[0].path == "/api/chat")
        with trio.fail_after(1):
            await emu.wait_connection_closed(first.id)  # Ollama is told to stop
        emu.settings.tokens_per_reply, emu.settings.token_delay = 3, 0
        with trio.fail_after(2):  # the single slot is free again, on a new connection
            assert b'"done":true' in await read_whole(b)
        await b.aclose()


async def test_cancelled_requests_leak_no_slot() -> None:
    async with open_emulator(EmulatorSettings(model_faults={"llama3": Fault.STALL})) as emu:
        b = backend(emu.url, size=1)
        for _ in range(10):
            with trio.move_on_after(0.05):
                await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
        await emu.wait_until(lambda: emu.open_connections <= 1)
        emu.settings.model_faults.clear()
        with trio.fail_after(2):
            assert b'"done":true' in await read_whole(b)
        await b.aclose()


async def test_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async with open_emulator() as emu:
        b = backend(emu.url)
        await read_whole(b)
        emu.settings.fault = Fault.REFUSE  # closes idle keep-alive connections at once
        await emu.wait_until(lambda: emu.open_connections == 0)
        emu.settings.fault = Fault.NONE
        assert b'"done":true' in await read_whole(b)
        await b.aclose()


async def test_transport_failures_are_upstream_errors() -> None:
    async with open_emulator() as emu:
        url = emu.url
        emu.settings.fault = Fault.REFUSE
        b = backend(url)
        with pytest.raises(UpstreamError):
            await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
        emu.settings.fault = Fault.CLOSE_BEFORE_FIRST_BYTE
        with pytest.raises(UpstreamError):
            await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
        emu.settings.fault = Fault.NONE
        emu.settings.model_faults["llama3"] = Fault.DIE_MID_STREAM
        response = await b.open(b"POST", b"/api/chat", body=CHAT, headers=JSON)
        with pytest.raises(UpstreamError):
            await response.read_all(1 << 20)
        await b.aclose()


# --- The pool over an injected network layer: nothing leaks, whatever is cancelled where ------
#
# The stream factory hands the pool one half of an in-memory stream pair per connection; a
# scripted server answers on the other half. Invariants checked after every scenario: each
# stream the pool opened and did not keep idle is closed by the time the call returned (no
# close is left to a task of its own), every slot is free, and no task was spawned anywhere.


class _TrackedStream(trio.abc.Stream):
    """The client half of an in-memory connection; remembers whether it was closed."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


class _Network:
    """A stream factory plus the server behind it. `mode` decides how the server answers:
    "ok" (a 3-chunk body), "stall_headers" (never answers), "stall_body" (headers, one chunk,
    then nothing), "hang_connect" (connecting never completes)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.mode = "ok"
        self.opened: list[_TrackedStream] = []
        self.requests = 0

    async def open_stream(self) -> trio.abc.Stream:
        if self.mode == "hang_connect":
            await trio.sleep_forever()
        client, server = trio.testing.memory_stream_pair()
        tracked = _TrackedStream(client)
        self.opened.append(tracked)
        self.nursery.start_soon(self._serve, server, self.mode)
        return tracked

    async def _serve(self, stream: trio.abc.Stream, mode: str) -> None:
        conn = h11.Connection(h11.SERVER)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some()
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                    continue
                if type(event) is not h11.EndOfMessage:
                    continue
                self.requests += 1
                if mode == "stall_headers":
                    await trio.sleep_forever()
                head = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
                await stream.send_all(conn.send(head) or b"")
                for part in (b"one", b"two", b"three"):
                    await stream.send_all(conn.send(h11.Data(data=part)) or b"")
                    if mode == "stall_body":
                        await trio.sleep_forever()
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                conn.start_next_cycle()

    def leaked(self, pool: H11Pool, size: int, *, idle_expected: int = 0) -> list[str]:
        """What the pool still holds or left open; empty when nothing leaked."""
        problems: list[str] = []
        open_streams = [s for s in self.opened if not s.closed]
        if len(open_streams) != idle_expected:
            problems.append(f"{len(open_streams)} open streams, {idle_expected} idle expected")
        if pool._slots.value != size:
            problems.append(f"{size - pool._slots.value} slots still taken")
        return problems


async def _get(pool: H11Pool) -> H11Response:
    return await pool.open(b"GET", b"/", [(b"host", b"backend")], b"")


@pytest.fixture
def no_system_tasks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every `spawn_system_task` call made by the code under test (there must be none)."""
    calls: list[object] = []
    real = trio.lowlevel.spawn_system_task

    def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.lowlevel, "spawn_system_task", spy)
    return calls


@pytest.fixture
async def network(nursery: trio.Nursery, no_system_tasks: list[object]) -> AsyncIterator[_Network]:
    """The in-memory network; after the test: no task was spawned anywhere."""
    yield _Network(nursery)
    assert no_system_tasks == []


@pytest.fixture
async def pool(network: _Network) -> AsyncIterator[H11Pool]:
    """A pool of size 2 on the in-memory network, closed after the test."""
    pool = H11Pool(network.open_stream, size=2, connect_timeout=10.0)
    yield pool
    await pool.aclose()


@pytest.mark.parametrize("mode", ["hang_connect", "stall_headers", "stall_body"])
async def test_cancellation_at_each_stage_leaks_nothing(
    mode: str,
    network: _Network,
    autojump_clock: trio.testing.MockClock,  # virtual time: the cancellations cost nothing
) -> None:
    pool = H11Pool(network.open_stream, size=1, connect_timeout=10.0)
    for _ in range(3):  # the single slot must come back every time
        network.mode = mode
        with trio.move_on_after(0.5) as scope:
            response = await _get(pool)
            assert await response.receive_some() == b"one"
            try:
                await response.receive_some()
            finally:
                await response.aclose()
        assert scope.cancelled_caught
        assert network.leaked(pool, 1) == []
    network.mode = "ok"
    response = await _get(pool)
    assert await response.read_all(1024) == b"onetwothree"
    assert network.leaked(pool, 1, idle_expected=1) == []
    await pool.aclose()


async def test_abandoned_response_is_closed_before_aclose_returns(
    pool: H11Pool, network: _Network
) -> None:
    network.mode = "stall_body"  # the body stops after its first chunk
    response = await _get(pool)
    assert await response.receive_some() == b"one"
    await response.aclose()
    assert network.opened[0].closed  # at once: no close left to another task
    assert network.leaked(pool, 2) == []


async def test_response_finishing_after_the_pool_closed_closes_its_connection(
    pool: H11Pool, network: _Network
) -> None:
    response = await _get(pool)
    await pool.aclose()  # shutdown while a response is still being read
    assert await response.read_all(1024) == b"onetwothree"
    assert network.opened[0].closed  # closed by the reader, before read_all returned
    assert network.leaked(pool, 2) == []


async def test_stale_idle_connection_is_closed_by_the_next_request(
    pool: H11Pool, network: _Network
) -> None:
    response = await _get(pool)
    assert await response.read_all(1024) == b"onetwothree"
    idle = pool._idle[0]
    idle.h11 = h11.Connection(h11.CLIENT)  # not reusable: a fresh h11 state machine
    idle.h11.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    response = await _get(pool)
    assert network.opened[0].closed  # the stale one, closed before a new one opened
    assert await response.read_all(1024) == b"onetwothree"
    assert len(network.opened) == 2
    assert network.leaked(pool, 2, idle_expected=1) == []


async def test_reuse_over_the_injected_network(pool: H11Pool, network: _Network) -> None:
    for _ in range(4):
        response = await _get(pool)
        assert await response.read_all(1024) == b"onetwothree"
    assert len(network.opened) == 1 and network.requests == 4


# --- The chunked body decoder (sans-IO): what h11 would have decoded, however the bytes arrive --

CHUNKED = b"3\r\none\r\n3;ext=1\r\ntwo\r\n5 \r\nthree\r\n0\r\nx-trailer: 1\r\n\r\n"


def test_chunked_bodies_decode_whole_however_they_are_split() -> None:
    for cut in range(len(CHUNKED) + 1):
        for step in (1, 2, 7, len(CHUNKED)):
            decoder = _Chunked(CHUNKED[:cut])
            body = decoder.decode()
            rest = CHUNKED[cut:]
            while rest:
                decoder.buffer += rest[:step]
                rest = rest[step:]
                body += decoder.decode()
            assert (body, decoder.done, bytes(decoder.buffer)) == (b"onetwothree", True, b"")


@pytest.mark.parametrize(
    "wire",
    [
        b"x\r\none\r\n",  # not hex
        b"-3\r\none\r\n",
        b"0x3\r\none\r\n",
        b"\r\none\r\n",  # no size
        b"3\r\noneXY",  # no CRLF after the data
        b"1" * 17 + b"\r\n",  # more than 64 bits
        b"3" * (_MAX_CHUNK_LINE + 1),  # a size line that never ends
    ],
)
def test_malformed_chunks_are_upstream_errors(wire: bytes) -> None:
    with pytest.raises(UpstreamError):
        _Chunked(wire).decode()


async def test_chunked_response_with_connection_close_is_not_reused() -> None:
    """h11 still decides keep-alive: the body is decoded here, the connection is not kept."""
    opened: list[_TrackedStream] = []

    async def serve(stream: trio.abc.Stream) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while b"\r\n\r\n" not in await stream.receive_some():
                pass
            head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            await stream.send_all(head + CHUNKED)

    async with trio.open_nursery() as nursery:

        async def open_stream() -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            opened.append(_TrackedStream(client))
            nursery.start_soon(serve, server)
            return opened[-1]

        pool = H11Pool(open_stream, size=1, connect_timeout=10.0)
        for _ in range(2):
            response = await _get(pool)
            assert await response.read_all(1024) == b"onetwothree"
        await pool.aclose()
    assert len(opened) == 2 and all(s.closed for s in opened)
