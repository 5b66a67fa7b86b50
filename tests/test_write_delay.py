"""server.write_delay_ms: frames due to one connection within the window go out in one write."""

from __future__ import annotations

import asyncio

from tests.conftest import NodeFactory, url_of
from tests.helpers import collect_chat, connect

ROOM = "channel_batched"


async def _burst(nodes: NodeFactory, **overrides: float) -> tuple[int, int]:
    """20 messages sent 10 ms apart (so spread over many event-loop turns): (transport writes, frames)
    of the node during them."""
    app = await nodes.start(**overrides)
    writer, reader = await connect(url_of(app), "1"), await connect(url_of(app), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    assert app.outbox is not None
    writes, frames = app.outbox.writes, app.outbox.frames
    for i in range(20):
        await writer.send({"type": "chat_message", "room": ROOM, "content": f"m{i}"})
        # Spacing the sends is the point: each one arrives in an event-loop turn of its own.
        await asyncio.sleep(0.01)  # by design; noqa: sleep-ok
    got = await collect_chat(reader, 20)
    assert [f["content"] for f in got] == [f"m{i}" for i in range(20)]
    return app.outbox.writes - writes, app.outbox.frames - frames


async def test_with_a_write_delay_a_burst_shares_writes(nodes: NodeFactory) -> None:
    writes, frames = await _burst(nodes, **{"server.write_delay_ms": 500})
    # 40 echoes (both members) and 20 acks over ~200 ms: one or two windows, so a write or two per member.
    assert frames >= 60
    assert writes <= 6, (writes, frames)


async def test_without_a_write_delay_frames_go_out_each_loop_turn(nodes: NodeFactory) -> None:
    writes, frames = await _burst(nodes)
    assert frames >= 60
    assert writes >= 40, (writes, frames)  # the reader's echoes never wait for company
