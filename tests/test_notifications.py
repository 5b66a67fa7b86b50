"""Notifications: backend events to subscribers, per-user inbox (offline delivery), system and role
announcements, reminders."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from hub.keys import Keys
from hub.notifications import inbox_room, schedule_reminder
from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, connect, mint, wait_until


async def xadd_event(redis: Redis, stream: str, etype: str, data: dict[str, Any]) -> str:
    entry_id = await redis.xadd(stream, {"type": etype, "sender_id": "backend", "data": orjson.dumps(data)})
    return str(entry_id.decode())


async def nothing_more(client: Client, etype: str) -> None:
    """Prove no ``etype`` frame is queued: a ping's pong is the next thing that arrives."""
    await client.send({"type": "ping", "request_id": "fence"})
    await client.expect("pong", request_id="fence")
    assert not [f for f in client.backlog if f["type"] == etype], client.backlog


async def test_order_update_reaches_every_subscribed_connection_of_both_parties_and_nobody_else(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """A raw XADD order_status_update reaches the customer's two devices and the manufacturer (on two
    nodes, by subscription or by membership), and no one else."""
    keys = Keys(prefix)
    await redis_client.sadd(keys.acl("order_77"), "10", "20")
    a, b = await nodes.start(), await nodes.start()
    phone = await connect(url_of(a), "10")
    laptop = await connect(url_of(b), "10")
    maker = await connect(url_of(b), "20")
    stranger = await connect(url_of(a), "30")
    await phone.send({"type": "subscribe_order_updates", "order_id": 77})
    await laptop.send({"type": "subscribe_order_updates", "order_id": 77})
    await maker.join("order_77")
    await phone.expect("subscribed")
    await laptop.expect("subscribed")
    await stranger.send({"type": "subscribe_order_updates", "order_id": 77})
    assert (await stranger.expect("error"))["code"] == "forbidden"
    event_id = await xadd_event(redis_client, keys.stream("order_77"), "order_status_update",
                                {"order_id": 77, "status": "in_production"})
    for client in (phone, laptop, maker):
        event = await client.expect("order_status_update")
        assert event["id"] == event_id and event["data"]["status"] == "in_production"
    await nothing_more(stranger, "order_status_update")


async def test_inbox_notification_reaches_all_devices_of_the_user(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """A payment_update XADDed to a user's inbox stream reaches each of their connected devices."""
    a, b = await nodes.start(), await nodes.start()
    devices = [await connect(url_of(a), "5"), await connect(url_of(b), "5")]
    other = await connect(url_of(a), "6")
    await xadd_event(redis_client, Keys(prefix).stream(inbox_room("5")), "payment_update",
                     {"payment_id": "p1", "status": "paid"})
    for device in devices:
        event = await device.expect("payment_update")
        assert event["room"] == "inbox:5" and event["data"] == {"payment_id": "p1", "status": "paid"}
    await nothing_more(other, "payment_update")


@pytest.mark.timeout(60)
async def test_offline_notification_is_delivered_once_on_next_connect_across_a_hub_restart(
        hub_processes: Any, redis_client: Redis, prefix: str) -> None:
    """A notification sent while the user is offline arrives on their next connect, after a hub
    restart, exactly once; the connect after that does not repeat it."""
    first = await hub_processes()
    user = await connect(first.url, "8")
    await user.close()
    await xadd_event(redis_client, Keys(prefix).stream(inbox_room("8")), "quote_update",
                     {"quote_id": 3, "status": "revised"})
    await asyncio.to_thread(first.stop)
    second = await hub_processes()
    back = await connect(second.url, "8")
    event = await back.expect("quote_update")
    assert event["data"] == {"quote_id": 3, "status": "revised"}
    await nothing_more(back, "quote_update")
    await back.close()
    again = await connect(second.url, "8")
    await nothing_more(again, "quote_update")


async def test_live_delivery_also_counts_as_delivered(nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """A notification received live is not replayed on the next connect."""
    node = await nodes.start()
    user = await connect(url_of(node), "9")
    await xadd_event(redis_client, Keys(prefix).stream(inbox_room("9")), "payment_update", {"n": 1})
    await user.expect("payment_update")
    await user.close()
    again = await connect(url_of(node), "9")
    await nothing_more(again, "payment_update")


async def test_system_announcement_to_everyone_and_to_a_role(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """system reaches every connection; role:support reaches only support staff."""
    node = await nodes.start()
    customer = await connect(url_of(node), "1", roles=["customer"])
    agent = await connect(url_of(node), "2", roles=["support"])
    keys = Keys(prefix)
    await xadd_event(redis_client, keys.stream("system"), "system_notification", {"text": "maintenance at 22:00"})
    for client in (customer, agent):
        assert (await client.expect("system_notification"))["data"]["text"] == "maintenance at 22:00"
    await xadd_event(redis_client, keys.stream("role:support"), "system_notification", {"text": "queue is long"})
    assert (await agent.expect("system_notification"))["data"]["text"] == "queue is long"
    await nothing_more(customer, "system_notification")


async def test_notifications_rest_lists_and_acknowledges(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """GET /ws/notifications lists the inbox newest first; acknowledging (frame or REST) marks read,
    and unread=true leaves those out."""
    node = await nodes.start()
    stream = Keys(prefix).stream(inbox_room("4"))
    ids = [await xadd_event(redis_client, stream, "payment_update", {"n": i}) for i in range(3)]
    headers = {"Authorization": f"Bearer {mint('4')}"}
    base = f"http://127.0.0.1:{node.api_port}/ws/notifications"
    async with aiohttp.ClientSession() as http:
        async with http.get(base, headers=headers) as r:
            listed = (await r.json())["data"]["notifications"]
        assert [n["id"] for n in listed] == ids[::-1] and not any(n["read"] for n in listed)
        user = await connect(url_of(node), "4")
        await user.send({"type": "notification_ack", "id": ids[0], "request_id": "a"})
        assert (await user.expect("notification_acked"))["ids"] == [ids[0]]
        async with http.post(f"{base}/ack", headers=headers, json={"ids": [ids[1]]}) as r:
            assert r.status == 200
        async with http.get(f"{base}?unread=true", headers=headers) as r:
            unread = (await r.json())["data"]["notifications"]
        assert [n["id"] for n in unread] == [ids[2]]
        async with http.post(f"{base}/ack", headers=headers, json={"ids": [1, 2]}) as r:
            assert r.status == 400


@pytest.mark.timeout(30)
async def test_reminder_due_in_two_seconds_fires_once_with_three_nodes(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """A reminder scheduled 2 s ahead is delivered once, near its time, while three nodes poll."""
    three = [await nodes.start() for _ in range(3)]
    members = [await connect(url_of(n), str(i + 1)) for i, n in enumerate(three)]
    for member in members:
        await member.join("channel_deadlines")
    due_ms = int(time.time() * 1000) + 2000
    await schedule_reminder(redis_client, Keys(prefix), "channel_deadlines", due_ms, "quote expires soon",
                            {"quote_id": 9})
    for member in members:
        reminder = await member.expect("deadline_reminder", timeout_s=10)
        assert reminder["data"]["text"] == "quote expires soon" and reminder["data"]["quote_id"] == 9
        assert "late" not in reminder["data"]
        assert int(time.time() * 1000) >= due_ms
    await members[0].send({"type": "join_room", "room": "channel_deadlines", "history": 10})
    replay = await members[0].expect("room_joined")
    assert [m["type"] for m in replay["messages"]] == ["deadline_reminder"]  # stored once
    assert await redis_client.zcard(Keys(prefix).reminders_due()) == 0
    assert await redis_client.zcard(Keys(prefix).reminders_claimed()) == 0


@pytest.mark.timeout(30)
async def test_a_new_reminder_wakes_every_node_at_once(nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """Nodes do not poll for reminders on a short timer: adding one announces it on the control channel, and
    every node's scheduler looks again at once. Here the nodes would otherwise not look for an hour."""
    two = [await nodes.start() for _ in range(2)]
    schedulers = [app.reminders for app in two if app.reminders is not None]
    polls = [scheduler.polls for scheduler in schedulers]
    for scheduler in schedulers:
        scheduler._idle_poll_s = 3600.0  # from its next sleep on
        scheduler.wake()  # ends the sleep in progress (at most 5 s)
    # Once a scheduler has polled again, it is asleep for the hour (nothing awaits between its poll and sleep).
    await wait_until(lambda: all(s.polls > before for s, before in zip(schedulers, polls, strict=True)),
                     timeout_s=5, what="the schedulers' next poll")
    member = await connect(url_of(two[1]), "1")
    await member.join("channel_woken")
    await schedule_reminder(redis_client, Keys(prefix), "channel_woken", int(time.time() * 1000), "now")
    reminder = await member.expect("deadline_reminder", timeout_s=10)
    assert reminder["data"]["text"] == "now" and "late" not in reminder["data"]
    assert sum(scheduler.delivered for scheduler in schedulers) == 1


async def test_overdue_reminder_is_delivered_late_and_says_so(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """A reminder that fell due while no hub ran is delivered when one starts, marked late."""
    await schedule_reminder(redis_client, Keys(prefix), "channel_late", int(time.time() * 1000) - 60_000, "missed")
    node = await nodes.start()
    member = await connect(url_of(node), "1")
    await member.join("channel_late", history=5)
    async with asyncio.timeout(10):
        while True:
            await member.send({"type": "join_room", "room": "channel_late", "history": 5})
            joined = await member.expect("room_joined")
            if joined["messages"]:
                break
            await asyncio.sleep(0.05)
    reminder = joined["messages"][0]
    assert reminder["data"]["late"] is True and reminder["data"]["late_by_ms"] >= 60_000
