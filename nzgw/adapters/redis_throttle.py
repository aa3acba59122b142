"""The failed-authentication throttle (`AuthThrottle`) in Redis: one allowance per client
address across every gateway process and replica that shares the Redis.

One key per address, a hash `{tokens, updated}`: `P{a:<address>}:authfail` (hash-tagged, so
the one-key scripts run on Redis Cluster too). The token bucket is refilled with Redis' own
clock (`TIME`), so processes whose clocks differ share one bucket exactly; a full bucket is
deleted and a partial one expires one window after its last change.

Calls go the counters' way (`NodeCalls` in `nzgw.adapters.redis_link`; docs/ARCHITECTURE.md
"Counters under a burst"): on the node's one live connection, written by the calling task,
shielded from the caller's cancellation, refused only when Redis has been silent for the counters'
timeout (never waiting more than 5 times it); no retries, and every failure becomes
`CountersUnavailableError`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import trio
from coredis.exceptions import RedisError

from nzgw.adapters.redis_link import MAX_WAIT_FACTOR, NodeCalls, entered, redis_client
from nzgw.ports import CountersUnavailableError

log = logging.getLogger("nzgw.counters")

# KEYS: the bucket. ARGV: op (acquire | fail | refund), limit, window ms.
# Returns -1 (allowed / done) or the milliseconds until an attempt is allowed.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local rate = limit / window
local b = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(b[1])
local updated = tonumber(b[2])
if tokens == nil or updated == nil then
  tokens = limit
  updated = now
end
tokens = math.min(limit, tokens + math.max(0, now - updated) * rate)
local wait = -1
if ARGV[1] == 'acquire' then
  if tokens < 1 then
    wait = math.ceil((1 - tokens) / rate)
  else
    tokens = tokens - 1
  end
elseif ARGV[1] == 'fail' then
  tokens = math.max(0, tokens - 1)
else
  tokens = math.min(limit, tokens + 1)
end
if tokens >= limit then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[1], window + 1000)
end
return wait
"""


class RedisAuthThrottle:
    """`AuthThrottle` on Redis. Obtain it from `open_redis_throttle`."""

    def __init__(
        self,
        client: coredis.Redis[str] | coredis.RedisCluster[str],
        *,
        limit: int,
        window: float = 60.0,
        prefix: str = "nzgw:",
        call_timeout: float,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (hash tags are ours)")
        # The counters' way into Redis: one live connection per node, written by the caller,
        # so a burst of cold verifications pipelines instead of queueing for pool slots.
        self._calls = NodeCalls(client, call_timeout=call_timeout)
        self._sha = hashlib.sha1(_BUCKET.encode()).hexdigest()
        self._limit = limit
        self._window_ms = int(window * 1000)
        self._prefix = prefix

    def key(self, address: str) -> str:
        return f"{self._prefix}{{a:{address}}}:authfail"

    async def _call(self, op: str, address: str) -> int:
        """One script call, shielded from the caller's cancellation and bounded as every
        counter call (`NodeCalls`); every failure is `CountersUnavailableError`."""
        try:
            reply = await self._calls.script(
                self._sha,
                _BUCKET,
                [self.key(address)],
                [op, self._limit, self._window_ms],
                start=trio.current_time(),
            )
        except (RedisError, OSError) as exc:
            # A string, not the exception: a log record must not keep coredis' connection
            # (and its streams) alive through the traceback.
            log.warning("counter store: auth throttle %s failed: %s", op, repr(exc))
            raise CountersUnavailableError(f"counter store: {exc!r}") from exc
        return int(str(reply))

    async def try_acquire(self, address: str) -> float | None:
        wait_ms = await self._call("acquire", address)
        return None if wait_ms < 0 else wait_ms / 1000

    async def record_failure(self, address: str) -> None:
        await self._call("fail", address)

    async def refund(self, address: str) -> None:
        await self._call("refund", address)

    def prune(self) -> None:
        pass  # keys expire in Redis


@asynccontextmanager
async def open_redis_throttle(
    url: str,
    *,
    limit: int,
    call_timeout: float,
    prefix: str = "nzgw:",
    max_connections: int = 16,
    cluster: bool = False,
) -> AsyncIterator[RedisAuthThrottle]:
    """The throttle on the Redis at `url` (with `cluster`: the Redis Cluster of that node; one
    key per call, sent to the master of its slot). A single server is connected to lazily
    (opening succeeds while Redis is down; calls then fail closed). Enter it in a task that
    outlives the requests."""
    client = redis_client(
        url,
        cluster=cluster,
        connect_timeout=MAX_WAIT_FACTOR * call_timeout,
        stream_timeout=2 * MAX_WAIT_FACTOR * call_timeout,
        max_connections=max_connections,
    )
    async with entered(client):
        yield RedisAuthThrottle(client, limit=limit, prefix=prefix, call_timeout=call_timeout)
