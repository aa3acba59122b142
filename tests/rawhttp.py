"""Raw bytes to a listener and the HTTP/1.1 answers that come back, for hostile probes that no
HTTP client library would send (h2 prefaces, ambiguous framing, invalid bytes)."""

from __future__ import annotations

import json
from typing import Any

import attrs
import h2.config
import h2.connection
import trio

H2C_SETTINGS = b"AAMAAABkAARAAAAAAAIAAAAA"  # base64url SETTINGS payload, as curl sends it
BAD_PATH = b"/\xff"  # not ASCII: raised out of hypercorn's HTTP/2 connection task


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Exchange:
    responses: list[RawResponse]
    closed: bool  # the server closed the connection (EOF) after them
    rest: bytes  # bytes after the last complete response (an HTTP/2 frame, ...)


async def exchange(
    port: int,
    data: bytes,
    *,
    host: str = "127.0.0.1",
    expect_close: bool = True,
    min_bytes: int = 0,
) -> Exchange:
    """Send `data`, then read until the server closes (or, with expect_close=False, until one
    complete answer or `min_bytes` bytes arrived). Hang-guarded."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            received = b""
            closed = False
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                received += chunk
                if not expect_close and (
                    _parse(received)[0] or (min_bytes and len(received) >= min_bytes)
                ):
                    break
    responses, rest = _parse(received)
    return Exchange(responses, closed, rest)


def _parse(data: bytes) -> tuple[list[RawResponse], bytes]:
    responses: list[RawResponse] = []
    while data.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in data:
        head, _, after = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, sep, after = after.partition(b"\r\n")
                if not sep:
                    return responses, data
                size = int(size_line.split(b";")[0], 16)
                if len(after) < size + 2:
                    return responses, data
                body += after[:size]
                after = after[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            if len(after) < length:
                return responses, data
            body, after = after[:length], after[length:]
        responses.append(RawResponse(status, headers, body))
        data = after
    return responses, data


def h2_client_bytes(
    path: bytes = BAD_PATH, extra: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """A client's HTTP/2 connection preface, SETTINGS and one HEADERS frame for GET `path`
    (validation off, so `path` may hold any byte)."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"gateway"),
        (b":path", path),
        *(extra or []),
    ]
    conn.send_headers(1, headers, end_stream=True)
    return conn.data_to_send()


def h2c_upgrade(path: str, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 GET asking to upgrade to h2c, as `curl --http2` sends it."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: gateway",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        f"HTTP2-Settings: {H2C_SETTINGS.decode()}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_request(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request head (with `Host`) and `body`, byte for byte as given."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gateway"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
