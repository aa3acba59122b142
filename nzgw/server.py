"""The composition root: configuration → adapters → services → app, under one root nursery.

Resources open outermost-first and close in reverse (docs/ARCHITECTURE.md, "Spine"):

    store → counters → backend clients → root nursery
        ├─ discovery          (started first: ready only after the first snapshot)
        ├─ metrics listener   (NZGW_METRICS_BIND: /metrics on its own socket, also while draining)
        ├─ revocation watch   (keys revoked elsewhere stop working here within a second)
        ├─ usage flusher      (settled usage to the ledger; last flush shielded on the way out)
        ├─ last-used flusher
        ├─ audit flusher      (audit rows in batches; last flush shielded, with a deadline)
        ├─ prompt purge       (expired prompt logs, in bounded batches)
        └─ HTTP (hypercorn trio worker) until the shutdown trigger; then in-flight requests get
           `graceful_timeout` to finish and are cancelled after that
    then the service tasks are cancelled (their final flushes are shielded with a deadline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import attrs
import trio

from nzgw.adapters.memory_counters import MemoryCounters
from nzgw.adapters.ollama import open_backends
from nzgw.adapters.redis import open_redis_counters
from nzgw.adapters.stores import open_store
from nzgw.config import Config
from nzgw.core.limits import budget_zone
from nzgw.http.app import GatewayApp, create_app
from nzgw.http.audit import audit_hook
from nzgw.http.gateway import Gateway
from nzgw.http.limits import LimiterAdmitter
from nzgw.http.listen import Bound, bind_socket, serve_http
from nzgw.http.metrics import METRICS, LiveCollector, serve_metrics
from nzgw.ports import Counters, Store
from nzgw.services.audit import AuditLog, run_audit_flusher, run_prompt_purge
from nzgw.services.discovery import run_discovery
from nzgw.services.identity import Authenticator, run_last_used_flush, run_revocation_watch
from nzgw.services.limiter import Limiter, run_usage_flusher
from nzgw.services.registry import Registry

log = logging.getLogger("nzgw.server")

ShutdownTrigger = Callable[[], Awaitable[None]]


@attrs.frozen
class Running:
    """What `run_server` hands to `task_status.started`: for tests, `nzgw dev` and logs."""

    bound: Bound
    app: GatewayApp
    gateway: Gateway
    store: Store
    limiter: Limiter
    authenticator: Authenticator
    metrics: Bound | None = None  # the /metrics listener, when NZGW_METRICS_BIND is set

    @property
    def url(self) -> str:
        host = f"[{self.bound.host}]" if ":" in self.bound.host else self.bound.host
        return f"http://{host}:{self.bound.port}"


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT (the shutdown trigger of `nzgw serve`)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            return


@contextlib.asynccontextmanager
async def open_counters(config: Config) -> AsyncIterator[Counters]:
    if config.embedded_counters:
        yield MemoryCounters()
    else:
        async with open_redis_counters(
            config.redis_url, call_timeout=config.counters_timeout
        ) as counters:
            yield counters


async def run_server(
    config: Config,
    *,
    shutdown_trigger: ShutdownTrigger = wait_for_signal,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until `shutdown_trigger` returns and the drain is over."""
    # Bind first: a port already in use should fail before anything else is opened.
    sock = bind_socket(
        config.bind,
        stall_timeout=config.client_stall_timeout,
        reuse_port=config.workers > 1,
    )
    try:
        async with open_store(config.database_url) as store:
            store = METRICS.watch_store(store)  # failures counted
            if config.migrate_on_start:
                applied = await store.migrate()
                if applied:
                    log.info("migrations applied", extra={"migrations": ",".join(applied)})
            async with (
                open_counters(config) as counters,
                open_backends(
                    config.effective_backends,
                    pool_size=config.upstream_pool_size,
                    connect_timeout=config.upstream_connect_timeout,
                ) as backends,
                trio.open_nursery() as services,
            ):
                counters = METRICS.watch_counters(counters)
                registry = Registry(backends)
                authenticator = Authenticator.from_config(store, config)
                # A lease outlives the longest wait for a first byte; streams extend it as they
                # go. It only matters after a crash: that is how long a dead slot stays taken.
                limiter = Limiter(
                    counters,
                    store,
                    timezone=config.budget_timezone,
                    lease_ttl=max(60.0, config.upstream_first_byte_timeout + 60.0),
                )
                poll_timeout = max(0.5, min(config.discovery_interval, 5.0))
                await services.start(
                    partial(
                        run_discovery,
                        registry,
                        backends,
                        interval=config.discovery_interval,
                        poll_timeout=poll_timeout,
                    )
                )
                live = LiveCollector(registry)  # read at scrape time
                live.track_backlog("usage", lambda: limiter.pending_rows)
                metrics_bound: Bound | None = None
                if config.metrics_bind:
                    metrics_bound = await services.start(
                        partial(serve_metrics, config.metrics_bind, live=live)
                    )
                await services.start(
                    partial(
                        run_revocation_watch,
                        store,
                        authenticator,
                        interval=config.revocation_poll_interval,
                    )
                )
                await services.start(
                    partial(run_usage_flusher, limiter, store, interval=config.flush_interval)
                )
                await services.start(
                    partial(
                        run_last_used_flush, store, authenticator, interval=config.flush_interval
                    )
                )
                audit_zone = budget_zone(config.budget_timezone)
                audit = AuditLog(queue_max=config.audit_queue_max, zone=audit_zone)
                live.track_backlog("audit", lambda: audit.pending)
                await services.start(
                    partial(run_audit_flusher, audit, store, interval=config.flush_interval)
                )
                await services.start(partial(run_prompt_purge, store))

                async def store_ready() -> bool:
                    await store.ping()
                    return True

                async def counters_ready() -> bool:
                    await counters.ping()
                    return True

                gateway = Gateway(
                    config,
                    authenticator,
                    registry,
                    readiness={"store": store_ready, "counters": counters_ready},
                    admitter=LimiterAdmitter(limiter, config),
                )
                gateway.finish_hooks.append(METRICS.observe_request)
                gateway.audit = audit  # fail closed while its queue is full
                gateway.finish_hooks.append(audit_hook(audit, zone=audit_zone))
                gateway.readiness["audit"] = audit.ready
                app = create_app(gateway)
                # HTTP runs in a nursery of its own: leaving it means the drain is over, and
                # only then are the service tasks stopped (their last flushes see every request).
                async with trio.open_nursery() as http:
                    bound = await http.start(
                        partial(serve_http, app, config, sock, shutdown_trigger=shutdown_trigger)
                    )
                    ready: dict[str, object] = {"bind": f"{bound.host}:{bound.port}"}
                    if metrics_bound is not None:
                        ready["metrics"] = f"{metrics_bound.host}:{metrics_bound.port}"
                    log.info("nzgw ready", extra={**ready, "pid": os.getpid()})
                    task_status.started(
                        Running(bound, app, gateway, store, limiter, authenticator, metrics_bound)
                    )
                services.cancel_scope.cancel()
    finally:
        sock.close()
