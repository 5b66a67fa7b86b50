"""Client messages reach members from room_publish.lua's announcement, without a stream read, and mix
with raw XADDs (which are read) in stream order."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from hub.app import App
from hub.keys import Keys
from tests.conftest import url_of
from tests.helpers import collect_chat, connect

ROOM = "channel_announced"


async def test_client_messages_are_delivered_from_the_announcement_not_read_back(node: App) -> None:
    writer, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    assert node.node is not None
    relay = node.node.relay
    announced, reads = relay.entries_announced, relay.reads
    for i in range(50):
        await writer.send({"type": "chat_message", "room": ROOM, "content": f"m{i}"})
    got = await collect_chat(reader, 50)
    assert [f["content"] for f in got] == [f"m{i}" for i in range(50)]
    ids = [tuple(int(p) for p in f["id"].split("-")) for f in got]
    assert ids == sorted(ids)
    # Every message came straight from its announcement; no XREADGROUP was needed for them.
    assert relay.entries_announced - announced == 50
    assert relay.reads - reads <= 1


async def test_raw_xadds_racing_client_messages_are_all_delivered_once_in_stream_order(
        node: App, redis_client: Redis, prefix: str) -> None:
    """A backend's XADD has no announcement: its wake-up forces a read, and announced entries behind it
    wait for that read, so the member sees exactly the stream, in order."""
    writer, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    stream = Keys(prefix).stream(ROOM)

    async def backend() -> None:
        for i in range(40):
            await redis_client.xadd(stream, {"sender_id": "orders-service", "content": f"raw{i}"})

    async def client() -> None:
        for i in range(40):
            await writer.send({"type": "chat_message", "room": ROOM, "content": f"chat{i}"})

    await asyncio.gather(backend(), client())
    got = await collect_chat(reader, 80)
    stored = await redis_client.xrange(stream)
    assert [f["id"] for f in got] == [entry_id.decode() for entry_id, _ in stored]
    assert sorted(f["content"] for f in got) == sorted([f"raw{i}" for i in range(40)] + [f"chat{i}" for i in range(40)])


async def test_a_garbled_announcement_falls_back_to_reading_the_stream(
        node: App, redis_client: Redis, prefix: str) -> None:
    writer, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    await redis_client.publish(Keys(prefix).events_channel(ROOM), b"\x93\xff not msgpack")
    await writer.send({"type": "chat_message", "room": ROOM, "content": "after the garbage"})
    got = await collect_chat(reader, 1)
    assert got[0]["content"] == "after the garbage"


# Two entries appended, then both announced, atomically: the subscriber sees notification, notification,
# announcement, announcement (what a Redis Cluster replica's subscriber can see after a failover, where
# notifications come by replication and announcements over the cluster bus).
TWO_THEN_ANNOUNCED = """
local first = redis.call('XADD', KEYS[1], '*', 'sender_id', 'backend', 'content', 'first')
local second = redis.call('XADD', KEYS[1], '*', 'sender_id', 'backend', 'content', 'second')
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({first, 'sender_id', 'backend', 'content', 'first'}))
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({second, 'sender_id', 'backend', 'content', 'second'}))
return {first, second}
"""


async def test_an_announcement_never_overtakes_an_earlier_one_left_for_a_read(
        node: App, redis_client: Redis, prefix: str) -> None:
    """Notification, notification, announcement, announcement: the first announcement finds a wake-up it cannot
    match (held for a read); the second then matches the last wake-up but must not be delivered ahead of the
    first. The member gets both, in stream order, then live messages as before."""
    writer, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    keys = Keys(prefix)
    ids = await redis_client.eval(TWO_THEN_ANNOUNCED, 1, keys.stream(ROOM), keys.events_channel(ROOM))
    live = await writer.say(ROOM, "live")
    got = await collect_chat(reader, 3)
    assert [f["id"] for f in got] == [i.decode() for i in ids] + [live["id"]]
    assert [f["content"] for f in got] == ["first", "second", "live"]
