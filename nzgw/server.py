"""The composition root: configuration → adapters → services → app, under one root nursery.

Resources open outermost-first and close in reverse (docs/ARCHITECTURE.md, "Spine"):

    store → counters → backend clients → root nursery
        ├─ discovery          (started first: ready only after the first snapshot)
        ├─ metrics listener   (NZGW_METRICS_BIND: /metrics on its own socket, also while draining)
        ├─ revocation watch   (keys revoked elsewhere stop working here within a second)
        ├─ spool replay       (orphaned spools of this store written to it, before the listener)
        ├─ usage flusher      (settled usage to the ledger; last flush shielded on the way out)
        ├─ reconciliation     (budget counters compared with the ledger, drift corrected)
        ├─ last-used flusher
        ├─ audit flusher      (audit rows in batches; last flush shielded, with a deadline)
        ├─ prompt purge       (expired prompt logs, in bounded batches)
        └─ HTTP (hypercorn trio worker) until the shutdown trigger; then in-flight requests get
           `graceful_timeout` to finish and are cancelled after that; the relay pump's thread
           (nzgw/http/pump.py) runs from before the first connection to after the last
    then the service tasks are cancelled (their final flushes are shielded with a deadline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import attrs
import trio

from nzgw.adapters.memory_counters import MemoryCounters
from nzgw.adapters.ollama import open_backends
from nzgw.adapters.redis import open_redis_counters
from nzgw.adapters.redis_throttle import open_redis_throttle
from nzgw.adapters.stores import open_store, store_identity
from nzgw.config import Config
from nzgw.core.limits import budget_zone
from nzgw.http.app import GatewayApp, create_app
from nzgw.http.audit import audit_hook
from nzgw.http.gateway import Gateway
from nzgw.http.lifecycle import StartupLog, discovered, report_drain, store_kind
from nzgw.http.limits import LimiterAdmitter
from nzgw.http.listen import Bound, bind_socket, serve_http
from nzgw.http.metrics import GatewayMetrics, LiveCollector, serve_metrics, track_pump
from nzgw.ports import AuthThrottle, Counters, CountersUnavailableError, Store
from nzgw.services.audit import AuditLog, run_audit_flusher, run_prompt_purge
from nzgw.services.deadlines import bound_store_calls
from nzgw.services.discovery import run_discovery
from nzgw.services.drain import StreamCut
from nzgw.services.identity import (
    Authenticator,
    MemoryAuthThrottle,
    run_last_used_flush,
    run_revocation_watch,
)
from nzgw.services.limiter import Limiter, run_usage_flusher
from nzgw.services.reconcile import Reconciler, run_reconciliation
from nzgw.services.registry import Registry
from nzgw.services.slots import SlotPool
from nzgw.services.spool import (
    Spool,
    SpoolStats,
    open_spool,
    run_spool_replay,
    store_fingerprint,
)

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
    reconciler: Reconciler | None = None

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
            config.redis_url, call_timeout=config.counters_timeout, cluster=config.redis_cluster
        ) as counters:
            yield counters


@contextlib.asynccontextmanager
async def open_process_spool(
    directory: Path, fingerprint: str, stats: SpoolStats
) -> AsyncIterator[Spool]:
    """This process's spool file, in the folder of the configured store (services/spool.py)."""
    with open_spool(directory, fingerprint, stats) as spool:
        yield spool


@contextlib.asynccontextmanager
async def open_auth_throttle(config: Config) -> AsyncIterator[AuthThrottle]:
    """The failed-authentication throttle: in Redis (shared by every process) when configured."""
    if config.embedded_counters:
        yield MemoryAuthThrottle(config.auth_fail_limit)
    else:
        async with open_redis_throttle(
            config.redis_url,
            limit=config.auth_fail_limit,
            call_timeout=config.counters_timeout,
            cluster=config.redis_cluster,
        ) as throttle:
            yield throttle


async def run_server(
    config: Config,
    *,
    shutdown_trigger: ShutdownTrigger = wait_for_signal,
    worker: int | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until `shutdown_trigger` returns and the drain is over.

    `worker`: this process's index under NZGW_WORKERS (named in `nzgw_worker_info`).

    Each start-up step is logged as it completes (`step_ms`: since the start), and so is the
    shutdown: draining (requests in flight, when the grace period ends), the grace period
    running out with requests still in flight, drained, stopped."""
    steps = StartupLog()
    metrics = GatewayMetrics(worker=worker, tenant_labels=config.metrics_tenant_labels)
    # Bind first: a port already in use should fail before anything else is opened.
    sock = bind_socket(
        config.bind,
        stall_timeout=config.client_stall_timeout,
        reuse_port=config.workers > 1,
    )
    steps.done("port bound", bind=config.bind)
    try:
        async with open_store(config.database_url) as store:
            store = metrics.watch_store(store)  # failures counted
            steps.done("store opened", store=store_kind(config.database_url))
            if config.migrate_on_start:
                applied = await store.migrate()
                if applied:
                    log.info("migrations applied", extra={"migrations": ",".join(applied)})
                steps.done("migrations checked", applied=len(applied))
            spool_stats = SpoolStats()
            # One folder per database: this process's spool and the orphans it replays.
            spool_dir = Path(config.spool_dir)
            fingerprint = store_fingerprint(store_identity(config.database_url))
            async with (
                open_process_spool(spool_dir, fingerprint, spool_stats) as spool,
                open_counters(config) as counters,
                open_auth_throttle(config) as auth_throttle,
                open_backends(
                    config.effective_backends,
                    pool_size=config.upstream_pool_size,
                    connect_timeout=config.upstream_connect_timeout,
                ) as backends,
                trio.open_nursery() as services,
            ):
                counters = metrics.watch_counters(counters)
                steps.done(
                    "counters and backend clients opened",
                    counters="in-process"
                    if config.embedded_counters
                    else "redis cluster"
                    if config.redis_cluster
                    else "redis",
                    backends=len(backends),
                )
                # Connect (and read Redis' clock) before the first burst; down: fail closed later.
                with contextlib.suppress(CountersUnavailableError):
                    await counters.ping()
                registry = Registry(
                    backends, priorities={b.name: b.priority for b in config.effective_backends}
                )
                slots = SlotPool(
                    {b.name: b.parallel for b in config.effective_backends},
                    queue_timeout=config.queue_timeout,
                    per_tenant=config.queue_per_tenant,
                    is_loaded=registry.is_loaded,
                )
                # A hung store answers requests with 503 within NZGW_STORE_TIMEOUT.
                authenticator = Authenticator.from_config(
                    bound_store_calls(store, timeout=config.store_timeout, nursery=services),
                    config,
                    throttle=auth_throttle,
                    events=metrics.auth_event,
                )
                # Leases are refreshed from admission on (the keeper below): the ttl is only how
                # long a crashed process's slots and reservations stay taken.
                limiter = Limiter(
                    counters, store, timezone=config.budget_timezone, lease_ttl=config.lease_ttl
                )
                await services.start(limiter.run_lease_keeper)
                # Rows an earlier process could not write reach the store before we serve.
                await services.start(
                    partial(
                        run_spool_replay,
                        spool_dir,
                        fingerprint,
                        store,
                        spool_stats,
                        own=spool.path,
                    )
                )
                steps.done("spool replayed", rows=spool_stats.replayed_rows)
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
                steps.done("first discovery round done", **discovered(registry))
                live = LiveCollector(registry)  # read at scrape time
                live.track_slots(slots, tenant_labels=config.metrics_tenant_labels)
                live.track_backlog("usage", lambda: limiter.pending_rows)
                live.track_counter(
                    "nzgw_counters_reclaimed_tokens",
                    "Tokens taken back off the budget counters from leases that expired "
                    "unsettled (a crashed process's reservations: counters vs ledger drift)",
                    lambda: limiter.reclaimed_tokens,
                )
                for name, documentation, value in (
                    (
                        "nzgw_spool_rows_spooled",
                        "Usage and audit rows written to the local spool (the store was away)",
                        lambda: spool_stats.spooled_rows,
                    ),
                    (
                        "nzgw_spool_rows_replayed",
                        "Rows of an earlier process's spool written to the store at start",
                        lambda: spool_stats.replayed_rows,
                    ),
                    (
                        "nzgw_rows_lost",
                        "Usage and audit rows that reached neither the store nor the spool",
                        lambda: spool_stats.lost_rows,
                    ),
                ):
                    live.track_counter(name, documentation, value)
                # Budget counters compared with the ledger every NZGW_RECONCILE_INTERVAL;
                # quiet: until usage settled before a snapshot is in the ledger, by any process.
                reconciler = Reconciler(
                    counters,
                    store,
                    limiter,
                    quiet=2 * config.flush_interval + config.store_timeout,
                )
                live.track_labelled_counter(
                    "nzgw_counters_drift_tokens",
                    "Tokens the reconciliation corrected on the budget counters to agree with "
                    "the usage ledger, by scope (key, tenant) and period (day, month, lifetime)",
                    ["scope", "period"],
                    lambda: reconciler.drift,
                )
                await services.start(
                    partial(run_reconciliation, reconciler, interval=config.reconcile_interval)
                )
                metrics_bound: Bound | None = None
                if config.metrics_bind:
                    metrics_bound = await services.start(
                        partial(
                            serve_metrics,
                            config.metrics_bind,
                            token=config.metrics_token,
                            metrics=metrics,
                            live=live,
                        )
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
                    partial(
                        run_usage_flusher,
                        limiter,
                        store,
                        interval=config.flush_interval,
                        spool=spool,
                        spool_after=config.store_timeout,
                    )
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
                    partial(
                        run_audit_flusher,
                        audit,
                        store,
                        interval=config.flush_interval,
                        spool=spool,
                        spool_after=config.store_timeout,
                    )
                )
                await services.start(partial(run_prompt_purge, store))
                steps.done("service tasks started")

                async def store_ready() -> bool:
                    await store.ping()
                    return True

                async def counters_ready() -> bool:
                    await counters.ping()
                    return True

                stream_cut = StreamCut()
                gateway = Gateway(
                    config,
                    authenticator,
                    registry,
                    readiness={
                        "store": store_ready,
                        "counters": counters_ready,
                        "audit": audit.ready,
                    },
                    admitter=LimiterAdmitter(limiter, config),
                    finish_hooks=[
                        metrics.observe_request,
                        audit_hook(audit, zone=audit_zone, probes=config.audit_probes),
                    ],
                    audit=audit,  # fail closed while its queue is full
                    stream_cut=stream_cut,
                    slots=slots,
                    metrics=metrics,
                )
                shutdown_started = trio.Event()
                await services.start(
                    partial(
                        stream_cut.run,
                        shutdown_started,
                        graceful_timeout=config.graceful_timeout,
                    )
                )

                async def shutdown_then_cut() -> None:
                    await shutdown_trigger()
                    report_drain(gateway, config.graceful_timeout, services)
                    shutdown_started.set()

                app = create_app(gateway)

                # HTTP runs in a nursery of its own: leaving it means the drain is over, and
                # only then are the service tasks stopped (their last flushes see every request).
                async with trio.open_nursery() as http:
                    bound = await http.start(
                        partial(
                            serve_http,
                            app,
                            config,
                            sock,
                            shutdown_trigger=shutdown_then_cut,
                            on_pump=partial(track_pump, live),
                        )
                    )
                    ready: dict[str, object] = {"bind": f"{bound.host}:{bound.port}"}
                    if metrics_bound is not None:
                        ready["metrics"] = f"{metrics_bound.host}:{metrics_bound.port}"
                    log.info("nzgw ready", extra={**ready, "pid": os.getpid(), **steps.since()})
                    task_status.started(
                        Running(
                            bound,
                            app,
                            gateway,
                            store,
                            limiter,
                            authenticator,
                            metrics_bound,
                            reconciler,
                        )
                    )
                log.info("drained", extra={"in_flight": gateway.in_flight})
                services.cancel_scope.cancel()
            log.info("service tasks stopped")
    finally:
        sock.close()
    log.info("stopped")
