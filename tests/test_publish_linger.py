"""server.publish_linger_ms: under load, client messages share pipelines; after a quiet spell, none waits."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import NodeFactory, url_of
from tests.helpers import collect_chat, connect

ROOM = "channel_linger"


async def _spaced_burst(nodes: NodeFactory, linger_ms: float) -> int:
    """20 messages sent 10 ms apart; the publisher's pipelines during them."""
    app = await nodes.start(**{"server.publish_linger_ms": linger_ms})
    writer, reader = await connect(url_of(app), "1"), await connect(url_of(app), "2")
    await writer.join(ROOM)
    await reader.join(ROOM)
    assert app.node is not None
    before = app.node.publisher.batches
    for i in range(20):
        await writer.send({"type": "chat_message", "room": ROOM, "content": f"m{i}"})
        # Spacing the sends is the point: each arrives in an event-loop turn of its own.
        await asyncio.sleep(0.01)  # by design; noqa: sleep-ok
    got = await collect_chat(reader, 20)
    assert [f["content"] for f in got] == [f"m{i}" for i in range(20)]
    return app.node.publisher.batches - before


async def test_under_load_messages_share_pipelines(nodes: NodeFactory) -> None:
    # ~200 ms of sends with a 100 ms linger: two or three pipelines, not twenty.
    assert await _spaced_burst(nodes, 100) <= 5


async def test_without_linger_each_message_has_its_pipeline(nodes: NodeFactory) -> None:
    assert await _spaced_burst(nodes, 0) >= 15


async def test_after_a_quiet_spell_a_message_does_not_wait_for_the_linger(nodes: NodeFactory) -> None:
    app = await nodes.start(**{"server.publish_linger_ms": 1000})
    writer = await connect(url_of(app), "1")
    await writer.join(ROOM)
    started = time.monotonic()
    await writer.say(ROOM, "alone")
    assert time.monotonic() - started < 0.9  # acked well before a 1 s linger could have passed
