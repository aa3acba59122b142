"""The edge, in-process over the real listener with raw bytes: HTTP/1.1 only, containment of a
failing connection or request, framing refusals, the body phase (README "Security").

Rules for this module: every probe is followed, in the same process, by a `/healthz` and a
normal chat that must succeed; every answer the application produced is checked against the
request's settled record (status, refusal), which is what the audit row is made of. No
wall-clock bounds: body deadlines are small settings and the tests wait for their effect.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from nzgw.http.edge import EdgeH11Protocol
from nzgw.http.gateway import RequestInfo
from tests.harness import Harness, open_harness
from tests.rawhttp import BAD_PATH, exchange, h2_client_bytes, h2c_upgrade, raw_request

CHAT = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
FORGED = "198.51.100.66"


async def still_serving(h: Harness) -> None:
    with trio.fail_after(30):
        health = await h.client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        chat = await h.client.post("/api/chat", json=CHAT, headers=h.auth)
        assert chat.status_code == 200 and chat.json()["done"] is True


async def record(h: Harness, request_id: str) -> RequestInfo:
    """The settled record of one request (what its audit row is made of)."""
    with trio.fail_after(30):
        while True:
            found = [i for i in h.finished if i.request_id == request_id]
            if found:
                return found[0]
            await h.wait_finished(len(h.finished) + 1)


def auth(h: Harness) -> tuple[bytes, bytes]:
    return (b"Authorization", f"Bearer {h.key}".encode())


# --- HTTP/1.1 only --------------------------------------------------------------------------------


async def test_an_h2_prior_knowledge_preface_is_refused_as_http1_and_the_server_stays(
    tmp_path: Path,
) -> None:
    async with open_harness(tmp_path) as h:
        got = await exchange(h.running.bound.port, h2_client_bytes(BAD_PATH))
        (answer,) = got.responses
        assert answer.status == 505 and got.closed
        assert answer.headers["connection"] == "close"
        assert answer.json() == {"error": "only HTTP/1.1 is served here"}
        info = await record(h, answer.headers["x-request-id"])
        assert (info.status, info.refusal, info.method) == (505, "http_version", "PRI")
        await still_serving(h)


async def test_an_h2c_upgrade_is_answered_as_http1_and_its_streams_never_run(
    tmp_path: Path,
) -> None:
    async with open_harness(tmp_path, trusted_proxies=("127.0.0.1",)) as h:
        # A trusted proxy forwards an h2c upgrade; HTTP/2 streams follow at once, each with its
        # own X-Forwarded-For. None of them may become a request with a forged address.
        probe = h2c_upgrade(
            "/api/tags", {"Authorization": f"Bearer {h.key}", "X-Forwarded-For": "192.0.2.1"}
        )
        forged = [
            (b"authorization", f"Bearer {h.key}".encode()),
            (b"x-forwarded-for", FORGED.encode()),
        ]
        got = await exchange(h.running.bound.port, probe + h2_client_bytes(b"/api/tags", forged))
        first, second = got.responses
        assert first.status == 200 and "models" in first.json()  # HTTP/1.1, not 101
        assert second.status == 505 and got.closed  # the preface that followed
        assert (await record(h, first.headers["x-request-id"])).client == "192.0.2.1"
        assert (await record(h, second.headers["x-request-id"])).client == "127.0.0.1"
        await still_serving(h)
        assert all(info.client != FORGED for info in h.finished)
        # The same with the non-ASCII path that used to stop the process.
        got = await exchange(
            h.running.bound.port, h2c_upgrade("/healthz") + h2_client_bytes(BAD_PATH)
        )
        assert [r.status for r in got.responses] == [200, 505]
        await still_serving(h)


# --- containment ----------------------------------------------------------------------------------


async def test_a_handler_that_raises_gets_a_500_in_its_surface_shape_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_harness(tmp_path) as h:

        def explode(*args: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(h.running.gateway.registry, "list_models", explode)
        with caplog.at_level(logging.ERROR):
            native = await h.client.get("/api/tags", headers=h.auth)
            openai = await h.client.get("/v1/models", headers=h.auth)
        assert native.status_code == 500 and native.json() == {"error": "internal error"}
        assert openai.status_code == 500 and openai.json()["error"]["message"] == "internal error"
        for answer in (native, openai):
            request_id = answer.headers["x-request-id"]
            info = await record(h, request_id)
            assert (info.status, info.refusal, info.outcome) == (500, "internal_error", "error")
            failures = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
            assert [r.getMessage() for r in failures] == ["request failed"]
        assert not [r for r in caplog.records if r.name.startswith("hypercorn")]
        monkeypatch.undo()
        await still_serving(h)


async def test_a_stream_body_that_raises_ends_only_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from nzgw.core.framing import StreamWatcher

    feed = StreamWatcher.feed
    calls = 0

    def feed_then_explode(self: StreamWatcher, data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug mid-stream")
        return feed(self, data)

    async with open_harness(tmp_path) as h:
        monkeypatch.setattr(StreamWatcher, "feed", feed_then_explode)
        body = {**CHAT, "stream": True}
        with caplog.at_level(logging.ERROR):
            async with h.client.stream("POST", "/api/chat", json=body, headers=h.auth) as answer:
                assert answer.status_code == 200
                request_id = answer.headers["x-request-id"]
                with pytest.raises(httpx.RemoteProtocolError):  # cut: incomplete chunked body
                    async for _ in answer.aiter_bytes():
                        pass
            await record(h, request_id)
        failures = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
        assert [r.getMessage() for r in failures] == ["request failed"]
        monkeypatch.undo()
        await still_serving(h)


async def test_a_connection_whose_protocol_code_raises_ends_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What the HTTP/2 path did with a non-ASCII :path: an exception in the connection's own
    # code, outside any request. Now it ends that connection (500 when one can still be sent).
    async def explode(self: EdgeH11Protocol, event: Any) -> None:
        raise UnicodeDecodeError("ascii", b"\xff", 0, 1, "a bug below the application")

    async with open_harness(tmp_path) as h:
        monkeypatch.setattr(EdgeH11Protocol, "_check_protocol", explode)
        with caplog.at_level(logging.ERROR):
            got = await exchange(h.running.bound.port, raw_request("GET", b"/healthz", []))
        (answer,) = got.responses
        assert answer.status == 500 and got.closed
        assert answer.json() == {"error": "internal error"}
        failures = [r for r in caplog.records if r.getMessage() == "connection failed; closed it"]
        assert len(failures) == 1 and failures[0].exc_info is not None
        assert getattr(failures[0], "connection_id", None) == answer.headers["x-request-id"]
        monkeypatch.undo()
        await still_serving(h)


HEADERS = [
    b"Host",
    b"Authorization",
    b"X-Api-Key",
    b"Content-Type",
    b"Content-Length",
    b"X-Forwarded-For",
    b"User-Agent",
    b"Accept",
    b"Accept-Encoding",
    b"Connection",
    b"Cookie",
    b"Origin",
    b"X-Request-Id",
    b"Expect",
    b"Upgrade",
    b"Transfer-Encoding",
]
INVALID_UTF8 = b"\xff\xfe\xc3\x28 \xed\xa0\x80"


async def test_invalid_utf8_in_every_header_and_in_the_target(tmp_path: Path) -> None:
    async with open_harness(tmp_path, trusted_proxies=("127.0.0.1",)) as h:
        port = h.running.bound.port
        body = b'{"model":"llama3","stream":false,"messages":[]}'
        for name in HEADERS:
            headers = [
                (b"Authorization", f"Bearer {h.key}".encode()),
                (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()),
                (b"Connection", b"close"),
            ]
            headers = [(n, v) for n, v in headers if n.lower() != name.lower()]
            headers.append((name, INVALID_UTF8))
            got = await exchange(port, raw_request("POST", b"/api/chat", headers, body))
            assert len(got.responses) <= 1 and got.closed, name
            for answer in got.responses:
                assert answer.status != 500, (name, answer)  # 501: h11 on Transfer-Encoding
                if "x-request-id" in answer.headers:
                    info = await record(h, answer.headers["x-request-id"])
                    assert info.status == answer.status, name
        for target in (b"/api/chat\xff", b"/api/%ff%fe", b"/\xed\xa0\x80", b"/v1/models/%c3%28"):
            got = await exchange(
                port, raw_request("GET", target, [(b"Connection", b"close"), auth(h)])
            )
            (answer,) = got.responses
            assert answer.status in (400, 404), (target, answer)
        await still_serving(h)


# --- framing --------------------------------------------------------------------------------------


async def test_content_length_with_transfer_encoding_is_400_and_closes(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        smuggled = raw_request("GET", b"/api/tags", [auth(h)])
        chunked = b"0\r\n\r\n" + smuggled
        probe = raw_request(
            "POST",
            b"/api/chat",
            [
                auth(h),
                (b"Content-Length", str(len(chunked)).encode()),
                (b"Transfer-Encoding", b"chunked"),
            ],
            chunked,
        )
        got = await exchange(h.running.bound.port, probe)
        (answer,) = got.responses  # the request hidden in the body is never answered
        assert got.closed and not got.rest
        assert answer.status == 400 and answer.headers["connection"] == "close"
        assert "Content-Length" in answer.json()["error"]
        info = await record(h, answer.headers["x-request-id"])
        assert (info.status, info.refusal) == (400, "bad_framing")
        await still_serving(h)
        assert not [i for i in h.finished if i.log_path == "/api/tags"]


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/api/chat", "native"), ("/v1/chat/completions", "openai"), ("/ws", "native")],
)
async def test_a_websocket_upgrade_gets_the_gateways_own_404(
    tmp_path: Path, path: str, shape: str
) -> None:
    async with open_harness(tmp_path) as h:
        headers = [
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
            auth(h),
        ]
        got = await exchange(
            h.running.bound.port, raw_request("GET", path.encode(), headers), expect_close=False
        )
        (answer,) = got.responses
        assert answer.status == 404
        assert answer.headers["content-type"].startswith("application/json")
        error = answer.json()["error"]
        assert (error if shape == "native" else error["message"]) == "not found"
        info = await record(h, answer.headers["x-request-id"])
        assert (info.status, info.refusal) == (404, "upgrade")
        await still_serving(h)


# --- the body phase -------------------------------------------------------------------------------


def partial_chat(key: str, declared: int = 1000) -> bytes:
    return raw_request(
        "POST",
        b"/api/chat",
        [(b"Authorization", f"Bearer {key}".encode()), (b"Content-Length", str(declared).encode())],
        b'{"model":',
    )


async def test_a_body_that_does_not_arrive_in_time_is_408(tmp_path: Path) -> None:
    async with open_harness(tmp_path, body_timeout=0.5) as h:
        got = await exchange(h.running.bound.port, partial_chat(h.key))
        (answer,) = got.responses
        assert answer.status == 408 and got.closed
        assert answer.json() == {"error": "the request body did not arrive in time"}
        info = await record(h, answer.headers["x-request-id"])
        assert (info.status, info.refusal) == (408, "body_timeout")
        assert h.running.gateway.uploads.in_progress(key=info.key_prefix) == 0
        await still_serving(h)


async def test_bodies_in_progress_are_bounded_per_key_and_per_client(tmp_path: Path) -> None:
    async with open_harness(
        tmp_path, max_body_uploads_per_key=2, max_body_uploads_per_client=3
    ) as h:
        gate = h.running.gateway.uploads
        other = await h.new_key(name="other")
        port = h.running.bound.port
        prefix = h.key[:11]
        streams: list[trio.SocketStream] = []

        async def trickle(key: str) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            await stream.send_all(partial_chat(key))

        async def wait_in_progress(client_count: int) -> None:
            with trio.fail_after(30):
                while gate.in_progress(client="127.0.0.1") < client_count:
                    await gate.wait_changed()

        try:
            await trickle(h.key)
            await trickle(h.key)
            await wait_in_progress(2)
            assert gate.in_progress(key=prefix) == 2
            over_key = await exchange(port, partial_chat(h.key))
            await trickle(other)  # another key from the same client: room for one more
            await wait_in_progress(3)
            over_client = await exchange(port, partial_chat(other))
            # Both bounds full: a body that arrives whole with its headers (one write) is not
            # "in progress" and holds nothing, so it is served (a burst of small requests
            # must not be refused for bodies its busy gateway reads late).
            body = json.dumps(CHAT).encode()
            whole = raw_request(
                "POST",
                b"/api/chat",
                [
                    (b"Authorization", f"Bearer {h.key}".encode()),
                    (b"Content-Length", str(len(body)).encode()),
                ],
                body,
            )
            served = await exchange(port, whole, expect_close=False)
            assert served.responses[0].status == 200, served.responses[0].body
            assert gate.in_progress(key=prefix) == 2
        finally:
            for stream in streams:
                await stream.aclose()
        for got in (over_key, over_client):
            (answer,) = got.responses
            assert answer.status == 429 and answer.headers["retry-after"] == "1"
            info = await record(h, answer.headers["x-request-id"])
            assert (info.status, info.refusal) == (429, "body_uploads")
        with trio.fail_after(30):
            while gate.in_progress(client="127.0.0.1"):  # the trickling clients left
                await gate.wait_changed()
        await still_serving(h)


async def test_headers_that_never_complete_are_cut_by_the_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    async with open_harness(tmp_path, keep_alive_timeout=0.5) as h:
        got = await exchange(h.running.bound.port, b"POST /api/chat HTTP/1.1\r\nHost: gateway\r\n")
        assert got.closed and not got.responses
        await still_serving(h)
