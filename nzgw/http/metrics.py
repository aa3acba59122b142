"""Prometheus metrics: what one gateway process counts, and the listener that serves them.

Two kinds of numbers:

* **Counted as they happen** by the `GatewayMetrics` the gateway owns (`Gateway.metrics`: one
  per process, built by `server.run_server`, with its own `CollectorRegistry`, never
  prometheus_client's global one): requests by surface, route,
  status and refusal reason; latency to the upstream's first byte and in total; tokens by
  tenant; streams in flight; backend attempt failures and failovers; store and counter-store
  errors. The request figures come from one finish hook (`observe_request`) that runs in the
  request's shielded settlement, after the last byte; the data plane itself only touches the
  streams gauge and, through `nzgw.ports.ForwardingMetrics`, the failure and failover counters
  and the queue wait. Each is a dict lookup and an
  increment under prometheus_client's lock: a few microseconds per request. The labelled
  children of the request path are looked up once per label combination and kept (`_children`):
  prometheus_client's `labels()` validates and locks on every call, ~3 µs each.
* **Read at scrape time** by the listener's `LiveCollector`: backend health from the routing
  registry's current snapshot, and the flushers' backlogs (rows waiting to be written).

The listener (`serve_metrics`) is a deliberately small HTTP/1.1 server on its own socket
(`NZGW_METRICS_BIND`), never the public port: one `GET /metrics` per connection, then close.
It runs in the root nursery beside the other services, so it answers during a drain too.

With `NZGW_WORKERS=N` every worker is its own process with its own numbers: worker *i* listens
on the metrics port + *i* (see `nzgw.cli.workers`), and `nzgw_worker_info` names its pid.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar, cast

import h11
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nzgw import __version__
from nzgw.core import paths
from nzgw.core.record import RequestInfo
from nzgw.http.listen import Bound
from nzgw.http.pump import Pump
from nzgw.ports import ConflictError, CountersUnavailableError, NotFoundError, StoreError
from nzgw.services.registry import Snapshot
from nzgw.services.slots import SlotPool

log = logging.getLogger("nzgw.metrics")

T = TypeVar("T")

# Seconds. Generations run for minutes; health checks and refusals take milliseconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Seconds to the first upstream byte: a loaded model answers in well under a second, a cold
# one may take the whole NZGW_UPSTREAM_FIRST_BYTE_TIMEOUT (300 s by default) to load.
FIRST_BYTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# A scrape that has not sent its request and read the answer in this time is dropped.
SCRAPE_TIMEOUT = 10.0
_MAX_REQUEST_HEAD = 16 * 1024


class GatewayMetrics:
    """Everything one gateway counts (`worker`: its index under NZGW_WORKERS, if any)."""

    def __init__(
        self, *, pid: int | None = None, worker: int | None = None, tenant_labels: bool = True
    ) -> None:
        # False (NZGW_METRICS_TENANT_LABELS): token totals under tenant "_all", no tenant names.
        self.tenant_labels = tenant_labels
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nzgw_requests",
            "Requests answered, by API surface, route, status and refusal reason "
            "('' when the request was not refused)",
            ["surface", "route", "status", "refusal"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "nzgw_request_duration_seconds",
            "Time from the request's arrival to its last byte (or the client's disconnect)",
            ["surface", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.first_byte = Histogram(
            "nzgw_upstream_first_byte_seconds",
            "Time from the request's arrival to the first byte from the backend that answered "
            "(authentication, admission and failover included)",
            ["surface", "route"],
            buckets=FIRST_BYTE_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "nzgw_tokens",
            "Tokens of answered requests by tenant, as the backend reported them (or as "
            "estimated when it did not); kind is prompt or completion",
            ["tenant", "kind"],
            registry=registry,
        )
        self.streams_in_flight = Gauge(
            "nzgw_streams_in_flight",
            "Streamed answers being relayed to clients now",
            registry=registry,
        )
        self.backend_failures = Counter(
            "nzgw_backend_failures",
            "Backend attempts that failed before the first byte (the request moved on to the "
            "next backend, if any); reason: transport, timeout, http_5xx, not_found, empty",
            ["backend", "reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "nzgw_queue_wait_seconds",
            "Time requests waited in the fair queue for a backend slot, by tenant",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.auth_events = Counter(
            "nzgw_auth_events",
            "What authentication did: cache_hit, cache_miss, verification (an Argon2id run, "
            "dummy ones included), failure, throttled, rehash, busy (cold-verification queue full)",
            ["event"],
            registry=registry,
        )
        self.failovers = Counter(
            "nzgw_failovers",
            "Requests answered by a backend other than the first one tried",
            registry=registry,
        )
        self.store_errors = Counter(
            "nzgw_store_errors",
            "Store (database) operations that failed, by operation",
            ["operation"],
            registry=registry,
        )
        self.counters_errors = Counter(
            "nzgw_counters_errors",
            "Counter-store (Redis or in-process) operations that failed, by operation",
            ["operation"],
            registry=registry,
        )
        # The process these numbers come from (its index under NZGW_WORKERS, if any).
        Gauge(
            "nzgw_worker_info",
            "Always 1; the labels identify the process these numbers come from",
            ["pid", "worker", "version"],
            registry=registry,
        ).labels(str(pid or os.getpid()), "" if worker is None else str(worker), __version__).set(1)
        ProcessCollector(registry=registry)
        # Labelled children by (metric, label values): `labels()` once per combination.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # --- request path -------------------------------------------------------------------------

    async def observe_request(self, info: RequestInfo) -> None:
        """The finish hook: one finished request's figures (runs shielded, after the last byte)."""
        decision = info.decision
        surface = decision.surface.value
        route = (
            decision.route.value
            if isinstance(decision, paths.Route | paths.MethodNotAllowed)
            else "-"
        )
        self._child(self.requests, surface, route, str(info.status), info.refusal or "").inc()
        if info.finished is not None:
            duration = self._child(self.request_duration, surface, route)
            duration.observe(info.finished - info.started)
        if info.first_byte is not None:
            first_byte = self._child(self.first_byte, surface, route)
            first_byte.observe(info.first_byte - info.started)
        usage = info.usage
        tenant = info.tenant_name
        if tenant is not None:
            tenant = self.tenant_label(tenant)
        if usage is not None and tenant is not None:
            if usage.prompt_tokens:
                self._child(self.tokens, tenant, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self._child(self.tokens, tenant, "completion").inc(usage.completion_tokens)

    def tenant_label(self, tenant: str) -> str:
        """The `tenant` label value: the name, or `_all` when tenant labels are off."""
        return tenant if self.tenant_labels else ALL_TENANTS

    def backend_failed(self, backend: str, reason: str) -> None:
        """A backend attempt failed before its first byte (data plane, failover loop)."""
        self.backend_failures.labels(backend, reason).inc()

    def failed_over(self) -> None:
        """A request was answered by a backend other than the first one tried."""
        self.failovers.inc()

    def auth_event(self, event: str) -> None:
        """The authenticator's report (`nzgw.services.identity.AuthEvent`)."""
        self._child(self.auth_events, event).inc()

    def queue_waited(self, tenant: str, seconds: float) -> None:
        """A request got a backend slot after waiting `seconds` in the fair queue."""
        self._child(self.queue_wait, self.tenant_label(tenant)).observe(seconds)

    # --- adapters -----------------------------------------------------------------------------

    def watch_store(self, store: T) -> T:
        """`store`, with every failed operation counted (not-found and conflict answers are
        answers, not failures)."""
        return _count_failures(
            store, self.store_errors, StoreError, ignore=(NotFoundError, ConflictError)
        )

    def watch_counters(self, counters: T) -> T:
        """`counters`, with every operation that raised `CountersUnavailableError` counted."""
        return _count_failures(counters, self.counters_errors, CountersUnavailableError)


# `*_created` series (a timestamp per counter child) only double the scrape for nzgw's uses.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _count_failures(
    target: T,
    counter: Counter,
    counted: type[BaseException],
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    return cast(T, _FailureCounting(target, counter, counted, ignore))


class _FailureCounting:
    """Delegates every attribute to `target`; its coroutine methods count their failures.

    The wrapped method is cached on the instance at first use, so after that an attribute
    lookup costs what it costs on the target, and a call one extra coroutine frame.
    """

    def __init__(
        self,
        target: Any,
        counter: Counter,
        counted: type[BaseException],
        ignore: tuple[type[BaseException], ...],
    ) -> None:
        self._target = target
        self._counter = counter
        self._counted = counted
        self._ignore = ignore

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        child = self._counter.labels(name)
        counted, ignore = self._counted, self._ignore
        method = cast(Callable[..., Awaitable[Any]], value)

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except counted as exc:
                if not isinstance(exc, ignore):
                    child.inc()
                raise

        self.__dict__[name] = call
        return call

    def __repr__(self) -> str:
        return f"<failures counted: {self._target!r}>"


# --- read at scrape time --------------------------------------------------------------------------


class BackendHealth(Protocol):
    """What the scrape reads of the routing registry (`nzgw.services.registry.Registry`)."""

    @property
    def snapshot(self) -> Snapshot: ...

    def in_rotation(self, backend_name: str) -> bool: ...


def track_pump(live: LiveCollector, pump: Pump) -> None:
    """The relay pump's counters (`nzgw.http.pump`), read at every scrape."""
    live.track_counter(
        "nzgw_relay_pump_carries",
        "Times a committed stream was handed to the relay pump's thread",
        lambda: pump.carried_total,
    )
    live.track_counter(
        "nzgw_relay_pump_frames",
        "Frames the relay pump wrote to clients",
        lambda: pump.frames_total,
    )
    live.track_counter(
        "nzgw_relay_pump_uncopied",
        "Streams left in their request's task because no file descriptor was left for the "
        "pump's copies of their sockets (raise the open-file limit)",
        lambda: pump.uncopied_total,
    )


class LiveCollector:
    """Gauges computed when scraped: backend health and the flushers' backlogs."""

    def __init__(
        self,
        backends: BackendHealth | None = None,
        backlog: Mapping[str, Callable[[], int]] | None = None,
    ) -> None:
        self._backends = backends
        self._backlog = dict(backlog or {})
        self._counters: dict[str, tuple[str, Callable[[], int]]] = {}
        self._labelled: dict[
            str, tuple[str, list[str], Callable[[], Mapping[tuple[str, ...], int]]]
        ] = {}
        self._slots: SlotPool | None = None
        self._slot_tenant_labels = True

    def track_counter(self, name: str, documentation: str, value: Callable[[], int]) -> None:
        """Report `value()` as the counter `name` (without `_total`) at every scrape."""
        self._counters[name] = (documentation, value)

    def track_labelled_counter(
        self,
        name: str,
        documentation: str,
        labels: list[str],
        values: Callable[[], Mapping[tuple[str, ...], int]],
    ) -> None:
        """Report `values()` (label values → count) as the counter `name` at every scrape."""
        self._labelled[name] = (documentation, labels, values)

    def track_backlog(self, queue: str, size: Callable[[], int]) -> None:
        """Report `size()` as `nzgw_flush_backlog{queue=...}` at every scrape."""
        self._backlog[queue] = size

    def track_slots(self, pool: SlotPool, *, tenant_labels: bool = True) -> None:
        """Report the fair queue's depth per tenant (all tenants as one `_all` without tenant
        labels) and each backend's slots at every scrape."""
        self._slots = pool
        self._slot_tenant_labels = tenant_labels

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self._backends is not None:
            yield from self._backend_families(self._backends)
        if self._slots is not None:
            yield from self._slot_families(self._slots, self._slot_tenant_labels)
        backlog = GaugeMetricFamily(
            "nzgw_flush_backlog",
            "Rows waiting to be written to the store, by queue (usage aggregate, audit rows)",
            labels=["queue"],
        )
        for name, size in self._backlog.items():
            try:
                backlog.add_metric([name], size())
            except Exception:  # a scrape must not fail because one gauge could not be read
                log.exception("reading the %s backlog failed", name)
        yield backlog
        for name, (documentation, value) in self._counters.items():
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], value())
            yield family
        for name, (documentation, labels, values) in self._labelled.items():
            family = CounterMetricFamily(name, documentation, labels=labels)
            for label_values, count in sorted(values().items()):
                family.add_metric(list(label_values), count)
            yield family

    @staticmethod
    def _slot_families(pool: SlotPool, tenant_labels: bool) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "nzgw_queue_depth",
            "Requests waiting in the fair queue for a backend slot now, by tenant",
            labels=["tenant"],
        )
        waiting_by_tenant = pool.waiting_by_label()
        if not tenant_labels:
            waiting_by_tenant = {ALL_TENANTS: sum(waiting_by_tenant.values())}
        for tenant, waiting in sorted(waiting_by_tenant.items()):
            depth.add_metric([tenant], waiting)
        busy = GaugeMetricFamily(
            "nzgw_backend_slots_busy",
            "Slots of the backend held by requests now",
            labels=["backend"],
        )
        slots = GaugeMetricFamily(
            "nzgw_backend_slots", "Slots of the backend (`parallel`)", labels=["backend"]
        )
        for name in pool.backends:
            busy.add_metric([name], pool.in_flight(name))
            slots.add_metric([name], pool.slots(name))
        yield from (depth, busy, slots)

    @staticmethod
    def _backend_families(health: BackendHealth) -> Iterator[GaugeMetricFamily]:
        snapshot = health.snapshot
        up = GaugeMetricFamily(
            "nzgw_backend_up",
            "1 when the backend is in rotation (its last discovery poll was healthy and its "
            "circuit breaker is closed), else 0",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "nzgw_backend_healthy",
            "1 when the backend's last discovery poll succeeded, else 0",
            labels=["backend"],
        )
        models = GaugeMetricFamily(
            "nzgw_backend_models",
            "Models the backend hosts, as of its last successful poll",
            labels=["backend"],
        )
        latency = GaugeMetricFamily(
            "nzgw_backend_poll_seconds",
            "How long the backend's last successful discovery poll took",
            labels=["backend"],
        )
        for state in snapshot.backends:
            up.add_metric([state.name], 1.0 if health.in_rotation(state.name) else 0.0)
            healthy.add_metric([state.name], 1.0 if state.healthy else 0.0)
            models.add_metric([state.name], len(state.models))
            if state.latency is not None:
                latency.add_metric([state.name], state.latency)
        yield from (up, healthy, models, latency)


class _Exposition:
    """The process's counted metrics followed by the listener's live gauges."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Any]:
        for collector in self._collectors:
            yield from collector.collect()


def render(metrics: GatewayMetrics, live: LiveCollector | None = None) -> bytes:
    """The text exposition format of everything, as a scrape returns it."""
    collectors: list[Collector] = [metrics.registry]
    if live is not None:
        collectors.append(live)
    return generate_latest(_Exposition(*collectors))


# --- the listener -----------------------------------------------------------------------------


ALL_TENANTS = "_all"


async def serve_metrics(
    bind: str,
    *,
    token: str = "",
    metrics: GatewayMetrics,
    live: LiveCollector | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` on `bind` (host:port) until cancelled; never returns.

    `task_status.started(Bound)` once the socket listens (port 0 → the port chosen). Each
    connection gets one answer and is closed; a client that does not complete its scrape in
    `SCRAPE_TIMEOUT` seconds is dropped. Cancellation closes the listener and every connection.
    With a `token` (NZGW_METRICS_TOKEN), a scrape without `Authorization: Bearer <token>` gets
    401 and no metrics.
    """
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    sockname = listeners[0].socket.getsockname()
    handler = functools.partial(_serve_connection, metrics, live, token)
    log.info("metrics listening", extra={"metrics_bind": f"{sockname[0]}:{sockname[1]}"})
    task_status.started(Bound(sockname[0], sockname[1]))
    await trio.serve_listeners(handler, listeners)


async def _serve_connection(
    metrics: GatewayMetrics, live: LiveCollector | None, token: str, stream: trio.SocketStream
) -> None:
    async with stream:
        with trio.move_on_after(SCRAPE_TIMEOUT):
            with contextlib.suppress(
                h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await _answer(metrics, live, stream, token)


async def _answer(
    metrics: GatewayMetrics, live: LiveCollector | None, stream: trio.abc.Stream, token: str = ""
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_MAX_REQUEST_HEAD)
            if not data:
                return  # the client left before sending a whole request
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            break
        return
    target = event.target.split(b"?", 1)[0]
    extra: list[tuple[bytes, bytes]] = []
    if token and not _authorized(event.headers, token):
        status, body, content_type = 401, b"unauthorized\n", "text/plain; charset=utf-8"
        extra.append((b"www-authenticate", b"Bearer"))
    elif event.method not in (b"GET", b"HEAD"):
        status, body, content_type = 405, b"method not allowed\n", "text/plain; charset=utf-8"
    elif target != b"/metrics":
        status, body, content_type = 404, b"not found: try /metrics\n", "text/plain; charset=utf-8"
    else:
        status, body, content_type = 200, render(metrics, live), CONTENT_TYPE_LATEST
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    payload = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if event.method != b"HEAD":
        payload += conn.send(h11.Data(data=body)) or b""
    payload += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(payload)


def _authorized(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    expected = b"Bearer " + token.encode()
    presented = [value for name, value in headers if name == b"authorization"]
    return len(presented) == 1 and hmac.compare_digest(presented[0].strip(), expected)
