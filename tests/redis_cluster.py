"""A Redis Cluster of the test's own: `redis-server --cluster-enabled yes` nodes on free loopback
ports, joined with `redis-cli --cluster create`; killed (and their files removed) at the end.

    with own_redis_cluster(tmp_path, replicas=1) as cluster:   # 3 masters + 3 replicas
        cluster.url                      # redis://127.0.0.1:<port of the first master>/0
        cluster.kill_master_of("{t1}")   # SIGKILL the master serving that hash tag's slot

`redis-server` and `redis-cli` are on the machine (Debian's redis-server and redis-tools);
without them the test is skipped, or fails under `CI=true` (CI must run the cluster tests).
Nodes run without persistence; `cluster-node-timeout` is short (1 s) so that a replica takes over
from a killed master within a few seconds, and `cluster-require-full-coverage no` keeps the
surviving masters answering when a master without replica is gone.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

from tests.system_tools import require_tool

# A redis-server of the tests' own: loopback only, nothing persisted (a restart comes back empty).
EPHEMERAL_REDIS_ARGS = (
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--protected-mode",
    "no",
    "--loglevel",
    "warning",
)
NODE_TIMEOUT_MS = 1000
MASTERS = 3
START_TIMEOUT = 30.0  # a hang guard for the whole start (nodes up, cluster created, state ok)


def free_port() -> int:
    """A free loopback port whose +10000 (the cluster bus) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _command(port: int, *args: str, timeout: float = 5.0) -> str:
    """One command through redis-cli; its output ('' when the node does not answer)."""
    try:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout


def _info_field(text: str, field: str) -> str:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def key_slot(key: str) -> int:
    """Redis Cluster's slot of `key` (CRC16 of its hash tag, mod 16384)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


@attrs.define
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                *EPHEMERAL_REDIS_ARGS,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.directory / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@attrs.define
class OwnedCluster:
    nodes: list[ClusterNode]
    replicas: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def alive_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def slot_owner(self, slot: int) -> int | None:
        """The port of the master that serves `slot` now, as a live node sees it."""
        for node in self.alive_nodes():
            owner = _owner_from_nodes(_command(node.port, "CLUSTER", "NODES"), slot)
            if owner is not None:
                return owner
        return None

    def node_id(self, port: int) -> str:
        return _command(port, "CLUSTER", "MYID").strip()

    def move_empty_slot(self, slot: int, port: int) -> None:
        """Hand `slot` (no keys in it) to the master on `port`, as every node sees it."""
        target = self.node_id(port)
        for node in self.alive_nodes():
            answer = _command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target)
            assert answer.strip() == "OK", answer
        self._wait_owner(slot, port)

    def wait_owner(self, slot: int, port: int) -> None:
        """Wait until every live node sees the master on `port` serve `slot` (e.g. after a
        failover, before a check that any node's slot map must show it)."""
        self._wait_owner(slot, port)

    def _wait_owner(self, slot: int, port: int) -> None:
        """Wait until every live node sees the master on `port` serve `slot`."""
        deadline = time.monotonic() + START_TIMEOUT
        while any(
            _owner_from_nodes(_command(n.port, "CLUSTER", "NODES"), slot) != port
            for n in self.alive_nodes()
        ):
            assert time.monotonic() < deadline, f"slot {slot} not moved to {port}"
            time.sleep(0.05)

    def start_migration(self, slot: int, source: int, target: int) -> None:
        """Open `slot`'s migration from the master on `source` to the one on `target`, as a
        resharding does: IMPORTING on the target, then MIGRATING on the source. The source
        then answers ASK for the slot's keys it no longer holds."""
        for port, state, other in ((target, "IMPORTING", source), (source, "MIGRATING", target)):
            answer = _command(port, "CLUSTER", "SETSLOT", str(slot), state, self.node_id(other))
            assert answer.strip() == "OK", answer

    def keys_in_slot(self, port: int, slot: int) -> list[str]:
        """The keys of `slot` that the node on `port` holds itself."""
        answer = _command(port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100000")
        return [k for k in answer.splitlines() if k]

    def migrate_keys(self, source: int, target: int, keys: Sequence[str]) -> None:
        """Move `keys` from the master on `source` to the one on `target` (MIGRATE)."""
        answer = _command(
            source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys
        )
        assert answer.strip() == "OK", answer

    def finish_migration(self, slot: int, source: int, target: int) -> None:
        """Close `slot`'s migration: SETSLOT NODE <target> on the target, the source, then
        every other master, as a resharding does; wait until every node agrees."""
        owner = self.node_id(target)
        others = [n.port for n in self.alive_nodes() if n.port not in (source, target)]
        for port in (target, source, *others):
            answer = _command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", owner)
            assert answer.strip() == "OK", answer
        self._wait_owner(slot, target)

    def command_stat(self, port: int, command: str, field: str) -> int:
        """A field of `INFO commandstats` for `command` on the node on `port` (0 if absent),
        e.g. ("evalsha", "rejected_calls"): calls answered with a redirection or TRYAGAIN."""
        info = _command(port, "INFO", "commandstats")
        for part in _info_field(info, f"cmdstat_{command.lower()}").split(","):
            name, _, value = part.partition("=")
            if name == field:
                return int(value)
        return 0

    def keys_on(self, port: int, pattern: str) -> list[str]:
        """The keys matching `pattern` that the node on `port` holds itself."""
        return [k for k in _command(port, "--scan", "--pattern", pattern).splitlines() if k]

    def wait_replicated(self) -> None:
        """Every master's writes so far received by its replicas: each replica's offset has
        reached the master's replication offset. (Not `WAIT`: it waits for the writes of the
        connection it is sent on, and redis-cli's own connection wrote nothing.)"""
        deadline = time.monotonic() + START_TIMEOUT
        for node in self.alive_nodes():
            info = _command(node.port, "INFO", "replication")
            if _info_field(info, "role") != "master":
                continue
            target = int(_info_field(info, "master_repl_offset") or 0)
            while True:
                offsets = [
                    int(part.partition("=")[2])
                    for n in range(self.replicas)
                    for part in _info_field(info, f"slave{n}").split(",")
                    if part.startswith("offset=")
                ]
                if len(offsets) == self.replicas and min(offsets) >= target:
                    break
                assert time.monotonic() < deadline, f"replicas of {node.port} behind: {info}"
                time.sleep(0.02)
                info = _command(node.port, "INFO", "replication")

    def node_at(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def kill_master_of(self, key: str) -> ClusterNode:
        """SIGKILL the master serving `key`'s slot; the killed node."""
        port = self.slot_owner(key_slot(key))
        assert port is not None, f"no master serves {key!r}"
        node = self.node_at(port)
        node.kill()
        return node

    def wait_slot_served(self, slot: int, *, not_by: int, timeout: float) -> int:
        """Wait until a live master other than `not_by` serves `slot` (a replica took over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owner = self.slot_owner(slot)
            if owner is not None and owner != not_by and self.node_at(owner).alive:
                state = _info_field(_command(owner, "CLUSTER", "INFO"), "cluster_state")
                if state == "ok":
                    return owner
            time.sleep(0.1)
        raise TimeoutError(f"slot {slot} not taken over within {timeout} s")


def _owner_from_nodes(text: str, slot: int) -> int | None:
    """The port of the healthy master serving `slot` in CLUSTER NODES output."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = fields[2].split(",")
        if "master" not in flags or "fail" in flags or "fail?" in flags:
            continue
        for ranges in fields[8:]:
            if ranges.startswith("["):  # a slot being migrated
                continue
            low, _, high = ranges.partition("-")
            if int(low) <= slot <= int(high or low):
                return int(fields[1].split("@", 1)[0].rsplit(":", 1)[1])
    return None


@contextmanager
def own_redis_cluster(directory: Path, *, replicas: int = 0) -> Iterator[OwnedCluster]:
    """3 masters (and `replicas` replicas of each) on free ports, ready (cluster_state:ok)."""
    require_tool("redis-server", "redis-server", "the Redis Cluster tests")
    require_tool("redis-cli", "redis-tools", "the Redis Cluster tests")
    ports: list[int] = []
    while len(ports) < MASTERS * (1 + replicas):
        port = free_port()
        if port not in ports and port + 10000 not in ports:
            ports.append(port)
    cluster = OwnedCluster(
        [ClusterNode(port, directory / f"node-{port}") for port in ports], replicas
    )
    try:
        for node in cluster.nodes:
            node.start()
        deadline = time.monotonic() + START_TIMEOUT
        for node in cluster.nodes:
            while _command(node.port, "PING", timeout=1).strip() != "PONG":
                assert node.alive, f"redis-server on {node.port} exited"
                assert time.monotonic() < deadline, f"redis-server on {node.port} not up"
                time.sleep(0.02)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for node in cluster.nodes:
            while True:
                info = _command(node.port, "CLUSTER", "INFO")
                known = _info_field(info, "cluster_known_nodes")
                if _info_field(info, "cluster_state") == "ok" and known == str(len(ports)):
                    break
                assert time.monotonic() < deadline, f"cluster not ok on {node.port}: {info}"
                time.sleep(0.05)
        if replicas:  # every replica attached and synced before the test kills its master
            for node in cluster.nodes:
                while True:
                    info = _command(node.port, "INFO", "replication")
                    role = _info_field(info, "role")
                    if role == "master" and _info_field(info, "connected_slaves") == str(replicas):
                        break
                    if role == "slave" and _info_field(info, "master_link_status") == "up":
                        break
                    assert time.monotonic() < deadline, f"replication not up on {node.port}"
                    time.sleep(0.05)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()
