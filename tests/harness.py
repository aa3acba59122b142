"""A whole gateway in-process: emulated backends, SQLite store, memory counters, a tenant and
a key. Tests drive it over real sockets with httpx; `finished` collects every request's
`RequestInfo` after its settlement ran."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from nzgw.config import Argon2Params, BackendConfig, Config, test_config
from nzgw.core.models import Budgets, Limits
from nzgw.http.gateway import RequestInfo
from nzgw.ports import NewKey, NotFoundError
from nzgw.server import Running, run_server
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import Emulator, EmulatorSettings, open_emulator

FAST_ARGON2 = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)


@attrs.define(eq=False)
class Harness:
    url: str
    key: str
    config: Config
    running: Running
    emulators: list[Emulator]
    client: httpx.AsyncClient
    shutdown: trio.Event
    stopped: trio.Event
    finished: list[RequestInfo] = attrs.Factory(list)
    #: Synchronous closers (test clients) run when the harness closes.
    cleanups: list[Callable[[], None]] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def emulator(self) -> Emulator:
        return self.emulators[0]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def new_key(
        self,
        *,
        tenant: str = "acme",
        name: str | None = None,
        limits: Limits = Limits(),
        budgets: Budgets = Budgets(),
        allowed_models: tuple[str, ...] = (),
        log_prompts: bool = False,
        prompt_ttl_seconds: int | None = None,
    ) -> str:
        store = self.running.store
        try:
            tenant_row = await store.get_tenant(tenant)
        except NotFoundError:
            tenant_row = await store.create_tenant(tenant)
        template = NewKey(
            tenant_row.id,
            name or f"k{len(self.finished)}-{trio.current_time()}",
            "",
            "",
            limits=limits,
            budgets=budgets,
            allowed_models=allowed_models,
            log_prompts=log_prompts,
            prompt_ttl_seconds=prompt_ttl_seconds,
        )
        full_key, _ = await issue_key(store, KeyHasher(self.config.argon2), template)
        return full_key

    def _record(self, info: RequestInfo) -> None:
        self.finished.append(info)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_finished(self, count: int) -> list[RequestInfo]:
        """Wait until `count` requests have been settled (no timeout: wrap it)."""
        while len(self.finished) < count:
            await self._changed.wait()
        return self.finished


@contextlib.asynccontextmanager
async def open_harness(
    tmp_path: Path,
    *,
    backends: int = 1,
    settings: Callable[[int], EmulatorSettings] | None = None,
    backend_fields: Callable[[int], dict[str, Any]] | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    async with contextlib.AsyncExitStack() as stack:
        emulators = [
            await stack.enter_async_context(
                open_emulator(settings(i) if settings else EmulatorSettings())
            )
            for i in range(backends)
        ]
        fields: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path}/nzgw.db",
            "spool_dir": f"{tmp_path}/spool",
            "bind": "127.0.0.1:0",
            "migrate_on_start": True,
            "argon2": FAST_ARGON2,
            "backends": tuple(
                BackendConfig(
                    f"backend-{i}", emu.url, **(backend_fields(i) if backend_fields else {})
                )
                for i, emu in enumerate(emulators)
            ),
            "discovery_interval": 0.2,
            "graceful_timeout": 5.0,
            "flush_interval": 0.2,
            "revocation_poll_interval": 0.1,
            **overrides,
        }
        config = test_config(**fields)
        shutdown = trio.Event()
        stopped = trio.Event()
        nursery = await stack.enter_async_context(trio.open_nursery())

        async def run(task_status: trio.TaskStatus[Running]) -> None:
            try:
                await run_server(config, shutdown_trigger=shutdown.wait, task_status=task_status)
            finally:
                stopped.set()

        running: Running = await nursery.start(run)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=running.url, timeout=30)
        )
        harness = Harness(running.url, "", config, running, emulators, client, shutdown, stopped)
        running.gateway.finish_hooks.append(_as_hook(harness))
        # Key names are unique per tenant: a harness reopened on the same database needs another.
        taken = {k.name for k in await running.store.list_keys()}
        harness.key = await harness.new_key(
            name=next(
                n for n in ("default", *(f"default-{i}" for i in range(1, 99))) if n not in taken
            )
        )
        try:
            yield harness
        finally:
            for close in harness.cleanups:
                close()
            shutdown.set()


def _as_hook(harness: Harness) -> Callable[[RequestInfo], Any]:
    async def hook(info: RequestInfo) -> None:
        harness._record(info)

    return hook
