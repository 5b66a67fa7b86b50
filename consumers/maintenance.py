"""Operator repairs over Redis and PostgreSQL: purging history and replaying ranges.

Every operation is planned first (what would change, as counts) and applied only when asked, and
is idempotent: running it twice changes nothing the second time.

- purge never removes a stream entry that is not yet archived (acknowledged by the archiver group).
- replay archive re-stores a range of a room's stream in PostgreSQL (ON CONFLICT: no duplicate).
- replay restore puts archived rows back into a room's stream after Redis lost it, with their original
  ids and epoch, so clients resume and the archiver recognises them (no duplicate either).
- replay dlq re-injects dead-lettered entries into their room (after the cause was fixed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from consumers.archiver import GROUP
from consumers.rows import COLUMNS, Poison, entry_to_row
from consumers.schema import ensure_partition, month_start
from hub.keys import Keys
from hub.protocol import StreamId, format_stream_id, parse_stream_id
from hub.redis_client import as_cluster, publish_many


@dataclass
class Plan:
    """What an operation changes (or changed, once applied)."""

    action: str
    room: str | None = None
    redis_entries: int = 0
    postgres_rows: int = 0
    unarchived: int = 0  # entries that block a purge
    refused: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    applied: bool = False


async def unarchived_entries(redis: Redis, keys: Keys, room: str) -> int:
    """Entries of the room's stream the archiver has not acknowledged (pending, or not read yet)."""
    stream = keys.stream(room)
    if not await redis.exists(stream):
        return 0
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:
        return int(await redis.xlen(stream))
    archiver = next((g for g in groups if _text(g.get("name")) == GROUP), None)
    if archiver is None:
        return int(await redis.xlen(stream))  # never archived
    pending = int(archiver.get("pending", 0))
    delivered = _text(archiver.get("last-delivered-id")) or "0-0"
    unread: Any = await redis.xrange(stream, min=f"({delivered}", max="+", count=100_000)
    return pending + len(unread)


async def purge_room(redis: Redis, keys: Keys, pg: asyncpg.Connection | None, room: str, *,
                     apply: bool) -> Plan:
    """Remove a room's whole history (stream, meta, receipts, presence; archived rows). Refused while
    any entry is unarchived. Deleting the meta gives the room a new epoch: clients resuming are told
    recovered: false and refetch (an empty) history."""
    plan = Plan("purge-room", room)
    plan.unarchived = await unarchived_entries(redis, keys, room)
    plan.redis_entries = int(await redis.xlen(keys.stream(room)))
    if pg is not None:
        plan.postgres_rows = int(await pg.fetchval("SELECT count(*) FROM messages WHERE room = $1", room))
    if plan.unarchived:
        plan.refused = f"{plan.unarchived} entries are not archived yet: run the archiver first"
        return plan
    if apply:
        await redis.delete(keys.stream(room), keys.meta(room), keys.read_receipts(room), keys.room_presence(room))
        if pg is not None:
            async with pg.transaction():
                await pg.execute("DELETE FROM messages WHERE room = $1", room)
                await pg.execute("DELETE FROM rooms WHERE room = $1", room)
                await pg.execute("DELETE FROM read_receipts WHERE room = $1", room)
        plan.applied = True
    return plan


async def purge_older_than(redis: Redis, keys: Keys, pg: asyncpg.Connection | None, kind: str,
                           age: timedelta, *, apply: bool) -> Plan:
    """Remove messages older than ``age`` in rooms of ``kind`` (order, quote, user, support, channel):
    archived rows in PostgreSQL, and stream entries only below what the archiver acknowledged."""
    plan = Plan("purge-older-than", details={"kind": kind, "older_than": str(age)})
    cutoff = datetime.now(UTC) - age
    floor = f"{int(cutoff.timestamp() * 1000)}-0"
    rooms = []
    async for key in redis.scan_iter(match=keys.stream_pattern(), count=1000, _type="stream"):
        room = keys.room_of_key(_text(key) or "")
        if room is not None and room.split("_", 1)[0] == kind:
            rooms.append(room)
    from hub.lua import Scripts

    scripts = Scripts(redis)
    if apply:
        await scripts.load()
    for room in rooms:
        stream = keys.stream(room)
        older: Any = await redis.xrange(stream, min="-", max=f"({floor}", count=1_000_000)
        plan.redis_entries += len(older)
        if apply and older:
            # room_trim removes only entries below both the floor and the archiver's safe point.
            await scripts.call("room_trim", [stream, keys.meta(room)], [GROUP, floor])
    if pg is not None:
        plan.postgres_rows = int(await pg.fetchval(
            "SELECT count(*) FROM messages WHERE split_part(room, '_', 1) = $1 AND stream_ts < $2", kind, cutoff))
        if apply:
            await pg.execute("DELETE FROM messages WHERE split_part(room, '_', 1) = $1 AND stream_ts < $2",
                             kind, cutoff)
    plan.details["rooms"] = len(rooms)
    plan.applied = apply
    return plan


async def replay_archive(redis: Redis, keys: Keys, pg: asyncpg.Connection, room: str, first: StreamId | None,
                         last: StreamId | None, *, apply: bool, max_entry_bytes: int = 262_144) -> Plan:
    """Store a range of the room's stream in PostgreSQL again (rows already there are kept as is)."""
    plan = Plan("replay-archive", room)
    entries: Any = await redis.xrange(keys.stream(room), min=_bound(first, "-"), max=_bound(last, "+"),
                                      count=1_000_000)
    epoch_raw: Any = await redis.hget(keys.meta(room), "epoch")
    epoch = _text(epoch_raw)
    plan.redis_entries = len(entries)
    if epoch is None:
        plan.refused = "the room has no epoch (never opened): nothing to archive"
        return plan
    rows = []
    for entry_id, fields in entries:
        converted = entry_to_row(room, epoch, entry_id, fields or {}, max_entry_bytes)
        if not isinstance(converted, Poison):
            rows.append(converted)
    plan.details["poison_skipped"] = len(entries) - len(rows)
    if not apply or not rows:
        plan.applied = apply
        return plan
    for month in {month_start(r[4]) for r in rows}:
        await ensure_partition(pg, month)
    columns = ", ".join(COLUMNS)
    async with pg.transaction():
        await pg.execute("CREATE TEMP TABLE IF NOT EXISTS replay_staging (LIKE messages_staging INCLUDING DEFAULTS) "
                         "ON COMMIT DELETE ROWS")
        await pg.copy_records_to_table("replay_staging", records=rows, columns=COLUMNS)
        status = await pg.execute(f"INSERT INTO messages ({columns}) SELECT {columns} FROM replay_staging "
                                  "ON CONFLICT DO NOTHING")
    plan.postgres_rows = int(status.split()[-1])
    plan.applied = True
    return plan


async def replay_restore(redis: Redis, keys: Keys, pg: asyncpg.Connection, room: str, first: StreamId | None,
                         last: StreamId | None, *, apply: bool) -> Plan:
    """Put archived rows back into the room's stream with their original ids, after Redis lost them.

    Only ids above the stream's current top can be added (streams only grow), so entries Redis still
    has are skipped, and a second run adds nothing. When the stream is gone, the room's epoch is set
    back to the archived one, so resuming clients and the archiver treat the entries as the same ones."""
    plan = Plan("replay-restore", room)
    low, high = first or (0, 0), last or (2**63 - 1, 2**63 - 1)
    rows = await pg.fetch(
        "SELECT epoch, stream_ms, stream_seq, type, sender_id, content, message_type, client_msg_id, metadata, "
        "data, created_at FROM messages WHERE room = $1 AND (stream_ms, stream_seq) BETWEEN ($2, $3) AND ($4, $5) "
        "ORDER BY stream_ms, stream_seq", room, low[0], low[1], high[0], high[1])
    plan.postgres_rows = len(rows)
    if not rows:
        return plan
    stream, meta = keys.stream(room), keys.meta(room)
    info: Any = await redis.xinfo_stream(stream) if await redis.exists(stream) else None
    top = parse_stream_id(_text(info["last-generated-id"]) or "0-0") if info else (0, 0)
    epochs = {r["epoch"] for r in rows}
    current_epoch = _text(await redis.hget(meta, "epoch"))
    if len(epochs) > 1:
        plan.refused = f"the range spans {len(epochs)} epochs; restore one epoch at a time"
        return plan
    epoch = epochs.pop()
    if current_epoch not in (None, epoch) and top != (0, 0):
        plan.refused = "the stream already holds entries of another epoch; restore into an empty stream"
        return plan
    todo = [r for r in rows if (r["stream_ms"], r["stream_seq"]) > top]
    plan.redis_entries = len(todo)
    plan.details["already_in_redis"] = len(rows) - len(todo)
    if not apply:
        return plan
    pipe = redis.pipeline(transaction=True)
    pipe.hset(meta, "epoch", epoch)
    for row in todo:
        pipe.xadd(stream, _fields(row), id=format_stream_id((row["stream_ms"], row["stream_seq"])))
    await pipe.execute()
    plan.applied = True
    return plan


async def purge_dead_nodes(redis: Redis, keys: Keys, *, apply: bool) -> Plan:
    """Nodes whose registration expired: their consumer groups and their connections' presence (what
    every live node's reaper does each heartbeat; for when no node runs)."""
    from hub.lua import Scripts
    from hub.presence import Presence

    plan = Plan("purge-dead-nodes")
    members: Any = await redis.smembers(keys.nodes())
    node_ids = sorted(_text(m) or "" for m in members)
    alive = [await redis.exists(keys.node(n)) for n in node_ids]
    dead = [n for n, a in zip(node_ids, alive, strict=True) if not a]
    plan.details["dead_nodes"] = dead
    for node in dead:
        plan.redis_entries += int(await redis.scard(keys.node_rooms(node)))
        plan.redis_entries += int(await redis.scard(keys.node_presence(node)))
    if apply and dead:
        scripts = Scripts(redis)
        await scripts.load()
        await Presence(scripts, keys, node_id="hubctl").reap_dead_nodes()
        plan.applied = True
    return plan


async def replay_deliver(redis: Redis, keys: Keys, room: str, first: StreamId | None, last: StreamId | None, *,
                         apply: bool) -> Plan:
    """Send a range of the room's stream to its live members again, on the room's event channel, each
    frame marked ``replayed: true`` (ids unchanged, so clients drop what they already have; nothing is
    written to the stream or the archive)."""
    from hub.protocol import entry_to_frame

    plan = Plan("replay-deliver", room)
    entries: Any = await redis.xrange(keys.stream(room), min=_bound(first, "-"), max=_bound(last, "+"),
                                      count=100_000)
    frames = [f for f in (entry_to_frame(room, eid, fields or {}) for eid, fields in entries) if f is not None]
    plan.redis_entries = len(frames)
    if apply and frames:
        receivers = await publish_many(redis, keys.events_channel(room),
                                       [orjson.dumps(frame | {"replayed": True}) for _sid, frame, _chat in frames])
        plan.details["nodes_reached"] = max(receivers) if receivers else 0
        plan.applied = True
    return plan


async def replay_dead_letters(redis: Redis, keys: Keys, ids: list[str] | None, *, apply: bool) -> Plan:
    """Re-inject dead-lettered entries into their rooms (new ids; fix the cause first) and drop them from
    the dead-letter stream. ``ids`` None: all."""
    plan = Plan("replay-dlq")
    dlq = keys.dead_letters(GROUP)
    records: Any = await redis.xrange(dlq, count=100_000)
    chosen = [(rid, f) for rid, f in records if ids is None or _text(rid) in ids]
    plan.redis_entries = len(chosen)
    if not apply:
        return plan
    for record_id, record in chosen:
        room = _text(record.get(b"_room"))
        original = {k[2:]: v for k, v in record.items() if k.startswith(b"f:")}
        if room and original:
            if as_cluster(redis) is None:
                pipe = redis.pipeline(transaction=True)
                pipe.xadd(keys.stream(room), original)
                pipe.xdel(dlq, record_id)
                await pipe.execute()
            else:
                # The room's stream and the dead-letter stream are in different slots: no MULTI across them in a
                # cluster. Added first, removed second: a failure in between re-injects it again next time.
                await redis.xadd(keys.stream(room), original)
                await redis.xdel(dlq, record_id)
    plan.applied = True
    return plan


def _fields(row: Any) -> dict[Any, Any]:
    created_ms = int((row["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1))
    fields: dict[Any, Any] = {"type": row["type"], "created_at": str(created_ms), "restored": "1"}
    for name in ("sender_id", "content", "message_type", "client_msg_id", "metadata", "data"):
        if row[name] is not None:
            fields[name] = row[name]
    return fields


def _bound(sid: StreamId | None, default: str) -> str:
    return format_stream_id(sid) if sid is not None else default


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def now_ms() -> int:
    return int(time.time() * 1000)
