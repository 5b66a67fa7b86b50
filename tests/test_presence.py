"""Presence: who is in a room, across devices and nodes, and what happens when a node dies."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest

from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, connect, mint

ROOM = "channel_presence"


async def presence_of(client: Client, user_id: str, timeout_s: float = 10.0) -> str:
    frame = await client.expect("presence_update", timeout_s=timeout_s, user_id=user_id)
    assert frame["room"] == ROOM and frame["last_seen"].endswith("Z")
    return str(frame["status"])


async def test_join_reports_who_is_here_and_members_see_arrivals_and_departures(nodes: NodeFactory) -> None:
    """room_joined lists present users; a member on another node sees a user arrive (online) and
    leave (offline)."""
    a, b = await nodes.start(), await nodes.start()
    alice = await connect(url_of(a), "1")
    joined = await alice.join(ROOM)
    assert joined["presence"] == [{"user_id": "1", "status": "online"}]
    bob = await connect(url_of(b), "2")
    bob_joined = await bob.join(ROOM)
    assert bob_joined["presence"] == [{"user_id": "1", "status": "online"}, {"user_id": "2", "status": "online"}]
    assert await presence_of(alice, "2") == "online"
    await bob.send({"type": "leave_room", "room": ROOM})
    assert await presence_of(alice, "2") == "offline"


async def test_a_user_with_two_devices_stays_online_when_one_disconnects(nodes: NodeFactory) -> None:
    """Two connections of one user: closing one changes nothing for the others; closing both makes
    the user offline."""
    a, b = await nodes.start(), await nodes.start()
    watcher = await connect(url_of(a), "1")
    await watcher.join(ROOM)
    phone = await connect(url_of(a), "2")
    laptop = await connect(url_of(b), "2")
    await phone.join(ROOM)
    await laptop.join(ROOM)
    assert await presence_of(watcher, "2") == "online"
    await phone.close()
    # Nothing about user 2 is said: the next frame the watcher gets is a marker message.
    await laptop.say(ROOM, "still here")
    marker = await watcher.expect("chat_message")
    assert marker["content"] == "still here"
    assert not [f for f in watcher.backlog if f["type"] == "presence_update"]
    await laptop.close()
    assert await presence_of(watcher, "2") == "offline"


async def test_away_set_by_the_client_or_by_idleness(nodes: NodeFactory) -> None:
    """presence {status: away} shows the user away; an idle connection turns away by itself and back
    online with its next frame."""
    node = await nodes.start(**{"rooms.away_after_idle_s": 0.3})
    watcher = await connect(url_of(node), "1")
    await watcher.join(ROOM)
    user = await connect(url_of(node), "2")
    await user.join(ROOM)
    assert await presence_of(watcher, "2") == "online"
    await user.send({"type": "presence", "status": "away", "request_id": "p"})
    assert await user.expect("presence_set") == {"type": "presence_set", "status": "away", "request_id": "p"}
    assert await presence_of(watcher, "2") == "away"
    await user.send({"type": "presence", "status": "online"})
    assert await presence_of(watcher, "2") == "online"
    # Now stay silent: idleness makes the user away (the watcher pings to stay active itself).
    async with asyncio.timeout(10):
        while True:
            await watcher.send({"type": "ping"})
            frame = await watcher.expect("pong")
            assert frame["type"] == "pong"
            updates = [f for f in watcher.backlog if f["type"] == "presence_update" and f["user_id"] == "2"]
            if updates:
                assert updates[-1]["status"] == "away"
                watcher.backlog.clear()
                break
            await asyncio.sleep(0.05)
    await user.send({"type": "ping"})
    assert await presence_of(watcher, "2") == "online"


async def test_presence_query_frame_and_rest_endpoint(nodes: NodeFactory) -> None:
    """presence_query and GET /ws/rooms/{room}/presence answer who is present; outsiders are refused."""
    node = await nodes.start()
    one = await connect(url_of(node), "1")
    two = await connect(url_of(node), "2")
    await one.join(ROOM)
    await two.join(ROOM)
    await two.send({"type": "presence", "status": "away"})
    await two.expect("presence_set")
    await one.expect("presence_update", user_id="2", status="away")
    await one.send({"type": "presence_query", "room": ROOM})
    state = await one.expect("presence_state")
    assert state["users"] == [{"user_id": "1", "status": "online"}, {"user_id": "2", "status": "away"}]
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {mint('3')}"}
        async with http.get(f"http://127.0.0.1:{node.api_port}/ws/rooms/{ROOM}/presence", headers=headers) as r:
            body: dict[str, Any] = await r.json()
        assert r.status == 200 and body["data"]["users"] == state["users"]
        async with http.get(f"http://127.0.0.1:{node.api_port}/ws/rooms/user_1_2/presence", headers=headers) as r:
            assert r.status == 403
    await one.send({"type": "presence_query", "room": "order_5"})
    assert (await one.expect("error"))["code"] == "forbidden"


@pytest.mark.fault
@pytest.mark.timeout(60)
async def test_users_of_a_killed_node_go_offline_within_the_ttl(hub_processes: Any) -> None:
    """kill -9 of a node: its users go offline for members on the other node within the node TTL,
    with nobody cleaning up by hand, and the dead node's consumer groups are removed."""
    env = {"HUB_RELAY_NODE_HEARTBEAT_S": "0.3", "HUB_RELAY_NODE_TTL_S": "1"}
    doomed = await hub_processes(**env)
    survivor = await hub_processes(**env)
    watcher = await connect(survivor.url, "1")
    await watcher.join(ROOM)
    victim = await connect(doomed.url, "2")
    await victim.join(ROOM)
    assert await presence_of(watcher, "2") == "online"
    loop = asyncio.get_running_loop()
    doomed.process.send_signal(signal.SIGKILL)
    started = loop.time()
    assert await presence_of(watcher, "2", timeout_s=10) == "offline"
    elapsed = loop.time() - started
    assert elapsed < 1 + 0.3 * 3 + 1, elapsed  # TTL + a few heartbeats + slack
    await watcher.send({"type": "presence_query", "room": ROOM})
    assert (await watcher.expect("presence_state"))["users"] == [{"user_id": "1", "status": "online"}]
