"""Redis Sentinel (``redis+sentinel://``): a private master, its replica and one sentinel on loopback ports, two hub
nodes on the sentinel's URL, and a failover while messages flow."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from hub import redis_client
from hub.app import App
from hub.keys import Keys
from tests.conftest import free_port, make_config, url_of
from tests.helpers import collect_chat, connect, say_until_acked, wait_until
from tests.redis_cluster import find_binary

SERVICE = "mymaster"
SERVER = find_binary("redis-server", (6, 2))

pytestmark = pytest.mark.skipif(SERVER is None, reason="needs redis-server 6.2 or newer")


class SentinelSetup:
    """A master, a replica of it and a sentinel watching them (quorum 1, a master is down after 1 s)."""

    def __init__(self) -> None:
        assert SERVER is not None
        self.dir = Path(tempfile.mkdtemp(prefix="hub-sentinel-"))
        self.master_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"

    def _server(self, port: int, *extra: str) -> None:
        assert SERVER is not None
        node_dir = self.dir / str(port)
        node_dir.mkdir()
        self.processes.append(subprocess.Popen(
            [SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
             "--appendonly", "no", "--logfile", str(node_dir / "redis.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5,
                           decode_responses=True)

    def wait(self, what: str, check: object, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; see {self.dir}")
            time.sleep(0.05)

    def start(self) -> None:
        self._server(self.master_port)
        self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        with self.client(self.replica_port) as replica:
            self.wait("the replica's sync", lambda: replica.info("replication")["master_link_status"] == "up")
        config = self.dir / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\nsentinel failover-timeout {SERVICE} 10000\n")
        assert SERVER is not None
        self.processes.append(subprocess.Popen([SERVER, str(config), "--sentinel"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with self.client(self.sentinel_port) as sentinel:
            # Connected to it and seeing its link to the master up: only then is it a replica Sentinel promotes.
            self.wait("the sentinel to see the replica", lambda: any(
                int(r["port"]) == self.replica_port and r["flags"] == "slave" and r["master-link-status"] == "ok"
                for r in sentinel.execute_command("SENTINEL", "REPLICAS", SERVICE)))

    def master(self) -> int:
        with self.client(self.sentinel_port) as sentinel:
            return int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def failover(self) -> None:
        """A coordinated SENTINEL FAILOVER: the master's writes are paused until the replica has all of them, then
        the replica is promoted and the old master made its replica, its clients dropped (they reconnect through
        the sentinel to the new master). A forced failover of a live master without the pause
        would let it acknowledge writes after the promotion, which its demotion then discards (split brain)."""
        with self.client(self.master_port) as master, self.client(self.replica_port) as replica:
            master.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
            written = int(master.info("replication")["master_repl_offset"])
            self.wait("the replica to catch up",
                      lambda: int(replica.info("replication")["slave_repl_offset"]) >= written)
            with self.client(self.sentinel_port) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
            self.wait("the promotion", lambda: self.master() == self.replica_port
                      and replica.info("replication")["role"] == "master")
            # What Sentinel does to the old master once it sees it again (after failover-timeout), done at once:
            # make it a replica of the new one and drop its clients, which reconnect through the sentinel.
            master.execute_command("REPLICAOF", "127.0.0.1", self.replica_port)
            for kind in ("normal", "pubsub"):
                master.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
            master.execute_command("CLIENT", "UNPAUSE")

    def destroy(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    try:
        setup.start()
        yield setup
    finally:
        setup.destroy()


@pytest.fixture
async def sentinel_nodes(prefix: str, sentinel_setup: SentinelSetup) -> AsyncIterator[list[App]]:
    apps = [App(make_config(prefix, **{"redis.url": sentinel_setup.url, "server.drain_timeout_s": 2}))
            for _ in range(2)]
    for app in apps:
        await app.start()
    yield apps
    for app in apps:
        await app.stop()


def test_sentinel_urls_name_the_sentinels_and_the_service() -> None:
    address = redis_client.parse_sentinel_url("rediss+sentinel://u:secret@10.0.0.1:26379,10.0.0.2/orders/2")
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 6379)) and address.service == "orders"
    assert (address.db, address.username, address.password, address.tls) == (2, "u", "secret", True)
    with pytest.raises(ValueError, match="service"):
        redis_client.parse_sentinel_url("redis+sentinel://10.0.0.1:26379")


@pytest.mark.timeout(90)
async def test_sentinel_failover_keeps_delivering_and_loses_nothing_acked(
        sentinel_setup: SentinelSetup, sentinel_nodes: list[App], prefix: str) -> None:
    """Two nodes on ``redis+sentinel://``; the replica is promoted (SENTINEL FAILOVER) while a writer on node A
    sends: the nodes reconnect to the new master by themselves (refused publishes are sent again, same
    client_msg_id), the member on node B gets every acknowledged message once and in order, the new master's
    stream holds exactly those, and a backend's raw XADD on it reaches the member live (its keyspace
    notifications were turned on while it was a replica)."""
    a, b = sentinel_nodes
    room = "channel_sentinel"
    writer, reader = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    await writer.join(room)
    await reader.join(room)
    with sentinel_setup.client(sentinel_setup.replica_port) as replica:
        assert "K" in replica.config_get("notify-keyspace-events")["notify-keyspace-events"]
    acked: list[str] = []
    refused: list[str] = []
    failed_over = asyncio.Event()

    async def write() -> None:
        index = 0
        while not failed_over.is_set() or len(acked) < index_at_failover + 20:
            acked.append(await say_until_acked(writer, room, f"m{index}", refused))
            index += 1

    index_at_failover = 10**9
    writing = asyncio.ensure_future(write())
    await wait_until(lambda: len(acked) >= 10, timeout_s=10, what="traffic before the failover")
    started = time.monotonic()
    await asyncio.to_thread(sentinel_setup.failover)
    index_at_failover = len(acked)
    failed_over.set()
    await asyncio.wait_for(writing, 45)
    writes_resumed_s = time.monotonic() - started

    got = await collect_chat(reader, len(acked), timeout_s=30)
    assert [f["id"] for f in got] == acked
    with sentinel_setup.client(sentinel_setup.replica_port) as promoted:
        stream = Keys(prefix).stream(room)
        assert [entry_id for entry_id, _ in promoted.xrange(stream)] == acked
        raw_id = promoted.xadd(stream, {"sender_id": "backend", "content": "after the failover"})
    frame = await reader.expect("chat_message", room=room, timeout_s=10)
    assert frame["id"] == raw_id and frame["content"] == "after the failover"
    print(f"sentinel failover: {len(acked)} messages acked and delivered, {len(refused)} refused and sent again "
          f"({sorted(set(refused))}); writes went on within {writes_resumed_s:.1f}s")
