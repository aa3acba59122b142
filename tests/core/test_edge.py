"""`nzgw.core.edge.check_request`: what the listener refuses whatever the target. Sans-IO."""

from __future__ import annotations

import pytest

from nzgw.core.edge import check_request

H = list[tuple[bytes, bytes]]


@pytest.mark.parametrize("version", ["1.0", "1.1", b"1.1"])
def test_plain_http1_requests_pass(version: str | bytes) -> None:
    assert check_request(version, [(b"host", b"x"), (b"content-length", b"3")]) is None


@pytest.mark.parametrize("version", ["2.0", "0.9", "3", ""])
def test_other_versions_are_505_and_close(version: str) -> None:
    refusal = check_request(version, [])
    assert refusal is not None
    assert (refusal.status, refusal.refusal, refusal.close) == (505, "http_version", True)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")],
        [(b" content-length", b"5"), (b"TRANSFER-ENCODING", b"gzip, chunked")],
    ],
)
def test_content_length_with_transfer_encoding_is_400_and_close(headers: H) -> None:
    refusal = check_request("1.1", headers)
    assert refusal is not None
    assert (refusal.status, refusal.refusal, refusal.close) == (400, "bad_framing", True)


@pytest.mark.parametrize(
    "upgrade", [b"websocket", b"WebSocket", b"h2c, websocket", b"TLS/1.2", b"h2", b"foo"]
)
def test_any_upgrade_but_h2c_is_404(upgrade: bytes) -> None:
    refusal = check_request("1.1", [(b"connection", b"Upgrade"), (b"upgrade", upgrade)])
    assert refusal is not None
    assert (refusal.status, refusal.refusal, refusal.close) == (404, "upgrade", False)


@pytest.mark.parametrize("upgrade", [b"h2c", b"H2C", b" h2c ", b"", b","])
def test_an_h2c_upgrade_is_ignored(upgrade: bytes) -> None:
    assert check_request("1.1", [(b"upgrade", upgrade), (b"http2-settings", b"AAMA")]) is None
