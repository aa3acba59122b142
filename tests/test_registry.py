"""The routing registry, synchronously: snapshots are built by hand, the clock is a variable.

Rules: no Trio here (the registry never awaits); every snapshot comes from `build_snapshot` and
`parse_model_list`, the same functions discovery uses.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from nzgw.services.registry import (
    BackendState,
    Registry,
    Snapshot,
    build_snapshot,
    parse_model_list,
)

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Named({self.name!r})"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tag(
    name: str, *, modified: str = "2026-01-01T00:00:00Z", digest: str = DIGEST_A
) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": modified, "size": 1, "digest": digest}


def ps(name: str, *, expires: str, digest: str = DIGEST_A) -> dict[str, Any]:
    return {"name": name, "model": name, "expires_at": expires, "digest": digest}


def up(
    name: str,
    tags: list[dict[str, Any]],
    loaded: list[dict[str, Any]] | None = None,
    *,
    polled_at: float = 0.0,
) -> BackendState:
    return BackendState(
        name=name,
        healthy=True,
        error=None,
        detail="",
        version="0.33.0",
        models=parse_model_list({"models": tags}, order_field="modified_at"),
        loaded=parse_model_list({"models": loaded or []}, order_field="expires_at"),
        polled_at=polled_at,
        latency=0.01,
    )


def down(
    name: str, tags: list[dict[str, Any]] | None = None, *, polled_at: float = 0.0
) -> BackendState:
    state = BackendState.down(name, "timeout", "no answer", polled_at=polled_at)
    if tags:  # a down backend keeps its last known list (discovery does this)
        models = parse_model_list({"models": tags}, order_field="modified_at")
        state = BackendState(
            state.name, False, "timeout", "no answer", None, models, {}, polled_at, None
        )
    return state


def snap(*states: BackendState, taken_at: float = 0.0) -> Snapshot:
    return build_snapshot(states, taken_at=taken_at)


def make(*names: str, threshold: int = 3) -> tuple[Registry[Named], dict[str, Named], Clock]:
    backends = {n: Named(n) for n in names}
    clock = Clock()
    registry = Registry(list(backends.values()), breaker_threshold=threshold, clock=clock)
    return registry, backends, clock


def allow_all(_name: str) -> bool:
    return True


# --- parsing ------------------------------------------------------------------------------------


def test_parse_normalises_names_and_digests() -> None:
    models = parse_model_list(
        {"models": [tag("llama3", digest="sha256:" + DIGEST_A.upper()), tag("llama3:latest")]},
        order_field="modified_at",
    )
    assert list(models) == ["llama3:latest"]
    assert models["llama3:latest"].digest == DIGEST_A
    assert models["llama3:latest"].entry["name"] == "llama3"  # as the backend sent it


def test_parse_skips_bad_entries_and_rejects_bad_shapes() -> None:
    models = parse_model_list(
        {"models": [42, {"size": 1}, {"name": "bad name!"}, tag("ok")]}, order_field="modified_at"
    )
    assert list(models) == ["ok:latest"]
    assert parse_model_list({"models": None}, order_field="modified_at") == {}
    with pytest.raises(ValueError):
        parse_model_list([], order_field="modified_at")
    with pytest.raises(ValueError):
        parse_model_list({"models": {}}, order_field="modified_at")


# --- routing ------------------------------------------------------------------------------------


def test_before_the_first_snapshot_nothing_is_ready() -> None:
    registry, _, _ = make("a", "b")
    assert not registry.ready()
    assert registry.candidates("m:latest") == []
    assert not registry.hosts("m:latest")
    assert [s.error for s in registry.snapshot.backends] == ["pending", "pending"]
    assert registry.snapshot.taken_at == -math.inf


def test_candidates_in_priority_order_healthy_only() -> None:
    registry, b, _ = make("a", "b", "c")
    registry.publish(
        snap(
            up("a", [tag("x")]),
            down("b", [tag("m")]),
            up("c", [tag("m"), tag("x")], loaded=[ps("m", expires="2030-01-01T00:00:00Z")]),
        )
    )
    assert registry.candidates("x:latest") == [b["a"], b["c"]]
    # b is down but its last known list still says it hosts m: hosts, not a candidate.
    assert registry.candidates("m:latest") == [b["c"]]
    assert registry.snapshot.model_index["m:latest"] == ("b", "c")
    assert registry.hosts("m:latest") and registry.hosts("x:latest")
    assert not registry.hosts("y:latest")
    assert registry.candidates("y:latest") == []
    assert registry.ready()


def test_candidates_returns_a_fresh_list() -> None:
    registry, b, _ = make("a")
    registry.publish(snap(up("a", [tag("x")])))
    registry.candidates("x:latest").clear()
    assert registry.candidates("x:latest") == [b["a"]]


def test_ready_only_when_some_backend_is_in_rotation() -> None:
    registry, _, _ = make("a", "b")
    registry.publish(snap(down("a"), down("b")))
    assert not registry.ready()
    registry.publish(snap(down("a"), up("b", [])))
    assert registry.ready()


def test_publish_rejects_a_snapshot_of_other_backends() -> None:
    registry, _, _ = make("a")
    with pytest.raises(ValueError):
        registry.publish(snap(up("z", [])))


# --- circuit breaker ----------------------------------------------------------------------------


def test_breaker_trips_after_consecutive_failures() -> None:
    registry, b, clock = make("a", "b", threshold=3)
    registry.publish(snap(up("a", [tag("m")]), up("b", [tag("m")])))
    registry.record_failure("a")
    registry.record_failure("a")
    registry.record_success("a")  # resets the count
    registry.record_failure("a")
    registry.record_failure("a")
    assert registry.candidates("m:latest") == [b["a"], b["b"]]
    clock.now = 5.0
    registry.record_failure("a")
    assert registry.candidates("m:latest") == [b["b"]]
    assert not registry.in_rotation("a")
    registry.record_failure("b")
    assert registry.ready()


def test_breaker_closes_only_on_a_poll_started_after_the_trip() -> None:
    registry, b, clock = make("a", threshold=1)
    registry.publish(snap(up("a", [tag("m")], polled_at=0.0)))
    clock.now = 5.0
    registry.record_failure("a")
    assert not registry.ready()
    # A round that started before the trip (and finished after it) proves nothing.
    registry.publish(snap(up("a", [tag("m")], polled_at=4.0), taken_at=4.0))
    assert registry.candidates("m:latest") == []
    # Discovery sees it down: still out.
    registry.publish(snap(down("a", polled_at=6.0), taken_at=6.0))
    assert not registry.ready()
    registry.publish(snap(up("a", [tag("m")], polled_at=7.0), taken_at=7.0))
    assert registry.candidates("m:latest") == [b["a"]]
    # The failure count was reset with the breaker: one more failure trips it again
    # (threshold 1), not zero.
    clock.now = 8.0
    registry.record_failure("a")
    assert not registry.ready()


def test_breaker_rejects_unknown_backends() -> None:
    registry, _, _ = make("a")
    with pytest.raises(KeyError):
        registry.record_failure("nope")
    with pytest.raises(KeyError):
        registry.record_success("nope")
    with pytest.raises(ValueError):
        Registry([Named("a")], breaker_threshold=0)
    with pytest.raises(ValueError):
        Registry([Named("a"), Named("a")])


# --- listings -----------------------------------------------------------------------------------


def test_list_models_union_dedup_newest_first_filtered() -> None:
    registry, _, _ = make("a", "b", "c", "d")
    registry.publish(
        snap(
            up("a", [tag("old", modified="2025-01-01T00:00:00Z"), tag("shared:7b")]),
            # The same name on b, newer: a (first in priority) wins anyway.
            up(
                "b",
                [
                    tag("shared:7b", modified="2027-01-01T00:00:00Z", digest=DIGEST_A),
                    tag("new", modified="2026-06-01T10:00:00+02:00"),
                    tag("secret"),
                ],
            ),
            down("c", [tag("gone")]),
            up("d", [tag("undated", modified="garbage")]),
        )
    )
    models = registry.list_models(lambda name: name != "secret:latest")
    assert [m["name"] for m in models] == ["new", "shared:7b", "old", "undated"]
    shared = next(m for m in models if m["name"] == "shared:7b")
    assert shared["modified_at"] == "2026-01-01T00:00:00Z"  # a's entry
    models[0]["name"] = "mutated"
    assert registry.list_models(allow_all)[0]["name"] == "new"


def test_listings_skip_backends_out_of_rotation() -> None:
    registry, _, _ = make("a", "b", threshold=1)
    registry.publish(
        snap(
            up("a", [tag("x")], loaded=[ps("x", expires="2030-01-01T00:00:00Z")]),
            up("b", [tag("y")]),
        )
    )
    registry.record_failure("a")
    assert [m["name"] for m in registry.list_models(allow_all)] == ["y"]
    assert registry.list_loaded(allow_all) == []


def test_list_loaded_longest_time_left_first() -> None:
    registry, _, _ = make("a", "b")
    registry.publish(
        snap(
            up(
                "a",
                [tag("x"), tag("y")],
                loaded=[
                    ps("x", expires="2030-01-01T00:00:00Z"),
                    ps("y", expires="2031-01-01T00:00:00Z"),
                ],
            ),
            up(
                "b",
                [tag("x"), tag("z"), tag("w")],
                loaded=[
                    ps("x", expires="2040-01-01T00:00:00Z"),  # duplicate: a wins
                    ps("z", expires="2035-01-01T00:00:00Z"),
                    ps("w", expires="2036-01-01T00:00:00Z"),
                ],
            ),
        )
    )
    loaded = registry.list_loaded(lambda name: name != "w:latest")
    assert [(m["name"], m["expires_at"][:4]) for m in loaded] == [
        ("z", "2035"),
        ("y", "2031"),
        ("x", "2030"),
    ]


# --- digest conflicts ---------------------------------------------------------------------------


def test_digest_conflict_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nzgw.registry")
    registry, _, _ = make("a", "b", "c")

    def conflicts() -> list[str]:
        found = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "digests" in r.getMessage()
        ]
        caplog.clear()
        return found

    agreeing = snap(up("a", [tag("m")]), up("b", [tag("m")]), up("c", []))
    clashing = snap(up("a", [tag("m")]), up("b", [tag("m", digest=DIGEST_B)]), up("c", []))
    registry.publish(agreeing)
    assert conflicts() == []
    registry.publish(clashing)
    assert conflicts() == [
        f"model m:latest has different digests on different backends: "
        f"a={DIGEST_A[:12]}, b={DIGEST_B[:12]}"
    ]
    registry.publish(clashing)
    # b going down keeps its last known list: same conflict, not logged again.
    registry.publish(snap(up("a", [tag("m")]), down("b", [tag("m", digest=DIGEST_B)]), up("c", [])))
    assert conflicts() == []
    # A third backend joins the conflict: that is a change.
    registry.publish(
        snap(
            up("a", [tag("m")]),
            up("b", [tag("m", digest=DIGEST_B)]),
            up("c", [tag("m", digest=DIGEST_B)]),
        )
    )
    assert len(conflicts()) == 1
    registry.publish(agreeing)
    assert conflicts() == []
    registry.publish(clashing)
    assert len(conflicts()) == 1


def test_health_changes_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nzgw.registry")
    registry, _, _ = make("a")
    registry.publish(snap(down("a")))
    registry.publish(snap(down("a")))
    registry.publish(snap(up("a", [])))
    registry.publish(snap(up("a", [])))
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        ("WARNING", "backend a: down (timeout: no answer)"),
        ("INFO", "backend a: up (version 0.33.0, 0 models)"),
    ]


# --- priority tiers and loaded models (issue #16) -------------------------------------------------


def test_priorities_group_candidates_into_tiers_in_config_order() -> None:
    backends = {n: Named(n) for n in ("a", "b", "c", "d")}
    registry = Registry(
        list(backends.values()), clock=Clock(), priorities={"a": 1, "b": 0, "c": None, "d": 0}
    )
    registry.publish(snap(*(up(n, [tag("llama3")]) for n in "abcd")))
    # c has no priority: its position (2); a=1, b=0, d=0.
    tiers = registry.candidate_tiers("llama3:latest")
    assert [[b.name for b in tier] for tier in tiers] == [["b", "d"], ["a"], ["c"]]
    assert [b.name for b in registry.candidates("llama3:latest")] == ["b", "d", "a", "c"]
    # Without priorities every backend is its own tier, in list order (the old behaviour).
    plain, _, _ = make("x", "y")
    plain.publish(snap(up("x", [tag("llama3")]), up("y", [tag("llama3")])))
    assert [[b.name for b in t] for t in plain.candidate_tiers("llama3:latest")] == [["x"], ["y"]]


def test_loaded_is_from_ps_or_from_what_was_routed_since_the_round_began() -> None:
    registry, _, clock = make("a", "b")
    expires = "2030-01-01T00:00:00Z"
    registry.publish(
        snap(up("a", [tag("llama3")], [ps("llama3", expires=expires)]), up("b", [tag("llama3")]))
    )
    assert registry.is_loaded("a", "llama3:latest")
    assert not registry.is_loaded("b", "llama3:latest")
    clock.now = 5.0
    registry.note_routed("b", "llama3:latest")
    assert registry.is_loaded("b", "llama3:latest")
    # A round that started after the routing is authoritative (Ollama may have unloaded it).
    registry.publish(snap(up("a", [tag("llama3")]), up("b", [tag("llama3")]), taken_at=6.0))
    assert not registry.is_loaded("b", "llama3:latest")
    assert not registry.is_loaded("a", "llama3:latest")
    with pytest.raises(KeyError):
        registry.note_routed("nope", "llama3:latest")
