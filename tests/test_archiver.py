"""The archiver: every stream entry lands in PostgreSQL exactly once; poison is dead-lettered."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from consumers.archiver import GROUP, Archiver
from consumers.schema import migrate, read_migrations
from hub.config import ArchiverConfig, PostgresConfig
from hub.keys import Keys
from tests.conftest import PG_URL, ROOT, hub_env


def make_archiver(redis: Redis, prefix: str, schema: str, **config: Any) -> Archiver:
    return Archiver(redis, Keys(prefix), PostgresConfig(url=PG_URL, schema=schema),
                    ArchiverConfig(**{"name": "a1", **config}))


async def burst(redis: Redis, prefix: str, schema: str, **config: Any) -> Archiver:
    archiver = make_archiver(redis, prefix, schema, **config)
    await archiver.start()
    try:
        await asyncio.wait_for(archiver.run(burst=True), 60)
    finally:
        await archiver.close()
    return archiver


async def stored_ids(pg: asyncpg.Connection, room: str) -> list[str]:
    rows = await pg.fetch("SELECT stream_ms, stream_seq FROM messages WHERE room = $1 "
                          "ORDER BY stream_ms, stream_seq", room)
    return [f"{r['stream_ms']}-{r['stream_seq']}" for r in rows]


async def stream_ids(redis: Redis, prefix: str, room: str) -> list[str]:
    return [eid.decode() for eid, _ in await redis.xrange(Keys(prefix).stream(room))]


async def test_migrate_twice_is_a_no_op(pg_schema: str) -> None:
    """The second migrate applies nothing and the recorded versions stay the same."""
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_schema})
    try:
        assert await migrate(conn) == []
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM hub_schema_migrations")]
        assert versions == [m.version for m in read_migrations()]
    finally:
        await conn.close()


async def test_every_entry_is_archived_once_including_raw_backend_rooms(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """Entries of several rooms, one created only by a backend's raw XADD, are stored once each,
    with their fields, and all are acknowledged; a second run writes nothing."""
    keys = Keys(prefix)
    for i in range(30):
        await redis_client.xadd(keys.stream("channel_a"), {"sender_id": "1", "content": f"hello {i}"})
    await redis_client.xadd(keys.stream("order_7"), {
        "type": "order_status_update", "sender_id": "orders", "data": orjson.dumps({"status": "shipped"})})
    first = await burst(redis_client, prefix, pg_schema)
    assert first.stats.rows_written == 31 and first.stats.dead_lettered == 0
    assert await stored_ids(pg, "channel_a") == await stream_ids(redis_client, prefix, "channel_a")
    event = await pg.fetchrow("SELECT type, sender_id, data, epoch FROM messages WHERE room = 'order_7'")
    assert event["type"] == "order_status_update" and orjson.loads(event["data"]) == {"status": "shipped"}
    epoch = await redis_client.hget(keys.meta("order_7"), "epoch")
    assert event["epoch"] == epoch.decode()
    assert (await redis_client.xpending(keys.stream("channel_a"), GROUP))["pending"] == 0
    room = await pg.fetchrow("SELECT message_count, last_content FROM rooms WHERE room = 'channel_a'")
    assert room["message_count"] == 30 and room["last_content"] == "hello 29"
    again = await burst(redis_client, prefix, pg_schema)
    assert again.stats.rows_written == 0


async def test_poison_entry_is_dead_lettered_while_the_rest_of_its_batch_is_stored(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """A batch of 100 with one poison entry: 99 stored, 1 in the dead-letter stream with its reason,
    all 100 acknowledged."""
    keys = Keys(prefix)
    poison_id = None
    for i in range(100):
        fields: dict[str, Any] = {"sender_id": "1", "content": f"m{i}"}
        if i == 42:
            fields["content"] = b"bad \x00 nul"
        entry_id = await redis_client.xadd(keys.stream("channel_p"), fields)
        if i == 42:
            poison_id = entry_id
    archiver = await burst(redis_client, prefix, pg_schema, batch_max_rows=100)
    assert archiver.stats.rows_written == 99 and archiver.stats.dead_lettered == 1
    assert len(await stored_ids(pg, "channel_p")) == 99
    dead = await redis_client.xrange(keys.dead_letters(GROUP))
    assert len(dead) == 1
    record = dead[0][1]
    assert record[b"_id"] == poison_id and record[b"_room"] == b"channel_p"
    assert b"NUL" in record[b"_reason"] and record[b"f:content"] == b"bad \x00 nul"
    assert (await redis_client.xpending(keys.stream("channel_p"), GROUP))["pending"] == 0


@pytest.mark.parametrize("fields, reason", [
    ({"content": b"\xed\xa0\x80 lone surrogate"}, b"UTF-8"),
    ({"content": "x" * 3000}, b"max_entry_bytes"),
    ({"type": "no_such_event", "content": "x"}, b"unknown type"),
    ({"sender_id": "1"}, b"without content"),
    ({"type": "quote_update", "data": "{not json"}, b"JSON"),
    ({"content": "x", "metadata": "[1, 2]"}, b"object"),
])
async def test_each_kind_of_poison_is_named(redis_client: Redis, prefix: str, pg_schema: str,
                                           fields: dict[str, Any], reason: bytes) -> None:
    """Malformed backend entries each get a dead-letter record saying why."""
    keys = Keys(prefix)
    await redis_client.xadd(keys.stream("channel_q"), fields)
    await redis_client.xadd(keys.stream("channel_q"), {"content": "fine"})
    archiver = await burst(redis_client, prefix, pg_schema, max_entry_bytes=2048)
    assert archiver.stats.rows_written == 1 and archiver.stats.dead_lettered == 1
    dead = await redis_client.xrange(keys.dead_letters(GROUP))
    assert reason in dead[0][1][b"_reason"]


async def test_trim_keeps_unarchived_entries_and_sets_the_watermark(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """With a zero hot window, archived entries are trimmed, the watermark is recorded, and an entry
    added after the archive run is kept."""
    keys = Keys(prefix)
    for i in range(10):
        await redis_client.xadd(keys.stream("channel_t"), {"content": f"t{i}"})
    await burst(redis_client, prefix, pg_schema, hot_window_s=1)
    # hot_window_s=1: entries older than a second may go; these are newer, so nothing is trimmed yet.
    assert await redis_client.xlen(keys.stream("channel_t")) == 10
    archiver = make_archiver(redis_client, prefix, pg_schema, hot_window_s=1)
    await archiver.start()
    try:
        future_floor = "99999999999999-0"
        await archiver._scripts.call("room_trim", [keys.stream("channel_t"), keys.meta("channel_t")],
                                     [GROUP, future_floor])
    finally:
        await archiver.close()
    assert await redis_client.xlen(keys.stream("channel_t")) == 0
    watermark = await redis_client.hget(keys.meta("channel_t"), "min_id")
    last = (await redis_client.xinfo_stream(keys.stream("channel_t")))["last-generated-id"]
    ms, seq = last.decode().split("-")
    assert watermark.decode() == f"{ms}-{int(seq) + 1}"
    # An entry nobody archived yet survives a trim.
    new_id = await redis_client.xadd(keys.stream("channel_t"), {"content": "late"})
    await redis_client.xreadgroup(GROUP, "other", {keys.stream("channel_t"): ">"})  # pending, not acked
    archiver = make_archiver(redis_client, prefix, pg_schema)
    await archiver.start()
    try:
        await archiver._scripts.call("room_trim", [keys.stream("channel_t"), keys.meta("channel_t")],
                                     [GROUP, "99999999999999-0"])
    finally:
        await archiver.close()
    assert [eid for eid, _ in await redis_client.xrange(keys.stream("channel_t"))] == [new_id]


def run_archiver(prefix: str, schema: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **hub_env(prefix, HUB_POSTGRES_SCHEMA=schema, **env)}
    return subprocess.run([sys.executable, "-m", "cli.main", "archiver", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.fault
async def test_archiver_killed_between_commit_and_ack_stores_everything_once(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """An archiver process dies (exit without XACK) right after committing its first batch; the
    restarted archiver redelivers that batch and every entry is in PostgreSQL exactly once."""
    keys = Keys(prefix)
    for i in range(250):
        await redis_client.xadd(keys.stream("channel_k"), {"content": f"k{i}"})
    crashed = await asyncio.to_thread(run_archiver, prefix, pg_schema, "--burst", "--name", "arch-1",
                                      HUB_ARCHIVER_CRASH_AFTER_COMMIT="1", HUB_ARCHIVER_BATCH_MAX_ROWS="100")
    assert crashed.returncode == 137, crashed.stderr
    committed = await pg.fetchval("SELECT count(*) FROM messages")
    assert committed == 100
    # Its first batch committed but was never acknowledged; the next one had been read meanwhile.
    assert 100 <= (await redis_client.xpending(keys.stream("channel_k"), GROUP))["pending"] <= 200
    again = await asyncio.to_thread(run_archiver, prefix, pg_schema, "--burst", "--name", "arch-1",
                                    HUB_ARCHIVER_BATCH_MAX_ROWS="100")
    assert again.returncode == 0, again.stderr
    assert "rows written: 150" in again.stdout
    assert await stored_ids(pg, "channel_k") == await stream_ids(redis_client, prefix, "channel_k")
    assert await pg.fetchval("SELECT count(*) FROM messages") == 250
    assert (await redis_client.xpending(keys.stream("channel_k"), GROUP))["pending"] == 0


@pytest.mark.fault
async def test_entries_left_by_a_dead_archiver_are_claimed_by_another(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """Two archivers: one dies after committing without acking; the other, under another name,
    claims its entries (XAUTOCLAIM) and nothing is lost or doubled."""
    keys = Keys(prefix)
    for i in range(120):
        await redis_client.xadd(keys.stream("channel_c"), {"content": f"c{i}"})
    crashed = await asyncio.to_thread(run_archiver, prefix, pg_schema, "--burst", "--name", "dead-one",
                                      HUB_ARCHIVER_CRASH_AFTER_COMMIT="1", HUB_ARCHIVER_BATCH_MAX_ROWS="50")
    assert crashed.returncode == 137
    survivor = await asyncio.to_thread(run_archiver, prefix, pg_schema, "--burst", "--name", "survivor",
                                       HUB_ARCHIVER_CLAIM_IDLE_MS="1")
    assert survivor.returncode == 0, survivor.stderr
    assert await pg.fetchval("SELECT count(*) FROM messages") == 120
    assert await stored_ids(pg, "channel_c") == await stream_ids(redis_client, prefix, "channel_c")
    assert (await redis_client.xpending(keys.stream("channel_c"), GROUP))["pending"] == 0
