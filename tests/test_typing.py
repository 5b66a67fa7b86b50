"""Typing indicators: fanned out across nodes on state changes, never stored, ended by themselves."""

from __future__ import annotations

from redis.asyncio import Redis

from hub.keys import Keys
from tests.conftest import NodeFactory, url_of
from tests.helpers import connect

ROOM = "channel_typing"


async def test_typing_reaches_members_on_other_nodes_and_is_not_stored(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """typing_start on node A reaches a member on node B once (repeats are coalesced), typing_stop
    ends it, and nothing is written to the room's stream."""
    a, b = await nodes.start(), await nodes.start()
    typist = await connect(url_of(a), "1")
    watcher = await connect(url_of(b), "2")
    await typist.join(ROOM)
    await watcher.join(ROOM)
    for _ in range(3):
        await typist.send({"type": "typing_start", "room": ROOM})
    await typist.send({"type": "typing_stop", "room": ROOM})
    start = await watcher.expect("typing_indicator")
    assert start == {"type": "typing_indicator", "room": ROOM, "user_id": "1", "is_typing": True}
    stop = await watcher.expect("typing_indicator")
    assert stop["is_typing"] is False
    # The typist does not get its own indicator; a marker message shows nothing else was queued.
    await typist.say(ROOM, "marker")
    assert (await watcher.next_frame())["content"] == "marker"
    assert not [f for f in typist.backlog if f["type"] == "typing_indicator"]
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 1


async def test_typing_that_is_never_stopped_ends_by_itself(nodes: NodeFactory) -> None:
    """A typing_start with no typing_stop is followed by is_typing false after the TTL."""
    node = await nodes.start(**{"rooms.typing_ttl_ms": 500})
    typist = await connect(url_of(node), "1")
    watcher = await connect(url_of(node), "2")
    await typist.join(ROOM)
    await watcher.join(ROOM)
    await typist.send({"type": "typing_start", "room": ROOM})
    assert (await watcher.expect("typing_indicator"))["is_typing"] is True
    assert (await watcher.expect("typing_indicator", timeout_s=5))["is_typing"] is False


async def test_closing_the_connection_stops_typing(node: object) -> None:
    """A typist who disconnects is reported as stopped."""
    from hub.app import App

    assert isinstance(node, App)
    typist = await connect(url_of(node), "1")
    watcher = await connect(url_of(node), "2")
    await typist.join(ROOM)
    await watcher.join(ROOM)
    await typist.send({"type": "typing_start", "room": ROOM})
    assert (await watcher.expect("typing_indicator"))["is_typing"] is True
    await typist.close()
    assert (await watcher.expect("typing_indicator"))["is_typing"] is False


async def test_typing_needs_membership(node: object) -> None:
    """typing_start in a room not joined is refused with not_joined."""
    from hub.app import App

    assert isinstance(node, App)
    client = await connect(url_of(node), "1")
    await client.send({"type": "typing_start", "room": ROOM})
    err = await client.expect("error")
    assert err["code"] == "not_joined" and err["request_type"] == "typing_start"


async def test_typing_crosses_nodes_within_100_ms(nodes: NodeFactory) -> None:
    """A typing_start on node A is seen on node B within 100 ms (median of 5, on loopback)."""
    import statistics
    import time

    a, b = await nodes.start(), await nodes.start()
    typist = await connect(url_of(a), "1")
    watcher = await connect(url_of(b), "2")
    await typist.join(ROOM)
    await watcher.join(ROOM)
    delays = []
    for _ in range(5):
        started = time.perf_counter()
        await typist.send({"type": "typing_start", "room": ROOM})
        assert (await watcher.expect("typing_indicator", is_typing=True))["user_id"] == "1"
        delays.append(time.perf_counter() - started)
        await typist.send({"type": "typing_stop", "room": ROOM})
        await watcher.expect("typing_indicator", is_typing=False)
    assert statistics.median(delays) < 0.1, delays
