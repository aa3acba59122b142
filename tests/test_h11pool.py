"""The data plane's connection pool against the emulator: reuse, and what happens to the
connection and the pool slot when a request fails, is cancelled or is abandoned half-read."""

from __future__ import annotations

import json

import pytest
import trio

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
