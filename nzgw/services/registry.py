"""The routing registry: which backend hosts which model, and which backends are in rotation.

Discovery (`nzgw.services.discovery`) polls the backends and publishes one immutable `Snapshot`
per round with `Registry.publish`; the data plane reads the registry on every request. Reads are
plain dict and set lookups on the current snapshot, with no lock and no await: publishing is a
single synchronous call, so under Trio a reader sees either the old snapshot or the new one,
never half of each.

Routing order. `OLLAMA_BACKENDS` order is the priority, and every backend has its own priority
(its position), so `candidates` is simply the hosting backends in rotation, in config order.
The first design preferred a backend where the model is loaded "within the same priority"; with
one backend per priority level that preference never reorders anything, so it is not applied.
If priority groups are ever added to the configuration, sort the hosting backends of each
model by `(group, not loaded, position)` in `build_snapshot` (the loaded sets are there).

In rotation = discovery saw the backend healthy in its last poll AND the circuit breaker has
not tripped. The breaker counts consecutive live-request failures (`record_failure`; any
`record_success` resets the count); at `breaker_threshold` the backend leaves the rotation
until a discovery poll that *started after* the trip finds it healthy again (a poll already
in flight when the breaker tripped proves nothing).

A backend that fails its poll keeps its last known model list (so `hosts` stays true for its
models, and the data plane can answer 503 "no backend available" instead of a misleading 403),
but it is out of rotation and out of every listing until it answers again.

Backend names are operator information: they appear in logs, never in anything returned for a
client (listings return the backends' own /api/tags and /api/ps entries).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Generic, Literal, Protocol, TypeVar

import attrs
import trio

from nzgw.core.names import InvalidModelNameError, normalize_model_name

log = logging.getLogger("nzgw.registry")

DEFAULT_BREAKER_THRESHOLD = 3

# Why a backend is not healthy: never polled yet; its poll ran out of time; the adapter raised
# UpstreamError (transport failure or a non-200 answer); it answered something that is not the
# documented /api/tags or /api/ps shape.
ErrorKind = Literal["pending", "timeout", "upstream", "invalid"]


class NamedBackend(Protocol):
    """What the registry needs of a backend: its (operator-facing) name."""

    @property
    def name(self) -> str: ...


B = TypeVar("B", bound=NamedBackend)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class ModelInfo:
    """One entry of a backend's /api/tags or /api/ps listing."""

    name: str  # normalised (`llama3` and `llama3:latest` are one name)
    digest: str  # lowercase hex without `sha256:`; "" when the backend sent none
    entry: Mapping[str, Any]  # the entry exactly as the backend sent it
    # Listing order, newest first: /api/tags `modified_at`, /api/ps `expires_at`, as POSIX
    # seconds; -inf when missing or unparseable (such entries go last).
    sort_key: float


@attrs.frozen
class BackendState:
    """What one discovery poll learnt about one backend."""

    name: str
    healthy: bool
    error: ErrorKind | None  # None when healthy
    detail: str  # operator-facing reason when not healthy; "" when healthy
    version: str | None  # /api/version, None when unknown
    models: Mapping[str, ModelInfo]  # normalised name → /api/tags entry, backend's order
    loaded: Mapping[str, ModelInfo]  # normalised name → /api/ps entry
    polled_at: float  # Trio time the poll started; -inf when never polled
    latency: float | None  # seconds the poll took, when it answered

    @classmethod
    def pending(cls, name: str) -> BackendState:
        return cls.down(name, "pending", "not polled yet", polled_at=-math.inf)

    @classmethod
    def down(cls, name: str, error: ErrorKind, detail: str, *, polled_at: float) -> BackendState:
        return cls(name, False, error, detail, None, _EMPTY, _EMPTY, polled_at, None)


@attrs.frozen
class Snapshot:
    """Everything discovery knows after one round. Immutable; replaced as a whole."""

    backends: tuple[BackendState, ...]  # config (priority) order
    by_name: Mapping[str, BackendState]
    # normalised model → names of the backends whose last known list has it, priority order.
    # Includes backends that are down (last known list); `Registry.candidates` filters those.
    model_index: Mapping[str, tuple[str, ...]]
    taken_at: float  # Trio time the round started; -inf for the initial, empty snapshot


def build_snapshot(states: Sequence[BackendState], *, taken_at: float) -> Snapshot:
    """Index a round's backend states (given in priority order). Pure; no I/O."""
    index: dict[str, list[str]] = {}
    for state in states:
        for model in state.models:
            index.setdefault(model, []).append(state.name)
    return Snapshot(
        backends=tuple(states),
        by_name=MappingProxyType({s.name: s for s in states}),
        model_index=MappingProxyType({m: tuple(names) for m, names in index.items()}),
        taken_at=taken_at,
    )


def empty_snapshot(names: Iterable[str]) -> Snapshot:
    """The snapshot before the first round: every backend pending, nothing hosted."""
    return build_snapshot([BackendState.pending(n) for n in names], taken_at=-math.inf)


# --- parsing the backends' answers (pure) -------------------------------------------------------


def _timestamp(value: object) -> float:
    if not isinstance(value, str):
        return -math.inf
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return -math.inf
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _digest(value: object) -> str:
    if not isinstance(value, str):
        return ""
    return value.lower().removeprefix("sha256:").removeprefix("sha256-")


def parse_model_list(payload: object, *, order_field: str) -> dict[str, ModelInfo]:
    """Parse an /api/tags or /api/ps body into normalised name → `ModelInfo`.

    Raises `ValueError` when the body is not `{"models": [...]}`. Single entries that are not
    objects or carry no valid model name are skipped (logged), so one odd model does not take
    a whole backend out of rotation. The first entry of a name wins, like Ollama's own lookup.
    """
    if not isinstance(payload, dict):
        raise ValueError("expected a JSON object")
    models = payload.get("models")
    if models is None:  # Go marshals an empty slice as null in some versions
        return {}
    if not isinstance(models, list):
        raise ValueError("'models' is not a list")
    result: dict[str, ModelInfo] = {}
    for item in models:
        if not isinstance(item, dict):
            log.debug("skipping a model entry that is not an object")
            continue
        raw = item.get("name") or item.get("model")
        if not isinstance(raw, str):
            log.debug("skipping a model entry without a name")
            continue
        try:
            name = normalize_model_name(raw)
        except InvalidModelNameError:
            log.debug("skipping model entry with invalid name %r", raw)
            continue
        if name not in result:
            result[name] = ModelInfo(
                name=name,
                digest=_digest(item.get("digest")),
                entry=MappingProxyType(item),
                sort_key=_timestamp(item.get(order_field)),
            )
    return result


# --- the registry -------------------------------------------------------------------------------


def _digest_conflicts(snapshot: Snapshot) -> dict[str, tuple[tuple[str, str], ...]]:
    """Models whose last known digests differ between backends: model → ((backend, digest)…)."""
    conflicts: dict[str, tuple[tuple[str, str], ...]] = {}
    for model, names in snapshot.model_index.items():
        if len(names) < 2:
            continue
        pairs = tuple((n, snapshot.by_name[n].models[model].digest) for n in names)
        if len({digest for _, digest in pairs if digest}) > 1:
            conflicts[model] = pairs
    return conflicts


class Registry(Generic[B]):
    """The current snapshot plus the circuit breaker; read by the data plane on every request.

    Not thread-safe: Trio code only (all calls from the one Trio thread). No method awaits.
    """

    def __init__(
        self,
        backends: Sequence[B],
        *,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if breaker_threshold < 1:
            raise ValueError("breaker_threshold must be >= 1")
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        self._backends: dict[str, B] = {b.name: b for b in backends}
        self._threshold = breaker_threshold
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._tripped: dict[str, float] = {}  # backend → clock time the breaker tripped
        self._conflicts: dict[str, tuple[tuple[str, str], ...]] = {}
        self._snapshot = empty_snapshot(names)
        self._rotation: frozenset[str] = frozenset()
        self._published = trio.Event()

    # --- reads (hot path: dict/set lookups only) ---

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def backends(self) -> list[B]:
        """All configured backends, priority order."""
        return list(self._backends.values())

    def candidates(self, model: str) -> list[B]:
        """Backends in rotation hosting `model` (normalised), priority order. Fresh list."""
        rotation = self._rotation
        return [
            self._backends[name]
            for name in self._snapshot.model_index.get(model, ())
            if name in rotation
        ]

    def hosts(self, model: str) -> bool:
        """Whether any backend's last known list has `model`, in rotation or not."""
        return model in self._snapshot.model_index

    def ready(self) -> bool:
        """At least one backend is in rotation."""
        return bool(self._rotation)

    def in_rotation(self, backend_name: str) -> bool:
        return backend_name in self._rotation

    def list_models(self, allowed: Callable[[str], bool]) -> list[dict[str, Any]]:
        """The union of the /api/tags entries of the backends in rotation, newest first.

        De-duplicated by normalised name (the backend first in priority wins) and filtered by
        `allowed(normalised_name)`. Entries are shallow copies of what the backends sent.
        """
        return self._union(allowed, loaded=False)

    def list_loaded(self, allowed: Callable[[str], bool]) -> list[dict[str, Any]]:
        """Like `list_models` for /api/ps entries, the longest time left first."""
        return self._union(allowed, loaded=True)

    def _union(self, allowed: Callable[[str], bool], *, loaded: bool) -> list[dict[str, Any]]:
        seen: set[str] = set()
        picked: list[ModelInfo] = []
        for state in self._snapshot.backends:
            if state.name not in self._rotation:
                continue
            for name, info in (state.loaded if loaded else state.models).items():
                if name not in seen:
                    seen.add(name)
                    if allowed(name):
                        picked.append(info)
        picked.sort(key=lambda info: info.sort_key, reverse=True)  # stable: ties keep priority
        return [dict(info.entry) for info in picked]

    # --- writes ---

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current (atomically: no await). Called by discovery after each round.

        Closes the breaker of every backend that this round found healthy with a poll started
        after the trip, and logs health changes and digest conflicts once per change.
        """
        if set(snapshot.by_name) != set(self._backends):
            raise ValueError("snapshot backends do not match the registry's")
        previous, self._snapshot = self._snapshot, snapshot
        for state in snapshot.backends:
            tripped_at = self._tripped.get(state.name)
            if tripped_at is not None and state.healthy and state.polled_at > tripped_at:
                del self._tripped[state.name]
                self._failures.pop(state.name, None)
                log.info("backend %s: circuit closed, healthy again", state.name)
        self._update_rotation()
        self._log_health_changes(previous, snapshot)
        self._log_digest_conflicts(snapshot)
        published, self._published = self._published, trio.Event()
        published.set()

    async def wait_published(self, rounds: int = 1) -> Snapshot:
        """Wait until `rounds` more snapshots were published; return the current one. (Tests and
        tools wait for "the round after my change" with `rounds=2`: the round running now may
        have started before it.)"""
        for _ in range(rounds):
            await self._published.wait()
        return self._snapshot

    def record_success(self, backend_name: str) -> None:
        """A live request to the backend succeeded: reset its consecutive-failure count."""
        self._check(backend_name)
        self._failures.pop(backend_name, None)

    def record_failure(self, backend_name: str) -> None:
        """A live request to the backend failed (before or during its answer).

        After `breaker_threshold` consecutive failures the backend leaves the rotation until a
        discovery poll started after this moment finds it healthy.
        """
        self._check(backend_name)
        count = self._failures.get(backend_name, 0) + 1
        self._failures[backend_name] = count
        if count >= self._threshold and backend_name not in self._tripped:
            self._tripped[backend_name] = self._clock()
            self._update_rotation()
            log.warning(
                "backend %s: circuit open after %d consecutive failures; "
                "out of rotation until discovery finds it healthy",
                backend_name,
                count,
            )

    def _check(self, backend_name: str) -> None:
        if backend_name not in self._backends:
            raise KeyError(backend_name)

    def _update_rotation(self) -> None:
        self._rotation = frozenset(
            s.name for s in self._snapshot.backends if s.healthy and s.name not in self._tripped
        )

    def _log_health_changes(self, previous: Snapshot, current: Snapshot) -> None:
        for state in current.backends:
            before = previous.by_name[state.name]
            if state.healthy and not before.healthy:
                log.info(
                    "backend %s: up (version %s, %d models)",
                    state.name,
                    state.version or "unknown",
                    len(state.models),
                )
            elif not state.healthy and (before.healthy or before.error == "pending"):
                log.warning("backend %s: down (%s: %s)", state.name, state.error, state.detail)

    def _log_digest_conflicts(self, snapshot: Snapshot) -> None:
        conflicts = _digest_conflicts(snapshot)
        for model, pairs in conflicts.items():
            if self._conflicts.get(model) != pairs:
                log.warning(
                    "model %s has different digests on different backends: %s",
                    model,
                    ", ".join(f"{name}={digest[:12] or '?'}" for name, digest in pairs),
                )
        for model in self._conflicts.keys() - conflicts.keys():
            log.info("model %s: digests agree again", model)
        self._conflicts = conflicts
