"""Audit rows, their hash chain, and the chain verifier. Sans-IO: values in, values out.

What one request leaves behind is an `AuditEvent`. The flusher seals events into `AuditRow`s with
a `Chain` (one per gateway process) and writes them in batches; `ChainVerifier` walks a chain as
stored and reports the first broken link.

The chain (tamper evidence)
---------------------------
Every process starts a chain with a fresh random id. Its rows are numbered 1, 2, 3 … (`seq`) and

    hash(row n) = sha256(prev_hash || canonical(row n)),   prev_hash = hash(row n-1)

where `prev_hash` of row 1 is `genesis(chain_id)` = sha256("nzgw-audit-v1:" || chain_id) and
`canonical` is a JSON array of the version tag, the chain id, `seq` and EVERY stored field of the
row, in a fixed order (times as integer microseconds since the epoch, so both stores reproduce
the bytes exactly). Each batch also records the chain's head (last seq and hash) in the
`audit_chains` table, in the same transaction as its rows.

What `verify` detects, for each chain:

* an edited row: its stored fields no longer hash to its stored `hash` ("edited");
* an edited row whose own hash was recomputed: the next row's `prev_hash` no longer matches
  ("relinked");
* a row deleted in the middle (or a renumbering to hide it): a gap in `seq`, or the hashes break
  because `seq` is part of every hash ("missing" / "edited");
* rows swapped or reordered: `seq` is hashed, so a moved row breaks its own hash or its
  neighbours' links;
* the tail of a chain deleted: the rows end before the head recorded in `audit_chains`
  ("truncated"); rows without any recorded head ("head_missing").

What it does NOT detect, and why that is acceptable here:

* Someone with write access to the database who rewrites a row AND recomputes every later hash
  AND the recorded head: the chain has no secret, so it proves integrity against accidents,
  partial edits and careless deletion, not against a full rewrite by the database owner. To
  catch that too, anchor heads outside the database: the flusher logs the chain head at start
  and on shutdown, and `nzgw audit verify` prints every head, so an operator (or a log
  shipper) can keep them elsewhere and compare.
* A whole chain deleted together with its head row: `verify` only sees the chains that exist.
  The shipped log lines of chain starts are the anchor for that case too.
* Rows that never reached the store (a crash before the flush, or the store down through the
  whole shutdown deadline): those are lost, not tampered with; the log says how many.

Why per-process chains and not one global chain: a global chain needs one writer ordering all
rows (a lock in the store on every batch, across replicas). Per-process chains need no
coordination at all, and each is still a total order of that process's requests.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import attrs

from nzgw.core.framing import Usage

CHAIN_VERSION = "nzgw-audit-v1"

#: The refusal reason of a request refused because the audit queue was full (fail closed). Such
#: requests leave no row each; one summary row per episode counts them (`requests` = N).
AUDIT_QUEUE_FULL = "audit_queue_full"

#: Bytes of a request body, and of a response, kept in a prompt log (longer ones are cut).
PROMPT_LOG_MAX_BYTES = 1 << 20

#: Characters of a raw request target kept in the audit row (404, 405: not a known route).
TARGET_MAX_CHARS = 256
#: Characters kept of other free-form text that comes from the client (address, method).
TEXT_MAX_CHARS = 128

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@attrs.frozen
class AuditEvent:
    """One request as the audit log records it (before it is sealed into the chain).

    `ts` is when the request arrived (wall clock, UTC); `day` is that instant's calendar day in
    the budget time zone (the same day the usage ledger uses). `requests` is 1, except in the
    summary row of an `AUDIT_QUEUE_FULL` episode, where it is the number of refused requests.
    """

    ts: datetime
    day: date
    request_id: str
    tenant_id: int | None
    key_id: int | None
    key_prefix: str | None
    client: str
    method: str
    surface: str
    path: str
    model: str | None
    status: int
    outcome: str
    refusal: str | None
    prompt_tokens: int
    completion_tokens: int
    tokens_reported: bool
    streamed: bool
    ttfb_us: int | None
    latency_us: int
    backend: str | None  # stored for operators, never shown to clients
    prompt_logged: bool = False
    requests: int = 1
    note: str | None = None


#: The stored columns of an event, in canonical order (`AuditEvent` attribute names).
EVENT_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(AuditEvent))


@attrs.frozen
class AuditRow:
    """An event sealed into a chain: what is stored, and what `verify` checks."""

    chain_id: str
    seq: int
    prev_hash: str
    hash: str
    event: AuditEvent


@attrs.frozen
class PendingPrompt:
    """A prompt log waiting in the queue with its event (bodies are decoded when sealed)."""

    request_body: bytes
    response: str | None
    expires_at: datetime | None

    @property
    def size(self) -> int:
        return len(self.request_body) + (len(self.response) if self.response else 0)


@attrs.frozen
class PromptRecord:
    """A prompt log as stored: linked to its audit row by (chain_id, seq) and by request id."""

    chain_id: str
    seq: int
    request_id: str
    tenant_id: int
    key_id: int
    created_at: datetime
    expires_at: datetime | None  # None: kept until the key's owner deletes it
    request_body: str
    response_text: str | None


# --- encoding and hashing -----------------------------------------------------------------------


def epoch_us(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("naive datetime in an audit row")
    return (when - _EPOCH) // _MICROSECOND


def _canonical_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return epoch_us(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def canonical(chain_id: str, seq: int, event: AuditEvent) -> bytes:
    """The bytes a row's hash covers: version, chain, seq and every field, in a fixed order."""
    values = [CHAIN_VERSION, chain_id, seq]
    values.extend(_canonical_value(getattr(event, name)) for name in EVENT_FIELDS)
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def genesis(chain_id: str) -> str:
    """The `prev_hash` of a chain's first row."""
    return hashlib.sha256(f"{CHAIN_VERSION}:{chain_id}".encode()).hexdigest()


def row_hash(prev_hash: str, chain_id: str, seq: int, event: AuditEvent) -> str:
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(canonical(chain_id, seq, event))
    return digest.hexdigest()


def new_chain_id(now: datetime) -> str:
    """A fresh chain id: start time (for humans; sorts by start) and 64 random bits."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


class Chain:
    """This process's chain: seals events in order. Not thread-safe; one sealer at a time."""

    __slots__ = ("head", "id", "seq", "started_at")

    def __init__(self, chain_id: str, started_at: datetime) -> None:
        self.id = chain_id
        self.started_at = started_at
        self.seq = 0
        self.head = genesis(chain_id)

    def seal(self, event: AuditEvent) -> AuditRow:
        seq = self.seq + 1
        digest = row_hash(self.head, self.id, seq, event)
        row = AuditRow(self.id, seq, self.head, digest, event)
        self.seq, self.head = seq, digest
        return row


# --- verification -------------------------------------------------------------------------------


@attrs.frozen
class ChainBreak:
    """The first broken link of a chain. `problem`: edited, relinked, missing, truncated,
    head_missing, head_mismatch."""

    chain_id: str
    seq: int
    problem: str
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain_id} at seq {self.seq}: {self.problem}: {self.detail}"


class ChainVerifier:
    """Checks one chain's rows, fed in `seq` order (in pages), then its recorded head.

    `feed` returns the first break found (and ignores everything after it), `end` the break at
    the tail if the rows stop before the head, or the head does not match the last row.
    """

    __slots__ = ("broken", "chain_id", "checked", "last_hash", "last_seq")

    def __init__(self, chain_id: str) -> None:
        self.chain_id = chain_id
        self.last_seq = 0
        self.last_hash = genesis(chain_id)
        self.checked = 0
        self.broken: ChainBreak | None = None

    def feed(self, rows: Iterable[AuditRow]) -> ChainBreak | None:
        for row in rows:
            if self.broken is not None:
                break
            self.broken = self._check(row)
        return self.broken

    def _check(self, row: AuditRow) -> ChainBreak | None:
        expected = self.last_seq + 1
        if row.seq != expected:
            return self._break(
                expected,
                "missing",
                f"rows {expected}..{row.seq - 1} are missing (deleted?); the next one is {row.seq}"
                if row.seq > expected
                else f"row {row.seq} appears after row {self.last_seq}",
            )
        if row_hash(row.prev_hash, row.chain_id, row.seq, row.event) != row.hash:
            return self._break(
                row.seq, "edited", "the row's fields do not match its hash (the row was changed)"
            )
        if row.prev_hash != self.last_hash:
            return self._break(
                row.seq,
                "relinked",
                f"the row does not follow row {self.last_seq} (that row was changed and "
                "rehashed, or rows were replaced or reordered)",
            )
        self.last_seq, self.last_hash = row.seq, row.hash
        self.checked += 1
        return None

    def end(self, head_seq: int | None, head_hash: str | None) -> ChainBreak | None:
        """After the last row: compare with the head recorded in the store (None: no head)."""
        if self.broken is not None:
            return self.broken
        if head_seq is None:
            self.broken = self._break(
                self.last_seq, "head_missing", "rows exist but the chain's head record does not"
            )
        elif self.last_seq < head_seq:
            self.broken = self._break(
                self.last_seq + 1,
                "truncated",
                f"the rows end at {self.last_seq} but the recorded head is {head_seq} "
                "(the tail of the chain was deleted)",
            )
        elif self.last_seq == head_seq and head_hash != self.last_hash:
            self.broken = self._break(
                head_seq, "head_mismatch", "the last row's hash differs from the recorded head"
            )
        # last_seq > head_seq: rows written after the head was read; they verified above.
        return self.broken

    def _break(self, seq: int, problem: str, detail: str) -> ChainBreak:
        return ChainBreak(self.chain_id, seq, problem, detail)


# --- building events ----------------------------------------------------------------------------


def clean_text(text: str, limit: int = TEXT_MAX_CHARS) -> str:
    """Client-supplied text made safe to store and show: printable ASCII kept (at most `limit`
    characters of input), everything else `%XX`-escaped (UTF-8 bytes), `%` itself included.
    No NUL, no control character, no terminal escape reaches the store or an operator's screen."""
    cut = text[:limit]
    if cut.isascii() and cut.isprintable() and " " not in cut and "%" not in cut:
        return cut
    out: list[str] = []
    for char in cut:
        if "!" <= char <= "~" and char != "%":
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def clean_target(target: bytes) -> str:
    """A raw request target for the audit (404, 405): the query cut off (it may carry
    secrets), at most `TARGET_MAX_CHARS` bytes, escaped like `clean_text`."""
    path = target[: TARGET_MAX_CHARS * 4].split(b"?", 1)[0].split(b"#", 1)[0]
    return clean_text(path[:TARGET_MAX_CHARS].decode("latin-1"), TARGET_MAX_CHARS)


def charged_tokens(
    usage: Usage | None, prompt_estimate: int, forwarded: bool
) -> tuple[int, int, bool]:
    """(prompt, completion, reported) for the audit row, the way settlement counts them: the
    reported usage (a missing prompt count replaced by the estimate); for a request forwarded
    without any usage seen, the prompt estimate; a request never forwarded used nothing."""
    if usage is not None:
        return usage.prompt_tokens or prompt_estimate, usage.completion_tokens, usage.reported
    if forwarded:
        return prompt_estimate, 0, False
    return 0, 0, False


def overflow_event(started: datetime, ended: datetime, day: date, refused: int) -> AuditEvent:
    """The summary row of an episode in which `refused` requests got 503 (queue full)."""
    return AuditEvent(
        ts=started,
        day=day,
        request_id="-",
        tenant_id=None,
        key_id=None,
        key_prefix=None,
        client="-",
        method="-",
        surface="gateway",
        path="-",
        model=None,
        status=503,
        outcome="refused",
        refusal=AUDIT_QUEUE_FULL,
        prompt_tokens=0,
        completion_tokens=0,
        tokens_reported=False,
        streamed=False,
        ttfb_us=None,
        latency_us=0,
        backend=None,
        requests=refused,
        note=(
            f"{refused} requests refused with 503 from {started.isoformat()} to "
            f"{ended.isoformat()}: the audit queue was full"
        ),
    )


def event_values(event: AuditEvent) -> list[Any]:
    """The event's fields in canonical (= column) order."""
    return [getattr(event, name) for name in EVENT_FIELDS]


def event_from_values(values: Sequence[Any]) -> AuditEvent:
    """The inverse of `event_values` (values already of the right Python types)."""
    return AuditEvent(*values)
