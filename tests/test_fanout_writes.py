"""Fan-out in a big room: chat is written to each member in the delivering pass (Session.send_wires_now), after
whatever the member already had queued in the same turn, and still waits for the window with a write delay."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.frames import Frame, Opcode

from hub.app import App
from hub.protocol import Delivery, text_frame
from hub.registry import DIRECT_WRITE_MIN_MEMBERS
from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, collect_chat, connect

ROOM = "channel_big"


async def _big_room(app: App) -> list[Client]:
    members = [await connect(url_of(app), str(i)) for i in range(DIRECT_WRITE_MIN_MEMBERS)]
    for member in members:
        await member.join(ROOM)
    return members


def _delivery(content: str) -> Delivery:
    frame = {"type": "chat_message", "room": ROOM, "message_id": "1-1", "content": content}
    return Delivery((1, 1), frame, text_frame(orjson.dumps(frame)), True)


@pytest.mark.timeout(30)
async def test_big_room_chat_is_written_in_the_delivering_pass_after_what_was_queued(node: App) -> None:
    members = await _big_room(node)
    assert node.node is not None and node.outbox is not None
    registry, outbox = node.node.registry, node.outbox
    first = next(s for s in registry.sessions if s.user_id == "0")
    writes = outbox.writes
    # In one turn: member 0 gets a frame of its own queued, then the room's chat arrives.
    first.send_wire(text_frame(b'{"type":"marker"}'))
    queued = registry.deliver(ROOM, [_delivery("a"), _delivery("b")])
    assert queued == 2 * DIRECT_WRITE_MIN_MEMBERS
    # Every other member was written to at once (the old way wrote nobody before the end of the turn) ...
    assert outbox.writes - writes == DIRECT_WRITE_MIN_MEMBERS - 1
    await asyncio.sleep(0)  # by design: one loop turn, for the end-of-turn flush; noqa: sleep-ok
    assert outbox.writes - writes == DIRECT_WRITE_MIN_MEMBERS
    # ... and member 0 gets its own frame first, then both chat messages.
    assert await _marker_and_chat(members[0], 3) == ["marker", "a", "b"]
    for member in members[1:]:
        assert await _marker_and_chat(member, 2) == ["a", "b"]


async def _marker_and_chat(client: Client, count: int) -> list[str]:
    """The first ``count`` marker and chat frames the client receives, in order (presence updates skipped)."""
    got: list[str] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            frame = await client.next_frame()
            if frame["type"] == "marker":
                got.append("marker")
            elif frame["type"] == "chat_message":
                got.append(frame["content"])
    return got


@pytest.mark.timeout(60)
async def test_big_room_chat_waits_for_the_write_delay_window(nodes: NodeFactory) -> None:
    app = await nodes.start(**{"server.write_delay_ms": 500})
    members = await _big_room(app)
    assert app.outbox is not None
    writes, frames = app.outbox.writes, app.outbox.frames
    for i in range(10):
        await members[0].send({"type": "chat_message", "room": ROOM, "content": f"m{i}"})
        await asyncio.sleep(0.01)  # by design: each message in a turn of its own; noqa: sleep-ok
    for member in members:
        assert [f["content"] for f in await collect_chat(member, 10)] == [f"m{i}" for i in range(10)]
    written_frames, written = app.outbox.frames - frames, app.outbox.writes - writes
    # 80 deliveries and 10 acks over ~100 ms: one or two windows, so a write or two per member.
    assert written_frames >= 90
    assert written <= 2 * DIRECT_WRITE_MIN_MEMBERS, (written, written_frames)


@pytest.mark.timeout(30)
async def test_messages_announced_together_reach_a_member_in_one_write(node: App) -> None:
    """Five chat frames in one TCP write go to Redis in one pipeline and come back announced together: each
    member of the big room gets all five in one write (a write per message would be five)."""
    members = await _big_room(node)
    assert node.outbox is not None
    sender = members[0]
    batch = b"".join(
        _text_frame({"type": "chat_message", "room": ROOM, "content": f"t{i}", "request_id": f"t{i}"})
        for i in range(5))
    writes, frames = node.outbox.writes, node.outbox.frames
    sender.ws.transport.write(batch)
    for member in members:
        assert [f["content"] for f in await collect_chat(member, 5)] == [f"t{i}" for i in range(5)]
    written, written_frames = node.outbox.writes - writes, node.outbox.frames - frames
    assert written_frames >= 5 * DIRECT_WRITE_MIN_MEMBERS
    assert written <= 2 * DIRECT_WRITE_MIN_MEMBERS + 5, (written, written_frames)


def _text_frame(frame: dict[str, object]) -> bytes:
    """A client's masked text frame, as the sender's socket would carry it."""
    return Frame(Opcode.TEXT, orjson.dumps(frame)).serialize(mask=True, extensions=[])
