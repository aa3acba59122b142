"""Counters in Redis through coredis, natively on Trio: one Lua script call per operation.

Key layout (`P` = the configured prefix; every key of one tenant shares the hash tag `{t<id>}`,
so each script touches one slot and runs on Redis Cluster too):

    P{t<t>}:seed                 string  epoch of the budget counters (absent: rebuild them)
    P{t<t>}:log                  zset    window log: member "<lease>|<tokens>", score admitted ms
    P{t<t>}:tok                  string  sum of the tokens in :log
    P{t<t>}:lease                zset    concurrency leases: member lease id, score expiry ms
    P{t<t>}:d:<YYYY-MM-DD>       string  tokens of that day (settled + reserved)
    P{t<t>}:m:<YYYY-MM>          string  tokens of that month
    P{t<t>}:life                 string  lifetime tokens
    P{t<t>}:k<k>:log|tok|lease|d:<day>|m:<month>|life    the same for key <k> of that tenant

Window and lease keys expire by themselves when idle; day and month counters a day after their
period ended; `:seed` and `:life` never (run Redis with `maxmemory-policy noeviction`).

Every call goes through `_eval`, which keeps cancellation away from coredis (a call cancelled
while coredis opens a connection loses that pool slot for good; docs/ARCHITECTURE.md):

- the call runs in `trio.CancelScope(shield=True)`: a client disconnect does not cut it;
- it is bounded by `trio.move_on_at(start + call_timeout)`, and coredis' own timeouts are set
  so that opening a connection always ends, connected or failed, *before* that deadline: the
  TCP connect has `connect_timeout = call_timeout / 4` and must start by `0.6 * call_timeout`;
  a semaphore of `max_connections` guarantees that coredis never waits for a pool slot (no
  `pool_timeout`: it would cancel a connect itself); a call that gets no semaphore slot by then
  is refused without entering coredis. The deadline can only fall on the wait for a reply,
  where coredis abandons the request cleanly (the connection stays usable, the late reply is
  discarded). Cancelling the handshake after the connect is safe too (tested: coredis turns it
  into a connection error and gives the slot back);
- no retries inside coredis (a retried admission could reserve twice);
- every failure (timeout, refused connection, protocol or script error) becomes
  `CountersUnavailableError`; nothing above this module sees a coredis exception.

A call abandoned at the deadline may still run in Redis: an admission then holds a lease until
it expires and keeps its reservation charged (conservative); a settlement is then lost and the
reservation stays charged likewise.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import coredis
import trio
from coredis.exceptions import NoScriptError, RedisError
from coredis.retry import NoRetryPolicy

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
from nzgw.ports import BudgetSeed, CountersUnavailableError, SeedNeeded

log = logging.getLogger("nzgw.counters")

# --- scripts ------------------------------------------------------------------------------------
# KEYS of ADMIT and SETTLE: [1] seed marker, [2..7] key scope, [8..13] tenant scope, each scope
# as log, tok, lease, day, month, life. Limit codes are indexes into LIMIT_ORDER (0 rpm, 1 tpm,
# 2 concurrency, 3 daily, 4 monthly, 5 lifetime); scope codes into SCOPE_ORDER (0 key, 1 tenant).

_ADMIT: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {2} end
local now = tonumber(ARGV[1])
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

local function load(base)
  local log, tok, leases = KEYS[base], KEYS[base + 1], KEYS[base + 2]
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #gone > 0 then
    local freed = 0
    for i = 1, #gone do freed = freed + tokens_of(gone[i]) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    if freed ~= 0 then redis.call('DECRBY', tok, freed) end
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  return {
    base = base,
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

local scopes = {load(2), load(8)}

-- Callers stamp their own clocks, so an entry can be a little newer than this call's `now`
-- (another process read its clock later but reached Redis first): never report a wait longer
-- than the window itself, nor a negative one.
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
                            allowed, used, need}) do
          out[#out + 1] = v
        end
        return out
      end
    end
  end
end

local member = lease .. '|' .. reserve
local day_ttl = day_end - now + slack
local month_ttl = month_end - now + slack
for s = 1, 2 do
  local base = scopes[s].base
  redis.call('ZADD', KEYS[base], now, member)
  redis.call('PEXPIRE', KEYS[base], 2 * window)
  redis.call('INCRBY', KEYS[base + 1], reserve)
  redis.call('PEXPIRE', KEYS[base + 1], 2 * window)
  redis.call('ZADD', KEYS[base + 2], now + lease_ttl, lease)
  redis.call('PEXPIRE', KEYS[base + 2], 2 * lease_ttl)
  redis.call('INCRBY', KEYS[base + 3], reserve)
  redis.call('PEXPIRE', KEYS[base + 3], day_ttl)
  redis.call('INCRBY', KEYS[base + 4], reserve)
  redis.call('PEXPIRE', KEYS[base + 4], month_ttl)
  redis.call('INCRBY', KEYS[base + 5], reserve)
end
local out = windows(1, reserve)
table.insert(out, 1, epoch)
table.insert(out, 1, 0)
return out
"""

# ARGV: 1 lease epoch, 2 lease id, 3 reserved, 4 tokens used, 5 admitted at, 6 day ttl,
# 7 month ttl (<= 0: that period's counter is gone, leave it). Returns the budget delta.
_SETTLE: Final = """
local lease, reserved, used = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local delta = used - reserved
for base = 2, 8, 6 do
  redis.call('ZREM', KEYS[base + 2], lease)
  if delta ~= 0 and redis.call('ZREM', KEYS[base], lease .. '|' .. ARGV[3]) == 1 then
    redis.call('ZADD', KEYS[base], ARGV[5], lease .. '|' .. ARGV[4])
    redis.call('INCRBY', KEYS[base + 1], delta)
  end
end
local marker = redis.call('GET', KEYS[1])
local budget = 0
if marker == ARGV[1] then budget = delta
elseif marker then budget = used
end
if budget ~= 0 then
  local day_ttl, month_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
  for base = 2, 8, 6 do
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

# KEYS: key lease zset, tenant lease zset. ARGV: lease id, now, new expiry, key ttl.
_REFRESH: Final = """
local held = 0
for i = 1, 2 do
  local expiry = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if expiry then
    if tonumber(expiry) <= tonumber(ARGV[2]) then
      redis.call('ZREM', KEYS[i], ARGV[1])
    else
      redis.call('ZADD', KEYS[i], 'XX', ARGV[3], ARGV[1])
      redis.call('PEXPIRE', KEYS[i], ARGV[4])
      held = 1
    end
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
    )
}

_Value = int | str


class RedisCounters:
    """The Counters port on Redis. Obtain it from `open_redis_counters`."""

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        prefix: str,
        call_timeout: float,
        max_connections: int,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (hash tags are ours)")
        self._client = client
        self._prefix = prefix
        self._timeout = call_timeout
        # A call may enter coredis only this long after it started: a TCP connect it then starts
        # (connect_timeout = call_timeout / 4) has ended, connected or failed, well before the
        # deadline, so the deadline never cancels a connect (trap 1).
        self._enter_by = call_timeout * 0.6
        # No more calls inside coredis than pool slots: coredis then never waits for a slot.
        self._slots = trio.Semaphore(max_connections)
        self._static_keys: dict[tuple[int, int], tuple[str, ...]] = {}

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

    def _keys(self, tenant_id: int, key_id: int, periods: Periods) -> list[str]:
        marker, klog, ktok, klease, k, tlog, ttok, tlease, t = self._scope_keys(tenant_id, key_id)
        day, month = f"d:{periods.day_id}", f"m:{periods.month_id}"
        return [
            marker,
            *(klog, ktok, klease, k + day, k + month, k + "life"),
            *(tlog, ttok, tlease, t + day, t + month, t + "life"),
        ]

    # --- the edge: every call bounded, shielded, translated

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[_Value]) -> object:
        script = _SCRIPTS[name]
        start = trio.current_time()
        # One scope: shielded, so that the caller's cancellation (client gone, shutdown) does not
        # reach coredis (trap 1), with its own deadline, which still bounds the call.
        with trio.CancelScope(shield=True, deadline=start + self._timeout) as scope:
            try:
                self._slots.acquire_nowait()  # the usual case: no scope, no wait
            except trio.WouldBlock:
                acquired = False
                with trio.move_on_at(start + self._enter_by):
                    await self._slots.acquire()
                    acquired = True
                if not acquired:
                    raise CountersUnavailableError(
                        "counter store: too many calls waiting"
                    ) from None
            try:
                try:
                    return await self._send(b"EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it again
                    return await self._send(b"EVAL", script.source, len(keys), *keys, *args)
            except (RedisError, OSError) as exc:  # OSError: TimeoutError included
                log.warning("counter store: %s failed: %r", name, exc)
                raise CountersUnavailableError(f"counter store: {exc!r}") from exc
            finally:
                self._slots.release()
        assert scope.cancelled_caught
        raise CountersUnavailableError(f"counter store: no answer within {self._timeout} s")

    async def _send(self, command: bytes, *args: _Value) -> object:
        """One command through coredis' pool, as `Redis.execute_command` does it, minus the
        layers we do not use (command wrappers, retries, telemetry, client cache): 30-40 % less
        CPU per call. As there, the connection goes back to the pool as soon as the command is
        queued, so concurrent calls share (pipeline on) one connection; nothing awaits between
        taking the connection and giving it back."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            request = connection.create_request(command, *args, decode=True)
        finally:
            pool.release(connection)
        return await request

    # --- the port

    async def ping(self) -> None:
        """Runs the cheapest script: proves the server answers scripts, not only PING."""
        keys = [f"{self._prefix}{{ping}}:a", f"{self._prefix}{{ping}}:b"]
        await self._eval("refresh", keys, ["-", 0, 0, 1])

    async def admit(self, request: AdmissionRequest) -> AdmissionResult | SeedNeeded:
        periods = request.periods
        args: list[_Value] = [
            request.now_ms,
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
        reply = await self._eval(
            "admit", self._keys(request.tenant_id, request.key_id, periods), args
        )
        try:
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
        await self._eval("settle", self._keys(lease.tenant_id, lease.key_id, periods), args)

    async def refresh(self, lease: Lease, *, now_ms: int) -> bool:
        scope = self._scope_keys(lease.tenant_id, lease.key_id)
        args: list[_Value] = [lease.id, now_ms, now_ms + lease.ttl_ms, 2 * lease.ttl_ms]
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


def _admission(request: AdmissionRequest, reply: object) -> AdmissionResult | SeedNeeded:
    if not isinstance(reply, list) or not reply:
        raise ValueError("not a list")
    status = reply[0]
    if status == 2:
        return SeedNeeded(request.tenant_id)
    kn, ktok, kreset, tn, ttok, treset = (int(v) for v in reply[2:8])
    key, tenant = WindowUsage(kn, ktok, kreset), WindowUsage(tn, ttok, treset)
    if status == 0:
        lease = Lease(
            id=request.lease_id,
            tenant_id=request.tenant_id,
            key_id=request.key_id,
            reserved=request.reserve_tokens,
            admitted_ms=request.now_ms,
            ttl_ms=request.lease_ttl_ms,
            epoch=str(reply[1]),
            periods=request.periods,
        )
        return AdmissionResult(lease, None, request.limits, key, tenant)
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
    return AdmissionResult(None, refusal, request.limits, key, tenant)


@asynccontextmanager
async def open_redis_counters(
    url: str, *, call_timeout: float, prefix: str = "nzgw:", max_connections: int = 64
) -> AsyncIterator[RedisCounters]:
    """Counters on the Redis server at `url` (`redis://host:port/db`).

    `call_timeout`: seconds any one call may take before it raises `CountersUnavailableError`
    (`NZGW_COUNTERS_TIMEOUT`). Connects lazily: opening succeeds while Redis is down, and every
    call then fails closed until it is back. Enter it in a task that outlives the requests.
    """
    client: coredis.Redis[str] = coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=call_timeout / 4,
        stream_timeout=call_timeout,
        max_connections=max_connections,
        retry_policy=NoRetryPolicy(),
    )
    async with client:
        yield RedisCounters(
            client, prefix=prefix, call_timeout=call_timeout, max_connections=max_connections
        )
