"""Inboxes are read without a consumer group (hub/relay.py: an XREAD cursor per inbox the node keeps): a
connect and a disconnect create nothing in Redis for the inbox, and notifications that arrive while devices
connect reach each device once, in order, without a gap."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from hub.app import App
from hub.keys import Keys
from hub.notifications import inbox_room
from tests.conftest import url_of
from tests.helpers import Client, connect, wait_until
from tests.test_notifications import xadd_event


async def received_until(client: Client, last_id: str) -> list[str]:
    """The ids of the payment_update frames the client got, up to and including ``last_id``."""
    ids: list[str] = []
    while not ids or ids[-1] != last_id:
        frame = await client.expect("payment_update")
        ids.append(frame["id"])
    return ids


async def test_connect_and_disconnect_leave_no_group_on_the_inbox(node: App, redis_client: Redis,
                                                                  prefix: str) -> None:
    """A notification reaches the connected user; the inbox stream never gets a group, and the node's
    set of rooms with its groups never lists the inbox."""
    keys, room = Keys(prefix), inbox_room("41")
    assert node.node is not None
    client = await connect(url_of(node), "41")
    event_id = await xadd_event(redis_client, keys.stream(room), "payment_update", {"n": 1})
    assert (await client.expect("payment_update"))["id"] == event_id
    assert await redis_client.xinfo_groups(keys.stream(room)) == []
    assert room.encode() not in await redis_client.smembers(keys.node_rooms(node.node_id))
    await client.close()
    relay = node.node.relay
    await wait_until(lambda: room not in relay.active, what="the inbox released")
    assert await redis_client.xinfo_groups(keys.stream(room)) == []


async def test_notifications_during_connects_reach_each_device_once_in_order(
        node: App, redis_client: Redis, prefix: str) -> None:
    """Notifications XADDed while devices of one user connect (one alone, then two at once): the first
    device gets every one once, in order (the earliest as its offline replay); each later device gets every
    one from its first on (no gap)."""
    stream = Keys(prefix).stream(inbox_room("42"))
    url = url_of(node)
    ids: list[str] = []

    async def add(count: int) -> None:
        for _ in range(count):
            ids.append(await xadd_event(redis_client, stream, "payment_update", {"n": len(ids)}))

    await add(10)
    first, _ = await asyncio.gather(connect(url, "42"), add(20))
    joined: list[Any] = await asyncio.gather(connect(url, "42"), connect(url, "42"), add(20))
    await add(5)
    got = [await received_until(client, ids[-1]) for client in (first, joined[0], joined[1])]
    assert got[0] == ids
    for later in got[1:]:
        # (A device attaching while the node's read of the inbox lags behind its replay may get an entry of
        # that replay once more, live; the ids tell. That predates reading inboxes without a group.)
        assert set(later) == set(ids[ids.index(later[0]):])
    for client in (first, joined[0], joined[1]):
        await client.close()
