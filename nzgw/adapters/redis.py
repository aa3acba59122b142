"""Counters in Redis through coredis, natively on Trio: one Lua script call per operation.

Key layout (`P` = the configured prefix; every key of one tenant shares the hash tag `{t<id>}`,
so each script touches one slot and runs on Redis Cluster too):

    P{t<t>}:seed                 string  epoch of the budget counters (absent: rebuild them)
    P{t<t>}:log                  zset    window log: member "<lease>|<tokens>", score admitted ms
    P{t<t>}:tok                  string  sum of the tokens in :log
    P{t<t>}:lease                zset    concurrency leases: member lease id, score expiry ms
    P{t<t>}:rsv                  hash    reservation of each lease: "<tokens>|<day id>|<month id>"
    P{t<t>}:k<k>:gone:<lease>    string  tombstone of an admission its caller gave up on
    P{t<t>}:d:<YYYY-MM-DD>       string  tokens of that day (settled + reserved)
    P{t<t>}:m:<YYYY-MM>          string  tokens of that month
    P{t<t>}:life                 string  lifetime tokens
    P{t<t>}:ver                  string  settlements and corrections of the tenant (the
                                         reconciliation's compare-and-set)
    P{t<t>}:k<k>:log|tok|lease|d:<day>|m:<month>|life    the same for key <k> of that tenant

Window keys expire by themselves when idle; day and month counters a day after their period
ended; `:seed` and `:life` never (run Redis with `maxmemory-policy noeviction`). `:lease` and
`:rsv` hold only leases not yet settled: a lease past its expiry (its process died, or its
refreshes failed for a whole ttl) has its reservation taken back off the budget counters by the
next admission of its tenant, so a dead request does not stay charged (docs: README "Failure
behaviour"). All times in the scripts come from Redis `TIME`: one clock for every replica.

Every call goes through `_eval`, which keeps cancellation away from coredis (a call cancelled
while coredis opens a connection loses that pool slot for good; docs/ARCHITECTURE.md) and judges
Redis by its replies, not by how late our own event loop gets to them:

- the call runs in `trio.CancelScope(shield=True)`: a client disconnect does not cut it;
- it goes out on the node's one live connection, written by the calling task before it yields
  (`nzgw.adapters.redis_link`; docs/ARCHITECTURE.md "Counters under a burst"): no pool checkout,
  no writer task to wait for. Only a call that finds no live connection waits, for one connect
  per node, bounded by coredis' own `connect_timeout` (`max_wait`: a loopback connect is
  instant, only a busy loop makes it look slow, and a refused one fails at once); our scopes
  never cancel a connect;
- the wait for the reply fails only when the node has been *silent* for `call_timeout`: no
  reply to any call of this process on that node since the later of the call's start and the
  last reply. Before it fails, the call lets the event loop read what the socket may already
  hold, and bytes still unread in the socket count as a reply (a busy loop makes every reply
  late, it does not make Redis slow). Whatever the replies, no call waits more than `max_wait`
  (`5 * call_timeout`);
- on Redis Cluster, a call goes to the master of its tenant's slot and follows MOVED and ASK;
  TRYAGAIN (a migrating slot) makes it go again, up to `max_wait`;
- no retries inside coredis (a retried admission could reserve twice);
- every failure (silence, refused connection, protocol or script error) becomes
  `CountersUnavailableError`; nothing above this module sees a coredis exception.

An admission cannot outlive its caller: it carries a deadline in Redis time (the caller's
`max_wait` end, converted with a lower bound of the Redis clock's offset, so it never falls
after the caller gave up) and the script does nothing past it. A caller that gave up before that
sends a release by lease id without waiting for an answer: it takes back the reservation if the
admission ran, or leaves a tombstone that makes the admission do nothing if it runs later.
A settlement or refresh that runs late only releases, corrects or extends: harmless.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, cast

import coredis
import trio
from coredis.exceptions import RedisError

from nzgw.adapters.redis_link import (
    MAX_WAIT_FACTOR,
    Links,
    NoAnswerError,
    Node,
    NodeCalls,
    entered,
    redis_client,
)
from nzgw.core.limits import (
    CONCURRENCY_RETRY_MS,
    LIMIT_ORDER,
    PERIOD_SLACK_MS,
    SCOPE_ORDER,
    TPM_RETRY_SCAN,
    WINDOW_MS,
    AdmissionRequest,
    AdmissionResult,
    Lease,
    Periods,
    Refusal,
    WindowUsage,
)
from nzgw.ports import (
    BudgetSeed,
    BudgetSnapshot,
    CountersUnavailableError,
    ScopeBudget,
    SeedNeeded,
    UsageTotals,
)

log = logging.getLogger("nzgw.counters")

# --- scripts ------------------------------------------------------------------------------------
# KEYS of ADMIT, SETTLE and RELEASE: [1] seed marker, [2..7] key scope, [8..13] tenant scope,
# each scope as log, tok, lease, day, month, life; [14] key rsv, [15] tenant rsv, [16] tombstone,
# SETTLE also gets [17], the tenant's version (it moves it).
# ADMIT's ARGV[1] is its deadline in Redis ms (past it: status 3, nothing done); ARGV[23], [24]
# the day and month ids; ARGV[25] the caller's clock for the windows (tests), '' for Redis'.
# Every reply ends with Redis' clock; admitted or refused, the tokens reclaimed from expired
# leases of the tenant come before it (and an admission's window `now` before those).
# Limit codes are indexes into
# LIMIT_ORDER (0 rpm, 1 tpm, 2 concurrency, 3 daily, 4 monthly, 5 lifetime); scope codes into
# SCOPE_ORDER (0 key, 1 tenant).

_ADMIT: Final = """
local clock = redis.call('TIME')
local real = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if real > tonumber(ARGV[1]) or redis.call('EXISTS', KEYS[16]) == 1 then return {3, real} end
local now = real
if ARGV[25] ~= '' then now = tonumber(ARGV[25]) end
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {2, real} end
local lease = ARGV[2]
local reserve = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local day_end = tonumber(ARGV[6])
local month_end = tonumber(ARGV[7])
local slack = tonumber(ARGV[8])
local scan = tonumber(ARGV[9])
local cutoff = now - window

local function tokens_of(member) return tonumber(string.match(member, '|(%d+)$')) end

local day_id, month_id = ARGV[23], ARGV[24]

-- Take an expired lease's reservation back: no live request holds it (live ones are refreshed).
local function expire(base, rsv)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[base + 2], '-inf', now)
  if #dead == 0 then return 0 end
  local reclaimed = 0
  for i = 1, #dead do
    local held = redis.call('HGET', rsv, dead[i])
    if held then
      redis.call('HDEL', rsv, dead[i])
      local tokens, day, month = string.match(held, '^(%d+)|([^|]*)|(.*)$')
      tokens = tonumber(tokens)
      if tokens and tokens > 0 then
        if day == day_id then redis.call('DECRBY', KEYS[base + 3], tokens) end
        if month == month_id then redis.call('DECRBY', KEYS[base + 4], tokens) end
        redis.call('DECRBY', KEYS[base + 5], tokens)
        reclaimed = reclaimed + tokens
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[base + 2], '-inf', now)
  return reclaimed
end

local function load(base, rsv)
  local log, tok, leases = KEYS[base], KEYS[base + 1], KEYS[base + 2]
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #gone > 0 then
    local freed = 0
    for i = 1, #gone do freed = freed + tokens_of(gone[i]) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    if freed ~= 0 then redis.call('DECRBY', tok, freed) end
  end
  local reclaimed = expire(base, rsv)
  local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  return {
    base = base,
    reclaimed = reclaimed,
    oldest = first[2] and tonumber(first[2]) or false,
    used = {
      redis.call('ZCARD', log),
      tonumber(redis.call('GET', tok) or '0'),
      redis.call('ZCARD', leases),
      tonumber(redis.call('GET', KEYS[base + 3]) or '0'),
      tonumber(redis.call('GET', KEYS[base + 4]) or '0'),
      tonumber(redis.call('GET', KEYS[base + 5]) or '0'),
    },
  }
end

local scopes = {load(2, KEYS[14]), load(8, KEYS[15])}

-- Entries are stamped with Redis' own clock; still, never report a wait longer than the window
-- itself, nor a negative one.
local function in_window(ms)
  if ms > window then return window end
  if ms < 0 then return 0 end
  return ms
end

local function windows(extra_requests, extra_tokens)
  local out = {}
  for s = 1, 2 do
    local st = scopes[s]
    local oldest = st.oldest
    if not oldest and extra_requests > 0 then oldest = now end
    out[#out + 1] = st.used[1] + extra_requests
    out[#out + 1] = st.used[2] + extra_tokens
    out[#out + 1] = oldest and in_window(oldest + window - now) or 0
  end
  return out
end

local function retry_after(kind, st, allowed, need, used)
  if kind == 0 then
    if allowed <= 0 then return -1 end
    local e = redis.call('ZRANGE', KEYS[st.base], used - allowed, used - allowed, 'WITHSCORES')
    return in_window(tonumber(e[2]) + window - now)
  elseif kind == 1 then
    if need > allowed then return -1 end
    local es = redis.call('ZRANGE', KEYS[st.base], 0, scan - 1, 'WITHSCORES')
    local freed = 0
    for i = 1, #es, 2 do
      freed = freed + tokens_of(es[i])
      if used - freed + need <= allowed then
        return in_window(tonumber(es[i + 1]) + window - now)
      end
    end
    return window
  elseif kind == 2 then return tonumber(ARGV[10])
  elseif kind == 3 then return day_end - now
  elseif kind == 4 then return month_end - now
  end
  return -1
end

-- check order: lifetime, monthly, daily, tokens/min, requests/min, concurrency; key, tenant
for _, kind in ipairs({5, 4, 3, 1, 0, 2}) do
  local need = reserve
  if kind == 0 or kind == 2 then need = 1 end
  for s = 1, 2 do
    local allowed = tonumber(ARGV[11 + (s - 1) * 6 + kind])
    if allowed >= 0 then
      local st = scopes[s]
      local used = st.used[kind + 1]
      if used + need > allowed then
        local out = windows(0, 0)
        table.insert(out, 1, '')
        table.insert(out, 1, 1)
        for _, v in ipairs({kind, s - 1, retry_after(kind, st, allowed, need, used),
                            allowed, used, need, scopes[2].reclaimed, real}) do
          out[#out + 1] = v
        end
        return out
      end
    end
  end
end

local member = lease .. '|' .. reserve
local held = reserve .. '|' .. day_id .. '|' .. month_id
local day_ttl = day_end - now + slack
local month_ttl = month_end - now + slack
for s = 1, 2 do
  local base = scopes[s].base
  redis.call('HSET', KEYS[13 + s], lease, held)
  redis.call('ZADD', KEYS[base], now, member)
  redis.call('PEXPIRE', KEYS[base], 2 * window)
  redis.call('INCRBY', KEYS[base + 1], reserve)
  redis.call('PEXPIRE', KEYS[base + 1], 2 * window)
  redis.call('ZADD', KEYS[base + 2], now + lease_ttl, lease)
  redis.call('INCRBY', KEYS[base + 3], reserve)
  redis.call('PEXPIRE', KEYS[base + 3], day_ttl)
  redis.call('INCRBY', KEYS[base + 4], reserve)
  redis.call('PEXPIRE', KEYS[base + 4], month_ttl)
  redis.call('INCRBY', KEYS[base + 5], reserve)
end
local out = windows(1, reserve)
table.insert(out, 1, epoch)
table.insert(out, 1, 0)
out[#out + 1] = now
out[#out + 1] = scopes[2].reclaimed
out[#out + 1] = real
return out
"""

# ARGV: 1 lease epoch, 2 lease id, 3 reserved, 4 tokens used, 5 admitted at, 6 day ttl,
# 7 month ttl (<= 0: that period's counter is gone, leave it). Returns the tenant's budget delta.
# A reservation still held (in :rsv) is corrected by the difference; one already taken back (the
# lease expired) or never in these counters (rebuilt since) is charged the tokens used.
_SETTLE: Final = """
local lease, reserved, used = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local delta = used - reserved
local marker = redis.call('GET', KEYS[1])
local day_ttl, month_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local budget = 0
redis.call('INCR', KEYS[17])
for s = 1, 2 do
  local base = 2 + (s - 1) * 6
  redis.call('ZREM', KEYS[base + 2], lease)
  if delta ~= 0 and redis.call('ZREM', KEYS[base], lease .. '|' .. ARGV[3]) == 1 then
    redis.call('ZADD', KEYS[base], ARGV[5], lease .. '|' .. ARGV[4])
    redis.call('INCRBY', KEYS[base + 1], delta)
  end
  local held = redis.call('HDEL', KEYS[13 + s], lease)
  budget = 0
  if marker == ARGV[1] and held == 1 then budget = delta
  elseif marker then budget = used
  end
  if budget ~= 0 then
    if day_ttl > 0 then
      redis.call('INCRBY', KEYS[base + 3], budget)
      redis.call('PEXPIRE', KEYS[base + 3], day_ttl)
    end
    if month_ttl > 0 then
      redis.call('INCRBY', KEYS[base + 4], budget)
      redis.call('PEXPIRE', KEYS[base + 4], month_ttl)
    end
    redis.call('INCRBY', KEYS[base + 5], budget)
  end
end
return budget
"""

# The caller of an admission gave up. ARGV: 1 lease id, 2 reserved, 3 tombstone ttl (ms).
# Admitted: undo it (slot, window entry, reservation). Not (yet): tombstone, so it never will be.
_RELEASE: Final = """
local lease, reserved = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', KEYS[14], lease) == 0 and redis.call('HEXISTS', KEYS[15], lease) == 0 then
  redis.call('SET', KEYS[16], '1', 'PX', ARGV[3])
  return 0
end
for s = 1, 2 do
  local base = 2 + (s - 1) * 6
  redis.call('ZREM', KEYS[base + 2], lease)
  if redis.call('ZREM', KEYS[base], lease .. '|' .. ARGV[2]) == 1 then
    redis.call('DECRBY', KEYS[base + 1], reserved)
  end
  if redis.call('HDEL', KEYS[13 + s], lease) == 1 and reserved > 0 then
    for i = 3, 5 do redis.call('DECRBY', KEYS[base + i], reserved) end
  end
end
return 1
"""

# KEYS: key lease zset, tenant lease zset. ARGV: lease id, ttl (ms), caller's clock or ''. An
# expired lease is left where it is: the next admission takes its reservation back (`expire`).
_REFRESH: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if ARGV[3] ~= '' then now = tonumber(ARGV[3]) end
local held = 0
for i = 1, 2 do
  local expiry = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[2]), ARGV[1])
    held = 1
  end
end
return held
"""

# KEYS: marker, then (day, month, life) of the tenant and of each key. ARGV: epoch, day ttl,
# month ttl, then the values in the same order as the keys.
_SEED: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #KEYS, 3 do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[2])
  redis.call('SET', KEYS[i + 1], ARGV[i + 3], 'PX', ARGV[3])
  redis.call('SET', KEYS[i + 2], ARGV[i + 4])
end
return 1
"""


# Reconciliation. KEYS: marker, version, the :rsv of the tenant and of each key, then (day,
# month, life) of the tenant and of each key. ARGV: day id, month id, scopes.
# Returns {0} (not seeded) or {1, epoch, version, then per scope: day, month, life, and of those
# the reservations of unsettled leases (day, month, life)}.
_SNAPSHOT: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {0} end
local out = {1, epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
local n = tonumber(ARGV[3])
for s = 1, n do
  local base = 2 + n + (s - 1) * 3
  for i = 1, 3 do out[#out + 1] = tonumber(redis.call('GET', KEYS[base + i]) or '0') end
  local hd, hm, hl = 0, 0, 0
  local held = redis.call('HVALS', KEYS[2 + s])
  for i = 1, #held do
    local tokens, day, month = string.match(held[i], '^(%d+)|([^|]*)|(.*)$')
    tokens = tonumber(tokens)
    hl = hl + tokens
    if day == ARGV[1] then hd = hd + tokens end
    if month == ARGV[2] then hm = hm + tokens end
  end
  out[#out + 1] = hd
  out[#out + 1] = hm
  out[#out + 1] = hl
end
return out
"""

# KEYS: as _SNAPSHOT. ARGV: epoch, version, day ttl, month ttl (<= 0: that period's counter is
# gone, leave it), scopes, then (day, month, life) deltas per scope. Compare-and-set: nothing
# unless epoch and version are unchanged; then the version moves (a second reconciler that read
# the same snapshot does nothing). Admissions meanwhile only added reservations: kept.
_CORRECT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[2]) then return 0 end
redis.call('INCR', KEYS[2])
local day_ttl, month_ttl, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for s = 1, n do
  local base = 2 + n + (s - 1) * 3
  local a = 5 + (s - 1) * 3
  local dd, dm, dl = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if dd ~= 0 and day_ttl > 0 then
    redis.call('INCRBY', KEYS[base + 1], dd)
    redis.call('PEXPIRE', KEYS[base + 1], day_ttl)
  end
  if dm ~= 0 and month_ttl > 0 then
    redis.call('INCRBY', KEYS[base + 2], dm)
    redis.call('PEXPIRE', KEYS[base + 2], month_ttl)
  end
  if dl ~= 0 then redis.call('INCRBY', KEYS[base + 3], dl) end
end
return 1
"""


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SCRIPTS: Final = {
    name: _Script(src)
    for name, src in (
        ("admit", _ADMIT),
        ("settle", _SETTLE),
        ("refresh", _REFRESH),
        ("seed", _SEED),
        ("release", _RELEASE),
        ("snapshot", _SNAPSHOT),
        ("correct", _CORRECT),
    )
}

_Value = int | str


class RedisCounters:
    """The Counters port on Redis (or Redis Cluster). Obtain it from `open_redis_counters`."""

    def __init__(
        self,
        client: coredis.Redis[str] | coredis.RedisCluster[str],
        *,
        prefix: str,
        call_timeout: float,
        caller_clock: bool = False,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (hash tags are ours)")
        self._calls = NodeCalls(client, call_timeout=call_timeout)
        self._links = self._calls.links
        self._prefix = prefix
        self._max_wait = self._calls.max_wait
        self._static_keys: dict[tuple[int, int], tuple[str, ...]] = {}
        # Per node: a lower bound of (Redis ms - local ms): that node's clock at a local instant
        # is at least the local time plus this. Deadlines converted with it never fall after
        # the local one.
        self._offset_ms: dict[str, float] = {}
        self._clock_read: dict[str, trio.Event] = {}  # set when that node's TIME call is over
        # Tests only: windows and leases on the callers' `now_ms` (exact virtual times).
        self._caller_clock = caller_clock

    # --- keys

    def _scope_keys(self, tenant_id: int, key_id: int) -> tuple[str, ...]:
        """Marker; key scope: log, tok, lease, stem; tenant scope: the same. Cached."""
        cached = self._static_keys.get((tenant_id, key_id))
        if cached is None:
            if len(self._static_keys) >= 100_000:
                self._static_keys.clear()
            t = f"{self._prefix}{{t{tenant_id}}}:"
            k = f"{t}k{key_id}:"
            cached = (f"{t}seed", f"{k}log", f"{k}tok", f"{k}lease", k)
            cached += (f"{t}log", f"{t}tok", f"{t}lease", t)
            self._static_keys[(tenant_id, key_id)] = cached
        return cached

    def _keys(self, tenant_id: int, key_id: int, periods: Periods, lease_id: str) -> list[str]:
        marker, klog, ktok, klease, k, tlog, ttok, tlease, t = self._scope_keys(tenant_id, key_id)
        day, month = f"d:{periods.day_id}", f"m:{periods.month_id}"
        return [
            marker,
            *(klog, ktok, klease, k + day, k + month, k + "life"),
            *(tlog, ttok, tlease, t + day, t + month, t + "life"),
            k + "rsv",
            t + "rsv",
            f"{k}gone:{lease_id}",
        ]

    # --- the edge: every call bounded, shielded, translated

    async def _eval(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[_Value],
        *,
        start: float | None = None,
        node: Node = None,
    ) -> object:
        """Run script `name` on the node that serves `keys` (`node`, if the caller routed
        already); every failure is `CountersUnavailableError` (`NoAnswerError` when it may
        still run in Redis)."""
        script = _SCRIPTS[name]
        if start is None:
            start = trio.current_time()
        try:
            return await self._calls.script(
                script.sha, script.source, keys, args, start=start, node=node
            )
        except (RedisError, OSError) as exc:  # OSError: TimeoutError included
            log.warning("counter store: %s failed: %r", name, exc)
            raise CountersUnavailableError(f"counter store: {exc!r}") from exc

    def _observe_clock(self, node: Node, redis_ms: int) -> None:
        name = Links.name(node)
        sample = redis_ms - trio.current_time() * 1000
        offset = self._offset_ms.get(name)
        # Keep the tightest lower bound; a clock stepped back by more than a second resets it.
        if offset is None or sample > offset or sample < offset - 1000:
            self._offset_ms[name] = sample

    async def _redis_ms(self, local: float, node: Node) -> int:
        """A lower bound of `node`'s clock at the local instant `local` (trio clock)."""
        name = Links.name(node)
        while (offset := self._offset_ms.get(name)) is None:
            running = self._clock_read.get(name)
            if running is not None:  # one TIME call per node at a time; the others wait for it
                await running.wait()
                continue
            done = self._clock_read[name] = trio.Event()
            try:
                await self._read_clock(node)
            finally:
                del self._clock_read[name]
                done.set()
        return math.floor(local * 1000 + offset)

    async def _read_clock(self, node: Node) -> None:
        """One TIME call on `node` (shielded, as every call) into its clock offset."""
        start = trio.current_time()
        with trio.CancelScope(shield=True):
            try:
                reply = await self._calls.call(node, start, False, b"TIME")
            except (RedisError, OSError) as exc:
                raise CountersUnavailableError(f"counter store: {exc!r}") from exc
        seconds, micros = cast("list[str]", reply)
        self._observe_clock(node, int(seconds) * 1000 + int(micros) // 1000)

    async def _release_nowait(
        self, node: Node, keys: Sequence[str], request: AdmissionRequest
    ) -> None:
        """Tell Redis that the caller of `request` gave up; do not wait for an answer."""
        args: list[_Value] = [
            request.lease_id,
            request.reserve_tokens,
            math.ceil(2 * self._max_wait * 1000) + 1000,
        ]
        link = self._links.live(node)
        if link is None:
            return  # best effort: the admission's own deadline still holds
        link.request(b"EVAL", _RELEASE, len(keys), *keys, *args, timeout=2 * self._max_wait)
        with trio.CancelScope(shield=True):
            try:
                await link.flush()
            except RedisError as exc:
                log.warning("counter store: release of lease %s failed: %r", request.lease_id, exc)

    # --- the port

    async def ping(self) -> None:
        """A single Redis: runs the cheapest script (proves the server answers scripts, not
        only PING). A cluster: reads the clock of every master and succeeds when at least one
        answers (a lost master costs its tenants 503, not every tenant's readiness). The first
        call also connects and reads the clocks (call it at start: a burst then finds the
        connections and the clock offsets ready)."""
        if not self._links.cluster:
            if "" not in self._offset_ms:
                await self._redis_ms(trio.current_time(), None)
            keys = [f"{self._prefix}{{ping}}:a", f"{self._prefix}{{ping}}:b"]
            await self._eval("refresh", keys, ["-", 1, ""])
            return
        failures: list[CountersUnavailableError] = []
        masters = self._links.primaries()
        for node in masters:
            try:
                await self._read_clock(node)
            except CountersUnavailableError as exc:
                log.warning("counter store: master %s: %s", Links.name(node), exc)
                failures.append(exc)
        if len(failures) == len(masters):
            raise CountersUnavailableError("counter store: no master of the cluster answers")

    async def admit(self, request: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        """Cancellation: as every call, runs to its end (shielded). A call that gets no answer
        in time sends a release (see the module docstring) and raises."""
        periods = request.periods
        start = trio.current_time()
        keys = self._keys(request.tenant_id, request.key_id, periods, request.lease_id)
        try:
            node = self._links.node_for(keys[0])
        except RedisError as exc:  # a cluster slot that no master serves
            raise CountersUnavailableError(f"counter store: {exc!r}") from exc
        # In the clock of the node that serves the tenant (after a redirection, the other
        # node's clock: cluster nodes' clocks agree to well within the call's wait).
        deadline = await self._redis_ms(start + self._max_wait, node)
        args: list[_Value] = [
            deadline,
            request.lease_id,
            request.reserve_tokens,
            request.lease_ttl_ms,
            WINDOW_MS,
            periods.day_end_ms,
            periods.month_end_ms,
            PERIOD_SLACK_MS,
            TPM_RETRY_SCAN,
            CONCURRENCY_RETRY_MS,
        ]
        for limits in (request.limits.key, request.limits.tenant):
            args += [-1 if value is None else value for value in limits.as_tuple()]
        args += [periods.day_id, periods.month_id, request.now_ms if self._caller_clock else ""]
        try:
            reply = await self._eval("admit", keys, args, start=start, node=node)
        except NoAnswerError:  # it may still run in Redis: undo it (refused connects cannot)
            await self._release_nowait(node, keys, request)
            raise
        try:
            if isinstance(reply, list) and reply:
                self._observe_clock(node, int(reply[-1]))
            return _admission(request, reply)
        except (TypeError, ValueError, IndexError) as exc:
            raise CountersUnavailableError(f"counter store: unexpected answer {reply!r}") from exc

    async def settle(self, lease: Lease, *, tokens: int, now_ms: int) -> None:
        periods = lease.periods
        args: list[_Value] = [
            lease.epoch,
            lease.id,
            lease.reserved,
            max(tokens, 0),  # the scripts parse "<lease>|<digits>"
            lease.admitted_ms,
            periods.day_end_ms - now_ms + PERIOD_SLACK_MS,
            periods.month_end_ms - now_ms + PERIOD_SLACK_MS,
        ]
        keys = self._keys(lease.tenant_id, lease.key_id, periods, lease.id)
        tenant_stem = self._scope_keys(lease.tenant_id, lease.key_id)[-1]
        keys.append(tenant_stem + "ver")  # the tenant's version (reconciliation)
        await self._eval("settle", keys, args)

    async def refresh(self, lease: Lease, *, now_ms: int) -> bool:
        """Extends by the ttl from Redis' clock (one clock for all replicas), not `now_ms`."""
        scope = self._scope_keys(lease.tenant_id, lease.key_id)
        args: list[_Value] = [lease.id, lease.ttl_ms, now_ms if self._caller_clock else ""]
        return await self._eval("refresh", [scope[3], scope[7]], args) == 1

    async def seed(self, seed: BudgetSeed) -> bool:
        periods = seed.periods
        t = f"{self._prefix}{{t{seed.tenant_id}}}:"
        day, month = f"d:{periods.day_id}", f"m:{periods.month_id}"
        keys = [f"{t}seed"]
        args: list[_Value] = [
            seed.epoch,
            periods.day_end_ms - seed.now_ms + PERIOD_SLACK_MS,
            periods.month_end_ms - seed.now_ms + PERIOD_SLACK_MS,
        ]
        for stem, totals in [(t, seed.tenant)] + [
            (f"{t}k{key_id}:", totals) for key_id, totals in seed.keys.items()
        ]:
            keys += [stem + day, stem + month, stem + "life"]
            args += [totals.day_tokens, totals.month_tokens, totals.lifetime_tokens]
        return await self._eval("seed", keys, args) == 1

    # --- reconciliation

    def _budget_keys(self, tenant_id: int, key_ids: Sequence[int], periods: Periods) -> list[str]:
        t = f"{self._prefix}{{t{tenant_id}}}:"
        stems = [t] + [f"{t}k{key_id}:" for key_id in key_ids]
        day, month = f"d:{periods.day_id}", f"m:{periods.month_id}"
        keys = [f"{t}seed", f"{t}ver"] + [stem + "rsv" for stem in stems]
        for stem in stems:
            keys += [stem + day, stem + month, stem + "life"]
        return keys

    async def budget_snapshot(
        self, tenant_id: int, key_ids: Sequence[int], periods: Periods
    ) -> BudgetSnapshot | None:
        keys = self._budget_keys(tenant_id, key_ids, periods)
        args: list[_Value] = [periods.day_id, periods.month_id, 1 + len(key_ids)]
        reply = await self._eval("snapshot", keys, args)
        if not isinstance(reply, list) or not reply:
            raise CountersUnavailableError(f"counter store: unexpected answer {reply!r}")
        try:
            if int(reply[0]) == 0:
                return None
            values = [int(v) for v in reply[2:]]
            scopes = [
                ScopeBudget(UsageTotals(*values[i : i + 3]), UsageTotals(*values[i + 3 : i + 6]))
                for i in range(1, len(values), 6)
            ]
            return BudgetSnapshot(
                tenant_id=tenant_id,
                epoch=str(reply[1]),
                version=values[0],
                periods=periods,
                tenant=scopes[0],
                keys=dict(zip(key_ids, scopes[1:], strict=True)),
            )
        except (TypeError, ValueError) as exc:
            raise CountersUnavailableError(f"counter store: unexpected answer {reply!r}") from exc

    async def correct_budgets(
        self,
        snapshot: BudgetSnapshot,
        tenant: UsageTotals,
        keys: Mapping[int, UsageTotals],
        *,
        now_ms: int,
    ) -> bool:
        key_ids = list(keys)
        periods = snapshot.periods
        args: list[_Value] = [
            snapshot.epoch,
            snapshot.version,
            periods.day_end_ms - now_ms + PERIOD_SLACK_MS,
            periods.month_end_ms - now_ms + PERIOD_SLACK_MS,
            1 + len(key_ids),
        ]
        for delta in [tenant, *keys.values()]:
            args += [delta.day_tokens, delta.month_tokens, delta.lifetime_tokens]
        keys_ = self._budget_keys(snapshot.tenant_id, key_ids, periods)
        return await self._eval("correct", keys_, args) == 1


def _admission(request: AdmissionRequest, reply: object) -> AdmissionResult | SeedNeeded:
    if not isinstance(reply, list) or not reply:
        raise ValueError("not a list")
    status = reply[0]
    if status == 2:
        return SeedNeeded(request.tenant_id)
    if status == 3:  # past its deadline, or its caller gave up already: nothing done
        raise ValueError("admission arrived after its deadline")
    kn, ktok, kreset, tn, ttok, treset = (int(v) for v in reply[2:8])
    key, tenant = WindowUsage(kn, ktok, kreset), WindowUsage(tn, ttok, treset)
    if status == 0:
        lease = Lease(
            id=request.lease_id,
            tenant_id=request.tenant_id,
            key_id=request.key_id,
            reserved=request.reserve_tokens,
            admitted_ms=int(reply[8]),  # Redis' clock: the window entry's score
            ttl_ms=request.lease_ttl_ms,
            epoch=str(reply[1]),
            periods=request.periods,
        )
        return AdmissionResult(lease, None, request.limits, key, tenant, int(reply[-2]))
    if status != 1:
        raise ValueError(f"status {status!r}")
    kind, scope, retry, allowed, used, requested = (int(v) for v in reply[8:14])
    refusal = Refusal(
        limit=LIMIT_ORDER[kind],
        scope=SCOPE_ORDER[scope],
        retry_after_ms=None if retry < 0 else retry,
        allowed=allowed,
        used=used,
        requested=requested,
    )
    return AdmissionResult(None, refusal, request.limits, key, tenant, int(reply[-2]))


@asynccontextmanager
async def open_redis_counters(
    url: str,
    *,
    call_timeout: float,
    prefix: str = "nzgw:",
    max_connections: int = 64,
    cluster: bool = False,
    caller_clock: bool = False,
) -> AsyncIterator[RedisCounters]:
    """Counters on the Redis server at `url` (`redis://host:port/db`), or with `cluster` on the
    Redis Cluster whose node `url` names (`NZGW_REDIS_CLUSTER`).

    `call_timeout` (`NZGW_COUNTERS_TIMEOUT`): seconds Redis may stay silent while a call waits
    before it raises `CountersUnavailableError`; no call waits more than `5 * call_timeout`.
    A single server is connected to lazily: opening succeeds while Redis is down, and every call
    then fails closed until it is back. A cluster's slot map is read when opening (it fails if
    no node answers). Enter it in a task that outlives the requests. `caller_clock` (tests
    only): the windows and leases use the callers' `now_ms` instead of Redis' clock.
    """
    client = redis_client(
        url,
        cluster=cluster,
        connect_timeout=MAX_WAIT_FACTOR * call_timeout,
        stream_timeout=2 * MAX_WAIT_FACTOR * call_timeout,
        max_connections=max_connections,
    )
    async with entered(client):
        yield RedisCounters(
            client, prefix=prefix, call_timeout=call_timeout, caller_clock=caller_clock
        )
