"""The Python client (hub/client.py) against real hub processes: chat with acks, reconnect and resume
across a node restart, the offline send queue, auth errors, and publish_event."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection, serve

from hub.client import HubAuthError, HubClient, publish_event
from tests.helpers import collect_chat, connect, mint

FAST = (0.05, 0.5, 2.0)  # backoff for tests: reconnect within half a second
TIMEOUT_S = 20.0
pytestmark = pytest.mark.timeout(90)  # a second bound, in case a hub process hangs outside asyncio.timeout


async def next_of(events: Any, ftype: str, timeout_s: float = 10.0, **match: Any) -> dict[str, Any]:
    """The next event of ``ftype`` whose fields match ``match`` (others are skipped)."""
    async with asyncio.timeout(timeout_s):
        while True:
            event = await events.get()
            if event.get("type") == ftype and all(event.get(k) == v for k, v in match.items()):
                return dict(event)


async def test_send_and_receive_between_two_clients(hub_processes: Any) -> None:
    """Two clients in a channel: the sender gets its ack, the other the message; a resent id is a duplicate."""
    hub = await hub_processes()
    async with asyncio.timeout(TIMEOUT_S):
        alice = HubClient(hub.url, token=mint("1"), backoff=FAST)
        bob = HubClient(hub.url, token=mint("2"), backoff=FAST)
        await alice.connect()
        await bob.connect()
        try:
            bob_events = bob.events(["chat_message"])
            joined = await alice.join_room("channel_general")
            assert joined["room"] == "channel_general" and joined["epoch"]
            await bob.join_room("channel_general")
            ack = await alice.send_message("channel_general", "hello bob", client_msg_id="m-1",
                                           metadata={"k": "v"})
            assert ack["type"] == "ack" and ack["client_msg_id"] == "m-1" and not ack.get("duplicate")
            got = await next_of(bob_events, "chat_message")
            assert (got["id"], got["content"], got["sender_id"], got["metadata"]) == (ack["id"], "hello bob", "1",
                                                                                       {"k": "v"})
            again = await alice.send_message("channel_general", "hello bob", client_msg_id="m-1")
            assert again["duplicate"] is True and again["id"] == ack["id"]
        finally:
            await alice.close()
            await bob.close()


async def test_reconnect_after_node_restart_resumes_without_gap_or_duplicate(hub_processes: Any) -> None:
    """When its node stops, the client reconnects to another node and resumes the room: no gap, no duplicate."""
    hub_a = await hub_processes()
    hub_b = await hub_processes()
    target = {"url": hub_a.url}
    async with asyncio.timeout(TIMEOUT_S * 2):
        alice = HubClient(lambda: target["url"], token=mint("1"), backoff=FAST)
        events = alice.events(["chat_message", "gap", "room_joined"])
        states = alice.events(["state"])
        await alice.connect()
        sender = await connect(hub_b.url, "2")
        try:
            await alice.join_room("channel_general")
            await sender.join("channel_general")
            first = await sender.say("channel_general", "before")
            assert (await next_of(events, "chat_message"))["id"] == first["id"]
            await asyncio.to_thread(hub_a.stop)  # drains: closes alice with 4001
            assert (await next_of(states, "state", state="reconnecting"))["code"] == 4001
            missed = [await sender.say("channel_general", f"missed {i}") for i in range(3)]
            target["url"] = hub_b.url  # only now: the three messages were surely missed
            resumed = await next_of(events, "room_joined", timeout_s=15)
            assert resumed["recovered"] is True
            got = [await next_of(events, "chat_message") for _ in range(3)]
            assert [m["id"] for m in got] == [a["id"] for a in missed]
            live = await sender.say("channel_general", "after")
            assert (await next_of(events, "chat_message"))["id"] == live["id"]
            # Nothing else: no gap event, no message twice.
            assert events.drain() == []
            assert alice.room_position("channel_general") == (resumed["epoch"], live["id"])
        finally:
            await sender.close()
            await alice.close()


async def test_messages_queued_while_disconnected_are_delivered_once(hub_processes: Any) -> None:
    """Sends made while the node is down wait in the queue and reach the room exactly once after the resume."""
    hub_a = await hub_processes()
    hub_b = await hub_processes()
    target = {"url": hub_a.url}
    async with asyncio.timeout(TIMEOUT_S * 2):
        alice = HubClient(lambda: target["url"], token=mint("1"), backoff=FAST)
        states = alice.events(["state"])
        await alice.connect()
        reader = await connect(hub_b.url, "2")
        try:
            await alice.join_room("channel_general")
            await reader.join("channel_general")
            await asyncio.to_thread(hub_a.stop)
            await next_of(states, "state", state="reconnecting")
            sends = [asyncio.create_task(alice.send_message("channel_general", f"queued {i}")) for i in range(3)]
            await asyncio.sleep(0.05)
            assert alice.pending_count == 3 and not any(t.done() for t in sends)
            target["url"] = hub_b.url
            acks = await asyncio.gather(*sends)
            assert len({a["id"] for a in acks}) == 3 and not any(a.get("duplicate") for a in acks)
            got = await collect_chat(reader, 3)
            assert [m["content"] for m in got] == ["queued 0", "queued 1", "queued 2"]
            assert [m["id"] for m in got] == [a["id"] for a in acks]
            with pytest.raises(TimeoutError):  # and nothing more: no message was stored twice
                await collect_chat(reader, 1, timeout_s=0.5)
        finally:
            await reader.close()
            await alice.close()


async def test_invalid_token_raises_auth_error_without_reconnect_storm(hub_processes: Any) -> None:
    """A token the hub refuses ends in one auth_error and HubAuthError, not in reconnect attempts."""
    hub = await hub_processes()
    async with asyncio.timeout(TIMEOUT_S):
        client = HubClient(hub.url, token="not-a-jwt", backoff=FAST)
        events = client.events(["auth_error", "connection_error"])
        with pytest.raises(HubAuthError):
            await client.connect()
        # Deliberate sleep: time for a reconnect storm to show, if there were one.
        await asyncio.sleep(0.5)  # by design; noqa: sleep-ok
        seen = events.drain()
        assert [e["type"] for e in seen] == ["connection_error", "auth_error"]
        assert seen[1]["status"] == 401 and client.state == "closed"
        await client.close()


async def test_get_token_fetches_a_fresh_token_after_an_auth_error(hub_processes: Any) -> None:
    """With get_token, a refused token is followed by a fresh one and the connection opens."""
    hub = await hub_processes()
    tokens = iter(["expired-or-bad", mint("7")])

    async def get_token() -> str:
        return next(tokens)

    async with asyncio.timeout(TIMEOUT_S):
        client = HubClient(hub.url, get_token=get_token, backoff=FAST)
        errors = client.events(["auth_error"])
        established = await client.connect()
        assert established["user_id"] == "7"
        assert (await errors.get(1.0))["status"] == 401
        await client.close()


async def test_publish_event_reaches_a_connected_member(hub_processes: Any, redis_client: Redis,
                                                        prefix: str) -> None:
    """A backend's publish_event into a room and into a user's inbox reaches the connected client."""
    hub = await hub_processes()
    async with asyncio.timeout(TIMEOUT_S):
        client = HubClient(hub.url, token=mint("42", rooms=["order_123"]), backoff=FAST)
        events = client.events(["order_status_update", "payment_update", "chat_message"])
        await client.connect()
        try:
            await client.join_room("order_123")
            event_id = await publish_event(redis_client, "order_123", "order_status_update",
                                           {"order_id": 123, "status": "shipped"}, sender_id="orders-service",
                                           prefix=prefix)
            got = await next_of(events, "order_status_update")
            assert got["id"] == event_id and got["data"] == {"order_id": 123, "status": "shipped"}
            assert got["sender_id"] == "orders-service" and got["room"] == "order_123"
            await publish_event(redis_client, "order_123", "chat_message", content="Parts are in QA",
                                sender_id=None, prefix=prefix)
            chat = await next_of(events, "chat_message")
            assert (chat["content"], chat["sender_id"]) == ("Parts are in QA", "system")
            await publish_event(redis_client, "inbox:42", "payment_update", {"payment_id": "p9"},
                                sender_id="payments", prefix=prefix)
            paid = await next_of(events, "payment_update")
            assert paid["room"] == "inbox:42" and paid["data"] == {"payment_id": "p9"}
        finally:
            await client.close()


async def test_gap_event_when_the_room_was_lost_while_disconnected(hub_processes: Any, redis_client: Redis,
                                                                   prefix: str) -> None:
    """If Redis lost the room while the client was away, the resume reports recovered: false and a gap event."""
    hub_a = await hub_processes()
    hub_b = await hub_processes()
    target = {"url": hub_a.url}
    async with asyncio.timeout(TIMEOUT_S * 2):
        alice = HubClient(lambda: target["url"], token=mint("1"), backoff=FAST)
        events = alice.events(["state", "gap"])
        await alice.connect()
        try:
            await alice.join_room("channel_lost")
            await alice.send_message("channel_lost", "soon gone")
            await asyncio.to_thread(hub_a.stop)
            await next_of(events, "state", state="reconnecting")
            await redis_client.delete(f"{prefix}{{channel_lost}}:s", f"{prefix}{{channel_lost}}:meta")
            target["url"] = hub_b.url
            gap = await next_of(events, "gap", timeout_s=15)
            assert gap["room"] == "channel_lost" and gap["previous_epoch"] != gap["epoch"]
        finally:
            await alice.close()


async def test_dead_connection_is_detected_by_heartbeat() -> None:
    """A server that stops answering is abandoned after two heartbeat intervals and the client reconnects."""
    connections = 0
    release = asyncio.Event()

    async def silent_hub(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send('{"type": "connection_established", "connection_id": "c", "user_id": "1", "heartbeat_s": 20}')
        await release.wait()  # reads nothing, answers no ping: a dead peer

    async with serve(silent_hub, "127.0.0.1", 0) as server, asyncio.timeout(TIMEOUT_S):
        port = next(iter(server.sockets)).getsockname()[1]
        client = HubClient(f"ws://127.0.0.1:{port}", token="t", heartbeat_s=0.2, backoff=FAST)
        events = client.events(["connection_error", "state"])
        await client.connect()
        try:
            dead = await next_of(events, "connection_error", timeout_s=5)
            assert dead["stage"] == "heartbeat"
            await next_of(events, "state", state="open", timeout_s=5)
            assert connections >= 2
        finally:
            release.set()
            await client.close()


async def test_token_expiring_is_answered_with_a_refresh(hub_processes: Any) -> None:
    """With get_token, the hub's token_expiring warning is answered in place: token_refreshed, same connection."""
    hub = await hub_processes()
    tokens = iter([mint("5", ttl_s=62), mint("5", ttl_s=3600)])  # the first one is warned about within ~2 s

    async def get_token() -> str:
        return next(tokens)

    async with asyncio.timeout(TIMEOUT_S):
        client = HubClient(hub.url, get_token=get_token, backoff=FAST)
        events = client.events(["token_expiring", "token_refreshed"])
        await client.connect()
        try:
            await next_of(events, "token_expiring", timeout_s=10)
            refreshed = await next_of(events, "token_refreshed", timeout_s=5)
            assert refreshed["expires_at"] and client.stats["connects"] == 1 and client.state == "open"
        finally:
            await client.close()


async def test_publish_event_seals_sensitive_chat_with_a_sealer(hub_processes: Any, redis_client: Redis,
                                                                prefix: str) -> None:
    """With the hub's Sealer, a backend's chat in a sensitive room is stored sealed and delivered in plaintext."""
    from hub.config import EncryptionConfig
    from hub.sealing import Sealer

    key = "ab" * 32
    hub = await hub_processes(WEBSOCKET_ENCRYPTION_KEY=key)
    sealer = Sealer(EncryptionConfig(key=key))
    async with asyncio.timeout(TIMEOUT_S):
        client = HubClient(hub.url, token=mint("42", rooms=["quote_45"]), backoff=FAST)
        events = client.events(["chat_message"])
        await client.connect()
        try:
            await client.join_room("quote_45")
            entry_id = await publish_event(redis_client, "quote_45", "chat_message", content="price 1890.00",
                                           sender_id="quotes-service", prefix=prefix, sealer=sealer)
            stored = await redis_client.xrange(f"{prefix}{{quote_45}}:s", entry_id, entry_id)
            assert stored[0][1][b"content"].startswith(b"enc:v1:")
            got = await next_of(events, "chat_message")
            assert (got["id"], got["content"]) == (entry_id, "price 1890.00")
        finally:
            await client.close()
