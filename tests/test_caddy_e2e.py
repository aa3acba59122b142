"""TLS in front, for real: Caddy (Debian's package) with its internal CA, in front of a running
gateway, driven by an HTTPS client that trusts only that CA.

Rules of this module:

- Caddy runs the `nzgw_proxy` snippet of `conf/Caddyfile` verbatim (the production proxy
  directives: no buffering, headers); only the global options and the site address are the
  test's own (loopback ports, `tls internal`, data and config under `tmp_path`, no admin API,
  no change to the system trust store).
- Caddy is ready when it logs that it obtained the site's certificate; nothing waits on a clock.
- The client connects from 127.0.0.2 (loopback, another address than Caddy's 127.0.0.1), so
  the address the gateway records tells whether it believed X-Forwarded-For.
- Without the `caddy` binary the tests are skipped with the reason; with `CI=true` they fail.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from nzgw.testing import EmulatorSettings, open_emulator
from tests.harness import Harness, open_harness
from tests.system_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "conf" / "Caddyfile"
CLIENT_ADDRESS = "127.0.0.2"
TOKENS = 8
TOKEN_DELAY = 0.1


READY_MESSAGES = {"certificate obtained successfully", "serving initial configuration"}


@pytest.fixture(scope="module")
def caddy() -> str:
    return require_tool("caddy", "caddy", "the TLS end-to-end test")


def proxy_snippet(text: str) -> str:
    """The `(nzgw_proxy) { ... }` block of a Caddyfile, verbatim."""
    match = re.search(r"^\(nzgw_proxy\) \{\n.*?^\}\n", text, re.M | re.S)
    assert match, "conf/Caddyfile has no (nzgw_proxy) snippet"
    return match[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define(eq=False)
class Caddy:
    url: str
    root_ca: Path
    log: list[dict[str, Any]]


@asynccontextmanager
async def running_caddy(binary: str, tmp_path: Path, upstream_port: int) -> AsyncIterator[Caddy]:
    https_port, http_port = _free_port(), _free_port()
    config = tmp_path / "Caddyfile"
    config.write_text(
        "{\n"
        "\tadmin off\n"
        "\tskip_install_trust\n"
        "\tlocal_certs\n"
        "\tauto_https disable_redirects\n"
        f"\thttp_port {http_port}\n"
        f"\thttps_port {https_port}\n"
        "\tdefault_sni 127.0.0.1\n"
        "\tservers {\n\t\tprotocols h1 h2\n\t}\n"
        "}\n\n" + proxy_snippet(CADDYFILE.read_text()) + f"\nhttps://127.0.0.1:{https_port} {{\n"
        "\tbind 127.0.0.1\n"
        "\ttls internal\n"
        "\timport nzgw_proxy\n"
        "}\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "NZGW_UPSTREAM": f"127.0.0.1:{upstream_port}",
    }
    process = await trio.lowlevel.open_process(
        [binary, "run", "--config", str(config), "--adapter", "caddyfile"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[dict[str, Any]] = []
    try:
        buffer = b""
        with trio.fail_after(20):
            # Ready: its certificate exists AND its servers listen (the two log lines come in
            # either order; waiting for the certificate alone raced the listener).
            while not {e.get("msg") for e in log} >= READY_MESSAGES:
                chunk = await process.stderr.receive_some()
                assert chunk, f"caddy exited before it was ready: {log or buffer!r}"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                log.extend(json.loads(line) for line in lines if line.startswith(b"{"))
        root_ca = tmp_path / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
        ready = Caddy(f"https://127.0.0.1:{https_port}", root_ca, log)
        await _handshake_succeeds(ready)
        yield ready
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stderr.aclose()


async def _handshake_succeeds(caddy: Caddy) -> None:
    """Caddy logs its certificate a moment before its TLS cache serves it: a bounded poll of
    TLS handshakes (another process: there is no event to wait on)."""
    context = ssl.create_default_context(cafile=str(caddy.root_ca))
    port = int(caddy.url.rsplit(":", 1)[1])
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
            except OSError:
                await trio.sleep(0.05)
                continue
            try:
                await stream.do_handshake()
                return
            except trio.BrokenResourceError:
                await trio.sleep(0.05)
            finally:
                await trio.aclose_forcefully(stream)


def https_client(caddy: Caddy) -> httpx.AsyncClient:
    """A client that trusts Caddy's root CA and nothing else, connecting from CLIENT_ADDRESS."""
    context = ssl.create_default_context(cafile=str(caddy.root_ca))
    transport = httpx.AsyncHTTPTransport(verify=context, local_address=CLIENT_ADDRESS)
    return httpx.AsyncClient(base_url=caddy.url, transport=transport, timeout=30)


def slow_tokens(_: int) -> EmulatorSettings:
    return EmulatorSettings(tokens_per_reply=TOKENS, token_delay=TOKEN_DELAY)


def _root_cause(error: BaseException) -> BaseException:
    while (cause := error.__cause__ or error.__context__) is not None:
        error = cause
    return error


def record_of(h: Harness, request_id: str) -> Any:
    (info,) = [i for i in h.finished if i.request_id == request_id]
    return info


@pytest.mark.parametrize("trusted", [True, False], ids=["caddy-trusted", "no-trusted-proxy"])
async def test_a_stream_through_caddy_arrives_token_by_token(
    caddy: str, tmp_path: Path, trusted: bool
) -> None:
    proxies = ("127.0.0.1",) if trusted else ()
    async with (
        open_harness(tmp_path, settings=slow_tokens, trusted_proxies=proxies) as h,
        running_caddy(caddy, tmp_path, h.running.bound.port) as proxy,
        https_client(proxy) as client,
    ):
        body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        arrivals: list[float] = []
        frames: list[dict[str, Any]] = []
        # A client-supplied X-Forwarded-For must never become the recorded address.
        spoof = {**h.auth, "X-Forwarded-For": "203.0.113.7"}
        async with client.stream("POST", "/api/chat", json=body, headers=spoof) as response:
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            async for line in response.aiter_lines():
                if line:
                    arrivals.append(trio.current_time())
                    frames.append(json.loads(line))
            headers = response.headers
        with trio.fail_after(10):
            await h.wait_finished(1)

        direct_transport = httpx.AsyncHTTPTransport(local_address=CLIENT_ADDRESS)
        async with httpx.AsyncClient(base_url=h.url, transport=direct_transport) as direct:
            answer = await direct.get("/api/tags", headers=spoof)
            assert answer.status_code == 200
        with trio.fail_after(10):
            await h.wait_finished(2)

    # Token by token: the frames came spread over the generation, not in one burst at its end.
    assert len(frames) == TOKENS + 1 and frames[-1]["done"] is True
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap >= TOKEN_DELAY / 2 for gap in gaps) >= TOKENS - 2, gaps
    assert arrivals[-1] - arrivals[0] >= (TOKENS - 1) * TOKEN_DELAY * 0.8, gaps

    # Through Caddy: the gateway records the client's address only when it trusts Caddy.
    via_caddy = record_of(h, headers["x-request-id"])
    assert via_caddy.client == (CLIENT_ADDRESS if trusted else "127.0.0.1")
    assert via_caddy.status == 200 and via_caddy.outcome == "ok"
    # Directly from a peer that is not the trusted proxy: its header is ignored either way.
    direct_record = record_of(h, answer.headers["x-request-id"])
    assert direct_record.client == CLIENT_ADDRESS

    # What Caddy adds and removes on the way out.
    assert "server" not in headers
    assert headers["strict-transport-security"].startswith("max-age=")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"].startswith("application/x-ndjson")


async def test_the_client_trusts_only_caddys_ca(caddy: str, tmp_path: Path) -> None:
    async with (
        open_harness(tmp_path) as h,
        running_caddy(caddy, tmp_path, h.running.bound.port) as proxy,
    ):
        # The system trust store does not know Caddy's local CA (skip_install_trust).
        async with httpx.AsyncClient(base_url=proxy.url) as untrusting:
            with pytest.raises(httpx.ConnectError) as refused:
                await untrusting.get("/healthz")
        assert isinstance(_root_cause(refused.value), ssl.SSLCertVerificationError)
        async with https_client(proxy) as client:
            answer = await client.get("/healthz")
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
        assert answer.url.scheme == "https"


async def test_caddy_forwards_no_upgrade_to_nzgw(caddy: str, tmp_path: Path) -> None:
    """Defence in depth (README "Security"): nzgw ignores `Upgrade: h2c` and refuses every
    other upgrade, and Caddy does not forward the header in the first place."""
    async with (
        open_emulator() as emu,
        running_caddy(caddy, tmp_path, emu.port) as proxy,
        https_client(proxy) as client,
    ):
        for upgrade in ("h2c", "websocket"):
            headers = {
                "Connection": "Upgrade, HTTP2-Settings",
                "Upgrade": upgrade,
                "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            }
            answer = await client.get("/api/version", headers=headers)
            assert answer.status_code == 200, upgrade
            (received,) = [r for r in emu.requests if r.path == "/api/version"][-1:]
            names = {name.lower() for name, _ in received.headers}
            assert "upgrade" not in names, (upgrade, received.headers)
            assert "http2-settings" not in names, (upgrade, received.headers)
