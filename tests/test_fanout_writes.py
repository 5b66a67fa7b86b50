"""Fan-out writes: messages that reach a node together reach each member in one write, not one write each
(under load that sharing is most of a fan-out's saving; a change that wrote each message at once measured
1.5x the CPU at ramp500's 256 msg/s)."""

from __future__ import annotations

import orjson
import pytest
from websockets.frames import Frame, Opcode

from hub.app import App
from tests.conftest import url_of
from tests.helpers import collect_chat, connect

ROOM = "channel_big"
MEMBERS = 8


@pytest.mark.timeout(30)
async def test_messages_announced_together_reach_a_member_in_one_write(node: App) -> None:
    """Five chat frames in one TCP write go to Redis in one pipeline and come back announced together: each
    member of the room gets all five in one write (a write per message would be five)."""
    members = [await connect(url_of(node), str(i)) for i in range(MEMBERS)]
    for member in members:
        await member.join(ROOM)
    assert node.outbox is not None
    batch = b"".join(
        _text_frame({"type": "chat_message", "room": ROOM, "content": f"t{i}", "request_id": f"t{i}"})
        for i in range(5))
    writes, frames = node.outbox.writes, node.outbox.frames
    members[0].ws.transport.write(batch)
    for member in members:
        assert [f["content"] for f in await collect_chat(member, 5)] == [f"t{i}" for i in range(5)]
    written, written_frames = node.outbox.writes - writes, node.outbox.frames - frames
    assert written_frames >= 5 * MEMBERS
    assert written <= 2 * MEMBERS + 5, (written, written_frames)


def _text_frame(frame: dict[str, object]) -> bytes:
    """A client's masked text frame, as the sender's socket would carry it."""
    return Frame(Opcode.TEXT, orjson.dumps(frame)).serialize(mask=True, extensions=[])
