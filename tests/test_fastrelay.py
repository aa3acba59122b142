"""The relay fast path (nzgw/http/fastrelay.py): a committed stream's body written by the edge
connection straight to the client's socket. Every test checks that the fast path carried the
stream (`relayed`), and what a client relies on: the same bytes as the slow path (Quart's ASGI
body iteration, here through stock hypercorn), the end of the body on a truncated or cut stream,
the upstream closed and the request settled when the client leaves, backpressure towards the
backend, HTTP/1.0 and keep-alive after a relayed stream."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import h11
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

import nzgw.http.edge
import nzgw.http.fastrelay
import nzgw.services.forwarding
from nzgw.services.drain import CUT_MESSAGE
from nzgw.testing import Fault
from tests.harness import Harness, open_harness
from tests.rawhttp import RawResponse, _parse

HANG_GUARD = 60
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": True}
OPENAI = {
    "model": "llama3",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
GENERATE = {"model": "llama3", "prompt": "hi", "stream": True}
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
# The emulator's clock (timestamps, durations, ids made of them): the only bytes that differ
# between two runs of the same stream.
_CLOCK = re.compile(rb'"(created_at|created|id|\w*_duration)":("[^"]*"|\d+)')


class Relayed(list[int]):
    """One entry per relayed stream: the pieces it carried (through the request's task and
    through the relay pump); `pumped`: of those, the frames the pump wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.pumped: list[int] = []


class _Counted:
    """The body as the fast path sees it (the pump's methods included), its pieces counted."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self.pieces = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        data = await self._body.__anext__()
        self.pieces += 1
        return data


@pytest.fixture
def relayed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Relayed]:
    """Counts the bodies the fast path wrote (one entry per relayed stream, its piece count)."""
    counts = Relayed()
    original = nzgw.http.fastrelay.relay_to_client
    frames = 0
    original_feed = nzgw.services.forwarding.Relay.pump_feed

    def counting_feed(self: Any, raw: bytes) -> tuple[bytes, bool]:
        nonlocal frames
        out, more = original_feed(self, raw)
        frames += bool(out)
        return out, more

    async def counting(body: AsyncIterator[bytes], *args: Any, **kwargs: Any) -> None:
        counted = _Counted(body)
        before = frames
        try:
            await original(counted, *args, **kwargs)
        finally:
            counts.append(counted.pieces + frames - before)
            counts.pumped.append(frames - before)

    monkeypatch.setattr(nzgw.services.forwarding.Relay, "pump_feed", counting_feed)
    monkeypatch.setattr(nzgw.http.edge, "relay_to_client", counting)
    yield counts


def _request(h: Harness, path: str, body: dict[str, Any], *, version: str = "1.1") -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/{version}\r\nHost: gw\r\nAuthorization: Bearer {h.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def _connect(h: Harness, *requests: bytes) -> trio.SocketStream:
    """A new connection to the gateway, with `requests` sent on it."""
    stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
    await stream.send_all(b"".join(requests))
    return stream


async def _read_responses(stream: trio.abc.ReceiveStream, count: int) -> list[RawResponse]:
    data = b""
    while True:
        responses, _ = _parse(data)
        if len(responses) >= count:
            return responses
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed after {len(responses)} answers: {data[-300:]!r}"
        data += chunk


async def _read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def _one_stream(port: int, request: bytes) -> RawResponse:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        (response,) = await _read_responses(stream, 1)
    return response


@contextlib.asynccontextmanager
async def _slow_path(h: Harness) -> AsyncIterator[int]:
    """The same application behind stock hypercorn (no relay extension): the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: hypercorn.trio.serve(
                h.running.app, config, shutdown_trigger=done.wait, task_status=task_status
            )
        )
        try:
            yield sock.getsockname()[1]
        finally:
            done.set()
    sock.detach()  # hypercorn closed the descriptor


@pytest.mark.parametrize("relay_pump", [True, False], ids=["pump", "no-pump"])
async def test_relayed_bodies_are_the_slow_paths_bytes(
    tmp_path: Path, relayed: Relayed, relay_pump: bool
) -> None:
    """NDJSON, OpenAI SSE with the usage chunk, and a stream whose usage chunk nzgw strips;
    carried by the relay pump, and without it (NZGW_RELAY_PUMP=false)."""
    requests = [
        ("/api/chat", CHAT),
        ("/api/generate", GENERATE),
        ("/v1/chat/completions", OPENAI),
        ("/v1/chat/completions", {**OPENAI, "stream_options": None}),  # usage stripped
    ]
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path, relay_pump=relay_pump) as h:
            h.emulator.settings.tokens_per_reply = 40
            async with _slow_path(h) as slow_port:
                for path, body in requests:
                    fast = await _one_stream(h.running.bound.port, _request(h, path, body))
                    assert len(relayed) == 1
                    slow = await _one_stream(slow_port, _request(h, path, body))
                    assert len(relayed) == 1  # stock hypercorn: no extension, the slow path
                    # The relay pump carried tokens, or none when it is off.
                    assert (relayed.pumped[0] > 0) is relay_pump
                    relayed.clear()
                    relayed.pumped.clear()
                    assert fast.status == slow.status == 200
                    assert fast.headers["transfer-encoding"] == "chunked"
                    assert fast.headers["content-type"] == slow.headers["content-type"]
                    assert b"tok39 " in fast.body
                    assert _CLOCK.sub(b"<clock>", fast.body) == _CLOCK.sub(b"<clock>", slow.body)


async def test_keep_alive_carries_on_after_relayed_streams(
    tmp_path: Path, relayed: Relayed
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path) as h:
            chat, openai = (
                _request(h, "/api/chat", CHAT),
                _request(h, "/v1/chat/completions", OPENAI),
            )
            async with await _connect(h, chat, openai, HEALTHZ) as stream:
                first, second, third = await _read_responses(stream, 3)
    assert len(relayed) == 2
    assert json.loads(first.body.splitlines()[-1])["done"] is True
    assert second.body.endswith(b"data: [DONE]\n\n")
    assert (third.status, third.body) == (200, b'{"status":"ok"}')


async def test_http_1_0_gets_a_close_delimited_relayed_body(
    tmp_path: Path, relayed: Relayed
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path) as h:
            request = _request(h, "/api/chat", CHAT, version="1.0")
            async with await _connect(h, request) as stream:
                data = await _read_to_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    frames = [json.loads(line) for line in body.splitlines()]
    assert "".join(f["message"]["content"] for f in frames) == "".join(f"tok{i} " for i in range(8))
    assert frames[-1]["done"] is True
    assert relayed and relayed[0] >= 1


async def test_backend_dying_mid_stream_ends_the_body_with_an_error_frame(
    tmp_path: Path, relayed: Relayed
) -> None:
    """The chunked body is ended properly (the connection stays usable), the error is a frame."""
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path) as h:
            h.emulator.settings.tokens_per_reply = 50
            h.emulator.settings.die_after_frames = 3
            h.emulator.settings.model_faults["llama3"] = Fault.DIE_MID_STREAM
            async with await _connect(h, _request(h, "/api/chat", CHAT), HEALTHZ) as stream:
                chat, health = await _read_responses(stream, 2)
            (info,) = await h.wait_finished(1)
    assert relayed == [relayed[0]] and relayed[0] >= 2
    lines = chat.body.splitlines()
    assert json.loads(lines[-1]) == {"error": "the model server ended the stream unexpectedly"}
    assert all("message" in json.loads(line) for line in lines[:-1])
    assert health.status == 200
    assert info.outcome == "upstream_truncated"
    assert info.usage is not None and info.usage.completion_tokens >= 1


async def test_client_leaving_mid_stream_closes_upstream_and_settles(
    tmp_path: Path, relayed: Relayed
) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path) as h:
            h.emulator.settings.tokens_per_reply = 100_000
            h.emulator.settings.token_delay = 0.01
            stream = await _connect(h, _request(h, "/api/chat", CHAT))
            received = b""
            while received.count(b"tok") < 3:
                chunk = await stream.receive_some(65536)
                assert chunk
                received += chunk
            await stream.aclose()
            (info,) = await h.wait_finished(1)
            (conn,) = [
                c for c in h.emulator.connections if any(r.path == "/api/chat" for r in c.requests)
            ]
            await h.emulator.wait_connection_closed(conn.id)
    assert len(relayed) == 1 and relayed[0] >= 1  # tokens may arrive together: >= 1 piece
    assert not conn.requests[-1].completed  # cut, not run to its end
    assert info.status == 200 and info.outcome == "cancelled"
    assert info.usage is not None and info.usage.completion_tokens >= 3


async def test_a_slow_reader_holds_the_backend_back(tmp_path: Path, relayed: Relayed) -> None:
    """Backpressure: while the client does not read, the relay does not read upstream either,
    so a backend that could write 2,000,000 frames is held at what the socket buffers take;
    then the client reads on and gets every byte in order."""
    with trio.fail_after(HANG_GUARD):
        # No periodic work during the test (discovery, flushes, revocation polls): the process
        # must be able to fall idle.
        async with open_harness(
            tmp_path, discovery_interval=30.0, flush_interval=30.0, revocation_poll_interval=30.0
        ) as h:
            h.emulator.settings.tokens_per_reply = 2_000_000
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", h.running.bound.port))
            stream = trio.SocketStream(sock)
            async with stream:
                await stream.send_all(_request(h, "/api/chat", CHAT))
                received = await stream.receive_some(4096)
                # Nothing in this process can run: the relay waits on the client, the
                # emulator on the relay (a relay that buffered would keep both running).
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                (request,) = [r for r in h.emulator.requests if r.path == "/api/chat"]
                assert not request.completed
                # Read on, slowly: the tokens arrive whole and in order.
                connection = h11.Connection(h11.CLIENT)
                connection.receive_data(received)
                body = b""
                while body.count(b"\n") < 2000:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(4096))
                    elif isinstance(event, h11.Data):
                        body += event.data
            (info,) = await h.wait_finished(1)
    frames = [json.loads(line) for line in body.splitlines()[:2000]]
    assert [f["message"]["content"] for f in frames] == [f"tok{i} " for i in range(2000)]
    assert relayed and info.outcome == "cancelled"


async def test_the_grace_cut_ends_a_relayed_body_properly(tmp_path: Path, relayed: Relayed) -> None:
    with trio.fail_after(HANG_GUARD):
        async with open_harness(tmp_path, graceful_timeout=1.0) as h:
            h.emulator.settings.tokens_per_reply = 100_000
            h.emulator.settings.token_delay = 0.05
            async with await _connect(h, _request(h, "/api/chat", CHAT)) as stream:
                received = await stream.receive_some(65536)
                h.shutdown.set()
                received += await _read_to_eof(stream)
            await h.stopped.wait()
    (chat,) = _parse(received)[0]
    assert received.endswith(b"\r\n0\r\n\r\n")  # the last chunk: a properly ended body
    assert json.loads(chat.body.splitlines()[-1]) == {"error": CUT_MESSAGE}
    assert len(relayed) == 1


# --- The writes themselves (no server): what goes out in which write --------------------------


class _Recorder(trio.abc.SendStream):
    """A client stream that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _responding(http_version: bytes) -> h11.Connection:
    """A server connection that has read a request and sent the head of a streamed answer."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"POST /api/chat HTTP/" + http_version + b"\r\nHost: gw\r\n\r\n")
    assert isinstance(connection.next_event(), h11.Request)
    connection.send(h11.Response(status_code=200, headers=[]))
    return connection


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (b"1.1", [b"HEAD" + b"3\r\none\r\n", b"b\r\ntwo + three\r\n"]),  # chunked, framed here
        (b"1.0", [b"HEAD" + b"one", b"two + three"]),  # close-delimited: h11's framing
    ],
)
async def test_the_head_leaves_with_the_first_piece_and_each_piece_in_one_write(
    version: bytes, expected: list[bytes]
) -> None:
    connection = _responding(version)
    client = _Recorder()
    with trio.fail_after(5):
        await nzgw.http.fastrelay.relay_to_client(
            _pieces(b"one", b"", b"two + three"), connection, client, trio.Lock(), head=b"HEAD"
        )
    assert client.writes == expected
    assert connection.send(h11.EndOfMessage()) == (b"0\r\n\r\n" if version == b"1.1" else b"")


async def test_a_whole_answer_leaves_in_one_write() -> None:
    """The edge holds a response's head until its body: one segment, one wake-up of the client."""
    writes: list[bytes] = []

    async def send(event: object) -> None:
        assert isinstance(event, RawData)
        writes.append(event.data)

    protocol = nzgw.http.edge.EdgeH11Protocol(
        None, Config(), WorkerContext(None), None, ConnectionState({}), False, None, None, send,
        client_stream=_Recorder(), send_lock=trio.Lock(), pump=None,
    )  # fmt: skip
    protocol.connection.receive_data(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert isinstance(protocol.connection.next_event(), h11.Request)
    with trio.fail_after(5):
        await protocol.stream_send(
            Response(stream_id=1, headers=[(b"content-length", b"2")], status_code=200)
        )
        assert writes == []
        await protocol.stream_send(Body(stream_id=1, data=b"ok"))
        await protocol.stream_send(EndBody(stream_id=1))
    (write,) = writes
    assert write.startswith(b"HTTP/1.1 200 ") and write.endswith(b"\r\n\r\nok")
