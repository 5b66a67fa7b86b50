"""A node's Redis cost follows rooms with new data, not rooms joined."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from hub.notifications import is_internal
from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, collect_chat, connect

CLIENTS = 10
ROOMS_PER_CLIENT = 1000
MESSAGES = 100


async def command_calls(redis: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def join_many(client: Client, rooms: list[str]) -> None:
    for room in rooms:
        await client.send({"type": "join_room", "room": room})
    for room in rooms:
        await client.expect("room_joined", timeout_s=60, room=room)


@pytest.mark.timeout(120)
async def test_ten_thousand_joined_rooms_cost_nothing_when_one_room_is_busy(
        nodes: NodeFactory, redis_client: Redis) -> None:
    """10,000 rooms joined on one node, 100 messages in one room: the node's Redis commands during
    the traffic are proportional to the 100 messages, not to the 10,000 rooms."""
    node = await nodes.start(**{"relay.sweep_interval_s": 3600})
    url = url_of(node)
    clients = [await connect(url, f"{i + 1}") for i in range(CLIENTS)]
    started = time.monotonic()
    await asyncio.gather(*(join_many(c, [f"channel_r{i}-{j}" for j in range(ROOMS_PER_CLIENT)])
                           for i, c in enumerate(clients)))
    join_s = time.monotonic() - started
    assert node.node is not None
    assert len([r for r in node.node.relay.active if not is_internal(r)]) == CLIENTS * ROOMS_PER_CLIENT
    busy = "channel_busy"
    writer, reader = clients[0], clients[1]
    await writer.join(busy)
    await reader.join(busy)

    before = await command_calls(redis_client)
    for i in range(MESSAGES):
        await writer.send({"type": "chat_message", "room": busy, "content": f"m{i}"})
    got = await collect_chat(reader, MESSAGES)
    after = await command_calls(redis_client)

    assert [f["content"] for f in got] == [f"m{i}" for i in range(MESSAGES)]
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    delta = {name: calls for name, calls in delta.items() if calls}
    total = sum(delta.values())
    print(f"joined {CLIENTS * ROOMS_PER_CLIENT} rooms in {join_s:.1f}s; commands for {MESSAGES} "
          f"messages: {total} {delta}")
    # Per message at most: the rate-limit script (EVALSHA + TIME, GET, SET inside it), the publish
    # script (EVALSHA + HGET, XADD inside it), one XREADGROUP and one XACK: 9, plus INFO and a
    # heartbeat. Anything touching the 10,000 joined rooms per message or per wake-up would cost
    # tens of thousands of calls.
    assert delta.get("xreadgroup", 0) <= MESSAGES
    assert total <= 10 * MESSAGES
