"""One live connection per Redis node, shared by every call of the process and written to by the
calling task itself: the counters' way into Redis (or into each master of a Redis Cluster).

Why not coredis' own path (`Redis.execute_command`, or a pool checkout per call): under a burst
the event loop is busy, and two of coredis' steps each cost the call a full scheduling round
(every runnable task runs once before it goes on; docs/ARCHITECTURE.md "Counters under a burst"):

- a pool checkout is an `await` on a queue, even when a connection is free;
- a command goes to the connection's writer task through a memory stream, and that task
  drains the stream with a checkpoint per batch, so while commands keep arriving it keeps
  yielding and sends late. The reply then comes late too, and the call's "Redis was silent"
  judgement (nzgw.adapters.redis) turns a healthy Redis into a false 503.

Here a call takes the node's live connection without waiting (connecting only when there is
none: one connect at a time per node, its outcome shared by every call that waited for it),
registers its reply in the connection's FIFO and puts the command on the socket before it
yields; concurrent calls pipeline on that one connection. coredis' reader task still parses
the replies. The connection is released to coredis' pool right away (so the pool counts and
reaps it as usual) and kept here while it is usable; nothing else takes connections from this
client, so coredis' writer task never writes on it after the handshake.

On Redis Cluster (`coredis.RedisCluster`) the node is the master that serves the slot of the
call's first key (all of a call's keys share one hash tag), from coredis' cluster layout; the
caller follows MOVED (the layout learns the new owner) and ASK (`ASKING` first, pipelined), and
goes again after TRYAGAIN (a migrating slot whose keys are split, or missing on the target:
admissions and settlements wait, up to their `max_wait`, for the migration to close). A master
that cannot be connected to (killed, or its host gone) sends no MOVED: the call then reads the
slot map again (`Links.reread_layout`) and, when a replica has taken the slot over, goes there;
nothing was sent to the dead node, so the call runs once.
"""

from __future__ import annotations

import math
import select
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import coredis
import trio
from anyio import BrokenResourceError, ClosedResourceError, TypedAttributeLookupError
from anyio.abc import SocketAttribute
from coredis._utils import hash_slot
from coredis.cluster._node import ClusterNodeLocation
from coredis.connection import BaseConnection, TCPLocation
from coredis.connection._request import Request
from coredis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterError,
    RedisError,
    TryAgainError,
)
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.retry import NoRetryPolicy

from nzgw.ports import CountersUnavailableError

MAX_WAIT_FACTOR: Final = 5
"""No call waits more than this many `call_timeout`s, however alive Redis is."""

_CATCH_UP_CHECKPOINTS: Final = 5
"""Checkpoints a call gives the connection's reader before it calls Redis silent."""

_REDIRECTS: Final = 3
"""MOVED / ASK redirections a call follows (a slot moves once per failover or migration)."""

REREAD_INTERVAL: Final = 0.2
"""Seconds between two reads of the cluster's slot map after failed connects (one at a time;
a call that finds one started less than this ago uses the layout as it is)."""

_TRY_AGAIN_PAUSE: Final = 0.02
"""Seconds before a call answered TRYAGAIN goes out again: its slot is migrating and neither
node holds all of the call's keys (it did not run). It waits so, up to its `max_wait`, for
the migration to close."""

Node = ClusterNodeLocation | None
"""A Redis Cluster master, or None for the one server of a plain client."""

_Value = int | str | bytes


class Link:
    """The live connection to one node. Obtain it from `Links.link`."""

    __slots__ = ("_flushing", "_out", "connection", "last_reply", "name")

    def __init__(self, connection: BaseConnection, name: str) -> None:
        self.connection = connection
        self.name = name
        # When this node last answered (trio clock): "silent" is measured from it.
        self.last_reply = -math.inf
        self._out = bytearray()
        self._flushing = False

    @property
    def usable(self) -> bool:
        return self.connection.usable

    def answer_waiting(self) -> bool:
        """True when bytes from the node wait in the socket, unread: the node has answered and
        it is our event loop (coredis' reader task) that is behind, not Redis."""
        stream = self.connection.stream
        if stream is None:
            return False
        try:
            sock = stream.extra(SocketAttribute.raw_socket)
        except TypedAttributeLookupError:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(readable)

    def request(self, command: bytes, *args: _Value, timeout: float) -> Request:
        """Queue one command; its reply arrives in the returned request (await it). Sent by
        the next `flush`: queue a call's commands, then flush once."""
        connection = self.connection
        request = Request(
            connection=connection,
            command=command,
            decode=True,
            encoding=connection._encoding,
            response_timeout=timeout,
        )
        # The reader task completes requests in this FIFO's order: the bytes must go out in
        # the same order, which one flusher at a time (below) guarantees.
        connection._requests.append(request)
        for chunk in connection._packer.pack_commands([(command, *args)]):
            self._out += chunk
        return request

    async def flush(self) -> None:
        """Put everything queued on the socket; the bytes are in the kernel before this task
        yields. A flush already running (it yields only once its bytes are out) picks up what
        was queued meanwhile."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._out:
                data = bytes(self._out)
                self._out.clear()
                stream = self.connection.stream
                if stream is None:
                    raise RedisConnectionError("connection closed")
                await stream.send(data)
        except (BrokenResourceError, ClosedResourceError, OSError) as exc:
            self.connection.invalidate("send failed")
            raise RedisConnectionError(f"connection lost while sending: {exc!r}") from exc
        except BaseException:
            self.connection.invalidate("send interrupted")
            raise
        finally:
            self._flushing = False


class NotConnectedError(RedisConnectionError):
    """No connection to the node could be made: nothing was sent to it."""


class NoAnswerError(CountersUnavailableError):
    """The command was sent and Redis did not answer in time: it may still run there."""


class _Connect:
    """One connect attempt to a node, shared by the calls that found no live connection."""

    __slots__ = ("done", "error", "link")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.link: Link | None = None
        self.error: BaseException | None = None


class Links:
    """The live connection of each node of `client` (a `coredis.Redis` or `coredis.RedisCluster`
    whose pool nothing else uses)."""

    def __init__(self, client: coredis.Redis[Any] | coredis.RedisCluster[Any]) -> None:
        self._client = client
        self.cluster = isinstance(client, coredis.RedisCluster)
        self._links: dict[str, Link] = {}
        self._connects: dict[str, _Connect] = {}
        self._reread: trio.Event | None = None  # set when the slot map read under way ends
        self._reread_at = -math.inf  # when the last one started (trio clock)

    @staticmethod
    def name(node: Node) -> str:
        return "" if node is None else node.name

    def node_for(self, key: str) -> Node:
        """The node that serves `key`: on a cluster, the master of its slot
        (`RedisClusterError` when no master serves it)."""
        if not isinstance(self._client, coredis.RedisCluster):
            return None
        layout = self._client.connection_pool.cluster_layout
        return layout.node_for_slot(hash_slot(key.encode()), primary=True)

    def primaries(self) -> list[Node]:
        if not isinstance(self._client, coredis.RedisCluster):
            return [None]
        return list(self._client.connection_pool.cluster_layout.primaries)

    def moved(self, node: Node, error: MovedError) -> Node:
        """The node a MOVED reply names; the layout learns that it owns the slot now."""
        if not isinstance(self._client, coredis.RedisCluster):
            raise error  # a plain server never redirects
        layout = self._client.connection_pool.cluster_layout
        layout.report_errors(node, error)
        return layout.node_for_location(TCPLocation(error.host, error.port)) or (
            ClusterNodeLocation(error.host, error.port, server_type="primary")
        )

    @staticmethod
    def asked(error: AskError) -> Node:
        """The node an ASK reply names (for this one call; the layout stays)."""
        return ClusterNodeLocation(error.host, error.port, server_type="primary")

    def failed(self, node: Node, error: Exception) -> None:
        """Tell the cluster layout that `node` failed (enough failures: it is read again)."""
        if isinstance(self._client, coredis.RedisCluster) and node is not None:
            self._client.connection_pool.cluster_layout.report_errors(node, error)

    async def reread_layout(self, deadline: float) -> None:
        """Read the cluster's slot map again: a master could not be connected to, and its
        replica may have taken its slots over (a dead node answers no MOVED, and coredis reads
        the map only after errors pile up, in the background). One read at a time and at most
        one per `REREAD_INTERVAL`; it runs in coredis' pool task group (a read is bounded by
        coredis' connect and stream timeouts, never cancelled by a call), and this waits for
        it until `deadline` (trio clock). A read that fails leaves the layout as it was."""
        if not isinstance(self._client, coredis.RedisCluster):
            return
        done = self._reread
        if done is None:
            now = trio.current_time()
            if now < self._reread_at + REREAD_INTERVAL:
                return
            self._reread_at = now
            done = self._reread = trio.Event()
            self._client.connection_pool.task_group.start_soon(self._read_layout, done)
        with trio.move_on_at(deadline):
            await done.wait()

    async def _read_layout(self, done: trio.Event) -> None:
        assert isinstance(self._client, coredis.RedisCluster)
        try:
            await self._client.connection_pool.cluster_layout.initialize()
        except (RedisError, OSError):
            pass  # the next failed connect reads it again
        finally:
            self._reread = None
            done.set()

    def live(self, node: Node) -> Link | None:
        """The node's live connection, if there is one (never connects)."""
        link = self._links.get(self.name(node))
        return link if link is not None and link.usable else None

    async def link(self, node: Node) -> Link:
        """The node's live connection; connects if there is none (bounded by coredis'
        connect_timeout). Raises `RedisError` (or `OSError`) when it cannot connect."""
        name = self.name(node)
        link = self._links.get(name)
        if link is not None and link.usable:
            return link
        attempt = self._connects.get(name)
        if attempt is None:
            attempt = self._connects[name] = _Connect()
            try:
                attempt.link = self._links[name] = Link(await self._connect(node), name)
            except (RedisError, OSError) as exc:
                attempt.error = exc
                if isinstance(exc, RedisConnectionError | OSError):
                    self.failed(node, RedisConnectionError(str(exc)))
            finally:
                del self._connects[name]
                attempt.done.set()
        else:
            await attempt.done.wait()
        if attempt.link is None:
            raise NotConnectedError(f"cannot connect to Redis: {attempt.error!r}")
        return attempt.link

    async def _connect(self, node: Node) -> BaseConnection:
        client = self._client
        if isinstance(client, coredis.RedisCluster):
            if node is None:
                raise RedisClusterError("no node")
            pool = client.connection_pool
            cluster_connection = await pool.get_connection(node, primary=True)
            pool.release(cluster_connection)  # counted by the pool, used only by us
            return cluster_connection
        basic_pool = client.connection_pool
        connection: BaseConnection = await basic_pool.get_connection()
        basic_pool.release(connection)
        return connection


class NodeCalls:
    """Commands and scripts on the nodes of `client` through their live connections
    (`Links`), each bounded and judged by the node's replies (nzgw.adapters.redis explains the
    rules; docs/ARCHITECTURE.md "Counters under a burst"). Shared by the counters and the
    failed-authentication throttle."""

    def __init__(
        self, client: coredis.Redis[Any] | coredis.RedisCluster[Any], *, call_timeout: float
    ) -> None:
        self.links = Links(client)
        self.timeout = call_timeout
        self.max_wait = MAX_WAIT_FACTOR * call_timeout

    async def script(
        self,
        sha: str,
        source: str,
        keys: Sequence[str],
        args: Sequence[_Value],
        *,
        start: float,
        node: Node = None,
    ) -> object:
        """Run a Lua script (by its sha, loaded again after NOSCRIPT) on the node that serves
        `keys` (`node`, if the caller routed already), following cluster redirections. Raises
        `RedisError`, `OSError` or `CountersUnavailableError`."""
        # Shielded: the caller's cancellation (client gone, shutdown) does not reach coredis
        # (docs/ARCHITECTURE.md); the waits below bound the call instead.
        with trio.CancelScope(shield=True):
            if node is None:
                node = self.links.node_for(keys[0])
            asking, redirects, rerouted = False, 0, False
            while True:
                try:
                    try:
                        return await self.call(
                            node, start, asking, b"EVALSHA", sha, len(keys), *keys, *args
                        )
                    except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it again
                        return await self.call(
                            node, start, asking, b"EVAL", source, len(keys), *keys, *args
                        )
                except NotConnectedError:
                    # Nothing was sent. The node may be a dead master whose replica serves its
                    # slots now: read the slot map (within the call's wait) and go to the
                    # slot's master if that is another node, once per call.
                    if rerouted or not self.links.cluster:
                        raise
                    rerouted = True
                    await self.links.reread_layout(start + self.max_wait)
                    owner = self.links.node_for(keys[0])
                    if Links.name(owner) == Links.name(node):
                        raise
                    node, asking = owner, False
                    continue
                except MovedError as moved:  # the slot has a new master: it did not run
                    node, asking = self.links.moved(node, moved), False
                except AskError as ask:  # the slot is migrating: ask its target, once
                    node, asking = self.links.asked(ask), True
                except TryAgainError as again:
                    # The slot is migrating and this node holds only part of the call's keys
                    # (a script declares keys that exist nowhere yet, so a migration target
                    # asked for it answers so too): it did not run. Go again from the slot's
                    # master once the migration may have moved on, within the call's wait.
                    resume = trio.current_time() + _TRY_AGAIN_PAUSE
                    if resume >= start + self.max_wait:
                        raise CountersUnavailableError(
                            f"counter store: slot still migrating after {self.max_wait} s: {again}"
                        ) from again
                    await trio.sleep_until(resume)
                    node, asking, redirects = self.links.node_for(keys[0]), False, 0
                    continue
                redirects += 1
                if redirects >= _REDIRECTS:
                    raise CountersUnavailableError(
                        f"counter store: more than {_REDIRECTS} redirects"
                    )
        raise AssertionError("unreachable: a shielded scope without a deadline")

    async def call(
        self, node: Node, start: float, asking: bool, command: bytes, *args: _Value
    ) -> object:
        """One command on `node`'s live connection, sent before this task yields; its reply."""
        link = await self._connected(node, start)
        if asking:
            link.request(b"ASKING", timeout=2 * self.max_wait)
        request = link.request(command, *args, timeout=2 * self.max_wait)
        try:
            await link.flush()
        except RedisError as exc:
            self.links.failed(node, exc)
            raise
        try:
            return await self._reply(link, request, start)
        except RedisConnectionError as exc:
            self.links.failed(node, exc)
            raise

    async def _connected(self, node: Node, start: float) -> Link:
        """`node`'s live connection: at once in the usual case; else one connect per node at
        a time, bounded by coredis' connect_timeout (`max_wait`: a loopback connect is
        instant, only a busy loop makes it look slow, and a refused one fails at once)."""
        link = self.links.live(node)
        if link is not None:
            return link
        with trio.move_on_at(start + self.max_wait):
            return await self.links.link(node)
        raise CountersUnavailableError("counter store: no connection within the call's wait")

    async def _reply(self, link: Link, request: Request, start: float) -> object:
        """Wait for `request`'s reply while the node is not silent."""
        hard = start + self.max_wait
        while True:
            silent_at = max(start, link.last_reply) + self.timeout
            with trio.move_on_at(min(hard, silent_at)) as waited:
                try:
                    reply = await request
                finally:
                    if request.complete:  # an error reply is an answer too
                        link.last_reply = trio.current_time()
            if not waited.cancelled_caught:
                return reply
            # Our loop may have been busy: the reply (or others') may sit in the socket. Let
            # the connection's reader run before judging Redis.
            for _ in range(_CATCH_UP_CHECKPOINTS):
                await trio.lowlevel.checkpoint()
            if request.complete:
                link.last_reply = trio.current_time()
                return await request
            now = trio.current_time()
            if now < hard and link.answer_waiting():
                # Redis answered (this call or another); only our reader is behind: a sign of
                # life, not silence. Wait on, up to the hard bound.
                link.last_reply = now
                continue
            if now >= hard or now >= max(start, link.last_reply) + self.timeout:
                raise NoAnswerError(
                    f"counter store: no answer for {self.timeout} s"
                    if now < hard
                    else f"counter store: no answer within {self.max_wait} s"
                )


def redis_client(
    url: str,
    *,
    cluster: bool,
    connect_timeout: float,
    stream_timeout: float,
    max_connections: int,
) -> coredis.Redis[str] | coredis.RedisCluster[str]:
    """A coredis client for `url` that never retries (a retried admission could reserve
    twice): the server itself, or with `cluster` the Redis Cluster that `url`'s node belongs
    to (its other nodes are discovered from it; `skip_full_coverage_check`: a cluster with a
    lost master still serves the other slots, see README "Redis Cluster").

    The cluster client is built with its constructor, not `RedisCluster.from_url` (which may
    warn, and warnings are errors in the suite)."""
    if not cluster:
        return coredis.Redis.from_url(
            url,
            decode_responses=True,
            connect_timeout=connect_timeout,
            stream_timeout=stream_timeout,
            max_connections=max_connections,
            retry_policy=NoRetryPolicy(),
        )
    parts = urlsplit(url)
    db = parts.path.strip("/")
    if db not in {"", "0"}:
        raise ValueError(f"Redis Cluster has only database 0, not {db!r}")
    return coredis.RedisCluster(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        decode_responses=True,
        connect_timeout=connect_timeout,
        stream_timeout=stream_timeout,
        max_connections=max_connections,
        skip_full_coverage_check=True,
        retry_policy=NoRetryPolicy(),
    )


@asynccontextmanager
async def entered(
    client: coredis.Redis[Any] | coredis.RedisCluster[Any],
) -> AsyncIterator[None]:
    """`async with client`, plus what coredis 6.9 leaves open on a cluster client: its layout's
    error stream (a memory stream pair that warns when collected unclosed)."""
    try:
        async with client:
            yield
    finally:
        if isinstance(client, coredis.RedisCluster):
            for stream in client.connection_pool.cluster_layout._error_stream:
                stream.close()
