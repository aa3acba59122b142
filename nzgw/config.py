"""One frozen configuration value, built at the edge from the environment, `.env` and TOML.

Precedence, highest first: process environment, `.env` in the working directory (or the file
named by `NZGW_ENV_FILE`), the TOML file named by `NZGW_CONFIG`, the defaults below. Every
variable is declared once in `SETTINGS`; `.env.example` and the README table are checked
against it by a test, so documentation cannot drift from the code.

Invalid configuration raises `ConfigError` whose message names the variable; the CLI prints it
on one line and exits with status 2.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from nzgw.core.redact import MASK, redact


class ConfigError(Exception):
    """A configuration value is invalid. The message names the variable."""


# Ollama's own default for OLLAMA_NUM_PARALLEL: one request at a time per model.
DEFAULT_PARALLEL = 1


@attrs.frozen
class BackendConfig:
    name: str
    url: str
    auth_token: str = ""
    # Requests nzgw lets run on this backend at once (its slots); more wait in nzgw's fair queue.
    parallel: int = DEFAULT_PARALLEL
    # Smaller is tried first; backends sharing a priority share the load. None: list position.
    priority: int | None = None


@attrs.frozen
class Argon2Params:
    time_cost: int = 2
    memory_cost_kib: int = 19456
    parallelism: int = 1


@attrs.frozen
class Config:
    # Backends
    ollama_base_url: str
    ollama_auth_token: str
    ollama_parallel: int
    backends: tuple[BackendConfig, ...]
    # Storage
    database_url: str
    redis_url: str
    redis_cluster: bool
    migrate_on_start: bool
    # HTTP server
    bind: str
    workers: int
    min_open_files: int
    graceful_timeout: float
    keep_alive_timeout: float
    client_stall_timeout: float
    relay_pump: bool
    max_body_bytes: int
    body_timeout: float
    max_body_uploads_per_key: int
    max_body_uploads_per_client: int
    trusted_proxies: tuple[str, ...]
    metrics_bind: str
    metrics_token: str
    metrics_tenant_labels: bool
    # Upstream
    upstream_connect_timeout: float
    upstream_first_byte_timeout: float
    upstream_pool_size: int
    discovery_interval: float
    # Fair queue for backend slots
    queue_timeout: float
    queue_per_tenant: int
    queue_wait_header: bool
    # Identity
    argon2: Argon2Params
    argon2_max_concurrency: int
    auth_cache_ttl: float
    auth_fail_limit: int
    auth_queue_max: int
    auth_ipv6_prefix: int
    revocation_poll_interval: float
    # Limits
    default_max_tokens: int
    budget_timezone: str
    counters_timeout: float
    lease_ttl: float
    store_timeout: float
    # Audit
    audit_queue_max: int
    flush_interval: float
    audit_probes: bool
    spool_dir: str
    reconcile_interval: float
    # Logging
    log_format: str
    log_level: str

    @property
    def embedded_counters(self) -> bool:
        return not self.redis_url

    @property
    def effective_backends(self) -> tuple[BackendConfig, ...]:
        if self.backends:
            return self.backends
        return (
            BackendConfig(
                "default", self.ollama_base_url, self.ollama_auth_token, self.ollama_parallel
            ),
        )


# --- parsers ------------------------------------------------------------------------------------


def _str(raw: str) -> str:
    return raw


def _path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a directory")
    return raw


def _int(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _int_range(minimum: int, maximum: int) -> Callable[[str], int]:
    at_least = _int(minimum)

    def parse(raw: str) -> int:
        value = at_least(raw)
        if value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {raw!r}")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an http(s):// URL, got {raw!r}")
    return raw.rstrip("/")


def _database_url(raw: str) -> str:
    scheme = raw.split(":", 1)[0].lower()
    if scheme in {"postgresql", "postgres"}:
        if not urlsplit(raw).hostname and "host=" not in raw:
            raise ValueError(f"a postgresql:// URL needs a host, got {raw!r}")
        return raw
    if scheme == "sqlite":
        if not raw.startswith("sqlite:///") or len(raw) <= len("sqlite:///"):
            raise ValueError(f"expected sqlite:///path/to/file.db, got {raw!r}")
        return raw
    raise ValueError(f"unknown scheme {scheme!r}: use postgresql:// or sqlite:///")


def _redis_url(raw: str) -> str:
    if raw == "":
        return raw
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
        raise ValueError(f"expected redis://host:port[/db] or empty, got {raw!r}")
    return raw


def _bind(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {raw!r}")
    return raw


def _optional_bind(raw: str) -> str:
    return raw if raw == "" else _bind(raw)


def _backends(raw: str) -> tuple[BackendConfig, ...]:
    if raw.strip() == "":
        return ()
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(items, list):
        raise ValueError("expected a JSON list of {name, url, auth_token}")
    backends: list[BackendConfig] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"item {index}: expected an object with a non-empty 'name'")
        if not isinstance(item.get("url"), str):
            raise ValueError(f"item {index}: 'url' is missing")
        token = item.get("auth_token") or ""
        if not isinstance(token, str):
            raise ValueError(f"item {index}: 'auth_token' must be a string")
        try:
            url = _http_url(item["url"])
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None
        parallel = _backend_int(item, "parallel", index, minimum=1, default=DEFAULT_PARALLEL)
        priority = item.get("priority")
        if priority is not None:
            priority = _backend_int(item, "priority", index, minimum=0, default=0)
        backends.append(BackendConfig(item["name"], url, token, parallel, priority))
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ValueError("backend names must be unique")
    return tuple(backends)


def _backend_int(
    item: dict[str, Any], field: str, index: int, *, minimum: int, default: int
) -> int:
    value = item.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"item {index}: {field!r} must be a whole number >= {minimum}")
    return value


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    return parse


def _timezone(raw: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {raw!r}") from None
    return raw


@attrs.frozen
class Setting:
    env: str
    field: str
    parse: Callable[[str], Any]
    default: str
    doc: str
    secret: bool = False  # may hold a credential: never echoed in errors


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "OLLAMA_BASE_URL",
        "ollama_base_url",
        _http_url,
        "http://127.0.0.1:11434",
        "The Ollama server when OLLAMA_BACKENDS is empty",
        secret=True,
    ),
    Setting(
        "OLLAMA_AUTH_TOKEN",
        "ollama_auth_token",
        _str,
        "",
        "Bearer token sent to OLLAMA_BASE_URL (empty: none)",
        secret=True,
    ),
    Setting(
        "OLLAMA_PARALLEL",
        "ollama_parallel",
        _int(1),
        str(DEFAULT_PARALLEL),
        "Slots of the OLLAMA_BASE_URL backend: requests run on it at once "
        "(its OLLAMA_NUM_PARALLEL)",
    ),
    Setting(
        "OLLAMA_BACKENDS",
        "backends",
        _backends,
        "",
        'JSON list [{"name","url","auth_token","parallel","priority"}] in priority order '
        "(parallel: slots, default 1; priority: smaller first, default the list position); "
        'empty: one "default" backend from the three above',
        secret=True,
    ),
    Setting(
        "DATABASE_URL",
        "database_url",
        _database_url,
        "sqlite:///./var/nzgw.db",
        "Store: postgresql://user@host/db or sqlite:///path",
        secret=True,
    ),
    Setting(
        "REDIS_URL",
        "redis_url",
        _redis_url,
        "",
        "Counters: redis://host:port/db; empty: in-process counters (single process only)",
        secret=True,
    ),
    Setting(
        "NZGW_REDIS_CLUSTER",
        "redis_cluster",
        _bool,
        "false",
        "REDIS_URL names one node of a Redis Cluster (db 0); the others are discovered",
    ),
    Setting(
        "NZGW_MIGRATE_ON_START",
        "migrate_on_start",
        _bool,
        "false",
        "Apply pending schema migrations when `serve` starts",
    ),
    Setting("NZGW_BIND", "bind", _bind, "127.0.0.1:8080", "Public listener host:port"),
    Setting(
        "NZGW_WORKERS",
        "workers",
        _int(1),
        "1",
        "Gateway processes on the public port (needs REDIS_URL when > 1)",
    ),
    Setting(
        "NZGW_MIN_OPEN_FILES",
        "min_open_files",
        _int(0),
        "8192",
        "Open files each gateway process needs (~4 per concurrent stream: its two sockets and the "
        "relay pump's copies); start fails when the hard limit is lower (0: no check)",
    ),
    Setting(
        "NZGW_GRACEFUL_TIMEOUT",
        "graceful_timeout",
        _seconds,
        "30",
        "On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cut",
    ),
    Setting(
        "NZGW_KEEP_ALIVE_TIMEOUT",
        "keep_alive_timeout",
        _seconds,
        "5",
        "Idle keep-alive connections are closed after this many seconds",
    ),
    Setting(
        "NZGW_CLIENT_STALL_TIMEOUT",
        "client_stall_timeout",
        _seconds,
        "30",
        "A client that stops reading a response for this long is disconnected",
    ),
    Setting(
        "NZGW_RELAY_PUMP",
        "relay_pump",
        _bool,
        "true",
        "Carry streamed tokens in the relay pump's thread (false: in each request's task)",
    ),
    Setting(
        "NZGW_MAX_BODY_BYTES",
        "max_body_bytes",
        _int(1024),
        "33554432",
        "Largest accepted request body (413 beyond)",
    ),
    Setting(
        "NZGW_BODY_TIMEOUT",
        "body_timeout",
        _seconds,
        "30",
        "Seconds a request body may take to arrive whole (408 beyond; 0: no limit)",
    ),
    Setting(
        "NZGW_MAX_BODY_UPLOADS_PER_KEY",
        "max_body_uploads_per_key",
        _int(0),
        "16",
        "Requests of one key still sending their body at once (429 beyond; 0: no limit)",
    ),
    Setting(
        "NZGW_MAX_BODY_UPLOADS_PER_CLIENT",
        "max_body_uploads_per_client",
        _int(0),
        "64",
        "Requests from one client address still sending their body at once "
        "(429 beyond; 0: no limit)",
    ),
    Setting(
        "NZGW_TRUSTED_PROXIES",
        "trusted_proxies",
        _csv,
        "",
        "Comma-separated proxy addresses whose X-Forwarded-For is believed",
    ),
    Setting(
        "NZGW_METRICS_BIND",
        "metrics_bind",
        _optional_bind,
        "",
        "Prometheus /metrics listener host:port (empty: off)",
    ),
    Setting(
        "NZGW_METRICS_TOKEN",
        "metrics_token",
        _str,
        "",
        "Bearer token a /metrics scrape must send (empty: none)",
        secret=True,
    ),
    Setting(
        "NZGW_METRICS_TENANT_LABELS",
        "metrics_tenant_labels",
        _bool,
        "true",
        "Label token totals with tenant names (false: one series for all tenants)",
    ),
    Setting(
        "NZGW_UPSTREAM_CONNECT_TIMEOUT",
        "upstream_connect_timeout",
        _seconds,
        "5",
        "Seconds to connect to a backend",
    ),
    Setting(
        "NZGW_UPSTREAM_FIRST_BYTE_TIMEOUT",
        "upstream_first_byte_timeout",
        _seconds,
        "300",
        "Seconds a backend may take to its first byte (model load included) before failover",
    ),
    Setting(
        "NZGW_UPSTREAM_POOL_SIZE",
        "upstream_pool_size",
        _int(1),
        "256",
        "Pooled connections per backend",
    ),
    Setting(
        "NZGW_DISCOVERY_INTERVAL",
        "discovery_interval",
        _seconds,
        "10",
        "Seconds between backend discovery rounds",
    ),
    Setting(
        "NZGW_QUEUE_TIMEOUT",
        "queue_timeout",
        _seconds,
        "60",
        "Seconds a request may wait for a backend slot before it is answered 503 with Retry-After",
    ),
    Setting(
        "NZGW_QUEUE_PER_TENANT",
        "queue_per_tenant",
        _int(0),
        "512",
        "Requests one tenant may have waiting for backend slots (429 beyond)",
    ),
    Setting(
        "NZGW_QUEUE_WAIT_HEADER",
        "queue_wait_header",
        _bool,
        "true",
        "Send X-Queue-Wait-Ms (milliseconds waited for a backend slot) on model answers",
    ),
    Setting("NZGW_ARGON2_TIME_COST", "argon2.time_cost", _int(1), "2", "Argon2id iterations"),
    Setting(
        "NZGW_ARGON2_MEMORY_KIB",
        "argon2.memory_cost_kib",
        _int(8),
        "19456",
        "Argon2id memory in KiB",
    ),
    Setting("NZGW_ARGON2_PARALLELISM", "argon2.parallelism", _int(1), "1", "Argon2id lanes"),
    Setting(
        "NZGW_ARGON2_MAX_CONCURRENCY",
        "argon2_max_concurrency",
        _int(1),
        "2",
        "Argon2id verifications running at once (worker threads)",
    ),
    Setting(
        "NZGW_AUTH_CACHE_TTL",
        "auth_cache_ttl",
        _seconds,
        "60",
        "Seconds a verified key stays in the in-memory cache",
    ),
    Setting(
        "NZGW_AUTH_FAIL_LIMIT",
        "auth_fail_limit",
        _int(1),
        "20",
        "Failed authentications per client address per minute before throttling",
    ),
    Setting(
        "NZGW_AUTH_QUEUE_MAX",
        "auth_queue_max",
        _int(0),
        "64",
        "Cold key verifications (Argon2id) that may wait for a thread; beyond: 503 + Retry-After",
    ),
    Setting(
        "NZGW_AUTH_IPV6_PREFIX",
        "auth_ipv6_prefix",
        _int_range(1, 128),
        "64",
        "IPv6 prefix length that counts as one client address for the failure throttle",
    ),
    Setting(
        "NZGW_REVOCATION_POLL_INTERVAL",
        "revocation_poll_interval",
        _seconds,
        "0.5",
        "Seconds between checks of the store's revocation epoch",
    ),
    Setting(
        "NZGW_DEFAULT_MAX_TOKENS",
        "default_max_tokens",
        _int(1),
        "4096",
        "Output cap set on requests that give none (bounds the token reservation)",
    ),
    Setting(
        "NZGW_BUDGET_TIMEZONE",
        "budget_timezone",
        _timezone,
        "UTC",
        "Time zone of daily and monthly budget periods",
    ),
    Setting(
        "NZGW_COUNTERS_TIMEOUT",
        "counters_timeout",
        _seconds,
        "0.5",
        "Seconds the counter store may stay silent before a request is refused (503)",
    ),
    Setting(
        "NZGW_LEASE_TTL",
        "lease_ttl",
        _seconds,
        "30",
        "Seconds a concurrency lease outlives its process (refreshed while the request runs)",
    ),
    Setting(
        "NZGW_STORE_TIMEOUT",
        "store_timeout",
        _seconds,
        "5",
        "Seconds a store call on the request path may take before the request is refused (503)",
    ),
    Setting(
        "NZGW_AUDIT_QUEUE_MAX",
        "audit_queue_max",
        _int(1),
        "100000",
        "Audit rows held while the store is unreachable before requests are refused",
    ),
    Setting(
        "NZGW_FLUSH_INTERVAL",
        "flush_interval",
        _seconds,
        "2",
        "Seconds between flushes of usage and audit rows to the store",
    ),
    Setting(
        "NZGW_AUDIT_PROBES",
        "audit_probes",
        _bool,
        "false",
        "Also audit health probes (GET /healthz, /readyz); by default they leave no audit row",
    ),
    Setting(
        "NZGW_SPOOL_DIR",
        "spool_dir",
        _path,
        "var/spool",
        "Directory of the local spool: usage and audit rows the store could not take, written "
        "to it at the next start (keep it on a persistent volume)",
    ),
    Setting(
        "NZGW_RECONCILE_INTERVAL",
        "reconcile_interval",
        _seconds,
        "300",
        "Seconds between comparisons of the budget counters with the usage ledger (0: never)",
    ),
    Setting("NZGW_LOG_FORMAT", "log_format", _choice("json", "text"), "text", "Log line format"),
    Setting(
        "NZGW_LOG_LEVEL",
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Log level",
    ),
)


def parse_env_file(text: str) -> dict[str, str]:
    """Parse a `.env` file: `NAME=value` lines, `#` comments, optional quotes, `export`."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        stripped = stripped.removeprefix("export ").strip()
        name, sep, value = stripped.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f".env line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def _toml_values(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"NZGW_CONFIG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"NZGW_CONFIG: {path}: {exc}") from None
    known = {s.env for s in SETTINGS}
    values: dict[str, str] = {}
    for key, value in data.items():
        name = key.upper()
        if name not in known:
            raise ConfigError(f"NZGW_CONFIG: {path}: unknown setting {key!r}")
        if isinstance(value, bool):
            values[name] = "true" if value else "false"
        elif isinstance(value, list):
            values[name] = (
                json.dumps(value) if name == "OLLAMA_BACKENDS" else ",".join(str(v) for v in value)
            )
        else:
            values[name] = str(value)
    return values


def load_config(
    environ: Mapping[str, str] | None = None, *, cwd: str | Path | None = None
) -> Config:
    """Build the configuration. Raises `ConfigError` naming the first invalid variable."""
    env = dict(os.environ if environ is None else environ)
    base = Path(cwd) if cwd is not None else Path.cwd()
    merged: dict[str, str] = {}
    if env.get("NZGW_CONFIG"):
        merged.update(_toml_values(env["NZGW_CONFIG"]))
    env_file = Path(env.get("NZGW_ENV_FILE") or base / ".env")
    if env_file.is_file():
        merged.update(parse_env_file(env_file.read_text()))
    merged.update(env)
    return config_from_values(merged)


def config_from_values(values: Mapping[str, str]) -> Config:
    fields: dict[str, Any] = {}
    argon2: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = values.get(setting.env, setting.default)
        try:
            value = setting.parse(raw.strip() if setting.env != "OLLAMA_AUTH_TOKEN" else raw)
        except ValueError as exc:
            raise ConfigError(f"{setting.env}: {_shown(setting, raw, str(exc))}") from None
        if setting.field.startswith("argon2."):
            argon2[setting.field.removeprefix("argon2.")] = value
        else:
            fields[setting.field] = value
    config = Config(argon2=Argon2Params(**argon2), **fields)
    if config.lease_ttl <= 0:
        raise ConfigError("NZGW_LEASE_TTL: must be more than 0 seconds")
    if config.redis_cluster and config.embedded_counters:
        raise ConfigError("NZGW_REDIS_CLUSTER: needs REDIS_URL (a node of the cluster)")
    if config.workers > 1 and config.embedded_counters:
        raise ConfigError(
            "NZGW_WORKERS: more than one worker needs REDIS_URL "
            "(in-process counters cannot be shared between processes)"
        )
    return config


def _shown(setting: Setting, raw: str, message: str) -> str:
    """An error message fit for logs: credentials redacted; a secret setting's value never
    shown, not even in part."""
    if setting.secret:
        for value in {raw, raw.strip()}:
            if len(value) >= 4:
                message = message.replace(repr(value), repr(MASK)).replace(value, MASK)
    return redact(message)


def test_config(**overrides: Any) -> Config:
    """The defaults with some fields replaced; for tests and tools, never for `serve`."""
    return attrs.evolve(config_from_values({}), **overrides)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
