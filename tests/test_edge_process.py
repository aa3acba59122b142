"""The hostile probes of issue #11 against a real `nzgw serve` process: it survives every one,
answers `/healthz` and a normal chat after them, exits 0 on SIGTERM, and its audit log (read
with `nzgw audit --json`) holds one row per probe with the status the client got."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from nzgw.testing import open_emulator
from tests.rawhttp import (
    BAD_PATH,
    RawResponse,
    exchange,
    h2_client_bytes,
    h2c_upgrade,
    raw_request,
)
from tests.test_processes import free_port, serve_env, start_nzgw, wait_answer

CHAT = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
FAST_ARGON2 = {"NZGW_ARGON2_TIME_COST": "1", "NZGW_ARGON2_MEMORY_KIB": "64"}


async def nzgw(env: dict[str, str], cwd: Path, *args: str) -> Any:
    result = await trio.run_process(
        [sys.executable, "-m", "nzgw", *args, "--json"], env=env, cwd=cwd, capture_stdout=True
    )
    return json.loads(result.stdout)


async def test_serve_survives_every_probe_and_audits_each_with_its_status(tmp_path: Path) -> None:
    port = free_port()
    async with open_emulator() as emu:
        env = serve_env(
            tmp_path,
            port,
            emu.url,
            NZGW_BODY_TIMEOUT="1",
            NZGW_FLUSH_INTERVAL="0.2",
            NZGW_AUDIT_PROBES="true",  # probe 2 smuggles its h2 bytes behind a /healthz
            **FAST_ARGON2,
        )
        await nzgw(env, tmp_path, "migrate")
        await nzgw(env, tmp_path, "create-tenant", "--name", "acme")
        key = (await nzgw(env, tmp_path, "create-key", "--tenant", "acme", "--name", "p"))["key"]
        bearer = (b"Authorization", f"Bearer {key}".encode())
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log_file:
            async with trio.open_nursery() as nursery:
                proc = await start_nzgw(nursery, "serve", cwd=tmp_path, env=env, stderr=log_file)
                base = f"http://127.0.0.1:{port}"
                await wait_answer(f"{base}/readyz", proc)
                expected: dict[str, int] = {}  # request id -> the status the client got

                def answered(response: RawResponse, status: int) -> None:
                    assert response.status == status, response
                    expected[response.headers["x-request-id"]] = status

                # 1. HTTP/2 prior knowledge, a non-ASCII :path (stopped the process before).
                got = await exchange(port, h2_client_bytes(BAD_PATH))
                (answer,) = got.responses
                answered(answer, 505)
                # 2. The same behind an h2c upgrade: answered as HTTP/1.1, then refused.
                got = await exchange(port, h2c_upgrade("/healthz") + h2_client_bytes(BAD_PATH))
                first, second = got.responses
                answered(first, 200)
                answered(second, 505)
                # 3. Content-Length and Transfer-Encoding, a second request hidden in the body.
                hidden = b"0\r\n\r\n" + raw_request("GET", b"/api/tags", [bearer])
                length = (b"Content-Length", str(len(hidden)).encode())
                chunked = (b"Transfer-Encoding", b"chunked")
                got = await exchange(
                    port, raw_request("POST", b"/api/chat", [bearer, length, chunked], hidden)
                )
                (answer,) = got.responses
                answered(answer, 400)
                # 4. A WebSocket upgrade.
                ws = [
                    (b"Connection", b"Upgrade"),
                    (b"Upgrade", b"websocket"),
                    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                    (b"Sec-WebSocket-Version", b"13"),
                    (b"Connection", b"close"),
                ]
                (answer,) = (await exchange(port, raw_request("GET", b"/api/chat", ws))).responses
                answered(answer, 404)
                # 5. Invalid UTF-8 in headers and in an escaped target.
                bad = [
                    bearer,
                    (b"User-Agent", b"\xff\xfe\xc3\x28"),
                    (b"Accept", b"\xed\xa0\x80"),
                    (b"Connection", b"close"),
                ]
                (answer,) = (await exchange(port, raw_request("GET", b"/api/tags", bad))).responses
                answered(answer, 200)
                target = raw_request("GET", b"/api/%ff%fe", [bearer, (b"Connection", b"close")])
                (answer,) = (await exchange(port, target)).responses
                answered(answer, 404)
                # 6. A body that trickles and never completes.
                trickle = raw_request("POST", b"/api/chat", [bearer, (b"Content-Length", b"1000")])
                (answer,) = (await exchange(port, trickle + b'{"model":')).responses
                answered(answer, 408)
                # 7. Framing errors below the application: answered 400 and closed.
                got = await exchange(port, raw_request("GET", b"/api/\xff", [bearer]))
                assert [r.status for r in got.responses] == [400] and got.closed

                # The process is alive and serves every tenant as before.
                assert proc.poll() is None
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    health = await client.get("/healthz")
                    chat = await client.post(
                        "/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"}
                    )
                assert health.status_code == 200
                assert chat.status_code == 200 and chat.json()["done"] is True
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    await proc.wait()
        assert proc.returncode == 0
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Error in ASGI Framework" not in log, log

    rows = await nzgw(env, tmp_path, "audit", "--limit", "1000")
    statuses = {row["request_id"]: row["status"] for row in rows}
    assert {rid: statuses.get(rid) for rid in expected} == expected
    refusals = {row["request_id"]: row["refusal"] for row in rows if row["request_id"] in expected}
    assert sorted(r for r in refusals.values() if r) == sorted(
        ["http_version", "http_version", "bad_framing", "upgrade", "not_found", "body_timeout"]
    )
    # The request hidden behind Content-Length + Transfer-Encoding never ran: one /api/tags.
    assert len([row for row in rows if row["path"] == "/api/tags"]) == 1
