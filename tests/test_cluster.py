"""The core flows against a private 3-master Redis Cluster (with a replica each), two hub nodes on it: delivery
across nodes, resume, a backend's raw XADD into a room and an inbox, typing, presence and read receipts,
revocation, the archiver, and a master failover while messages flow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from consumers.archiver import GROUP, Archiver
from hub import redis_client
from hub.app import App
from hub.config import ArchiverConfig, PostgresConfig
from hub.errors import CloseCode
from hub.keys import Keys
from hub.notifications import inbox_room
from hub.tokens import RevocationStore
from tests.conftest import PG_URL, make_config, url_of
from tests.helpers import Client, connect, mint, say_until_acked, wait_until
from tests.redis_cluster import RedisClusterFixture, find_binary

pytestmark = pytest.mark.skipif(find_binary("redis-server") is None or find_binary("redis-cli") is None,
                                reason="Redis Cluster tests need redis-server and redis-cli 7")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterFixture]:
    cluster = RedisClusterFixture()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def cluster_redis(redis_cluster: RedisClusterFixture) -> AsyncIterator[Redis]:
    """A backend's client of the cluster."""
    client = redis_client.connect(redis_cluster.url)
    await redis_client.initialize(client)
    yield client
    await client.aclose()


class ClusterNodes:
    def __init__(self, prefix: str, url: str) -> None:
        self.prefix, self.url = prefix, url
        self.apps: list[App] = []

    async def start(self, **overrides: Any) -> App:
        # A short drain: the tests leave their clients open, and stopping two nodes must stay well inside the
        # test's timeout.
        app = App(make_config(self.prefix, **{"redis.url": self.url, "server.drain_timeout_s": 2, **overrides}))
        await app.start()
        self.apps.append(app)
        return app

    async def stop_all(self) -> None:
        for app in self.apps:
            await app.stop()


@pytest.fixture
async def cluster_nodes(prefix: str, redis_cluster: RedisClusterFixture) -> AsyncIterator[ClusterNodes]:
    factory = ClusterNodes(prefix, redis_cluster.url)
    yield factory
    await factory.stop_all()


def rooms_on_every_shard(cluster: RedisClusterFixture, keys: Keys, per_shard: int = 2) -> list[str]:
    """Channel rooms whose streams are spread over all masters, ``per_shard`` on each."""
    by_owner: dict[int, list[str]] = {}
    index = 0
    while len(by_owner) < cluster.masters or min(len(r) for r in by_owner.values()) < per_shard:
        room = f"channel_c{index}"
        index += 1
        owned = by_owner.setdefault(cluster.slot_owner(keys.stream(room)), [])
        if len(owned) < per_shard:
            owned.append(room)
    return [room for owned in by_owner.values() for room in owned]


async def chat_by_room(client: Client, count: int, timeout_s: float = 20.0) -> dict[str, list[dict[str, Any]]]:
    got: dict[str, list[dict[str, Any]]] = {}
    async with asyncio.timeout(timeout_s):
        for _ in range(count):
            frame = await client.expect("chat_message", timeout_s=timeout_s)
            got.setdefault(frame["room"], []).append(frame)
    return got


async def test_delivery_resume_and_raw_xadd_across_nodes_and_shards(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, cluster_redis: Redis, prefix: str) -> None:
    """Rooms on all three masters: messages sent on node A reach a member on node B once each, in order; a
    backend's raw XADD into a room stream and into the user's inbox reaches the member live; after a
    disconnect the member resumes on node A with exactly the missed messages (recovered true), and a stale
    epoch gets recovered false."""
    keys = Keys(prefix)
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    rooms = rooms_on_every_shard(redis_cluster, keys)
    writer, reader = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    joined = {}
    for room in rooms:
        await writer.join(room)
        joined[room] = await reader.join(room)
    sent = {room: [(await writer.say(room, f"{room} m{i}"))["id"] for i in range(5)] for room in rooms}
    got = await chat_by_room(reader, 5 * len(rooms))
    assert {room: [f["id"] for f in frames] for room, frames in got.items()} == sent

    raw_id = await cluster_redis.xadd(keys.stream(rooms[0]), {"sender_id": "backend", "content": "raw"})
    frame = await reader.expect("chat_message", room=rooms[0])
    assert frame["id"] == raw_id.decode() and frame["content"] == "raw"
    await cluster_redis.xadd(keys.stream(inbox_room("2")), {
        "type": "payment_update", "sender_id": "backend", "data": orjson.dumps({"payment_id": "p1"})})
    event = await reader.expect("payment_update")
    assert event["room"] == "inbox:2" and event["data"] == {"payment_id": "p1"}

    last_seen = {room: (got[room][-1]["id"] if room != rooms[0] else raw_id.decode()) for room in rooms}
    await reader.close()
    missed = {room: [(await writer.say(room, f"{room} missed {i}"))["id"] for i in range(3)] for room in rooms}
    back = await connect(url_of(a), "2")
    for room in rooms:
        rejoined = await back.join(room, since={"epoch": joined[room]["epoch"], "last_id": last_seen[room]})
        assert rejoined["recovered"] is True and [m["id"] for m in rejoined["messages"]] == missed[room]
    stale = await back.join("channel_elsewhere", since={"epoch": "deadbeef", "last_id": "0-0"})
    assert stale["recovered"] is False and stale["messages"] == []
    live = await writer.say(rooms[-1], "live")
    assert (await back.expect("chat_message", room=rooms[-1]))["id"] == live["id"]


async def test_typing_presence_and_read_receipts_cross_nodes(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, prefix: str) -> None:
    """The ephemeral events published from Lua (typing_set, presence_set, read_mark) in rooms on every master
    reach a member on the other node, once each."""
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    rooms = rooms_on_every_shard(redis_cluster, Keys(prefix), per_shard=1)
    alice, bob = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    for room in rooms:
        await bob.join(room)
        await alice.join(room)
        arrival = await bob.expect("presence_update", room=room, user_id="1")
        assert arrival["status"] == "online"
        await alice.send({"type": "typing_start", "room": room})
        typing = await bob.expect("typing_indicator", room=room)
        assert typing == {"type": "typing_indicator", "room": room, "user_id": "1", "is_typing": True}
        said = await bob.say(room, "read this")
        await alice.expect("chat_message", room=room)
        await alice.send({"type": "mark_read", "room": room, "up_to": said["id"]})
        receipt = await bob.expect("read_receipt", room=room)
        assert receipt == {"type": "read_receipt", "room": room, "user_id": "1", "up_to": said["id"]}
    await bob.send({"type": "ping", "request_id": "fence"})
    await bob.expect("pong", request_id="fence")
    assert [f for f in bob.backlog if f["type"] == "typing_indicator"] == []  # none twice


async def test_revocation_reaches_sockets_on_both_nodes(cluster_nodes: ClusterNodes, cluster_redis: Redis,
                                                        prefix: str) -> None:
    """A revocation stored and announced through the cluster closes the token's sockets on both nodes with
    4503, and the announcement says both nodes heard it."""
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    token = mint("5", jti="revoke-me")
    sockets = [await connect(url_of(a), "5", token=token), await connect(url_of(b), "5", token=token)]
    heard = await RevocationStore(cluster_redis, Keys(prefix)).revoke_token("revoke-me")
    assert heard == 2
    for client in sockets:
        async with asyncio.timeout(5):
            await client.ws.wait_closed()
        assert client.ws.close_code == CloseCode.TOKEN_REVOKED


async def test_archiver_stores_every_entry_of_every_shard_once(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, cluster_redis: Redis, prefix: str,
        pg_schema: str, pg: asyncpg.Connection) -> None:
    """Messages published through a hub node and raw XADDs, in rooms on all masters: the archiver (woken per
    shard, reading per slot) stores each entry exactly once and acknowledges all; a second run writes nothing."""
    keys = Keys(prefix)
    node = await cluster_nodes.start()
    rooms = rooms_on_every_shard(redis_cluster, keys)
    writer = await connect(url_of(node), "1")
    for room in rooms:
        await writer.join(room)
        for i in range(4):
            await writer.say(room, f"{room} {i}")
        await cluster_redis.xadd(keys.stream(room), {"sender_id": "backend", "content": "raw"})

    first = await archive_burst(cluster_redis, keys, pg_schema, "cluster-a1")
    assert first.stats.rows_written == 5 * len(rooms) and first.stats.dead_lettered == 0
    for room in rooms:
        stored = [f"{r['stream_ms']}-{r['stream_seq']}" for r in await pg.fetch(
            "SELECT stream_ms, stream_seq FROM messages WHERE room = $1 ORDER BY stream_ms, stream_seq", room)]
        assert stored == [eid.decode() for eid, _ in await cluster_redis.xrange(keys.stream(room))]
        assert (await cluster_redis.xpending(keys.stream(room), GROUP))["pending"] == 0
    assert (await archive_burst(cluster_redis, keys, pg_schema, "cluster-a1")).stats.rows_written == 0


@pytest.mark.timeout(90)
async def test_master_failover_keeps_delivering_and_loses_nothing_acked(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, cluster_redis: Redis, prefix: str) -> None:
    """A replica of the master holding the busy room is promoted (CLUSTER FAILOVER) while a writer on node A
    sends: the relays of both nodes move their subscriptions to the new master by themselves, the member on
    node B gets every acknowledged message once and in order, and the stream holds every acknowledged one."""
    keys = Keys(prefix)
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    room = "channel_failover"
    writer, reader = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    await writer.join(room)
    await reader.join(room)
    old_master = redis_cluster.slot_owner(keys.stream(room))
    promoted = redis_cluster.replica_of(old_master)
    acked: list[str] = []
    stop = asyncio.Event()

    refused: list[str] = []

    async def write() -> None:
        """One message at a time, each until acknowledged: one refused while the shard fails over may have been
        stored all the same (the hub cannot tell when its call failed after sending), so it is sent again with
        the same client_msg_id (stored once either way) rather than skipped."""
        index = 0
        while not (stop.is_set() and len(acked) >= 40):
            acked.append(await say_until_acked(writer, room, f"m{index}", refused))
            index += 1

    writing = asyncio.ensure_future(write())
    await wait_until(lambda: len(acked) >= 10, timeout_s=10, what="traffic before the failover")
    started = time.monotonic()
    await asyncio.to_thread(redis_cluster.failover, promoted)
    for app in (a, b):
        assert app.node is not None and app.node.relay._pubsub is not None
        relay_subscriptions = app.node.relay._pubsub
        await wait_until(lambda s=relay_subscriptions: f"127.0.0.1:{promoted}" in s.connections, timeout_s=15,
                         what="the relay's subscriptions on the promoted master")
    moved_s = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(writing, 30)
    got = [f["id"] for f in (await chat_by_room(reader, len(acked), timeout_s=30))[room]]
    assert got == acked
    assert [eid.decode() for eid, _ in await cluster_redis.xrange(keys.stream(room))] == acked
    print(f"failover: subscriptions followed within {moved_s:.1f}s; {len(acked)} messages acked and delivered, "
          f"{len(refused)} refused and sent again ({sorted(set(refused))})")


async def commands_on_masters(cluster: RedisClusterFixture) -> dict[str, int]:
    """Calls per command (INFO commandstats) summed over the masters: every command the hubs sent, since a
    replica only replays what its master already counted."""
    totals: dict[str, int] = {}
    for port in cluster.master_ports():
        with cluster.client(port) as client:
            stats = await asyncio.to_thread(client.info, "commandstats")
        for name, values in stats.items():
            command = name.removeprefix("cmdstat_")
            totals[command] = totals.get(command, 0) + int(values["calls"])
    return totals


MESSAGES_COUNTED = 100
RAW_COUNTED = 20


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


@pytest.mark.timeout(90)
async def test_redis_commands_per_message_on_the_cluster(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, cluster_redis: Redis, prefix: str,
        pg_schema: str) -> None:
    """Counted on every master (INFO commandstats): 100 messages from a writer on node A to a member on node B
    in one room cost what they cost on a standalone Redis (rate-limit script, publish script and its
    announcement: 8 commands each, no stream read); 20 raw XADDs (which the relay reads with XREADGROUP) and
    an archiver run (XREADGROUP per slot) are routed without a single ``COMMAND GETKEYS`` (redis-py asking a
    node where a command's keys are, twice per XREADGROUP)."""
    keys = Keys(prefix)
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    room = "channel_counted"
    writer, reader = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    await writer.join(room)
    await reader.join(room)
    await writer.say(room, "warm-up")  # the first publish loads the pub/sub paths; not counted
    await reader.expect("chat_message", room=room)

    before = await commands_on_masters(redis_cluster)
    for i in range(MESSAGES_COUNTED):
        await writer.send({"type": "chat_message", "room": room, "content": f"m{i}"})
    got = (await chat_by_room(reader, MESSAGES_COUNTED))[room]
    after = await commands_on_masters(redis_cluster)
    assert [f["content"] for f in got] == [f"m{i}" for i in range(MESSAGES_COUNTED)]
    delta = command_delta(before, after)
    per_message = sum(delta.values()) / MESSAGES_COUNTED
    print(f"cluster: {per_message:.2f} commands per client message over all masters: {delta}")
    assert "command|getkeys" not in delta
    assert delta.get("xreadgroup", 0) <= MESSAGES_COUNTED // 10
    assert per_message <= 9

    before = after
    for i in range(RAW_COUNTED):
        await cluster_redis.xadd(keys.stream(room), {"sender_id": "backend", "content": f"raw{i}"})
        assert (await reader.expect("chat_message", room=room))["content"] == f"raw{i}"
    archiver = await archive_burst(cluster_redis, keys, pg_schema, "counted-a1")
    assert archiver.stats.rows_written == MESSAGES_COUNTED + RAW_COUNTED + 1
    delta = command_delta(before, await commands_on_masters(redis_cluster))
    print(f"cluster: {RAW_COUNTED} raw XADDs read by the relay and an archiver run: {delta}")
    assert delta.get("xreadgroup", 0) >= RAW_COUNTED  # the stream reads this is about did happen
    assert "command|getkeys" not in delta


@pytest.mark.timeout(90)
async def test_stream_reads_and_delivery_follow_a_slot_migration(
        cluster_nodes: ClusterNodes, redis_cluster: RedisClusterFixture, cluster_redis: Redis, prefix: str) -> None:
    """A room's slot is resharded to another master. Halfway (keys moved, the slot still the source's) the
    cluster client's XREADGROUP is answered ASK and follows it to the target; once the slot is the target's, an
    XREADGROUP sent to the source is answered MOVED and retried there; both read the right entries, and no
    ``COMMAND GETKEYS`` is sent (the client finds an XREADGROUP's keys itself, after a redirection too). A
    member on node B gets every entry (the writer's messages and a raw XADD sent right after the slot moved, when
    the relays' subscriptions are still on the old master, which hears the room's announcements over the cluster
    bus but not its keyspace notifications) once each and in order. Publishes while the slot is half-migrated are
    refused and sent again until the migration completes, as a client does: redis-py 8.1's cluster client sends
    ASKING on another pooled connection than the command it is for, which the target then answers MOVED, until
    the redirections run out."""
    keys = Keys(prefix)
    a, b = await cluster_nodes.start(), await cluster_nodes.start()
    room = "channel_resharded"
    writer, reader = await connect(url_of(a), "1"), await connect(url_of(b), "2")
    await writer.join(room)
    await reader.join(room)
    stream = keys.stream(room)
    slot = cluster_redis.keyslot(stream)  # type: ignore[attr-defined]
    source = redis_cluster.slot_owner(stream)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    await cluster_redis.xgroup_create(stream, "probe", id="0")
    sent = [(await writer.say(room, f"before {i}"))["id"] for i in range(3)]
    before = await commands_on_masters(redis_cluster)

    await asyncio.to_thread(redis_cluster.begin_slot_migration, slot, source, target)
    asked = await redis_client.xreadgroup_many(cluster_redis, "probe", "c1", {stream: ">"})
    assert [entry_id.decode() for entry_id, _ in asked[0][1]] == sent
    refused: list[str] = []

    async def write_while_migrating() -> list[str]:
        return [await say_until_acked(writer, room, f"migrating-{i}", refused) for i in range(3)]

    writing = asyncio.ensure_future(write_while_migrating())
    await wait_until(lambda: bool(refused) or writing.done(), timeout_s=15, what="a publish while migrating")
    await asyncio.to_thread(redis_cluster.finish_slot_migration, slot, source, target)
    sent += await asyncio.wait_for(writing, 30)
    with redis_cluster.client(target) as target_client:  # written behind the cluster client's back
        raw_id = (await asyncio.to_thread(target_client.xadd, stream, {"sender_id": "backend", "content": "raw"}))
    moved = await redis_client.xreadgroup_many(cluster_redis, "probe", "c1", {stream: ">"})
    assert [entry_id.decode() for entry_id, _ in moved[0][1]] == [*sent[3:], raw_id.decode()]
    sent.append(raw_id.decode())
    sent += [(await writer.say(room, f"after {i}"))["id"] for i in range(3)]

    delta = command_delta(before, await commands_on_masters(redis_cluster))
    assert "command|getkeys" not in delta
    got = (await chat_by_room(reader, len(sent), timeout_s=30))[room]
    assert [f["id"] for f in got] == sent
    assert redis_cluster.slot_owner(stream) == target
    print(f"slot migration: {len(refused)} publishes refused while the slot was migrating and sent again")


@pytest.mark.parametrize(("command", "expected"), [
    (("XREADGROUP", "GROUP", "g", "c", "STREAMS", "k1", "k2", ">", ">"), ["k1", "k2"]),
    (("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "BLOCK", 0, "NOACK", "STREAMS", b"k", b">"), [b"k"]),
    (("XREADGROUP", "GROUP", "streams", "streams", "STREAMS", "k", "0"), ["k"]),  # names that look like keywords
    (("XREAD", "COUNT", 5, "STREAMS", "k", "0-0"), ["k"]),
    (("XREADGROUP", "GROUP", "g", "c", "STREAMS", "k1", "k2", ">"), None),  # odd: left to redis-py
    (("XREADGROUP", "GROUP", "g", "c", "FUTURE", "STREAMS", "k", ">"), None),  # unknown option: left to redis-py
    (("GET", "k"), None),
])
def test_stream_read_keys(command: tuple[Any, ...], expected: list[Any] | None) -> None:
    """Where the cluster client finds an XREADGROUP's or XREAD's keys itself, and what it leaves to redis-py."""
    assert redis_client.stream_read_keys(command[0], command[1:]) == expected


async def test_a_burst_of_commands_waits_for_connections_instead_of_failing(
        redis_cluster: RedisClusterFixture, prefix: str) -> None:
    """300 commands and 100 pipelines at once through a cluster client allowed 4 connections per node: every one
    succeeds (callers wait for a free connection, as with the standalone client's blocking pool) and no node gets
    more than 4 of its connections. redis-py's cluster client alone raises MaxConnectionsError past the limit."""
    client = redis_client.connect(redis_cluster.url, pool_size=4, pool_wait_s=10)
    await redis_client.initialize(client)
    try:
        keys = [f"{prefix}{{burst{i}}}" for i in range(300)]

        async def pipelined(key: str) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.get(key)
            return list(await pipe.execute())

        singles = await asyncio.gather(*(client.set(key, "1") for key in keys))
        pipelines = await asyncio.gather(*(pipelined(key) for key in keys[:100]))
        assert all(singles) and all(reply == [2, b"2"] for reply in pipelines)
        cluster = redis_client.as_cluster(client)
        assert cluster is not None
        assert max(len(node._connections) for node in cluster.get_nodes()) <= 4
    finally:
        await client.delete(*keys)
        await client.aclose()


async def archive_burst(redis: Any, keys: Keys, pg_schema: str, name: str) -> Archiver:
    """One archiver run over everything there is (burst), closed afterwards; its stats tell what it did."""
    archiver = Archiver(redis, keys, PostgresConfig(url=PG_URL, schema=pg_schema), ArchiverConfig(name=name))
    await archiver.start()
    try:
        await asyncio.wait_for(archiver.run(burst=True), 30)
    finally:
        await archiver.close()
    return archiver
