"""A private three-master Redis Cluster for the tests, started once per session.

Load it in a test module with ``pytest_plugins = ("tests.redis_cluster",)``: pytest then
registers its fixtures once, so every module shares the one cluster. The servers listen on
free loopback ports (with cluster bus ports of their own) and keep their files in a
temporary folder; they are killed when the session ends. Without ``redis-server`` and
``redis-cli`` the tests that need the cluster are skipped, or fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import redis_answers, wait_until

MASTERS = 3


@dataclass
class PrivateCluster:
    """The running cluster: its nodes' ports and the URL celeriac reaches it by."""

    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming two of the three nodes (the client finds the third)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node."""
        return redis.Redis(port=port, socket_connect_timeout=2)

    def flush(self) -> None:
        """Empty every node (scripts stay loaded)."""
        for port in self.ports:
            client = self.node(port)
            try:
                client.flushall()
            finally:
                client.close()

    def all_keys(self) -> set[bytes]:
        """Every key on every node."""
        found: set[bytes] = set()
        for port in self.ports:
            client = self.node(port)
            try:
                found.update(client.keys("*"))
            finally:
                client.close()
        return found

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(30)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _tools() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server and redis-cli are needed to start a private Redis Cluster"
        if os.environ.get("CI"):
            pytest.fail(f"REDIS CLUSTER TESTS CANNOT RUN under CI: {message}")
        pytest.skip(f"SKIPPING REDIS CLUSTER TESTS: {message} (CI=1 makes this fail)")
    return server, cli


def _settled(cluster: PrivateCluster) -> bool:
    """Whether every node sees every node and all slots served, with the cluster up."""
    for port in cluster.ports:
        client = cluster.node(port)
        try:
            info = client.execute_command("CLUSTER INFO")  # redis-py reads it into a dict of str
        finally:
            client.close()
        wanted = {"cluster_state": "ok", "cluster_slots_ok": "16384", "cluster_known_nodes": str(MASTERS)}
        if any(info.get(name) != value for name, value in wanted.items()):
            return False
    return True


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """Start a three-master Redis Cluster on free loopback ports; stop it when the session ends."""
    server, cli = _tools()
    folder = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(2 * MASTERS)
    cluster = PrivateCluster(ports[:MASTERS])
    try:
        for port, bus in zip(ports[:MASTERS], ports[MASTERS:], strict=True):
            node_dir = Path(folder) / str(port)
            node_dir.mkdir()
            args = [server, "--port", str(port), "--cluster-port", str(bus), "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", "nodes.conf", "--dir", str(node_dir), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no"]
            cluster.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for port in cluster.ports:
            wait_until(lambda port=port: redis_answers(port), timeout=10, what=f"redis-server on {port}")
        addresses = [f"127.0.0.1:{port}" for port in cluster.ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(lambda: _settled(cluster), timeout=30, what="the private Redis Cluster to settle")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: PrivateCluster) -> str:
    """The private cluster's URL, every node emptied first."""
    redis_cluster.flush()
    return redis_cluster.url
