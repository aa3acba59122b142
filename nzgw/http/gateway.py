"""What the HTTP layer needs from the rest of nzgw: the `Gateway`, built complete by `server.py`.

The HTTP layer sees services and adapters only through the protocols of `nzgw.ports`;
`server.py` wires the concrete objects. The request record (`RequestInfo`) and `Refused` live
in `nzgw.core.record` and are re-exported here for the HTTP modules.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from nzgw.config import Config
from nzgw.core.record import Refused, RequestInfo
from nzgw.http.metrics import GatewayMetrics
from nzgw.http.uploads import UploadGate
from nzgw.ports import Admitter, AuditGatePort, AuthenticatorPort, RegistryPort, Ticket
from nzgw.services.drain import StreamCut
from nzgw.services.forwarding import Forwarder
from nzgw.services.slots import SlotPool

__all__ = [
    "OLLAMA_API_VERSION",
    "Admitter",
    "FinishHook",
    "Gateway",
    "ReadinessCheck",
    "Refused",
    "RequestInfo",
    "Ticket",
]

log = logging.getLogger("nzgw.gateway")

# What `/api/version` reports: the Ollama API level nzgw speaks, never a backend's version.
OLLAMA_API_VERSION = "0.33.0"


ReadinessCheck = Callable[[], Awaitable[bool]]
FinishHook = Callable[[RequestInfo], Awaitable[None]]


def _forwarder(gateway: Gateway) -> Forwarder:
    return Forwarder(
        gateway.registry,
        gateway.metrics,
        slots=gateway.slots,
        first_byte_timeout=gateway.config.upstream_first_byte_timeout,
        stream_cut=gateway.stream_cut,
    )


@attrs.define(eq=False)
class Gateway:
    """Everything a request needs, built complete in one expression by `server.run_server`
    (tests build smaller ones). Only `in_flight` changes while it serves."""

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
    # This gateway's Prometheus numbers (one per process in production, one per test gateway).
    metrics: GatewayMetrics = attrs.Factory(GatewayMetrics)
    # The data plane below HTTP (nzgw.services.forwarding), made of the fields above.
    forwarder: Forwarder = attrs.field(
        init=False, default=attrs.Factory(_forwarder, takes_self=True)
    )
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
