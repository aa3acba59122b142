"""Who is calling: API key verification, its cache, the failure throttle, revocation.

`Authenticator.authenticate(presented, client_addr)` returns the `Principal` or raises
`AuthenticationError` (HTTP: 401) / `AuthThrottledError` (HTTP: 429 with Retry-After) /
`AuthBusyError` (HTTP: 503 with Retry-After). None says which part failed. The path, cheapest first:

1. `parse_key`: length and alphabet; garbage costs nothing more (and counts as a failure).
2. The positive cache, indexed by the public prefix; an entry holds HMAC-SHA256(per-process
   secret, presented key), compared with `hmac.compare_digest`, never the key itself. A hit
   costs one HMAC: a key that is already known good needs no throttle allowance, so an
   attacker throttling a shared address does not lock out the clients behind it. While the
   cache is not trusted (the revocation watch is behind, below), a hit re-reads its key's
   record from the store, once for all the concurrent requests of that key and without
   Argon2id (the secret matched the verified one); the entry is then trusted for
   `max_staleness` from that read. Without this, a burst that delays the watch made every
   request of a hot key verify it again: a store and Argon2id stampede.
3. A verification of the very same key already in flight (a cold-cache burst) is waited for
   and shared: one Argon2id run, no throttle allowance spent by the waiters. The first request
   claims the verification before it asks the throttle (a Redis call), so a burst of one key
   asks the throttle once.
4. The failure throttle per client address (IPv6: per /`ipv6_prefix`, 64 by default): a token
   bucket of `fail_limit` per minute behind the `AuthThrottle` port (in Redis, shared by every
   process, when configured; `MemoryAuthThrottle` otherwise). A token is taken BEFORE any store
   or Argon2id work and given back only on success, so concurrent guesses cannot overrun it
   either. If the throttle's store cannot answer, `CountersUnavailableError` (HTTP: 503).
5. The global bound (`nzgw.services.coldgate`): at most `max_concurrency` cold verifications
   run and `queue_max` wait, the least busy address first; beyond that `AuthBusyError` at once
   (the throttle allowance is given back: a busy gateway is not the client's fault).
   Then `store.find_key(prefix)` and Argon2id in a worker thread under a `CapacityLimiter`; an
   unknown prefix is verified against a dummy hash, and the status checks come only after a
   successful verification, so neither timing nor answers reveal which prefixes exist or are
   revoked.
6. Key and tenant active, key not expired (wall clock), rehash if the parameters changed, cache.

Revocation within one second on every process: every change to a key or tenant
bumps the store's revocation epoch and records what changed (the key, or the whole tenant) in
the change feed, in the same transaction. `run_revocation_watch` reads the feed every
`interval` seconds and drops only the cache entries of the keys and tenants that changed, so
an operator's action does not turn every key cold at once (an Argon2id storm); when the feed
cannot tell (first read, too many changes, a gap), the whole cache is emptied. The cache is
trusted only while the last successful read STARTED less than `max_staleness` seconds ago
(1 s by default); when the watch falls behind (store slow or down, watch not running) every
request takes the store path, which fails closed. A verification that began before a change
that concerns its key (or before an emptying) does not refill the cache, so a fill racing a
revocation cannot resurrect the key.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import ipaddress
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime

import argon2
import attrs
import trio

from nzgw.config import Argon2Params, Config
from nzgw.core.keys import ParsedKey, parse_key
from nzgw.core.models import Principal, Status
from nzgw.ports import (
    AuthThrottle,
    Change,
    ChangeFeed,
    CountersUnavailableError,
    KeyChanges,
    Store,
    StoreError,
    WallClock,
    utc_now,
)
from nzgw.services.coldgate import ColdGate, GateFullError

log = logging.getLogger("nzgw.identity")


class AuthenticationError(Exception):
    """The presented credentials are not accepted. Deliberately without detail."""

    def __init__(self) -> None:
        super().__init__("authentication failed")


class AuthThrottledError(AuthenticationError):
    """Too many failed attempts from this client address; try again after `retry_after` s."""

    def __init__(self, retry_after: float) -> None:
        super().__init__()
        self.retry_after = retry_after


class AuthBusyError(Exception):
    """Too many cold key verifications in progress on this process; not the client's fault:
    try again after `retry_after` s (HTTP: 503)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("key verification queue full")
        self.retry_after = retry_after


# --- Argon2id -------------------------------------------------------------------------------------


class KeyHasher:
    """Argon2id hashing of whole keys with the configured parameters (argon2-cffi).

    Every method blocks for the Argon2id cost: call them in a worker thread.
    """

    def __init__(self, params: Argon2Params) -> None:
        self.params = params
        self._hasher = argon2.PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=argon2.Type.ID,
        )
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

    def hash(self, key: str) -> str:
        return self._hasher.hash(key)

    def verify(self, key_hash: str | None, key: str) -> bool:
        """True if `key` matches `key_hash`. With None, spends the same effort on a dummy hash
        (so an unknown prefix takes as long as a wrong secret) and returns False."""
        if key_hash is None:
            self._verify(self._dummy_hash(), key)
            return False
        return self._verify(key_hash, key)

    def needs_rehash(self, key_hash: str) -> bool:
        return self._hasher.check_needs_rehash(key_hash)

    def _verify(self, key_hash: str, key: str) -> bool:
        try:
            return self._hasher.verify(key_hash, key)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    def _dummy_hash(self) -> str:
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._hasher.hash(secrets.token_urlsafe(32))
            return self._dummy


# --- failure throttle -----------------------------------------------------------------------------


def throttle_key(client_addr: str, ipv6_prefix: int = 64) -> str:
    """The throttled unit: an IPv4 address, an IPv6 /`ipv6_prefix` (/64: one host's usual
    allocation), or the string as given when it is not an IP address."""
    try:
        address = ipaddress.ip_address(client_addr)
    except ValueError:
        return client_addr
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class FailureThrottle:
    """A token bucket per client address: `limit` failures per `window` seconds. Sans-IO (`now`
    is given), single-threaded. Memory is bounded by `max_tracked` addresses: full buckets are
    dropped first, then the least recently touched."""

    def __init__(self, limit: int, *, window: float = 60.0, max_tracked: int = 100_000) -> None:
        self.limit = limit
        self.rate = limit / window
        self.max_tracked = max_tracked
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, address: str, now: float) -> _Bucket:
        bucket = self._buckets.pop(address, None)  # re-inserted last: dict order = recency
        if bucket is None:
            if len(self._buckets) >= self.max_tracked:
                self.prune(now)
            bucket = _Bucket(float(self.limit), now)
        else:
            bucket.tokens = min(self.limit, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[address] = bucket
        return bucket

    def try_acquire(self, address: str, now: float) -> float | None:
        """Take one attempt; None if allowed, else the seconds until one is allowed."""
        bucket = self._bucket(address, now)
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) / self.rate
        bucket.tokens -= 1.0
        return None

    def record_failure(self, address: str, now: float) -> None:
        """A failure that took no attempt first (a malformed key)."""
        bucket = self._bucket(address, now)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def refund(self, address: str) -> None:
        """Give back an attempt taken by `try_acquire` (it succeeded, or was not the client's
        fault: store down, cancelled)."""
        bucket = self._buckets.get(address)
        if bucket is not None:
            bucket.tokens = min(float(self.limit), bucket.tokens + 1.0)

    def prune(self, now: float) -> None:
        """Drop buckets that have refilled; if still too many, the least recently touched."""
        full = [
            address
            for address, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.limit
        ]
        for address in full:
            del self._buckets[address]
        excess = len(self._buckets) - self.max_tracked + 1
        if excess > 0:
            for address in list(self._buckets)[:excess]:
                del self._buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)


class MemoryAuthThrottle:
    """The `AuthThrottle` port in this process (embedded mode): `FailureThrottle` on Trio's
    clock. Never fails."""

    def __init__(self, limit: int, *, window: float = 60.0) -> None:
        self.buckets = FailureThrottle(limit, window=window)

    async def try_acquire(self, address: str) -> float | None:
        await trio.lowlevel.checkpoint()
        return self.buckets.try_acquire(address, trio.current_time())

    async def record_failure(self, address: str) -> None:
        await trio.lowlevel.checkpoint()
        self.buckets.record_failure(address, trio.current_time())

    async def refund(self, address: str) -> None:
        self.buckets.refund(address)  # no checkpoint: also called from shielded cleanup

    def prune(self) -> None:
        self.buckets.prune(trio.current_time())


# --- the authenticator ----------------------------------------------------------------------------


class AuthEvent(enum.StrEnum):
    """What the authenticator reports as it works (`nzgw_auth_events_total{event}`)."""

    CACHE_HIT = "cache_hit"
    CACHE_MISS = "cache_miss"
    VERIFICATION = "verification"  # an Argon2id verification ran (dummy ones included)
    FAILURE = "failure"  # a presented key was refused
    THROTTLED = "throttled"  # refused: the address failed too often
    REHASH = "rehash"  # a hash was upgraded to the current parameters
    BUSY = "busy"  # refused because the cold-verification queue was full
    REREAD = "reread"  # a cached key's record read again while the watch was behind


AuthEvents = Callable[[AuthEvent], None]
"""Where the authenticator reports its events (the gateway's metrics; a counter in tests)."""


def _unreported(event: AuthEvent) -> None:
    """No one listens (tools that authenticate outside a gateway)."""


@attrs.define
class _CacheEntry:
    mac: bytes
    principal: Principal
    expires: float  # trio.current_time() deadline
    # Re-read from the store while the watch was behind: trusted until then, whatever the watch.
    fresh_until: float = float("-inf")


@attrs.define
class _Flight:
    """One verification in progress, shared by concurrent requests with the same key."""

    done: trio.Event = attrs.field(factory=trio.Event)
    principal: Principal | None = None
    refused: bool = False  # a definitive AuthenticationError (not: store down, cancelled)


class Authenticator:
    """Verifies API keys; one per process, shared by all requests. See the module docstring.

    Not thread-safe: use it from Trio tasks of one `trio.run` (worker threads only hash).
    """

    def __init__(
        self,
        store: Store,
        *,
        hasher: KeyHasher,
        max_concurrency: int,
        cache_ttl: float,
        fail_limit: int,
        queue_max: int = 64,
        throttle: AuthThrottle | None = None,
        ipv6_prefix: int = 64,
        max_staleness: float = 1.0,
        wall_clock: WallClock = utc_now,
        events: AuthEvents = _unreported,
    ) -> None:
        self._store = store
        self._event = events
        self._hasher = hasher
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self.gate = ColdGate(max_concurrency, queue_max)
        self._cache_ttl = cache_ttl
        self._max_staleness = max_staleness
        self._wall_clock = wall_clock
        self._throttle: AuthThrottle = throttle or MemoryAuthThrottle(fail_limit)
        self._ipv6_prefix = ipv6_prefix
        self._secret = secrets.token_bytes(32)  # per process: cache entries mean nothing outside
        self._cache: dict[str, _CacheEntry] = {}
        self._generation = 0  # bumped whenever the cache is emptied
        self._inflight: dict[bytes, _Flight] = {}
        self._rereads: dict[str, _Flight] = {}  # cached keys whose record is being read again
        self._epoch: int | None = None
        # Changes applied lately (seq order), so that a verification can tell whether one
        # concerning its key happened while it ran.
        self._applied: deque[Change] = deque(maxlen=4096)
        self._fresh_until = float("-inf")  # cache trusted until then (trio clock)
        self._last_used: dict[int, datetime] = {}

    @classmethod
    def from_config(
        cls,
        store: Store,
        config: Config,
        *,
        throttle: AuthThrottle | None = None,
        wall_clock: WallClock = utc_now,
        events: AuthEvents = _unreported,
    ) -> Authenticator:
        return cls(
            store,
            hasher=KeyHasher(config.argon2),
            max_concurrency=config.argon2_max_concurrency,
            cache_ttl=config.auth_cache_ttl,
            fail_limit=config.auth_fail_limit,
            queue_max=config.auth_queue_max,
            throttle=throttle,
            ipv6_prefix=config.auth_ipv6_prefix,
            max_staleness=max(1.0, 2 * config.revocation_poll_interval),
            wall_clock=wall_clock,
            events=events,
        )

    # --- the request path -------------------------------------------------------------------------

    async def authenticate(self, presented: str, client_addr: str) -> Principal:
        """The principal behind `presented`, or `AuthenticationError` / `AuthThrottledError`.

        May raise `StoreError` when the store cannot answer (HTTP: 503). On cancellation
        nothing is cached and the throttle attempt is given back.
        """
        now = trio.current_time()
        address = throttle_key(client_addr, self._ipv6_prefix)
        parsed = parse_key(presented)
        if parsed is None:
            await self._record_failure(address)
            self._event(AuthEvent.FAILURE)
            raise AuthenticationError()

        mac = hmac.digest(self._secret, presented.encode("ascii"), "sha256")
        entry = self._cache.get(parsed.prefix)
        if entry is not None and now < entry.expires and hmac.compare_digest(entry.mac, mac):
            if now >= self._fresh_until and now >= entry.fresh_until:
                # The watch is behind: the secret is known good, only its record may have
                # changed. One store read for all of this key's requests, no Argon2id.
                entry = await self._reread(parsed.prefix, entry)
            if entry is not None:
                wall_now = self._wall_clock()
                if _usable(entry.principal, wall_now):
                    self._event(AuthEvent.CACHE_HIT)
                    self._last_used[entry.principal.key.id] = wall_now
                    return entry.principal
                self._cache.pop(parsed.prefix, None)  # expired while cached: the slow path
        self._event(AuthEvent.CACHE_MISS)

        # The same key being verified already (a burst from one client on a cold cache):
        # share that verification, which costs this request no throttle allowance.
        while (flight := self._inflight.get(mac)) is not None:
            await flight.done.wait()
            if flight.principal is not None:
                self._last_used[flight.principal.key.id] = self._wall_clock()
                return flight.principal
            if flight.refused:
                await self._record_failure(address)
                self._event(AuthEvent.FAILURE)
                raise AuthenticationError()
            # The leader was throttled, cancelled, or the store failed: verify ourselves.
        # Lead. The flight is claimed before the throttle is asked (an await: a Redis call), so
        # that a burst of this key waits for this one verification instead of each request
        # spending an allowance (which throttled a valid key with 429, and queued more calls
        # than the throttle's connections: 503).
        flight = self._inflight[mac] = _Flight()
        try:
            retry_after = await self._throttle.try_acquire(address)  # CountersUnavailableError
        except BaseException:
            self._land(mac, flight)
            raise
        if retry_after is not None:
            self._land(mac, flight)  # the waiters ask the throttle for their own address
            self._event(AuthEvent.THROTTLED)
            raise AuthThrottledError(retry_after)
        try:
            principal = await self._lead(parsed, mac, flight, address)
        except AuthenticationError:
            self._event(AuthEvent.FAILURE)
            raise  # the attempt stays spent
        except AuthBusyError:
            self._event(AuthEvent.BUSY)
            await self._refund(address)
            raise
        except BaseException:
            await self._refund(address)
            raise
        await self._refund(address)
        self._last_used[principal.key.id] = self._wall_clock()
        return principal

    async def _record_failure(self, address: str) -> None:
        """Best effort: the answer is a refusal anyway (the counter store logs its outage)."""
        with contextlib.suppress(CountersUnavailableError):
            await self._throttle.record_failure(address)

    async def _refund(self, address: str) -> None:
        """Best effort, shielded (it also runs on the way out of a cancelled request); on a
        counter store failure the address loses one attempt until its bucket refills."""
        with trio.CancelScope(shield=True), contextlib.suppress(CountersUnavailableError):
            await self._throttle.refund(address)

    def _land(self, mac: bytes, flight: _Flight) -> None:
        """End `flight`: its waiters read its outcome (or verify themselves without one)."""
        if self._inflight.get(mac) is flight:
            del self._inflight[mac]
        flight.done.set()

    async def _lead(
        self, parsed: ParsedKey, mac: bytes, flight: _Flight, address: str
    ) -> Principal:
        """Verify under `flight`, publishing the outcome to concurrent requests with the same
        key; cache it unless the cache was emptied meanwhile."""
        generation, position = self._generation, self._epoch
        try:
            principal = await self._verify(parsed, address)
        except AuthenticationError:
            flight.refused = True
            raise
        else:
            flight.principal = principal
        finally:
            self._land(mac, flight)
        if generation == self._generation and not self._changed_since(position, principal):
            self._cache[parsed.prefix] = _CacheEntry(
                mac, principal, trio.current_time() + self._cache_ttl
            )
        return principal

    async def _reread(self, prefix: str, entry: _CacheEntry) -> _CacheEntry | None:
        """Read the record of a cached key again while the cache is not trusted (the watch is
        behind): single-flight per prefix, no throttle and no Argon2id (the request's secret
        matched the verified one). The entry, trusted for `max_staleness` from the read's
        start, if the key is unchanged and usable; None otherwise (the slow path decides).
        `StoreError` when the store cannot answer (fail closed, as the slow path)."""
        flight = self._rereads.get(prefix)
        if flight is not None:
            await flight.done.wait()
            return self._cache.get(prefix) if flight.principal is not None else None
        flight = self._rereads[prefix] = _Flight()
        generation, position = self._generation, self._epoch
        started = trio.current_time()
        try:
            found = await self._store.find_key(prefix)
            self._event(AuthEvent.REREAD)
            if (
                found is None
                or not hmac.compare_digest(found.key.key_hash, entry.principal.key.key_hash)
                or not _usable(found, self._wall_clock())
                or generation != self._generation
                or self._changed_since(position, found)
                or self._cache.get(prefix) is not entry
            ):
                self._cache.pop(prefix, None)
                return None
            entry.principal = found
            entry.fresh_until = started + self._max_staleness
            flight.principal = found
            return entry
        finally:
            del self._rereads[prefix]
            flight.done.set()

    async def _verify(self, parsed: ParsedKey, address: str) -> Principal:
        try:
            await self.gate.acquire(address)
        except GateFullError as exc:
            raise AuthBusyError(exc.retry_after) from None
        try:
            found = await self._store.find_key(parsed.prefix)
            key_hash = found.key.key_hash if found is not None else None
            self._event(AuthEvent.VERIFICATION)
            matches = await trio.to_thread.run_sync(
                self._hasher.verify, key_hash, parsed.key, limiter=self._limiter
            )
        finally:
            self.gate.release()
        if found is None or not matches or not _usable(found, self._wall_clock()):
            raise AuthenticationError()
        if self._hasher.needs_rehash(found.key.key_hash):
            await self._rehash(found, parsed.key)
        return found

    async def _rehash(self, principal: Principal, key: str) -> None:
        """Store a hash with the current parameters. Best effort: the key stays valid anyway."""
        new_hash = await trio.to_thread.run_sync(self._hasher.hash, key, limiter=self._limiter)
        try:
            await self._store.update_key(principal.key.prefix, KeyChanges(key_hash=new_hash))
        except StoreError as exc:
            log.warning("rehash failed", extra={"prefix": principal.key.prefix, "error": str(exc)})
        else:
            self._event(AuthEvent.REHASH)

    # --- revocation -------------------------------------------------------------------------------

    def epoch_observed(self, epoch: int, read_started_at: float) -> None:
        """The store's revocation epoch, as read by a query started at `read_started_at` (trio
        clock). Empties the cache if it moved; trusts the cache for `max_staleness` after."""
        if epoch != self._epoch:
            if self._epoch is not None:
                log.info("revocation epoch moved: key cache emptied", extra={"epoch": epoch})
            self._epoch = epoch
            self.invalidate()
        self._fresh_until = max(self._fresh_until, read_started_at + self._max_staleness)

    @property
    def feed_position(self) -> int | None:
        """The epoch this cache is up to date with (None before the first read)."""
        return self._epoch

    def changes_observed(self, feed: ChangeFeed, read_started_at: float) -> None:
        """The change feed after `feed_position`, read by a query started at `read_started_at`.
        Drops the entries of the keys and tenants that changed (all of them when the feed
        cannot tell); trusts the cache for `max_staleness` after."""
        if feed.changes is None or self._epoch is None:
            self.epoch_observed(feed.epoch, read_started_at)
            return
        dropped = 0
        for change in feed.changes:
            dropped += self._drop(change)
            self._applied.append(change)
        if feed.changes:
            log.info(
                "keys changed: cache entries dropped",
                extra={"changes": len(feed.changes), "dropped": dropped, "epoch": feed.epoch},
            )
        self._epoch = feed.epoch
        self._fresh_until = max(self._fresh_until, read_started_at + self._max_staleness)

    def _drop(self, change: Change) -> int:
        doomed = [
            prefix
            for prefix, entry in self._cache.items()
            if entry.principal.tenant.id == change.tenant_id
            and change.key_id in (None, entry.principal.key.id)
        ]
        for prefix in doomed:
            del self._cache[prefix]
        return len(doomed)

    def _changed_since(self, position: int | None, principal: Principal) -> bool:
        """True if a change after `position` concerns `principal` (or may have: unknown)."""
        if position == self._epoch:
            return False
        if position is None or not self._applied or self._applied[0].seq > position + 1:
            return True
        return any(
            change.seq > position
            and change.tenant_id == principal.tenant.id
            and change.key_id in (None, principal.key.id)
            for change in self._applied
        )

    def invalidate(self) -> None:
        """Empty the cache; verifications in flight will not refill it."""
        self._cache.clear()
        self._applied.clear()
        self._generation += 1

    def prune(self) -> None:
        """Drop expired cache entries and idle throttle buckets (housekeeping)."""
        now = trio.current_time()
        for prefix in [p for p, e in self._cache.items() if e.expires <= now]:
            del self._cache[prefix]
        self._throttle.prune()

    # --- last-used times --------------------------------------------------------------------------

    def drain_last_used(self) -> dict[int, datetime]:
        """Last-used times recorded since the previous drain (key id → time); for the flusher."""
        drained, self._last_used = self._last_used, {}
        return drained

    def restore_last_used(self, pending: dict[int, datetime]) -> None:
        """Put back times a failed flush could not write (newer ones recorded since win)."""
        for key_id, when in pending.items():
            current = self._last_used.get(key_id)
            if current is None or current < when:
                self._last_used[key_id] = when


def _usable(principal: Principal, wall_now: datetime) -> bool:
    key, tenant = principal.key, principal.tenant
    return (
        key.status is Status.ACTIVE
        and tenant.status is Status.ACTIVE
        and (key.expires_at is None or wall_now < key.expires_at)
    )


# --- service tasks --------------------------------------------------------------------------------


async def run_revocation_watch(
    store: Store,
    authenticator: Authenticator,
    *,
    interval: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read the change feed every `interval` seconds, forever; feed it to `authenticator`
    (the first read, and any read the feed cannot answer, empties its cache).

    Started after the first read (successful or not: a store that is down must not keep the
    gateway from starting; the cache is simply not trusted until a read succeeds). Store errors
    are logged once per outage and retried. Cancel to stop.
    """
    failing = False
    started = False
    while True:
        read_started_at = trio.current_time()
        with trio.move_on_after(max(4 * interval, 2.0)):
            try:
                position = authenticator.feed_position
                if position is None:
                    feed = ChangeFeed(await store.revocation_epoch(), None)
                else:
                    feed = await store.changes_since(position)
            except StoreError as exc:
                if not failing:
                    log.warning("cannot read the revocation epoch", extra={"error": str(exc)})
                failing = True
            else:
                if failing:
                    log.info("revocation epoch readable again")
                failing = False
                authenticator.changes_observed(feed, read_started_at)
        authenticator.prune()
        if not started:
            task_status.started()
            started = True
        await trio.sleep_until(read_started_at + max(interval, 0.01))


FINAL_FLUSH_TIMEOUT = 5.0


async def flush_last_used(store: Store, authenticator: Authenticator) -> None:
    """Write the pending last-used times once. On failure (or cancellation) they are kept for
    the next flush; a `StoreError` is logged, not raised."""
    pending = authenticator.drain_last_used()
    if not pending:
        return
    try:
        await store.touch_keys(pending)
    except StoreError as exc:
        authenticator.restore_last_used(pending)
        log.warning("cannot record last-used times", extra={"error": str(exc)})
    except BaseException:
        authenticator.restore_last_used(pending)
        raise


async def run_last_used_flush(
    store: Store,
    authenticator: Authenticator,
    *,
    interval: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush last-used times every `interval` seconds, forever. When cancelled, one last flush
    runs shielded, for at most `FINAL_FLUSH_TIMEOUT` seconds."""
    task_status.started()
    try:
        while True:
            await trio.sleep(interval)
            await flush_last_used(store, authenticator)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_FLUSH_TIMEOUT):
            await flush_last_used(store, authenticator)
