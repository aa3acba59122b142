"""The sans-IO audit core: the hash chain, what `ChainVerifier` detects, text cleaning and the
token rule. Plain synchronous tests (and one property test for the chain)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nzgw.core.audit import (
    AuditEvent,
    AuditRow,
    Chain,
    ChainVerifier,
    canonical,
    charged_tokens,
    clean_target,
    clean_text,
    genesis,
    new_chain_id,
    overflow_event,
    row_hash,
)
from nzgw.core.framing import Usage

T0 = datetime(2031, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC)


def event(n: int = 0, **changes: object) -> AuditEvent:
    base = AuditEvent(
        ts=T0,
        day=date(2031, 3, 4),
        request_id=f"req{n:04d}",
        tenant_id=1,
        key_id=2,
        key_prefix="nz_abcdefgh",
        client="198.51.100.7",
        method="POST",
        surface="native",
        path="/api/chat",
        model="llama3:latest",
        status=200,
        outcome="ok",
        refusal=None,
        prompt_tokens=10 + n,
        completion_tokens=20,
        tokens_reported=True,
        streamed=True,
        ttfb_us=1500,
        latency_us=25_000,
        backend="backend-0",
    )
    return attrs.evolve(base, **changes)  # type: ignore[arg-type]


def chain_of(n: int, chain_id: str = "c1") -> list[AuditRow]:
    chain = Chain(chain_id, T0)
    return [chain.seal(event(i)) for i in range(n)]


def verify(rows: list[AuditRow], head: AuditRow | None, chain_id: str = "c1") -> ChainVerifier:
    verifier = ChainVerifier(chain_id)
    verifier.feed(rows)
    if head is None:
        verifier.end(None, None)
    else:
        verifier.end(head.seq, head.hash)
    return verifier


def test_chain_links_rows_and_starts_at_the_genesis() -> None:
    rows = chain_of(3)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == genesis("c1")
    assert rows[1].prev_hash == rows[0].hash and rows[2].prev_hash == rows[1].hash
    assert rows[2].hash == row_hash(rows[1].hash, "c1", 3, rows[2].event)
    assert genesis("c1") != genesis("c2")


def test_an_intact_chain_verifies() -> None:
    rows = chain_of(10)
    verifier = verify(rows, rows[-1])
    assert verifier.broken is None and verifier.checked == 10


def test_an_intact_chain_fed_in_pages_verifies() -> None:
    rows = chain_of(10)
    verifier = ChainVerifier("c1")
    for start in range(0, 10, 3):
        assert verifier.feed(rows[start : start + 3]) is None
    assert verifier.end(10, rows[-1].hash) is None


def test_an_edited_row_is_found() -> None:
    rows = chain_of(5)
    rows[2] = attrs.evolve(rows[2], event=attrs.evolve(rows[2].event, status=403))
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and (broken.seq, broken.problem) == (3, "edited")


def test_an_edited_and_rehashed_row_breaks_the_next_link() -> None:
    rows = chain_of(5)
    changed = attrs.evolve(rows[2].event, prompt_tokens=0)
    rows[2] = attrs.evolve(
        rows[2], hash=row_hash(rows[2].prev_hash, "c1", 3, changed), event=changed
    )
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and (broken.seq, broken.problem) == (4, "relinked")


def test_a_deleted_row_in_the_middle_is_found() -> None:
    rows = chain_of(5)
    del rows[1]
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and (broken.seq, broken.problem) == (2, "missing")
    assert "2..2" in broken.detail


def test_renumbering_after_a_deletion_is_found() -> None:
    rows = chain_of(5)
    del rows[1]
    rows = [attrs.evolve(r, seq=i) for i, r in enumerate(rows, 1)]
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and (broken.seq, broken.problem) == (2, "edited")


def test_swapped_rows_are_found() -> None:
    rows = chain_of(5)
    a, b = rows[1], rows[2]
    rows[1], rows[2] = attrs.evolve(b, seq=2), attrs.evolve(a, seq=3)
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and (broken.seq, broken.problem) == (2, "edited")


def test_a_deleted_tail_is_found_against_the_head() -> None:
    rows = chain_of(5)
    head = rows[-1]
    broken = verify(rows[:3], head).broken
    assert broken is not None and (broken.seq, broken.problem) == (4, "truncated")


def test_rows_without_a_head_record_are_reported() -> None:
    rows = chain_of(2)
    broken = verify(rows, None).broken
    assert broken is not None and broken.problem == "head_missing"


def test_a_head_that_does_not_match_is_reported() -> None:
    rows = chain_of(3)
    verifier = ChainVerifier("c1")
    verifier.feed(rows)
    broken = verifier.end(3, "00" * 32)
    assert broken is not None and broken.problem == "head_mismatch"


def test_rows_newer_than_the_head_read_are_not_a_break() -> None:
    rows = chain_of(4)
    verifier = ChainVerifier("c1")
    verifier.feed(rows)
    assert verifier.end(3, rows[2].hash) is None


def test_only_the_first_break_is_reported() -> None:
    rows = chain_of(6)
    rows[1] = attrs.evolve(rows[1], event=attrs.evolve(rows[1].event, client="x"))
    del rows[4]
    broken = verify(rows, rows[-1]).broken
    assert broken is not None and broken.seq == 2


def test_the_canonical_encoding_covers_every_field_and_is_stable() -> None:
    encoded = canonical("c1", 7, event())
    assert encoded.startswith(b'["nzgw-audit-v1","c1",7,')
    for name in ("req0000", "198.51.100.7", "backend-0", "2031-03-04"):
        assert name.encode() in encoded
    assert str(int(T0.timestamp() * 1_000_000)).encode() in encoded
    for field in attrs.fields(AuditEvent):
        value = getattr(event(), field.name)
        change: dict[str, Any] = {}
        if isinstance(value, bool):
            change[field.name] = not value
        elif isinstance(value, int):
            change[field.name] = value + 1
        elif isinstance(value, str):
            change[field.name] = value + "x"
        elif isinstance(value, datetime):
            change[field.name] = value + timedelta(microseconds=1)
        elif isinstance(value, date):
            change[field.name] = value + timedelta(days=1)
        else:
            change[field.name] = "x"
        flipped = attrs.evolve(event(), **change)
        assert canonical("c1", 7, flipped) != encoded, field.name


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=30), st.data())
def test_any_single_change_to_a_stored_chain_is_detected(
    tokens: list[int], data: st.DataObject
) -> None:
    chain = Chain("c9", T0)
    rows = [chain.seal(event(i, prompt_tokens=t)) for i, t in enumerate(tokens)]
    head = rows[-1]
    index = data.draw(st.integers(0, len(rows) - 1))
    kind = data.draw(st.sampled_from(["edit", "delete"]))
    if kind == "edit":
        rows[index] = attrs.evolve(
            rows[index], event=attrs.evolve(rows[index].event, completion_tokens=-1)
        )
    else:
        del rows[index]
    assert verify(rows, head, "c9").broken is not None


def test_clean_text_escapes_controls_and_cuts() -> None:
    assert clean_text("198.51.100.7") == "198.51.100.7"
    assert clean_text("a b\x00\x1b[31m%") == "a%20b%00%1B[31m%25"
    assert clean_text("é") == "%C3%A9"
    assert clean_text("x" * 500) == "x" * 128


def test_clean_target_drops_the_query_and_truncates() -> None:
    assert clean_target(b"/nope?api_key=secret") == "/nope"
    assert clean_target(b"/a#frag") == "/a"
    assert clean_target(b"/\xff\x00x") == "/%C3%BF%00x"
    assert len(clean_target(b"/" + b"a" * 10_000)) == 256


def test_charged_tokens_follow_settlement() -> None:
    assert charged_tokens(Usage(5, 7), 100, forwarded=True) == (5, 7, True)
    assert charged_tokens(Usage(0, 7, reported=False), 100, forwarded=True) == (100, 7, False)
    assert charged_tokens(None, 100, forwarded=True) == (100, 0, False)
    assert charged_tokens(None, 100, forwarded=False) == (0, 0, False)


def test_overflow_event_counts_the_refused_requests() -> None:
    summary = overflow_event(T0, T0, date(2031, 3, 4), 42)
    assert (summary.requests, summary.status, summary.refusal) == (42, 503, "audit_queue_full")
    assert summary.note is not None and "42 requests" in summary.note


def test_chain_ids_are_unique_and_sort_by_start() -> None:
    a, b = new_chain_id(T0), new_chain_id(T0)
    assert a != b and a.startswith("20310304T050607Z-")


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        canonical("c1", 1, event(ts=datetime(2031, 1, 1)))
