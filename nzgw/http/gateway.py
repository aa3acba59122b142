"""What the HTTP layer needs from the rest of nzgw, and the record one request leaves behind.

The HTTP layer sees services and adapters only through the protocols of `nzgw.ports` (and
`Admitter`/`Ticket` below, which speak in terms of the request record); `server.py` wires the
concrete objects.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from nzgw.config import Config
from nzgw.core import paths
from nzgw.core.framing import Usage
from nzgw.core.models import Principal
from nzgw.http.drain import StreamCut
from nzgw.http.uploads import UploadGate
from nzgw.ports import AuditGatePort, AuthenticatorPort, RegistryPort
from nzgw.services.slots import SlotPool

log = logging.getLogger("nzgw.gateway")

# What `/api/version` reports: the Ollama API level nzgw speaks, never a backend's version.
OLLAMA_API_VERSION = "0.33.0"


@attrs.define(eq=False)
class RequestInfo:
    """Everything one request leaves for the log, the audit row and settlement."""

    request_id: str
    method: str
    decision: paths.Route | paths.Blocked | paths.NotFound | paths.MethodNotAllowed
    client: str
    started: float  # trio clock
    wall_started: float  # unix time
    status: int = 0
    refusal: str | None = None
    principal: Principal | None = None
    model: str | None = None
    streamed: bool = False
    backend: str | None = None  # stored for the audit, never shown to clients
    usage: Usage | None = None
    first_byte: float | None = None
    finished: float | None = None
    prompt_estimate: int = 0  # charged as prompt tokens when no usage was reported
    outcome: str = "ok"  # ok | cancelled | upstream_failed | upstream_truncated | refused
    request_body: bytes | None = None  # kept only for keys that opted in to prompt logging
    response_text: str | None = None
    target: bytes = b""  # the raw request target (the audit keeps a cleaned prefix for 404/405)
    queue_wait: float | None = None  # seconds waited for backend slots (None: never queued)

    @property
    def log_path(self) -> str:
        decision = self.decision
        # Routes and blocked endpoints have canonical names; raw unknown paths are not logged.
        return decision.path if isinstance(decision, paths.Route | paths.Blocked) else "-"

    @property
    def tenant_name(self) -> str | None:
        return self.principal.tenant.name if self.principal else None

    @property
    def key_prefix(self) -> str | None:
        return self.principal.key.prefix if self.principal else None


class Refused(Exception):
    """A request refused before forwarding: status, message, audit reason, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        refusal: str,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.refusal = refusal
        self.headers = headers or {}
        self.code = code
        self.error_type = error_type


class Ticket(Protocol):
    """An admitted request's reservation. `settle` runs once, shielded, at the very end."""

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


ReadinessCheck = Callable[[], Awaitable[bool]]
FinishHook = Callable[[RequestInfo], Awaitable[None]]


@attrs.define(eq=False)
class Gateway:
    config: Config
    authenticator: AuthenticatorPort
    registry: RegistryPort
    readiness: dict[str, ReadinessCheck] = attrs.Factory(dict)
    admitter: Admitter | None = None
    finish_hooks: list[FinishHook] = attrs.Factory(list)
    readiness_timeout: float = 2.0
    audit: AuditGatePort | None = None  # fail closed: new requests get 503 while it is refusing
    uploads: UploadGate = attrs.Factory(
        lambda self: UploadGate(
            self.config.max_body_uploads_per_key, self.config.max_body_uploads_per_client
        ),
        takes_self=True,
    )
    # Worker threads that decode big request bodies at once (nzgw.http.bodies).
    body_workers: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(2))
    stream_cut: StreamCut | None = None  # streams left at the end of the drain: error frame
    slots: SlotPool | None = None  # backend slots and the fair queue; None: no queueing
    in_flight: int = 0  # requests dispatched and not settled yet (logged when draining)

    async def missing_dependencies(self) -> list[str]:
        """Names of the dependencies that do not answer now (checked in parallel)."""
        missing: list[str] = []

        async def check(name: str, probe: ReadinessCheck) -> None:
            ok = False
            with trio.move_on_after(self.readiness_timeout):
                try:
                    ok = await probe()
                except Exception:
                    ok = False
            if not ok:
                missing.append(name)

        async with trio.open_nursery() as nursery:
            for name, probe in self.readiness.items():
                nursery.start_soon(check, name, probe)
        if not self.registry.ready():
            missing.append("backends")
        return sorted(missing)

    async def request_finished(self, info: RequestInfo) -> None:
        """Settlement hooks (limits, audit, metrics); run shielded by the caller."""
        for hook in self.finish_hooks:
            try:
                await hook(info)
            except Exception:
                log.exception("finish hook failed", extra={"request_id": info.request_id})
