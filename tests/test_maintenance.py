"""hubctl purge and replay against real Redis and PostgreSQL: plans by default, idempotent repairs,
and no unarchived entry ever removed."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import orjson
from click.testing import CliRunner, Result
from redis.asyncio import Redis

from cli.main import cli
from consumers.archiver import GROUP
from hub.keys import Keys
from tests.conftest import PG_URL, REDIS_URL
from tests.test_archiver import burst


async def hubctl(prefix: str, schema: str, *args: str) -> Result:
    env = {"REDIS_URL": REDIS_URL, "DATABASE_URL": PG_URL, "HUB_POSTGRES_SCHEMA": schema,
           "HUB_REDIS_KEY_PREFIX": prefix, "PATH": os.environ["PATH"]}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


def plan_of(result: Result) -> dict[str, Any]:
    plan: dict[str, Any] = orjson.loads(result.output.strip().splitlines()[-1])
    return plan


async def fill(redis: Redis, prefix: str, room: str, n: int) -> list[str]:
    return [(await redis.xadd(Keys(prefix).stream(room), {"sender_id": "1", "content": f"m{i}"})).decode()
            for i in range(n)]


async def test_purge_room_shows_its_plan_refuses_unarchived_and_then_removes_everything(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """purge room is a dry run without --yes, refuses while entries are unarchived, and with --yes
    after archiving removes the stream and the archived rows."""
    await fill(redis_client, prefix, "channel_old", 5)
    refused = await hubctl(prefix, pg_schema, "purge", "room", "channel_old", "--yes", "--json")
    assert refused.exit_code == 1 and plan_of(refused)["unarchived"] == 5 and not plan_of(refused)["applied"]
    assert await redis_client.xlen(Keys(prefix).stream("channel_old")) == 5
    await burst(redis_client, prefix, pg_schema)
    dry = await hubctl(prefix, pg_schema, "purge", "room", "channel_old", "--json")
    assert dry.exit_code == 0 and plan_of(dry) | {} == plan_of(dry)
    assert plan_of(dry)["redis_entries"] == 5 and plan_of(dry)["postgres_rows"] == 5 and not plan_of(dry)["applied"]
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'channel_old'") == 5
    done = await hubctl(prefix, pg_schema, "purge", "room", "channel_old", "--yes", "--json")
    assert done.exit_code == 0 and plan_of(done)["applied"]
    assert not await redis_client.exists(Keys(prefix).stream("channel_old"))
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'channel_old'") == 0
    again = await hubctl(prefix, pg_schema, "purge", "room", "channel_old", "--yes", "--json")
    assert plan_of(again)["redis_entries"] == 0 and plan_of(again)["postgres_rows"] == 0
    audited = [f for _, f in await redis_client.xrange(Keys(prefix).audit())
               if f.get(b"command") == b"purge-room"]
    assert len(audited) == 2 and audited[0][b"what"] == b"channel_old"  # the refusal was not audited


async def test_purge_older_than_keeps_unarchived_entries(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """purge older-than removes archived entries and rows past the retention, never unarchived ones."""
    keys = Keys(prefix)
    stream = keys.stream("order_1")
    old_ids = [await redis_client.xadd(stream, {"content": f"old{i}"}, id=f"{1000 + i}-0") for i in range(3)]
    await burst(redis_client, prefix, pg_schema, hot_window_s=10**11)  # the archiver itself trims nothing
    unarchived = await redis_client.xadd(stream, {"content": "not archived"}, id="2000-0")
    await redis_client.xreadgroup(GROUP, "someone", {stream: ">"})  # read, never acknowledged
    dry = await hubctl(prefix, pg_schema, "purge", "older-than", "--type", "order", "--days", "30", "--json")
    assert plan_of(dry)["postgres_rows"] == 3 and plan_of(dry)["redis_entries"] == 4
    assert await redis_client.xlen(stream) == 4
    done = await hubctl(prefix, pg_schema, "purge", "older-than", "--type", "order", "--days", "30", "--yes")
    assert done.exit_code == 0, done.output
    assert [eid for eid, _ in await redis_client.xrange(stream)] == [unarchived]
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'order_1'") == 0
    assert old_ids  # the archived ones are gone from both stores


async def test_replay_archive_twice_gives_the_same_row_count(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """replay archive stores a range again after rows were lost; a second run adds nothing."""
    ids = await fill(redis_client, prefix, "channel_re", 10)
    await burst(redis_client, prefix, pg_schema)
    await pg.execute("DELETE FROM messages WHERE room = 'channel_re' AND (stream_ms, stream_seq) >= ($1, $2)",
                     *map(int, ids[5].split("-")))
    first = await hubctl(prefix, pg_schema, "replay", "archive", "channel_re", "--from", ids[3], "--json")
    assert first.exit_code == 0 and plan_of(first)["postgres_rows"] == 5
    count = await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'channel_re'")
    second = await hubctl(prefix, pg_schema, "replay", "archive", "channel_re", "--from", ids[3], "--json")
    assert plan_of(second)["postgres_rows"] == 0
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'channel_re'") == count == 10


async def test_replay_restore_puts_archived_messages_back_after_redis_lost_them(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """After the stream and meta vanish, replay restore brings the archived entries back with their
    ids and epoch; the archiver then adds no duplicate and a second restore adds nothing."""
    keys = Keys(prefix)
    ids = await fill(redis_client, prefix, "channel_lost", 6)
    await burst(redis_client, prefix, pg_schema)
    epoch = await redis_client.hget(keys.meta("channel_lost"), "epoch")
    await redis_client.delete(keys.stream("channel_lost"), keys.meta("channel_lost"))
    dry = await hubctl(prefix, pg_schema, "replay", "restore", "channel_lost", "--dry-run", "--json")
    assert plan_of(dry)["redis_entries"] == 6 and not await redis_client.exists(keys.stream("channel_lost"))
    done = await hubctl(prefix, pg_schema, "replay", "restore", "channel_lost", "--json")
    assert done.exit_code == 0 and plan_of(done)["applied"]
    assert [eid.decode() for eid, _ in await redis_client.xrange(keys.stream("channel_lost"))] == ids
    assert await redis_client.hget(keys.meta("channel_lost"), "epoch") == epoch
    again = await hubctl(prefix, pg_schema, "replay", "restore", "channel_lost", "--json")
    assert plan_of(again)["redis_entries"] == 0
    await burst(redis_client, prefix, pg_schema)
    assert await pg.fetchval("SELECT count(*) FROM messages WHERE room = 'channel_lost'") == 6


async def test_replay_dlq_reinjects_dead_letters_once(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """A dead-lettered entry is put back into its room by replay dlq and leaves the dead-letter stream."""
    keys = Keys(prefix)
    await redis_client.xadd(keys.stream("channel_dl"), {"type": "mystery_event", "content": "x"})
    await burst(redis_client, prefix, pg_schema)
    assert await redis_client.xlen(keys.dead_letters(GROUP)) == 1
    dry = await hubctl(prefix, pg_schema, "replay", "dlq", "--all", "--dry-run", "--json")
    assert plan_of(dry)["redis_entries"] == 1 and await redis_client.xlen(keys.dead_letters(GROUP)) == 1
    done = await hubctl(prefix, pg_schema, "replay", "dlq", "--all", "--json")
    assert done.exit_code == 0 and plan_of(done)["redis_entries"] == 1
    assert await redis_client.xlen(keys.dead_letters(GROUP)) == 0
    entries = await redis_client.xrange(keys.stream("channel_dl"))
    assert len(entries) == 2 and entries[-1][1][b"type"] == b"mystery_event"
    again = await hubctl(prefix, pg_schema, "replay", "dlq", "--all", "--json")
    assert plan_of(again)["redis_entries"] == 0


async def test_purge_dead_nodes_removes_their_groups_and_presence(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """A registered node whose heartbeat key is gone: purge dead-nodes plans, then removes its group
    and its presence entry (members would see it offline)."""
    keys = Keys(prefix)
    stream = keys.stream("channel_dn")
    await redis_client.xadd(stream, {"content": "x"})
    await redis_client.xgroup_create(stream, "ghost-1-abc", id="$")
    await redis_client.sadd(keys.nodes(), "ghost-1-abc")
    await redis_client.sadd(keys.node_rooms("ghost-1-abc"), "channel_dn")
    await redis_client.hset(keys.room_presence("channel_dn"), "7", "ghost-1-abc-1=o")
    await redis_client.sadd(keys.node_presence("ghost-1-abc"), "channel_dn 7 ghost-1-abc-1")
    dry = await hubctl(prefix, pg_schema, "purge", "dead-nodes", "--json")
    assert plan_of(dry)["details"]["dead_nodes"] == ["ghost-1-abc"] and not plan_of(dry)["applied"]
    assert len(await redis_client.xinfo_groups(stream)) == 1
    done = await hubctl(prefix, pg_schema, "purge", "dead-nodes", "--yes", "--json")
    assert done.exit_code == 0 and plan_of(done)["applied"]
    assert await redis_client.xinfo_groups(stream) == []
    assert not await redis_client.hexists(keys.room_presence("channel_dn"), "7")
    assert not await redis_client.sismember(keys.nodes(), "ghost-1-abc")


async def test_replay_deliver_sends_a_range_again_to_live_members(
        nodes: Any, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """replay deliver re-sends a range to the room's live members marked replayed, without writing."""
    from tests.conftest import url_of
    from tests.helpers import connect

    node = await nodes.start()
    member = await connect(url_of(node), "1")
    await member.join("channel_rd")
    ids = await fill(redis_client, prefix, "channel_rd", 3)
    for _ in ids:
        await member.expect("chat_message")
    done = await hubctl(prefix, pg_schema, "replay", "deliver", "channel_rd", "--from", ids[1], "--json")
    assert done.exit_code == 0 and plan_of(done)["redis_entries"] == 2
    again = [await member.expect("chat_message", replayed=True) for _ in range(2)]
    assert [m["id"] for m in again] == ids[1:]
    assert await redis_client.xlen(Keys(prefix).stream("channel_rd")) == 3


async def test_migrate_and_remind_commands(redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """hubctl migrate is a no-op on a current schema; hubctl remind schedules a reminder (and refuses
    a time without a zone)."""
    current = await hubctl(prefix, pg_schema, "migrate")
    assert current.exit_code == 0 and "schema is current" in current.output
    scheduled = await hubctl(prefix, pg_schema, "remind", "quote_4", "--text", "expires soon", "--in", "60")
    assert scheduled.exit_code == 0 and "reminder" in scheduled.output
    assert await redis_client.zcard(Keys(prefix).reminders_due()) == 1
    naive = await hubctl(prefix, pg_schema, "remind", "quote_4", "--text", "x", "--at", "2030-01-01T00:00:00")
    assert naive.exit_code != 0 and "time zone" in naive.output
