"""A Redis Cluster master killed while three `nzgw serve` processes serve (issue 17, "Beyond
one machine"): what users see over HTTP (README "Redis Cluster", "Failure behaviour").

- `test_a_master_failover_under_traffic_refuses_then_resumes_exactly`: 3 masters with a
  replica each (tests/redis_cluster.py: `cluster-node-timeout` 1 s). Clients keep sending to
  two tenants, one whose slot lives on the master that is SIGKILLed and one on another master.
  While the replica takes over, the first tenant's requests are refused with the API's 503
  (`Retry-After: 1`, never admitted unchecked, never a 500) and the second tenant's are all
  admitted; no gateway dies or is restarted, each admits the first tenant again once the
  replica serves its slot. After it: requests held in flight across the failover (their
  concurrency leases written before the kill, replicated, settled on the new master) free
  their slots, so a concurrency limit of N admits N again and refuses the N+1st; a
  requests-per-minute window on the new master admits exactly its limit across the three
  processes.
- `test_a_master_without_replica_refuses_its_tenants_until_it_is_back`: 3 masters, no
  replica. The killed master's tenant gets 503 for as long as it is down, on every gateway
  and past the slot map's re-reads; the other tenant is admitted throughout and /readyz
  stays ready. Restarted (empty, same cluster identity), the master serves its slots again;
  the tenant is admitted again without restarting any gateway, with its budget counters
  rebuilt from the ledger.

Synchronisation: cluster state is observed with redis-cli (polled in a thread: a failover has
no event to wait on), gateway answers are awaited, held requests are the emulator's `hold`.
The durations printed (`-s`) are measurements for README, never asserted.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from nzgw.adapters.stores import open_store
from nzgw.core.models import Limits
from nzgw.ports import NewKey, Store
from nzgw.services.identity import KeyHasher
from nzgw.services.issuing import issue_key
from nzgw.testing import EmulatorSettings, open_emulator
from nzgw.testing.emulator import Emulator
from tests.counters.conftest import COREDIS_CONNECT_LEAK
from tests.harness import FAST_ARGON2
from tests.redis_cluster import OwnedCluster, key_slot, own_redis_cluster
from tests.test_limits_http import (
    GENERATE,
    GatewayProcess,
    _auth,
    _body,
    open_clients,
    open_gateways,
    stop_gracefully,
)

pytestmark = [pytest.mark.redis, COREDIS_CONNECT_LEAK]

HANG_GUARD = 60.0  # a bound for a whole phase on a loaded box, not a latency figure
CLIENTS_PER_GATEWAY = 2  # per tenant
CONCURRENT = 3  # the held key's concurrent_requests
RPM = 20  # the exactness key's requests_per_minute (RPM requests to each of the 3 gateways)
CHAT = _body({"model": "llama3", "messages": [{"role": "user", "content": "x"}], "stream": False})
# Room on the backend for the held requests and the clients together (the default is one
# request at a time: held requests would queue everything behind them).
GATEWAY_ENV = {"OLLAMA_PARALLEL": "64"}
REFUSED = "rate limiting is unavailable, try again"


@attrs.frozen
class Answer:
    gateway: int
    tenant: str
    started: float  # time.monotonic(): comparable with the cluster observations' times
    ended: float
    status: int
    retry_after: str | None
    body: str


async def _tenant_key(store: Store, tenant_id: int, name: str, limits: Limits = Limits()) -> str:
    full_key, _ = await issue_key(
        store, KeyHasher(FAST_ARGON2), NewKey(tenant_id, name, "", "", limits=limits)
    )
    return full_key


async def _tenants_on_two_masters(store: Store, cluster: OwnedCluster) -> tuple[int, int]:
    """Tenants created until two have their hash tag (`{t<id>}`) on different masters."""
    first = await store.create_tenant("lost")
    owner = cluster.slot_owner(key_slot(f"{{t{first.id}}}"))
    for n in range(20):
        other = await store.create_tenant(f"kept-{n}")
        if cluster.slot_owner(key_slot(f"{{t{other.id}}}")) != owner:
            return first.id, other.id
    raise AssertionError("every tenant on one master")


@attrs.define
class Traffic:
    """Clients that keep sending /api/generate for a tenant's key to every gateway."""

    clients: list[httpx.AsyncClient]
    answers: list[Answer] = attrs.Factory(list)
    stop: trio.Event = attrs.Factory(trio.Event)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def client(self, gateway: int, tenant: str, key: str) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            response = await self.clients[gateway].post(
                "/api/generate", content=GENERATE, headers=_auth(key)
            )
            self.answers.append(
                Answer(
                    gateway,
                    tenant,
                    started,
                    time.monotonic(),
                    response.status_code,
                    response.headers.get("retry-after"),
                    response.text,
                )
            )
            self._changed.set()
            self._changed = trio.Event()
            if response.status_code != 200:
                await trio.sleep(0.05)  # a client's retry pace, not a synchronisation

    def start(self, nursery: trio.Nursery, keys: dict[str, str]) -> None:
        for gateway in range(len(self.clients)):
            for tenant, key in keys.items():
                for _ in range(CLIENTS_PER_GATEWAY):
                    nursery.start_soon(self.client, gateway, tenant, key)

    async def wait_until(self, holds: Callable[[list[Answer]], bool]) -> None:
        while not holds(self.answers):
            await self._changed.wait()


def _admitted_after(answers: list[Answer], tenant: str, since: float, gateways: int) -> bool:
    """Every gateway admitted a request of `tenant` that started after `since`."""
    admitted = {a.gateway for a in answers if a.tenant == tenant and a.status == 200}
    late = {
        g
        for g in admitted
        if any(
            a.gateway == g and a.tenant == tenant and a.status == 200 and a.started > since
            for a in answers
        )
    }
    return late == set(range(gateways))


def _assert_fail_closed(refused: list[Answer]) -> None:
    """The API's refusal for counters that cannot answer: 503, Retry-After 1, its message."""
    for answer in refused:
        assert answer.status == 503, answer
        assert answer.retry_after == "1", answer
        assert REFUSED in answer.body, answer


def _assert_alive(gateways: list[GatewayProcess]) -> None:
    for gateway in gateways:
        assert gateway.process.returncode is None, gateway.lines[-10:]


def _refusal_spans(answers: list[Answer], tenant: str) -> dict[int, float]:
    """Per gateway: seconds from the first refused request's start to the last one's end."""
    spans: dict[int, float] = {}
    for g in {a.gateway for a in answers}:
        refused = [a for a in answers if a.gateway == g and a.tenant == tenant and a.status != 200]
        if refused:
            spans[g] = max(a.ended for a in refused) - min(a.started for a in refused)
    return spans


async def _chat(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/api/chat", content=CHAT, headers=_auth(key))


def _chats(emulator: Emulator) -> int:
    """Chat requests the emulator received: each one admitted (its lease taken) first."""
    return sum(r.path == "/api/chat" for r in emulator.requests)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[OwnedCluster]:
    with own_redis_cluster(tmp_path / "redis-cluster", replicas=1) as cluster:
        yield cluster


@pytest.fixture
def unreplicated(tmp_path: Path) -> Iterator[OwnedCluster]:
    with own_redis_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


async def test_a_master_failover_under_traffic_refuses_then_resumes_exactly(
    tmp_path: Path, replicated: OwnedCluster
) -> None:
    cluster = replicated
    database_url = f"sqlite:///{tmp_path}/nzgw.db"
    async with open_store(database_url) as store:
        await store.migrate()
        lost, kept = await _tenants_on_two_masters(store, cluster)
        keys = {
            "lost": await _tenant_key(store, lost, "load-lost"),
            "kept": await _tenant_key(store, kept, "load-kept"),
        }
        held_key = await _tenant_key(store, lost, "held", Limits(concurrent_requests=CONCURRENT))
        rpm_key = await _tenant_key(store, lost, "rpm", Limits(requests_per_minute=RPM))
    slot = key_slot(f"{{t{lost}}}")
    settings = EmulatorSettings(tokens_per_reply=2)
    async with (
        open_emulator(settings) as emulator,
        open_gateways(
            tmp_path,
            redis_url=cluster.url,
            redis_cluster=True,
            database_url=database_url,
            ollama_url=emulator.url,
            extra_env=GATEWAY_ENV,
        ) as gateways,
        open_clients(gateways) as clients,
    ):
        n = len(gateways)
        for key in (*keys.values(), held_key, rpm_key):  # authenticated once per process
            for client in clients:
                assert (await client.get("/api/tags", headers=_auth(key))).status_code == 200

        # CONCURRENT requests of the held key in flight across the failover: admitted (their
        # leases on the doomed master, replicated), held by the emulator until released.
        release = trio.Event()
        settings.hold = release
        held: list[httpx.Response] = []
        traffic = Traffic(clients)
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:

                async def hold_one(client: httpx.AsyncClient) -> None:
                    held.append(await _chat(client, held_key))

                for i in range(CONCURRENT):
                    nursery.start_soon(hold_one, clients[i % n])
                await emulator.wait_until(lambda: _chats(emulator) == CONCURRENT)
                settings.hold = None  # later generations run; the held ones wait on `release`
                full = await _chat(clients[0], held_key)
                assert full.status_code == 429, full.text
                assert "concurrent requests limit" in full.text

                traffic.start(nursery, keys)
                await traffic.wait_until(
                    lambda answers: (
                        _admitted_after(answers, "lost", 0, n)
                        and _admitted_after(answers, "kept", 0, n)
                    )
                )
                await trio.to_thread.run_sync(cluster.wait_replicated)
                killed_at = time.monotonic()
                killed = cluster.kill_master_of(f"{{t{lost}}}")
                new_master = await trio.to_thread.run_sync(
                    lambda: cluster.wait_slot_served(slot, not_by=killed.port, timeout=HANG_GUARD)
                )
                served_at = time.monotonic()
                # Every gateway admits the lost tenant again, by itself (no restart).
                await traffic.wait_until(
                    lambda answers: _admitted_after(answers, "lost", served_at, n)
                )
                _assert_alive(gateways)
                traffic.stop.set()
                release.set()  # the held requests end now, on the new master
        answers = traffic.answers

        assert {a.status for a in answers if a.tenant == "kept"} == {200}
        lost_answers = [a for a in answers if a.tenant == "lost"]
        _assert_fail_closed([a for a in lost_answers if a.status != 200])
        refused = [a for a in lost_answers if a.status != 200]
        assert refused, "no request saw the dead master"
        assert all(a.ended > killed_at for a in refused)  # refused only once it was killed
        # Nothing refused reached the backend: it saw exactly the admitted generations.
        generated = sum(r.path == "/api/generate" for r in emulator.requests)
        assert generated == sum(a.status == 200 for a in answers)
        assert [r.status_code for r in held] == [200] * CONCURRENT
        assert cluster.slot_owner(slot) == new_master

        # The held requests' leases were settled on the new master: CONCURRENT slots free again,
        # and not one more.
        release = trio.Event()
        settings.hold = release
        again: list[httpx.Response] = []
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:

                async def again_one(client: httpx.AsyncClient) -> None:
                    again.append(await _chat(client, held_key))

                for i in range(CONCURRENT):
                    nursery.start_soon(again_one, clients[i % n])
                await emulator.wait_until(lambda: _chats(emulator) == 2 * CONCURRENT)
                for client in clients:
                    over = await _chat(client, held_key)
                    assert over.status_code == 429, over.text
                    assert "concurrent requests limit" in over.text
                release.set()
        settings.hold = None
        assert [r.status_code for r in again] == [200] * CONCURRENT

        # One requests-per-minute window on the new master, shared by the three processes.
        burst: list[int] = []
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:

                async def one(client: httpx.AsyncClient) -> None:
                    response = await client.post(
                        "/api/generate", content=GENERATE, headers=_auth(rpm_key)
                    )
                    burst.append(response.status_code)

                for _ in range(RPM):
                    for client in clients:
                        nursery.start_soon(one, client)
        assert collections.Counter(burst) == {200: RPM, 429: (n - 1) * RPM}
        _assert_alive(gateways)
        await stop_gracefully(gateways)

    spans = _refusal_spans(answers, "lost")
    print(  # shown with -s: the figure README "Redis Cluster" quotes
        f"failover: replica serving {served_at - killed_at:.1f} s after the kill; refusals per "
        f"gateway {', '.join(f'{s:.1f} s' for s in spans.values())}; {len(refused)} refused"
    )


async def test_a_master_without_replica_refuses_its_tenants_until_it_is_back(
    tmp_path: Path, unreplicated: OwnedCluster
) -> None:
    cluster = unreplicated
    database_url = f"sqlite:///{tmp_path}/nzgw.db"
    async with open_store(database_url) as store:
        await store.migrate()
        lost, kept = await _tenants_on_two_masters(store, cluster)
        keys = {
            "lost": await _tenant_key(store, lost, "load-lost"),
            "kept": await _tenant_key(store, kept, "load-kept"),
        }
    async with (
        open_emulator(EmulatorSettings(tokens_per_reply=2)) as emulator,
        open_gateways(
            tmp_path,
            redis_url=cluster.url,
            redis_cluster=True,
            database_url=database_url,
            ollama_url=emulator.url,
            extra_env=GATEWAY_ENV,
        ) as gateways,
        open_clients(gateways) as clients,
    ):
        n = len(gateways)
        traffic = Traffic(clients)
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                traffic.start(nursery, keys)
                await traffic.wait_until(
                    lambda answers: (
                        _admitted_after(answers, "lost", 0, n)
                        and _admitted_after(answers, "kept", 0, n)
                    )
                )
                killed_at = time.monotonic()
                killed = cluster.kill_master_of(f"{{t{lost}}}")

                def refused_after_kill(gateway: int, count: int) -> Callable[[list[Answer]], bool]:
                    return lambda answers: (
                        sum(
                            a.gateway == gateway and a.tenant == "lost" and a.started > killed_at
                            for a in answers
                        )
                        >= count
                    )

                # Well past the slot map's re-reads (after failed connects): the slots stay
                # without a master, the tenant refused, on every gateway.
                for g in range(n):
                    await traffic.wait_until(refused_after_kill(g, 40))
                for client in clients:
                    ready = await client.get("/readyz")
                    assert ready.status_code == 200, ready.text
                _assert_alive(gateways)

                restarted_at = time.monotonic()
                killed.start()  # empty (no persistence), with its nodes.conf: same slots
                await trio.to_thread.run_sync(
                    lambda: cluster.wait_slot_served(
                        key_slot(f"{{t{lost}}}"), not_by=0, timeout=HANG_GUARD
                    )
                )
                back_at = time.monotonic()
                await traffic.wait_until(
                    lambda answers: _admitted_after(answers, "lost", back_at, n)
                )
                traffic.stop.set()
        answers = traffic.answers
        _assert_alive(gateways)
        await stop_gracefully(gateways)

    assert {a.status for a in answers if a.tenant == "kept"} == {200}
    during = [
        a
        for a in answers
        if a.tenant == "lost" and killed_at < a.started and a.ended < restarted_at
    ]
    assert during and {a.status for a in during} == {503}
    _assert_fail_closed(during)
    generated = sum(r.path == "/api/generate" for r in emulator.requests)
    assert generated == sum(a.status == 200 for a in answers)
    print(f"no replica: {len(during)} refused while the master was down")
