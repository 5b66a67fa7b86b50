"""Delivery across nodes: two hubctl processes on one Redis behave as one hub."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from hub.app import App
from hub.keys import Keys
from tests.conftest import url_of
from tests.helpers import Client, collect_chat, connect, wait_until

ROOM = "channel_load"


@pytest.mark.timeout(60)
async def test_message_from_node_a_reaches_members_on_both_nodes_once(hub_processes: Any) -> None:
    """A member on node A sends; members on A and on B each receive it exactly once, in order."""
    a = await hub_processes()
    b = await hub_processes()
    sender = await connect(a.url, "1")
    on_a = await connect(a.url, "2")
    on_b = await connect(b.url, "3")
    for client in (sender, on_a, on_b):
        await client.join(ROOM)
    for i in range(3):
        await sender.send({"type": "chat_message", "room": ROOM, "content": f"m{i}", "client_msg_id": f"c{i}"})
    for member in (on_a, on_b):
        frames = await collect_chat(member, 3)
        assert [f["content"] for f in frames] == ["m0", "m1", "m2"]
        assert [f["sender_id"] for f in frames] == ["1", "1", "1"]
    # Exactly once: a marker sent afterwards is the very next chat frame each member sees.
    await sender.send({"type": "chat_message", "room": ROOM, "content": "marker"})
    for member in (on_a, on_b):
        assert (await collect_chat(member, 1))[0]["content"] == "marker"


@pytest.mark.timeout(90)
async def test_thousand_messages_from_five_senders_keep_order_and_lose_nothing(hub_processes: Any) -> None:
    """1,000 messages from 5 senders spread over two nodes reach every member, per-sender order kept."""
    a = await hub_processes()
    b = await hub_processes()
    senders = [await connect((a if i % 2 == 0 else b).url, f"{10 + i}") for i in range(5)]
    listeners = [await connect((a if i % 2 == 0 else b).url, f"{20 + i}") for i in range(4)]
    members = senders + listeners
    for client in members:
        await client.join(ROOM)
    per_sender = 200
    total = per_sender * len(senders)

    async def send_all(index: int, client: Client) -> None:
        for seq in range(per_sender):
            body = orjson.dumps({"s": index, "n": seq}).decode()
            await client.send({"type": "chat_message", "room": ROOM, "content": body,
                               "client_msg_id": f"s{index}-{seq}"})

    received = await asyncio.gather(*(collect_chat(m, total, 60) for m in members),
                                    *(send_all(i, s) for i, s in enumerate(senders)))
    for frames in received[:len(members)]:
        assert len(frames) == total
        by_sender: dict[int, list[int]] = {}
        ids = []
        for frame in frames:
            body = orjson.loads(frame["content"])
            by_sender.setdefault(body["s"], []).append(body["n"])
            ids.append(frame["id"])
        assert by_sender == {i: list(range(per_sender)) for i in range(len(senders))}
        assert len(set(ids)) == total  # no duplicate
        # Every member sees the one stream order.
        assert ids == sorted(ids, key=lambda x: tuple(int(p) for p in x.split("-")))


async def test_raw_xadd_by_a_backend_reaches_members_live(node: App, redis_client: Redis, prefix: str) -> None:
    """A plain XADD into a room's stream (no hub code involved) is delivered to connected members."""
    member = await connect(url_of(node), "7")
    await member.join("channel_news")
    stream = Keys(prefix).stream("channel_news")
    entry_id = await redis_client.xadd(stream, {"sender_id": "orders-service", "content": "raw hello"})
    frame = await member.expect("chat_message")
    assert frame["id"] == entry_id.decode() and frame["content"] == "raw hello"
    assert frame["sender_id"] == "orders-service" and frame["message_type"] == "text"


async def test_backend_order_event_reaches_room_members_and_update_subscribers(
        node: App, redis_client: Redis, prefix: str) -> None:
    """An order_status_update XADDed by a backend reaches chat members and subscribe_order_updates
    subscribers; chat in the room reaches only the members."""
    keys = Keys(prefix)
    await redis_client.sadd(keys.acl("order_42"), "1", "2")
    member = await connect(url_of(node), "1")
    watcher = await connect(url_of(node), "2")
    await member.join("order_42")
    await watcher.send({"type": "subscribe_order_updates", "order_id": 42, "request_id": "r1"})
    sub = await watcher.expect("subscribed")
    assert sub == {"type": "subscribed", "topic": "order_updates", "room": "order_42", "order_id": 42,
                   "request_id": "r1"}
    await member.say("order_42", "chat only for members")
    await member.expect("chat_message")
    await redis_client.xadd(keys.stream("order_42"), {
        "type": "order_status_update", "sender_id": "orders",
        "data": orjson.dumps({"order_id": 42, "status": "shipped"})})
    for client in (member, watcher):
        event = await client.expect("order_status_update")
        assert event["data"] == {"order_id": 42, "status": "shipped"} and event["room"] == "order_42"


async def test_order_updates_subscription_needs_access(node: App) -> None:
    """subscribe_order_updates applies the order room's ACL."""
    outsider = await connect(url_of(node), "5")
    await outsider.send({"type": "subscribe_order_updates", "order_id": 77})
    err = await outsider.expect("error")
    assert err["code"] == "forbidden" and err["request_type"] == "subscribe_order_updates"
    await outsider.send({"type": "subscribe_quote_updates", "quote_id": "x1"})
    assert (await outsider.expect("error"))["code"] == "invalid_room"


async def test_hostile_backend_entries_do_not_break_delivery(node: App, redis_client: Redis, prefix: str) -> None:
    """Malformed raw entries (bad UTF-8, unknown type, missing content) are skipped; later entries
    still arrive."""
    member = await connect(url_of(node), "7")
    await member.join("channel_x")
    stream = Keys(prefix).stream("channel_x")
    await redis_client.xadd(stream, {"content": b"\xff\xfe bad utf8", "sender_id": b"\xc3"})
    await redis_client.xadd(stream, {"type": "no_such_type", "content": "x"})
    await redis_client.xadd(stream, {"sender_id": "x"})
    await redis_client.xadd(stream, {"type": "quote_update", "data": "not json"})
    await redis_client.xadd(stream, {"content": "after"})
    first = await member.expect("chat_message")
    assert first["content"] == "\ufffd\ufffd bad utf8"
    quote = await member.expect("quote_update")
    assert quote["data"] == {}
    assert (await member.expect("chat_message"))["content"] == "after"


async def test_frames_sent_back_to_back_are_served_in_order(node: App) -> None:
    """Chat messages are served as they arrive (not through the session's task) only while nothing else of the
    session's is being handled: of frames written in one go (join, chat, leave, chat, join, chat), the first
    chat is accepted after the join, the second refused after the leave, the third accepted again."""
    client = await connect(url_of(node), "1")
    room = "channel_back_to_back"
    frames = [
        {"type": "join_room", "room": room, "request_id": "j1"},
        {"type": "chat_message", "room": room, "content": "one", "request_id": "c1"},
        {"type": "leave_room", "room": room, "request_id": "l1"},
        {"type": "chat_message", "room": room, "content": "two", "request_id": "c2"},
        {"type": "join_room", "room": room, "request_id": "j2"},
        {"type": "chat_message", "room": room, "content": "three", "request_id": "c3"},
    ]
    # One write for all six frames, so they arrive together.
    for frame in frames:
        client.ws.protocol.send_text(orjson.dumps(frame))
    client.ws.send_data()
    answers: list[tuple[Any, Any, Any]] = []
    while len(answers) < len(frames):
        got = await client.recv()
        if got.get("request_id") in {"j1", "c1", "l1", "c2", "j2", "c3"}:
            answers.append((got["request_id"], got["type"], got.get("code")))
    # Acks come when Redis answers (a later frame's answer may come first); what matters is which state each
    # chat message met: after the join, after the leave, after the second join.
    assert {rid: (kind, code) for rid, kind, code in answers} == {
        "j1": ("room_joined", None), "c1": ("ack", None), "l1": ("room_left", None),
        "c2": ("error", "not_joined"), "j2": ("room_joined", None), "c3": ("ack", None)}
    assert [rid for rid, kind, _ in answers if kind != "ack"] == ["j1", "l1", "c2", "j2"]


async def test_a_chat_sent_right_after_a_join_waits_for_the_join(node: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat message that arrives while the session's task is still joining (nothing left in websockets'
    queue, the join waiting on Redis) is not served ahead of the join: here the join is held at a gate
    until the chat message has arrived."""
    assert node.node is not None
    hub_node = node.node
    join = hub_node._join
    inside, gate = asyncio.Event(), asyncio.Event()

    async def held_join(*args: Any) -> None:
        inside.set()
        await gate.wait()
        await join(*args)

    monkeypatch.setattr(hub_node, "_join", held_join)
    client = await connect(url_of(node), "1")
    room = "channel_right_after"
    await client.send({"type": "join_room", "room": room, "request_id": "j"})
    await asyncio.wait_for(inside.wait(), 5)
    (session,) = hub_node.registry.sessions
    await client.send({"type": "chat_message", "room": room, "content": "hi", "request_id": "c"})
    await wait_until(lambda: len(session.connection.recv_messages.frames.queue) == 1, timeout_s=5,
                     what="the chat message queued behind the join")
    gate.set()
    joined = await client.expect("room_joined", request_id="j")
    acked = await client.expect("ack", request_id="c")
    assert joined["room"] == acked["room"] == room
    assert not [f for f in client.backlog if f["type"] == "error"], client.backlog
