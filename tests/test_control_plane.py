"""The control plane's client (discovery, probes): `OllamaBackend.get_json` over the one shared
`httpx.AsyncClient`, against the emulator. The data plane's pool is tested in test_h11pool.py."""

from __future__ import annotations

import gc
import warnings

import pytest
import trio

from nzgw.adapters.ollama import open_backends
from nzgw.config import BackendConfig
from nzgw.ports import UpstreamError
from nzgw.testing import EmulatorSettings, Fault, open_emulator


async def test_get_json_goes_through_httpx_with_the_backend_headers() -> None:
    with trio.fail_after(30):
        async with (
            open_emulator() as emu,
            open_backends(
                [BackendConfig("a", emu.url, auth_token="secret")],
                pool_size=1,
                connect_timeout=5,
            ) as backends,
        ):
            tags = await backends[0].get_json("/api/tags")
            assert isinstance(tags["models"], list)
            request = next(r for c in emu.connections for r in c.requests)
            assert (request.header("user-agent") or "").startswith("python-httpx/")
            assert request.header("authorization") == "Bearer secret"


async def test_backends_share_one_control_client_and_reuse_its_connection() -> None:
    with trio.fail_after(30):
        async with (
            open_emulator() as emu,
            open_backends(
                [BackendConfig("a", emu.url), BackendConfig("b", emu.url)],
                pool_size=1,
                connect_timeout=5,
            ) as backends,
        ):
            for _ in range(3):
                for backend in backends:
                    await backend.get_json("/api/version")
            # one pool for the purpose: six GETs from two backends on one keep-alive connection
            assert [len(c.requests) for c in emu.connections] == [6]


async def test_too_large_body_is_an_upstream_error_and_leaves_no_generator() -> None:
    with trio.fail_after(30):
        async with (
            open_emulator() as emu,
            open_backends([BackendConfig("a", emu.url)], pool_size=1, connect_timeout=5) as bs,
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with pytest.raises(UpstreamError, match="too large"):
                    await bs[0].get_json("/api/tags", limit=10)
                gc.collect()
            assert [str(w.message) for w in caught] == []
            assert isinstance(await bs[0].get_json("/api/tags"), dict)  # the client still works


async def test_failures_are_upstream_errors_and_cancellation_closes_the_connection() -> None:
    with trio.fail_after(30):
        async with (
            open_emulator(EmulatorSettings()) as emu,
            open_backends([BackendConfig("a", emu.url)], pool_size=1, connect_timeout=5) as bs,
        ):
            with pytest.raises(UpstreamError, match="HTTP 404"):
                await bs[0].get_json("/api/nothing-here")
            emu.settings.fault = Fault.STALL
            with trio.move_on_after(0.2):
                await bs[0].get_json("/api/tags")
            await emu.wait_until(lambda: emu.open_connections == 0)
            emu.settings.fault = Fault.CLOSE_BEFORE_FIRST_BYTE
            with pytest.raises(UpstreamError):
                await bs[0].get_json("/api/tags")
