"""The spine (issue 2): graceful shutdown, keep-alive timeout, cleanup of responses that were
never sent, readiness, clients that stop reading. Real sockets, an emulated backend, the whole
gateway in-process; upstream connection times come from the emulator's connection log."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, NoReturn

import trio
from quart import request

from nzgw.testing import EmulatorSettings, Fault
from tests.harness import open_harness

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}


def _chat_request(key: str, body: dict[str, object] | None = None) -> bytes:
    payload = json.dumps(body or CHAT).encode()
    return (
        b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )


async def _read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before {marker!r}: {data[-300:]!r}"
        data += chunk
    return data


async def test_graceful_shutdown_lets_a_running_stream_finish(tmp_path: Path) -> None:
    def slow(_: int) -> EmulatorSettings:
        return EmulatorSettings(tokens_per_reply=20, token_delay=0.03)

    async with open_harness(tmp_path, settings=slow, graceful_timeout=5.0) as h:
        lines: list[dict[str, object]] = []
        async with h.client.stream("POST", "/api/chat", json=CHAT, headers=h.auth) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
                if len(lines) == 1:
                    h.shutdown.set()  # SIGTERM, as it were, with 19 tokens still to come
        with trio.fail_after(5):
            await h.stopped.wait()
    assert lines[-1]["done"] is True
    assert "".join(str(f["message"]["content"]) for f in lines) == "".join(  # type: ignore[index]
        f"tok{i} " for i in range(20)
    )


async def test_graceful_shutdown_cuts_a_stream_after_the_grace_period(tmp_path: Path) -> None:
    def endless(_: int) -> EmulatorSettings:
        return EmulatorSettings(tokens_per_reply=10_000, token_delay=0.01)

    async with open_harness(tmp_path, settings=endless, graceful_timeout=0.5) as h:
        lines = 0
        cut_at = 0.0
        async with h.client.stream("POST", "/api/chat", json=CHAT, headers=h.auth) as response:
            try:
                async for _ in response.aiter_lines():
                    lines += 1
                    if lines == 1:
                        h.shutdown.set()
                        shutdown_at = trio.current_time()
            except Exception:
                pass  # a cut body (no error frame) would be a protocol error here
            cut_at = trio.current_time()
        assert 0.4 <= cut_at - shutdown_at <= 10.0  # the grace period, then the cut (hang guard)
        with trio.fail_after(5):
            await h.stopped.wait()
        chat = [c for c in h.emulator.connections if any(r.path == "/api/chat" for r in c.requests)]
        assert len(chat) == 1 and chat[0].closed_at is not None
        assert chat[0].closed_at - shutdown_at <= 10.0  # let go, not left to run (hang guard)
        infos = [i for i in h.finished if i.log_path == "/api/chat"]
        assert len(infos) == 1 and infos[0].outcome == "cancelled"
        assert infos[0].usage is not None and infos[0].usage.completion_tokens >= lines - 1


async def test_idle_keep_alive_connection_closed_after_first_request(tmp_path: Path) -> None:
    async with open_harness(tmp_path, keep_alive_timeout=0.5) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            await _read_until(stream, b'{"status":"ok"}')
            answered = trio.current_time()
            with trio.fail_after(5):
                assert await stream.receive_some(1024) == b""
            idle = trio.current_time() - answered
        assert 0.4 <= idle <= 1.5


async def test_response_abandoned_before_its_body_was_sent_closes_upstream(
    tmp_path: Path,
) -> None:
    """Handler returned a streaming response; the client left while Quart was still in
    after_request: the body was never iterated, yet the upstream must be closed at once."""

    def slow(_: int) -> EmulatorSettings:
        return EmulatorSettings(tokens_per_reply=1000, token_delay=0.01)

    async with open_harness(tmp_path, settings=slow) as h:
        returned = trio.Event()

        async def stall_after_request(response: object) -> NoReturn:
            returned.set()
            await trio.sleep_forever()

        h.running.app.after_request_funcs[None].append(stall_after_request)
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        await stream.send_all(_chat_request(h.key))
        with trio.fail_after(5):
            await returned.wait()
        await stream.aclose()
        left_at = trio.current_time()
        chat = next(
            c for c in h.emulator.connections if c.requests and c.requests[-1].path == "/api/chat"
        )
        with trio.fail_after(2):
            await h.emulator.wait_connection_closed(chat.id)
            infos = await h.wait_finished(1)
        assert chat.closed_at is not None and chat.closed_at - left_at < 0.05
        assert infos[0].log_path == "/api/chat"


async def test_quart_hooks_registered_on_the_running_app_are_honoured(tmp_path: Path) -> None:
    """Quart's per-request machinery is skipped while no hook is registered (http/app.py); a
    hook registered on the running app runs from the next request on, and the whole answer
    keeps its shape either way (one body message: head, Content-Length, body)."""

    async def ask(h: Any) -> tuple[bytes, dict[str, Any]]:
        stream = await trio.open_tcp_stream("127.0.0.1", h.running.bound.port)
        async with stream:
            await stream.send_all(_chat_request(h.key, {**CHAT, "stream": False}))
            data = await _read_until(stream, b"\r\n\r\n")
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                assert chunk
                body += chunk
        assert len(body) == length
        assert b"\r\nx-request-id: " in head.lower()
        return head.split(b"\r\n", 1)[0], json.loads(body)

    async with open_harness(tmp_path) as h:
        plain_status, plain = await ask(h)
        seen: list[str] = []

        async def before_request() -> None:
            seen.append(request.path)

        h.running.app.before_request_funcs[None].append(before_request)
        hooked_status, hooked = await ask(h)
        assert seen == ["/api/chat"]
        assert plain_status == hooked_status == b"HTTP/1.1 200 "
        assert plain["done"] is hooked["done"] is True
        assert plain.keys() == hooked.keys()


async def test_readyz_follows_the_backend(tmp_path: Path) -> None:
    async with open_harness(tmp_path, discovery_interval=0.1) as h:
        response = await h.client.get("/readyz")
        assert response.status_code == 200

        registry = h.running.gateway.registry

        async def status_after_round() -> tuple[int, dict[str, object]]:
            await registry.wait_published(rounds=2)  # type: ignore[attr-defined]
            response = await h.client.get("/readyz")
            return response.status_code, dict(response.json())

        h.emulator.settings.fault = Fault.REFUSE
        with trio.fail_after(3):
            status, body = await status_after_round()
        assert status == 503 and body["missing"] == ["backends"]
        assert h.emulator.url not in json.dumps(body) and "backend-0" not in json.dumps(body)
        h.emulator.settings.fault = Fault.NONE
        with trio.fail_after(3):
            status, body = await status_after_round()
        assert status == 200 and body == {"status": "ready"}
        assert (await h.client.get("/healthz")).status_code == 200


async def test_client_that_stops_reading_is_cut_after_the_stall_timeout(tmp_path: Path) -> None:
    def firehose(_: int) -> EmulatorSettings:
        return EmulatorSettings(tokens_per_reply=2_000_000, token_delay=0)

    async with open_harness(tmp_path, settings=firehose, client_stall_timeout=1.0) as h:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", h.running.bound.port))
        stream = trio.SocketStream(sock)
        await stream.send_all(_chat_request(h.key))
        await _read_until(stream, b"tok0")  # the stream started; now never read again
        with trio.fail_after(15):
            infos = await h.wait_finished(1)
        chat = next(
            c for c in h.emulator.connections if c.requests and c.requests[-1].path == "/api/chat"
        )
        with trio.fail_after(2):
            await h.emulator.wait_connection_closed(chat.id)
        assert infos[0].outcome == "cancelled"
        assert infos[0].usage is not None and infos[0].usage.completion_tokens > 0
        await stream.aclose()
