"""Redis killed and restarted under a running node: with AOF always no acknowledged message is lost
and delivery resumes by itself; without persistence the loss is detected (new epoch, recovered
false), never a silent gap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from hub.errors import CloseCode
from hub.keys import Keys
from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, connect
from tests.redis_server import PrivateRedis

ROOM = "channel_fault"


@pytest.fixture
async def aof_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(appendonly=True, fsync="always")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.destroy)


@pytest.fixture
async def volatile_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(appendonly=False)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.destroy)


async def say_until_acked(client: Client, content: str, timeout_s: float = 20) -> dict[str, object]:
    """Send (retrying with the same client_msg_id while Redis is coming back) until acknowledged."""
    async with asyncio.timeout(timeout_s):
        while True:
            await client.send({"type": "chat_message", "room": ROOM, "content": content,
                               "client_msg_id": content.replace(" ", "-")})
            frame = await _ack_or_error(client)
            if frame["type"] == "ack":
                return frame
            assert frame["code"] == "unavailable", frame
            # Deliberate sleep: Redis is restarting; retry like a client would.
            await asyncio.sleep(0.1)  # by design; noqa: sleep-ok


async def _ack_or_error(client: Client) -> dict[str, object]:
    """The next ack or error; other frames stay for later expect() calls (a message's echo may
    overtake its ack)."""
    for index, frame in enumerate(client.backlog):
        if frame["type"] in ("ack", "error"):
            return client.backlog.pop(index)
    while True:
        frame = await client.recv()
        if frame["type"] in ("ack", "error"):
            return frame
        client.backlog.append(frame)


@pytest.mark.fault
@pytest.mark.timeout(90)
async def test_redis_restart_with_aof_always_loses_no_acked_message(
        nodes: NodeFactory, aof_redis: PrivateRedis) -> None:
    """kill -9 of Redis (appendfsync always) and a restart: every acknowledged message is still in the
    stream, the epoch is unchanged, and a message sent afterwards is delivered live again."""
    node = await nodes.start(**{"redis.url": aof_redis.url, "relay.node_heartbeat_s": 0.3,
                                "relay.node_ttl_s": 3, "relay.sweep_interval_s": 1})
    sender, member = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    joined = await member.join(ROOM)
    await sender.join(ROOM)
    acked = [str((await sender.say(ROOM, f"before {i}"))["id"]) for i in range(20)]
    await asyncio.to_thread(aof_redis.kill)
    await asyncio.to_thread(aof_redis.start)
    after = await say_until_acked(sender, "after restart")
    live = await member.expect("chat_message", content="after restart", timeout_s=20)
    assert live["id"] == after["id"]
    client = aioredis.Redis.from_url(aof_redis.url)
    try:
        stored = [eid.decode() for eid, _ in await client.xrange(Keys(node.keys.prefix).stream(ROOM))]
    finally:
        await client.aclose()
    assert set(acked) <= set(stored)
    again = await connect(url_of(node), "3")
    rejoined = await again.join(ROOM, since={"epoch": joined["epoch"], "last_id": acked[-1]})
    assert rejoined["recovered"] is True and [m["content"] for m in rejoined["messages"]] == ["after restart"]


@pytest.mark.fault
@pytest.mark.timeout(90)
async def test_redis_restart_without_persistence_is_detected_not_a_silent_gap(
        nodes: NodeFactory, volatile_redis: PrivateRedis) -> None:
    """kill -9 of a Redis without persistence: the node finds the room's stream gone and closes its live
    members with 4010 (they could have missed entries); their resume with the old position says recovered
    false with no messages and a new epoch, and new messages reach live members again."""
    node = await nodes.start(**{"redis.url": volatile_redis.url, "relay.node_heartbeat_s": 0.3,
                                "relay.node_ttl_s": 3, "relay.sweep_interval_s": 1})
    sender, member = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    joined = await member.join(ROOM)
    await sender.join(ROOM)
    last = await sender.say(ROOM, "before")
    await asyncio.to_thread(volatile_redis.kill)
    await asyncio.to_thread(volatile_redis.start)
    assert await _close_code(member) == CloseCode.ROOM_DATA_LOST
    again = await connect(url_of(node), "3")
    rejoined = await again.join(ROOM, since={"epoch": joined["epoch"], "last_id": last["id"]})
    assert rejoined["recovered"] is False and rejoined["messages"] == []
    assert rejoined["epoch"] != joined["epoch"]
    after = await say_until_acked(again, "after loss")
    live = await again.expect("chat_message", content="after loss", timeout_s=20)
    assert live["id"] == after["id"]


async def _close_code(client: Client, timeout_s: float = 20.0) -> int | None:
    """Read (and drop) frames until the hub closes the connection; the code it sent."""
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await client.ws.recv()
    return client.ws.close_code
