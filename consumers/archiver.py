"""The archiver: one consumer group ("archiver") over every room stream, batching entries into
PostgreSQL exactly once.

Guarantees:
- An entry is XACKed only after the transaction holding its row committed (or after it was written
  to the dead-letter stream with its reason). A crash in between redelivers it, and the insert's
  ``ON CONFLICT DO NOTHING`` on (room, epoch, stream id) makes the second write a no-op: every
  entry is stored exactly once.
- Memory is bounded by two batches of ``batch_max_rows``: one being written while the next is read
  (reading overlaps writing). While PostgreSQL is down the archiver retries the batch it is writing,
  fills the next one and then stops reading; the rest waits in Redis.
- Cost follows rooms with new data: a pattern subscription on the room streams' keyspace channel
  wakes the rooms that received entries; a slow sweep claims entries left by dead archivers.
- A stream is trimmed only below what the group has acknowledged and below the hot window.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from consumers.pg_retry import until_written
from consumers.rows import COLUMNS, Poison, Row, entry_to_row
from consumers.schema import ensure_partition, month_start
from hub.config import ArchiverConfig, PostgresConfig
from hub.keys import Keys
from hub.lua import Scripts
from hub.redis_client import xreadgroup_many
from hub.subscriptions import Subscriptions
from hub.tasks import cancel_and_wait

log = logging.getLogger("consumers.archiver")

GROUP = "archiver"


def default_consumer_name() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:40] or "host"
    return f"{host}"


@dataclass
class Pending:
    """Entries read but not yet committed and acknowledged."""

    rows: list[tuple[str, bytes, Row]] = field(default_factory=list)  # (room, entry id, row)
    poison: list[tuple[str, bytes, dict[bytes, bytes], str]] = field(default_factory=list)
    # Pending entries whose data was trimmed away meanwhile: only acknowledged.
    gone: list[tuple[str, bytes]] = field(default_factory=list)
    first_at: float = 0.0  # monotonic time the oldest entry was read
    size: int = 0  # bytes of the entries' fields (bounds memory with batch_max_bytes)

    def __len__(self) -> int:
        return len(self.rows) + len(self.poison) + len(self.gone)

    def clear(self) -> None:
        self.rows.clear()
        self.poison.clear()
        self.gone.clear()
        self.first_at = 0.0
        self.size = 0


@dataclass
class Stats:
    rows_written: int = 0  # rows new to PostgreSQL
    entries_acked: int = 0
    dead_lettered: int = 0
    batches: int = 0
    retries: int = 0


class Archiver:
    def __init__(self, redis: Redis, keys: Keys, pg: PostgresConfig, config: ArchiverConfig) -> None:
        self._redis = redis
        self._keys = keys
        self._pg = pg
        self._config = config
        self._scripts = Scripts(redis)
        self.consumer = config.name or default_consumer_name()
        self.stats = Stats()
        # Rooms whose stream has our group (created at id 0, so nothing before is skipped).
        self._rooms: set[str] = set()
        # Rooms to read on the next turn; rooms that received entries since the last trim.
        self._dirty: set[str] = set()
        self._to_trim: set[str] = set()
        self._wake = asyncio.Event()
        self._epochs: dict[str, str] = {}
        self._pending = Pending()
        # The batch being written and acknowledged while the next one is read; None when idle.
        self._inflight: asyncio.Task[None] | None = None
        self._months: set[datetime] = set()
        # The PostgreSQL connection; None while disconnected (re-made on the next flush).
        self._conn: asyncpg.Connection | None = None
        # Keyspace pattern subscription (on every master of a Redis Cluster); None until start().
        self._pubsub: Subscriptions | None = None
        self._last_trim = time.monotonic()
        self._last_sweep = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._scripts.load()
        self._pubsub = Subscriptions(self._redis, self._on_notification, on_gap=self._wake_all, name="archiver")
        await self._pubsub.psubscribe(self._keys.keyspace_stream_pattern())
        await self._discover()
        # Entries this consumer read before a crash are re-read first (their rows may or may not
        # have committed; ON CONFLICT makes either case right), batch by batch until none is left.
        while await self._read(sorted(self._rooms), own_pending=True):
            await self._flush()
            await self._drain()

    async def close(self) -> None:
        if self._inflight is not None:
            # Not acknowledged: redelivered to the next run, and stored once thanks to ON CONFLICT.
            await cancel_and_wait([self._inflight])
            self._inflight = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def run(self, *, burst: bool = False) -> Stats:
        """Archive until cancelled; with ``burst``, until nothing is left to read, then return."""
        assert self._pubsub is not None
        listener = asyncio.ensure_future(self._pubsub.run())
        backoff = 0.05
        try:
            while True:
                try:
                    idle = await self._turn()
                except RedisError as exc:
                    # Redis restarting or unreachable: wait and go on (entries wait in Redis; what this
                    # consumer read and did not acknowledge is claimed back by the sweep). Exiting here
                    # made every Redis restart an archiver crash.
                    log.warning("Redis unavailable (%s); retrying in %.2fs", type(exc).__name__, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._config.max_retry_delay_s)
                    self._dirty.update(self._rooms)
                    continue
                backoff = 0.05
                if burst and idle:
                    await self._claim_all(min_idle_ms=self._config.claim_idle_ms)
                    await self._flush()
                    await self._drain()
                    if not self._dirty and not self._pending:
                        await self._trim(force=True)
                        return self.stats
        finally:
            await cancel_and_wait([listener])

    async def _turn(self) -> bool:
        """One step: flush if due, read woken rooms, sweep/trim if due. True when nothing was read
        and nothing is waiting."""
        now = time.monotonic()
        if self._pending and (len(self._pending) >= self._config.batch_max_rows
                              or self._pending.size >= self._config.batch_max_bytes
                              or now - self._pending.first_at >= self._config.batch_max_age_ms / 1000):
            await self._flush()
        if now - self._last_sweep >= self._config.sweep_interval_s:
            self._last_sweep = now
            await self._discover()
            await self._claim_all(min_idle_ms=self._config.claim_idle_ms)
        if now - self._last_trim >= self._config.trim_interval_s:
            await self._trim()
        if not self._dirty:
            timeout = self._config.sweep_interval_s
            if self._pending:
                timeout = max(0.0, self._pending.first_at + self._config.batch_max_age_ms / 1000 - now)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
        rooms = sorted(self._dirty)
        self._dirty.clear()
        read = await self._read(rooms) if rooms else 0
        if read == 0 and self._pending:
            await self._flush()
        return read == 0 and not self._pending and not self._dirty

    # ------------------------------------------------------------------ discovery and wake-ups

    async def _discover(self) -> None:
        """Find every room stream (SCAN) and make sure the archiver group exists on it."""
        found = []
        async for key in self._redis.scan_iter(match=self._keys.stream_pattern(), count=1000, _type="stream"):
            room = self._keys.room_of_key(key.decode() if isinstance(key, bytes) else str(key))
            if room is not None and room not in self._rooms:
                found.append(room)
        for room in found:
            await self._ensure_group(room)
        self._dirty.update(found)

    async def _ensure_group(self, room: str) -> None:
        try:
            await self._redis.xgroup_create(self._keys.stream(room), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._rooms.add(room)

    def _wake_all(self) -> None:
        """Notifications may have been lost (a reconnect, a failover): read every known room."""
        self._dirty.update(self._rooms)
        self._wake.set()

    def _on_notification(self, message: dict[str, Any]) -> None:
        if message.get("type") != "pmessage":
            return
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        key = channel.split(":", 1)[1] if channel.startswith("__keyspace@") else ""
        room = self._keys.room_of_key(key)
        if room is not None:
            self._dirty.add(room)
            self._wake.set()

    # ------------------------------------------------------------------ reading

    async def _read(self, rooms: Sequence[str], own_pending: bool = False) -> int:
        """Read new entries (or, with ``own_pending``, this consumer's unacknowledged ones) of
        ``rooms`` into the pending batch, never past ``batch_max_rows``. Returns entries read."""
        total = 0
        for start in range(0, len(rooms), 256):
            chunk = list(rooms[start:start + 256])
            for room in chunk:
                if room not in self._rooms:
                    await self._ensure_group(room)
            while chunk:
                room_space = self._config.batch_max_rows - len(self._pending)
                if room_space <= 0 or self._pending.size >= self._config.batch_max_bytes:
                    self._dirty.update(chunk)  # come back after the flush
                    await self._flush()
                    room_space = self._config.batch_max_rows
                # XREADGROUP's COUNT is per stream: split room_space over the streams read at once.
                reading, rest = chunk[:room_space], chunk[room_space:]
                per_stream = min(self._config.read_count, max(1, room_space // len(reading)))
                streams = {self._keys.stream(r): ("0" if own_pending else ">") for r in reading}
                try:
                    response = await xreadgroup_many(self._redis, GROUP, self.consumer, streams, count=per_stream)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    for room in reading:
                        self._rooms.discard(room)
                        self._epochs.pop(room, None)
                        await self._ensure_group(room)
                    continue
                got = 0
                full: list[str] = []
                for key, entries in _stream_items(response):
                    name = self._keys.room_of_key(key.decode() if isinstance(key, bytes) else str(key))
                    if name is None:
                        continue
                    got += await self._take(name, entries)
                    if len(entries) >= per_stream:
                        full.append(name)
                total += got
                if own_pending:
                    self._dirty.update(rest)
                    break
                chunk = full + rest  # rooms with more waiting, and rooms not read yet
        return total

    async def _take(self, room: str, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> int:
        if not entries:
            return 0
        epoch = await self._epoch(room)
        if not self._pending:
            self._pending.first_at = time.monotonic()
        for entry_id, fields in entries:
            if fields is None:
                self._pending.gone.append((room, entry_id))  # trimmed while pending: nothing to store
                continue
            self._pending.size += sum(map(len, fields)) + sum(map(len, fields.values()))
            converted = entry_to_row(room, epoch, entry_id, fields, self._config.max_entry_bytes)
            if isinstance(converted, Poison):
                self._pending.poison.append((room, entry_id, fields, converted.reason))
            else:
                self._pending.rows.append((room, entry_id, converted))
        self._to_trim.add(room)
        return len(entries)

    async def _epoch(self, room: str) -> str:
        epoch = self._epochs.get(room)
        if epoch is None:
            raw = await self._scripts.call("room_epoch", [self._keys.meta(room)], [secrets.token_hex(8)])
            epoch = self._epochs[room] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return epoch

    async def _claim_all(self, min_idle_ms: int) -> None:
        """Take over entries other (dead) archivers read but never acknowledged."""
        for room in sorted(self._rooms):
            if len(self._pending) >= self._config.batch_max_rows:
                await self._flush()
            try:
                reply = await self._redis.xautoclaim(
                    self._keys.stream(room), GROUP, self.consumer, min_idle_ms, start_id="0-0",
                    count=self._config.batch_max_rows - len(self._pending))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._rooms.discard(room)
                    continue
                raise
            entries = reply[1] if reply and len(reply) > 1 else []
            if entries:
                log.info("claimed %d entries of %s from a dead archiver", len(entries), room)
                await self._take(room, entries)

    # ------------------------------------------------------------------ writing

    async def _flush(self) -> None:
        """Hand the pending batch to a writer task (after the previous one finished), so the next
        batch is read while this one is written. At most one batch is written at a time, in order."""
        if not self._pending:
            return
        await self._drain()
        batch, self._pending = self._pending, Pending()
        self._inflight = asyncio.ensure_future(self._store(batch))

    async def _drain(self) -> None:
        """Wait until the batch being written is committed and acknowledged."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            await inflight

    async def _store(self, batch: Pending) -> None:
        """Write ``batch`` (retrying while PostgreSQL is away), then acknowledge it, then publish this
        archiver's batch statistics (for hubctl stats)."""
        started = time.monotonic()
        await until_written(lambda: self._write(batch, batch.rows), self._drop_connection,
                            self._config.max_retry_delay_s, self._count_retry)
        if self._config.crash_after_commit:
            log.error("crash_after_commit: exiting between commit and XACK (test fault injection)")
            os._exit(137)
        size = len(batch)
        await self._acknowledge(batch)
        try:
            key = self._keys.consumer_stats(self.consumer)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping={
                "group": GROUP, "batches": self.stats.batches, "rows_written": self.stats.rows_written,
                "dead_lettered": self.stats.dead_lettered, "retries": self.stats.retries, "last_batch_entries": size,
                "last_batch_ms": round((time.monotonic() - started) * 1000, 1), "at_ms": int(time.time() * 1000)})
            pipe.expire(key, 300)
            await pipe.execute()
        except RedisError:
            pass  # statistics only: the next batch publishes them again

    def _count_retry(self) -> None:
        self.stats.retries += 1

    async def _write(self, batch: Pending, rows: list[tuple[str, bytes, Row]]) -> None:
        """Store ``rows``; a row PostgreSQL refuses is isolated by bisection and dead-lettered."""
        if not rows:
            return
        conn = await self._connection()
        for month in {month_start(row[4]) for _, _, row in rows} - self._months:
            await ensure_partition(conn, month)
            self._months.add(month)
        try:
            await self._insert(conn, [row for _, _, row in rows])
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            if len(rows) == 1:
                room_name, entry_id, _ = rows[0]
                batch.rows.remove(rows[0])
                fields = await self._fields(room_name, entry_id)
                batch.poison.append((room_name, entry_id, fields, f"PostgreSQL refused it: {exc}"[:500]))
                return
            middle = len(rows) // 2
            await self._write(batch, rows[:middle])
            await self._write(batch, rows[middle:])

    async def _insert(self, conn: asyncpg.Connection, rows: list[Row]) -> None:
        """COPY into the connection's staging table, move new rows into messages and update the rooms
        table from the rows that were really new, in one transaction."""
        columns = ", ".join(COLUMNS)
        async with conn.transaction():
            await conn.copy_records_to_table("archiver_staging", records=rows, columns=COLUMNS)
            inserted = await conn.fetchval(f"""
                WITH inserted AS (
                    INSERT INTO messages ({columns}) SELECT {columns} FROM archiver_staging
                    ON CONFLICT DO NOTHING
                    RETURNING room, stream_ms, stream_seq, sender_id, content, stream_ts
                ), latest AS (
                    SELECT DISTINCT ON (room) room, stream_ms, stream_seq, sender_id, content, stream_ts,
                           count(*) OVER (PARTITION BY room) AS n
                    FROM inserted ORDER BY room, stream_ms DESC, stream_seq DESC
                ), upserted AS (
                    INSERT INTO rooms AS r (room, kind, last_stream_ms, last_stream_seq, last_sender_id,
                                            last_content, last_at, message_count)
                    SELECT room, split_part(room, '_', 1), stream_ms, stream_seq, sender_id, left(content, 200),
                           stream_ts, n
                    FROM latest
                    ON CONFLICT (room) DO UPDATE SET
                        message_count = r.message_count + EXCLUDED.message_count,
                        last_stream_ms = CASE WHEN newer THEN EXCLUDED.last_stream_ms ELSE r.last_stream_ms END,
                        last_stream_seq = CASE WHEN newer THEN EXCLUDED.last_stream_seq ELSE r.last_stream_seq END,
                        last_sender_id = CASE WHEN newer THEN EXCLUDED.last_sender_id ELSE r.last_sender_id END,
                        last_content = CASE WHEN newer THEN EXCLUDED.last_content ELSE r.last_content END,
                        last_at = CASE WHEN newer THEN EXCLUDED.last_at ELSE r.last_at END
                    RETURNING 1
                )
                SELECT count(*) FROM inserted""".replace(
                "newer", "(EXCLUDED.last_stream_ms, EXCLUDED.last_stream_seq) > (r.last_stream_ms, r.last_stream_seq)"))
        self.stats.rows_written += int(inserted or 0)
        self.stats.batches += 1

    async def _fields(self, room: str, entry_id: bytes) -> dict[bytes, bytes]:
        rows: Any = await self._redis.xrange(self._keys.stream(room), min=entry_id, max=entry_id, count=1)
        return dict(rows[0][1] or {}) if rows else {}

    async def _acknowledge(self, pending: Pending) -> None:
        """Dead-letter the poison entries, then XACK everything in the batch, in one round trip."""
        by_room: dict[str, list[bytes]] = {}
        for room, entry_id, _ in pending.rows:
            by_room.setdefault(room, []).append(entry_id)
        for room, entry_id in pending.gone:
            by_room.setdefault(room, []).append(entry_id)
        pipe = self._redis.pipeline(transaction=False)
        dlq = self._keys.dead_letters(GROUP)
        for room, entry_id, fields, reason in pending.poison:
            record: dict[Any, Any] = {"_room": room, "_id": entry_id, "_reason": reason,
                                      "_at": str(int(time.time() * 1000))}
            record.update({b"f:" + k: v for k, v in fields.items()})
            pipe.xadd(dlq, record)
            by_room.setdefault(room, []).append(entry_id)
            log.warning("dead-lettered %s in %s: %s", entry_id.decode("ascii", "replace"), room, reason)
        for room, ids in by_room.items():
            pipe.xack(self._keys.stream(room), GROUP, *ids)
        delay = 0.05
        while True:
            try:
                await pipe.execute()
                break
            except RedisError as exc:
                log.warning("acknowledging failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.max_retry_delay_s)
        self.stats.entries_acked += len(pending)
        self.stats.dead_lettered += len(pending.poison)
        pending.clear()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self._pg.url, timeout=5, server_settings={
                "search_path": self._pg.schema, "application_name": f"streamhub-archiver:{self.consumer}"})
            # Emptied by every commit (cheaper than a TRUNCATE per batch).
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS archiver_staging "
                               "(LIKE messages_staging INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            self._conn = conn
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()

    # ------------------------------------------------------------------ trimming

    async def _trim(self, force: bool = False) -> None:
        """Trim rooms that received entries: only below what is acknowledged and the hot window."""
        self._last_trim = time.monotonic()
        if (self._pending or self._inflight is not None) and not force:
            return
        rooms, self._to_trim = self._to_trim, set()
        floor_ms = int(time.time() * 1000) - self._config.hot_window_s * 1000
        for room in sorted(rooms):
            try:
                await self._scripts.call("room_trim", [self._keys.stream(room), self._keys.meta(room)],
                                         [GROUP, f"{max(floor_ms, 0)}-0"])
            except RedisError as exc:
                log.warning("trim of %s failed: %s", room, exc)
                self._to_trim.add(room)


def _stream_items(response: Any) -> list[tuple[Any, list[tuple[bytes, dict[bytes, bytes] | None]]]]:
    if not response:
        return []
    if isinstance(response, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in response.items()]
    return [(k, v) for k, v in response]
