"""A client that stops reading is cut off with the slow code; everyone else keeps receiving."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import NodeFactory, url_of
from tests.helpers import collect_chat, connect, wait_until

ROOM = "channel_firehose"


@pytest.mark.timeout(60)
async def test_stalled_reader_is_closed_with_4008_while_others_receive_everything(nodes: NodeFactory) -> None:
    """With a 64 KiB outbox limit, a member that never reads is closed with 4008 "slow", and a
    healthy member of the same room receives every message meanwhile."""
    node = await nodes.start(**{"server.outbox_limit_bytes": 65536, "server.slow_close_grace_s": 30})
    url = url_of(node)
    # max_queue=1: the client library stops reading the socket as soon as one frame is unread.
    stalled = await connect(url, "1", max_queue=1)
    healthy = await connect(url, "2")
    writer = await connect(url, "3")
    for client in (stalled, healthy, writer):
        await client.join(ROOM)
    count, body = 300, "x" * 40_000  # 12 MB: more than loopback socket buffers hold
    send = asyncio.gather(*(writer.send({"type": "chat_message", "room": ROOM, "content": f"{i}:{body}"})
                            for i in range(count)))
    frames = await collect_chat(healthy, count, timeout_s=40)
    await send
    assert [int(f["content"].split(":", 1)[0]) for f in frames] == list(range(count))
    assert node.node is not None and node.node.metrics.slow_disconnects == 1
    # Now drain the stalled client: it gets what fitted in the buffers, then the 4008 close frame.
    with pytest.raises(ConnectionClosed):
        while True:
            await stalled.ws.recv()
    assert stalled.ws.close_code == 4008
    registry = node.node.registry
    await wait_until(lambda: "1" not in registry.users, what="the slow session to leave the node")
    assert "2" in registry.users
