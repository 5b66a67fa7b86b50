"""Resume: join_room with since {epoch, last_id} replays exactly what was missed, or says it cannot."""

from __future__ import annotations

import os

import pytest
from redis.asyncio import Redis

from hub.app import App
from hub.keys import Keys
from hub.streams import new_epoch
from tests.conftest import NodeFactory, url_of
from tests.helpers import connect

ROOM = "channel_resume"


async def test_resume_returns_exactly_the_missed_messages_then_live(node: App) -> None:
    """After a disconnect, since={epoch,last_id} replays the missed messages in order, then live ones
    follow with no gap and no duplicate."""
    url = url_of(node)
    reader = await connect(url, "1")
    writer = await connect(url, "2")
    joined = await reader.join(ROOM)
    await writer.join(ROOM)
    await writer.say(ROOM, "seen")
    seen = await reader.expect("chat_message")
    await reader.close()
    missed = [(await writer.say(ROOM, f"missed {i}"))["id"] for i in range(5)]
    back = await connect(url, "1")
    rejoined = await back.join(ROOM, since={"epoch": joined["epoch"], "last_id": seen["id"]})
    assert rejoined["recovered"] is True and rejoined["epoch"] == joined["epoch"]
    assert [m["id"] for m in rejoined["messages"]] == missed
    assert [m["content"] for m in rejoined["messages"]] == [f"missed {i}" for i in range(5)]
    assert rejoined["last_id"] == missed[-1]
    live = await writer.say(ROOM, "live")
    frame = await back.expect("chat_message")
    assert frame["id"] == live["id"]


async def test_resume_with_nothing_missed_is_recovered_and_empty(node: App) -> None:
    """Resuming at the newest id replays nothing and says recovered."""
    client = await connect(url_of(node), "1")
    first = await client.join(ROOM)
    ack = await client.say(ROOM, "only")
    await client.expect("chat_message")
    await client.close()
    again = await connect(url_of(node), "1")
    rejoined = await again.join(ROOM, since={"epoch": first["epoch"], "last_id": ack["id"]})
    assert rejoined["recovered"] is True and rejoined["messages"] == []


async def test_stale_epoch_gives_recovered_false_and_nothing_else(node: App) -> None:
    """A resume with an epoch from before Redis lost the room is refused: recovered false, no messages."""
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    ack = await client.say(ROOM, "before")
    await client.expect("chat_message")
    rejoined = await client.join("channel_other", since={"epoch": "0123abcd", "last_id": ack["id"]})
    assert rejoined["recovered"] is False and rejoined["messages"] == []
    await client.close()
    again = await connect(url_of(node), "1")
    stale = await again.join(ROOM, since={"epoch": "deadbeef", "last_id": "0-0"})
    assert stale["recovered"] is False and stale["messages"] == []
    assert stale["epoch"] == joined["epoch"] and stale["last_id"] == ack["id"]


async def test_data_loss_changes_the_epoch(node: App, redis_client: Redis, prefix: str) -> None:
    """When the room's keys vanish (Redis lost its data), the next join gets a new epoch and the old
    position is not recovered."""
    keys = Keys(prefix)
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    ack = await client.say(ROOM, "lost soon")
    await client.expect("chat_message")
    await client.close()
    await redis_client.delete(keys.stream(ROOM), keys.meta(ROOM))
    again = await connect(url_of(node), "1")
    rejoined = await again.join(ROOM, since={"epoch": joined["epoch"], "last_id": ack["id"]})
    assert rejoined["epoch"] != joined["epoch"]
    assert rejoined["recovered"] is False and rejoined["messages"] == []


async def test_ids_from_the_future_and_trimmed_ranges_are_not_recovered(
        node: App, redis_client: Redis, prefix: str) -> None:
    """A last_id beyond the stream's end, or below the trim watermark, gives recovered false."""
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    ack = await client.say(ROOM, "x")
    future = await client.join("channel_f", since={"epoch": joined["epoch"], "last_id": "99999999999999-0"})
    assert future["recovered"] is False
    await client.send({"type": "leave_room", "room": ROOM})
    await client.expect("room_left", room=ROOM)
    await redis_client.hset(Keys(prefix).meta(ROOM), "min_id", "99999999999998-0")
    trimmed = await client.join(ROOM, since={"epoch": joined["epoch"], "last_id": ack["id"]})
    assert trimmed["recovered"] is False and trimmed["messages"] == []


async def test_too_many_missed_messages_are_not_replayed(nodes: NodeFactory) -> None:
    """More missed messages than rooms.max_replay: recovered false (fetch history instead)."""
    node = await nodes.start(**{"rooms.max_replay": 3})
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    for i in range(4):
        await client.say(ROOM, f"m{i}")
    rejoined = await client.join("channel_two", since={"epoch": joined["epoch"], "last_id": joined["last_id"]})
    assert rejoined["recovered"] is False
    other = await connect(url_of(node), "2")
    full = await other.join(ROOM, since={"epoch": joined["epoch"], "last_id": joined["last_id"]})
    assert full["recovered"] is False and full["messages"] == []


async def test_fresh_join_can_ask_for_recent_history(node: App) -> None:
    """join_room with history N returns the newest N messages, oldest first."""
    writer = await connect(url_of(node), "1")
    await writer.join(ROOM)
    ids = [(await writer.say(ROOM, f"h{i}"))["id"] for i in range(5)]
    reader = await connect(url_of(node), "2")
    joined = await reader.join(ROOM, history=3)
    assert [m["id"] for m in joined["messages"]] == ids[-3:]
    assert joined["last_id"] == ids[-1]


async def test_retried_client_msg_id_is_stored_once(node: App, redis_client: Redis, prefix: str) -> None:
    """Sending the same client_msg_id twice acks the original id and appends nothing."""
    client = await connect(url_of(node), "1")
    await client.join(ROOM)
    first = await client.say(ROOM, "once", client_msg_id="abc-1")
    second = await client.say(ROOM, "once", client_msg_id="abc-1")
    assert second["id"] == first["id"] and second.get("duplicate") is True
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 1


async def test_backend_trim_past_the_position_is_detected(node: App, redis_client: Redis, prefix: str) -> None:
    """If someone trims the stream (XTRIM MAXLEN) past a client's position, resume says
    recovered false rather than silently skipping the trimmed messages."""
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    ids = [(await client.say(ROOM, f"t{i}"))["id"] for i in range(5)]
    await client.send({"type": "leave_room", "room": ROOM})
    await client.expect("room_left", room=ROOM)
    await redis_client.xtrim(Keys(prefix).stream(ROOM), maxlen=2, approximate=False)
    lost = await client.join(ROOM, since={"epoch": joined["epoch"], "last_id": ids[1]})
    assert lost["recovered"] is False and lost["messages"] == []
    await client.send({"type": "leave_room", "room": ROOM})
    await client.expect("room_left", room=ROOM)
    kept = await client.join(ROOM, since={"epoch": joined["epoch"], "last_id": ids[3]})
    assert kept["recovered"] is True and [m["id"] for m in kept["messages"]] == ids[4:]


async def test_join_again_while_joined_answers_the_resume(node: App) -> None:
    """A join_room with since for a room the connection is already in replays what follows since."""
    client = await connect(url_of(node), "1")
    joined = await client.join(ROOM)
    ids = [(await client.say(ROOM, f"j{i}"))["id"] for i in range(3)]
    again = await client.join(ROOM, since={"epoch": joined["epoch"], "last_id": ids[0]})
    assert again["already_joined"] is True and again["recovered"] is True
    assert [m["id"] for m in again["messages"]] == ids[1:]


@pytest.mark.timeout(10)
def test_epochs_are_unique_in_a_process_and_across_forked_workers() -> None:
    """Epochs count up from a random start (no getrandom() per publish); a forked worker starts afresh, so a
    room recreated after a Redis data loss never gets back the epoch it had on another worker."""
    mine = {new_epoch() for _ in range(1000)}
    assert len(mine) == 1000 and all(len(e) == 16 and int(e, 16) >= 0 for e in mine)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next epochs and leave at once
        os.write(write_end, " ".join(new_epoch() for _ in range(1000)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    parent_next = {new_epoch() for _ in range(1000)}
    assert len(child) == 1000 and not child & (mine | parent_next)
