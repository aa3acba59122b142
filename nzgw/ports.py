"""The ports: Trio-flavoured interfaces that `http` and `services` use, adapters implement.

Every method is a Trio coroutine; none takes a timeout (callers wrap calls in
`trio.fail_after` / `move_on_after`). Adapters translate their library's exceptions into the
errors below and nothing above the adapters catches a library exception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol

import attrs

from nzgw.core.audit import AuditRow, PromptRecord
from nzgw.core.models import ApiKey, Budgets, Limits, Principal, Status, Tenant
from nzgw.core.record import RequestInfo

WallClock = Callable[[], datetime]
"""Wall-clock time for what is dated (expiry, audit rows, budget days); tests pass their own."""


def utc_now() -> datetime:
    """The one production `WallClock`."""
    return datetime.now(UTC)


class StoreError(Exception):
    """The store failed (unreachable, timed out, or refused the statement)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached."""


class NotFoundError(StoreError):
    """The named tenant or key does not exist."""


class ConflictError(StoreError):
    """A unique name or prefix is taken already, or the change is not allowed (revoked key)."""


class KeyNameTakenError(ConflictError):
    """Another key of the tenant (not revoked) has this name already."""


class CountersUnavailableError(Exception):
    """The counter store could not answer: the request must be refused (fail closed)."""


class UpstreamError(Exception):
    """A backend failed at the transport level (refused, reset, protocol error, timeout)."""


class UpstreamResponse(Protocol):
    """An open backend response; `aclose` it always (closing early tells Ollama to stop)."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None: ...

    async def receive_some(self) -> bytes:
        """The next chunk as received; `b""` at the end. Raises `UpstreamError`."""
        ...

    async def read_all(self, limit: int) -> bytes: ...

    async def aclose(self) -> None: ...


class RawBody(Protocol):
    """An upstream body whose raw bytes another thread may read off its socket: the relay pump
    (`nzgw.http.pump`, docs/ARCHITECTURE.md "The relay pump"). An `UpstreamResponse` offers one
    through an optional `raw_body()` method (`raw_body_of`)."""

    def pump_fd(self) -> int | None:
        """The socket to read from now, or None (TLS, not chunked, ended, failed)."""
        ...

    def feed_nowait(self, raw: bytes) -> bytes:
        """The body bytes decoded from `raw` (read off `pump_fd`). What ends the body (its last
        chunk, malformed framing) is left for the next `receive_some` to report."""
        ...


def raw_body_of(response: object) -> RawBody | None:
    """The response's `RawBody`, if it offers one now."""
    offer: Callable[[], RawBody | None] | None = getattr(response, "raw_body", None)
    return offer() if offer is not None else None


class Backend(Protocol):
    """One Ollama server. Its name and URL are never shown to clients."""

    name: str
    url: str

    async def open(
        self,
        method: bytes,
        path: bytes,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> UpstreamResponse: ...

    async def get_json(self, path: str, *, limit: int = ...) -> Any: ...


class PolledBackend(Protocol):
    """What discovery and probes need of a backend (`Backend` has it; fakes in tests)."""

    @property
    def name(self) -> str: ...

    async def get_json(self, path: str) -> Any:
        """GET `path`, return the decoded JSON. Raises `UpstreamError`. Takes no timeout."""
        ...


# --- Services as the HTTP layer sees them --------------------------------------------------------
#
# A Protocol whose implementation carries the same role name ends in `Port` (`RegistryPort` is
# implemented by `services.registry.Registry`); see docs/ARCHITECTURE.md ("Ports").


class AuthenticatorPort(Protocol):
    """Checks a presented API key (`services.identity.Authenticator`)."""

    async def authenticate(self, presented: str, client_addr: str) -> Principal: ...


class RegistryPort(Protocol):
    """Which backends host which model, and their health (`services.registry.Registry`)."""

    def ready(self) -> bool: ...

    def hosts(self, model: str) -> bool: ...

    def candidates(self, model: str) -> Sequence[Backend]: ...

    def candidate_tiers(self, model: str) -> Sequence[Sequence[Backend]]: ...

    def note_routed(self, backend_name: str, model: str) -> None: ...

    def record_failure(self, backend_name: str) -> None: ...

    def record_success(self, backend_name: str) -> None: ...

    def list_models(self, allowed: Callable[[str], bool]) -> list[dict[str, Any]]: ...

    def list_loaded(self, allowed: Callable[[str], bool]) -> list[dict[str, Any]]: ...


class AuditGatePort(Protocol):
    """The audit log as the request path sees it: `refusing` while its queue is full
    (`services.audit.AuditLog`)."""

    refusing: bool


class Ticket(Protocol):
    """An admitted request's reservation (`http.limits.LimiterAdmitter`). `settle` runs once,
    shielded, at the very end."""

    headers: dict[str, str]
    refresh_every: float  # seconds; a long stream extends its lease this often

    async def refresh(self) -> None:
        """Extend the concurrency lease (best effort, bounded, never raises)."""
        ...

    async def settle(self, info: RequestInfo) -> None: ...


class Admitter(Protocol):
    async def admit(
        self, principal: Principal, *, model: str, reserve_tokens: int, info: RequestInfo
    ) -> Ticket:
        """Reserve, or raise `Refused` (429 over a limit, 503 when the counters are down)."""
        ...


class ForwardingMetrics(Protocol):
    """What the data plane counts while it forwards (`http.metrics.GatewayMetrics`)."""

    def backend_failed(self, backend: str, reason: str) -> None: ...

    def failed_over(self) -> None: ...

    def queue_waited(self, tenant: str, seconds: float) -> None: ...


# --- Store: tenants, keys, usage ledger -----------------------------------------------------------


@attrs.frozen
class TenantChanges:
    """Fields to change on a tenant; `None` leaves a field as it is."""

    name: str | None = None
    status: Status | None = None
    limits: Limits | None = None
    budgets: Budgets | None = None
    allowed_models: tuple[str, ...] | None = None
    allow_model_controls: bool | None = None
    weight: int | None = None  # share of saturated backend slots (1..1000)


@attrs.frozen
class KeyChanges:
    """Fields to change on a key; `None` leaves a field as it is."""

    name: str | None = None
    status: Status | None = None
    limits: Limits | None = None
    budgets: Budgets | None = None
    allowed_models: tuple[str, ...] | None = None
    log_prompts: bool | None = None
    prompt_ttl_seconds: int | None = None
    expires_at: datetime | None = None
    key_hash: str | None = None  # rehash-on-verify when Argon2 parameters changed
    clear_prompt_ttl: bool = False  # set prompt_ttl_seconds to None (no expiry of prompt logs)
    clear_expires_at: bool = False  # set expires_at to None (the key never expires)


@attrs.frozen
class NewKey:
    tenant_id: int
    name: str
    prefix: str
    key_hash: str
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    allowed_models: tuple[str, ...] = ()
    log_prompts: bool = False
    prompt_ttl_seconds: int | None = None
    expires_at: datetime | None = None


@attrs.frozen
class UsageRow:
    """Settled usage aggregated per (day, tenant, key, model); added to the ledger."""

    day: date  # calendar day in the budget time zone
    tenant_id: int
    key_id: int
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    refusals: int = 0


@attrs.frozen
class UsageTotals:
    """Tokens charged so far, for rebuilding budget counters: (day, month, lifetime)."""

    day_tokens: int = 0
    month_tokens: int = 0
    lifetime_tokens: int = 0

    def minus(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.day_tokens - other.day_tokens,
            self.month_tokens - other.month_tokens,
            self.lifetime_tokens - other.lifetime_tokens,
        )


# --- Store: audit log, prompt logs, usage reports (docs/audit.md) ---------------------------------


@attrs.frozen
class ChainHead:
    """The last row written of one audit chain (recorded with every batch)."""

    chain_id: str
    started_at: datetime
    seq: int
    hash: str
    updated_at: datetime | None = None
    recorded: bool = True  # False: rows of this chain exist, its head record does not


@attrs.frozen
class UsageBatch:
    """Usage rows sealed for the ledger under one id: every write of it (a retry after an
    unknown outcome, a spool replay at the next start) adds it to the ledger once."""

    id: str
    rows: tuple[UsageRow, ...]


@attrs.frozen
class AuditBatch:
    """Audit rows sealed into a chain together, their prompt logs, and the chain head after
    them: one `append_audit` call, idempotent (the store skips (chain_id, seq) it has)."""

    rows: tuple[AuditRow, ...]
    prompts: tuple[PromptRecord, ...]
    head: ChainHead

    @property
    def key(self) -> str:
        return f"audit:{self.head.chain_id}:{self.head.seq}"


@attrs.frozen
class AuditQuery:
    """Filters of an audit listing; every one optional. `since` inclusive, `until` exclusive;
    statuses inclusive. Newest first, at most `limit` rows."""

    tenant_id: int | None = None
    key_prefix: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status_min: int | None = None
    status_max: int | None = None
    limit: int = 50


@attrs.frozen
class PromptLog:
    """A stored prompt log with the key prefix of its audit row."""

    record: PromptRecord
    key_prefix: str | None


UsageGrouping = Literal["day", "month", "model"]


@attrs.frozen
class UsageQuery:
    """A usage report: ledger days `since` (inclusive) to `until` (exclusive), grouped `by`."""

    by: UsageGrouping = "day"
    tenant_id: int | None = None
    key_id: int | None = None
    since: date | None = None
    until: date | None = None


@attrs.frozen
class UsageReportRow:
    """`group`: the day (YYYY-MM-DD), month (YYYY-MM) or model. Requests and tokens from the
    usage ledger; refusals from the audit log (every refused request of a tenant's keys)."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    refusals: int


class AuditStore(Protocol):
    """The audit part of the Store (listed apart so services can ask for just this)."""

    async def append_audit(
        self,
        rows: Sequence[AuditRow],
        prompts: Sequence[PromptRecord] = (),
        heads: Sequence[ChainHead] = (),
    ) -> None:
        """Write a batch in ONE transaction: the rows (a multi-row insert), their prompt logs,
        the chains' new heads. Idempotent: a (chain_id, seq) already stored is skipped, and a
        head never moves back, so a batch whose outcome was unknown can simply be written again.
        """
        ...

    async def list_audit(self, query: AuditQuery) -> list[AuditRow]:
        """Rows matching `query`, newest first."""
        ...

    async def audit_chains(self) -> list[ChainHead]:
        """Every chain, oldest first: the recorded heads, and for rows whose chain has no head
        record, a `ChainHead` with `recorded=False` (seq 0, hash "")."""
        ...

    async def audit_chain_rows(
        self, chain_id: str, *, after_seq: int, limit: int
    ) -> list[AuditRow]:
        """The chain's rows with seq > `after_seq`, in seq order, at most `limit`."""
        ...

    async def get_prompts(self, request_id: str, *, now: datetime) -> list[PromptLog]:
        """The unexpired prompt logs of a request id (normally one)."""
        ...

    async def purge_prompts(self, now: datetime, *, limit: int) -> int:
        """Delete at most `limit` prompt logs expired at `now` (one statement); return how many."""
        ...

    async def usage_report(self, query: UsageQuery) -> list[UsageReportRow]:
        """Ledger totals and audit refusals per group, in group order."""
        ...


@attrs.frozen
class Change:
    """One entry of the change feed: a key (`key_id`) or a whole tenant (`key_id` None)."""

    seq: int
    tenant_id: int
    key_id: int | None


@attrs.frozen
class ChangeFeed:
    """What changed after a position: `epoch` is the new position; `changes` in seq order, or
    None when the store cannot tell (too many, pruned, or the epoch moved back): then treat
    everything as changed."""

    epoch: int
    changes: tuple[Change, ...] | None


class Store(AuditStore, Protocol):
    """Tenants, keys and the usage ledger; the audit log (`AuditStore`). Errors: the
    `StoreError` family above, nothing else.

    Every change to a tenant or a key (create, update, revoke) bumps the revocation epoch and
    records what changed in the change feed in the same transaction, except an update that only
    replaces `key_hash` (rehash-on-verify).
    A revoked key is final: any other change to it raises `ConflictError`.
    """

    async def ping(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations under a lock; return the names applied now."""
        ...

    async def pending_migrations(self) -> list[str]:
        """Names of the migrations not applied yet (all of them on an empty database)."""
        ...

    async def create_tenant(
        self,
        name: str,
        *,
        limits: Limits = ...,
        budgets: Budgets = ...,
        allowed_models: tuple[str, ...] = ...,
        weight: int = ...,
    ) -> Tenant: ...

    async def get_tenant(self, name_or_id: str | int) -> Tenant:
        """By name (str) or id (int); `NotFoundError` when there is none."""
        ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, name_or_id: str | int, changes: TenantChanges) -> Tenant: ...

    async def create_key(self, new: NewKey) -> ApiKey:
        """`NotFoundError`: no such tenant; `KeyNameTakenError`: another key of the tenant that
        is not revoked has this name; `ConflictError`: the prefix is taken."""
        ...

    async def find_key(self, prefix: str) -> Principal | None:
        """The key with this prefix and its tenant, or None."""
        ...

    async def list_keys(self, tenant: str | int | None = None) -> list[ApiKey]:
        """All keys, or one tenant's (by name or id; `NotFoundError` if unknown), by id."""
        ...

    async def update_key(self, prefix: str, changes: KeyChanges) -> ApiKey: ...

    async def touch_keys(self, last_used: dict[int, datetime]) -> None:
        """Record last-used times (batched, off the request path). Never moves a time back;
        ignores unknown key ids; does not bump the revocation epoch."""
        ...

    async def revocation_epoch(self) -> int:
        """A number that grows whenever a key or tenant changes (revoke, disable, limits)."""
        ...

    async def changes_since(self, after: int, *, limit: int = 1000) -> ChangeFeed:
        """The changes with `after` < seq <= the current epoch, read in one snapshot (each
        epoch bump writes its change with seq = the new epoch; at most `limit` are returned,
        more means `changes` None)."""
        ...

    async def add_usage(self, rows: Sequence[UsageRow], *, batch_id: str | None = None) -> None:
        """Add rows to the ledger (upsert-add per day, tenant, key, model), atomically. With a
        `batch_id`, a batch already added under that id is skipped (retries, spool replays)."""
        ...

    async def usage_totals(
        self, tenant_id: int, *, day: date, month_start: date
    ) -> tuple[UsageTotals, dict[int, UsageTotals]]:
        """Ledger totals of one tenant and of each of its keys (by key id)."""
        ...


# --- Counters: live windows, leases, budget counters ---------------------------------------------

from collections.abc import Mapping  # noqa: E402

from nzgw.core.limits import AdmissionRequest, AdmissionResult, Lease, Periods  # noqa: E402


@attrs.frozen
class SeedNeeded:
    """The tenant's budget counters are missing (fresh store): rebuild them, then admit again."""

    tenant_id: int


@attrs.frozen
class BudgetSeed:
    """Budget counters rebuilt from the ledger for one tenant and its keys, under a new `epoch`."""

    tenant_id: int
    epoch: str
    periods: Periods
    now_ms: int
    tenant: UsageTotals
    keys: Mapping[int, UsageTotals]


@attrs.frozen
class ScopeBudget:
    """One scope's budget counters as stored (settled + reserved), and of those the
    reservations of leases not settled yet, for the current day and month and for life."""

    counted: UsageTotals
    reserved: UsageTotals

    @property
    def settled(self) -> UsageTotals:
        return self.counted.minus(self.reserved)


@attrs.frozen
class BudgetSnapshot:
    """A tenant's budget counters read in one step, for reconciliation with the ledger.
    `version` moves with every settlement and correction of the tenant (not with admissions:
    they only add reservations, which are counted apart)."""

    tenant_id: int
    epoch: str
    version: int
    periods: Periods
    tenant: ScopeBudget
    keys: Mapping[int, ScopeBudget]


class Counters(Protocol):
    """Atomic check-and-reserve over the live counters. Errors: `CountersUnavailableError` only.

    Implementations bound every call themselves (the caller cannot cancel a call half-way: a
    half-done call must not leak a connection) and answer within the configured timeout.
    """

    async def ping(self) -> None: ...

    async def admit(self, request: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        """Check every limit of the key and its tenant; if all pass, reserve in one step.
        Refusals reserve nothing. `SeedNeeded`: nothing was checked or reserved."""
        ...

    async def settle(self, lease: Lease, *, tokens: int, now_ms: int) -> None:
        """Release the lease and replace its reservation by the `tokens` really used."""
        ...

    async def refresh(self, lease: Lease, *, now_ms: int) -> bool:
        """Extend the lease by its ttl from `now_ms`; False: it expired already (not revived)."""
        ...

    async def seed(self, seed: BudgetSeed) -> bool:
        """Set the budget counters unless the tenant's are present; True: this call set them."""
        ...

    async def budget_snapshot(
        self, tenant_id: int, key_ids: Sequence[int], periods: Periods
    ) -> BudgetSnapshot | None:
        """The tenant's and these keys' budget counters; None if they are not seeded."""
        ...

    async def correct_budgets(
        self,
        snapshot: BudgetSnapshot,
        tenant: UsageTotals,
        keys: Mapping[int, UsageTotals],
        *,
        now_ms: int,
    ) -> bool:
        """Add these deltas to the budget counters (day and month of `snapshot.periods`, and
        lifetime), atomically, only if no settlement or correction ran since `snapshot` (same
        epoch and version); the version then moves. Admissions in between are kept: their
        reservations are not touched. False: something ran in between, nothing changed."""
        ...


# --- the failed-authentication throttle ----------------------------------------------------------


class AuthThrottle(Protocol):
    """The failed-authentication allowance per client address (a throttle key: an IPv4 address,
    an IPv6 prefix): a token bucket of `limit` per minute, shared by every process that uses
    the same counter store (Redis), or by one process (memory). Errors:
    `CountersUnavailableError` only; implementations bound every call themselves."""

    async def try_acquire(self, address: str) -> float | None:
        """Take one attempt: None if allowed, else the seconds until one is."""
        ...

    async def record_failure(self, address: str) -> None:
        """A failure that took no attempt first (a malformed key): one token less, if any."""
        ...

    async def refund(self, address: str) -> None:
        """Give back an attempt taken by `try_acquire` (it succeeded, or was not the client's
        fault)."""
        ...

    def prune(self) -> None:
        """Housekeeping (memory only; Redis keys expire by themselves)."""
        ...
