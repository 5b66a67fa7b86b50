"""Archiver throughput, end to end (stream -> PostgreSQL, committed and acked), against plain
``copy_records_to_table`` of the same rows into the same ``messages`` table.

(a) raw COPY: N rows, built exactly as the archiver builds them (``consumers.rows.entry_to_row``), copied
    into a freshly migrated ``messages`` table in a temporary schema, in batches of ``copy_batch`` rows.
(b) archiver: N entries XADDed into ``rooms`` room streams under a fresh key prefix (not timed), then
    ``Archiver.start()`` + ``Archiver.run(burst=True)`` timed until every entry is committed and acked, into
    another freshly migrated schema. The archiver runs in this process: its CPU is this process's.

The Redis keys and schemas a run made are removed afterwards, even when it fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import asdict
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench.load import Progress
from bench.report import aggregate, summary
from consumers.archiver import GROUP, Archiver
from consumers.rows import COLUMNS, Poison, Row, entry_to_row
from consumers.schema import ensure_partition, migrate, month_start
from hub.config import ArchiverConfig, PostgresConfig
from hub.keys import Keys

ARCHIVER_TIMEOUT_S = 600.0
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "


def entry_fields(i: int, now_ms: int) -> dict[bytes, bytes]:
    """One chat message as a hub or a backend writes it (about 150 bytes of fields)."""
    fields = {
        b"type": b"chat_message",
        b"sender_id": f"user{i % 100}".encode(),
        b"content": f"message {i}: {FILLER[: 40 + i % 40]}".encode(),
        b"message_type": b"text",
        b"client_msg_id": f"c{i:012d}".encode(),
        b"created_at": str(now_ms).encode(),
    }
    if i % 10 == 0:
        fields[b"metadata"] = b'{"reply_to": null, "mentions": ["user1"]}'
    return fields


def room_names(rooms: int) -> list[str]:
    return [f"channel_bench{r}" for r in range(rooms)]


def prepared_rows(n: int, rooms: list[str], max_entry_bytes: int) -> list[Row]:
    """N rows exactly as the archiver produces them (same conversion, synthetic stream ids)."""
    now_ms = int(time.time() * 1000)
    rows: list[Row] = []
    for i in range(n):
        entry_id = f"{now_ms + i // 10}-{i % 10}".encode()
        row = entry_to_row(rooms[i % len(rooms)], "benchepoch", entry_id, entry_fields(i, now_ms), max_entry_bytes)
        if isinstance(row, Poison):
            raise RuntimeError(f"a synthetic entry was refused: {row}")
        rows.append(row)
    return rows


class ArchiveRun:
    """One run's PostgreSQL schemas and Redis prefixes, removed by :meth:`cleanup`."""

    def __init__(self, admin: asyncpg.Connection, redis: Redis, pg_url: str) -> None:
        self.admin = admin
        self.redis = redis
        self.pg_url = pg_url
        self.schemas: list[str] = []
        self.prefixes: list[str] = []

    async def fresh_schema(self, tag: str) -> str:
        name = f"bench_{tag}_{secrets.token_hex(4)}"
        await self.admin.execute(f'CREATE SCHEMA "{name}"')
        self.schemas.append(name)
        conn = await asyncpg.connect(self.pg_url, server_settings={"search_path": name})
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return name

    async def raw_copy(self, n: int, rooms: list[str], batch: int) -> float:
        rows = prepared_rows(n, rooms, ArchiverConfig().max_entry_bytes)
        schema = await self.fresh_schema("copy")
        conn = await asyncpg.connect(self.pg_url, server_settings={"search_path": schema})
        try:
            for month in {month_start(row[4]) for row in rows}:
                await ensure_partition(conn, month)
            started = time.perf_counter()
            for first in range(0, n, batch):
                await conn.copy_records_to_table("messages", records=rows[first:first + batch], columns=COLUMNS)
            elapsed = time.perf_counter() - started
            stored = await conn.fetchval("SELECT count(*) FROM messages")
        finally:
            await conn.close()
        if stored != n:
            raise RuntimeError(f"raw COPY stored {stored} rows, expected {n}")
        return n / elapsed

    async def archiver(self, n: int, rooms: list[str], archiver_batch: int | None) -> dict[str, Any]:
        prefix = f"bench{secrets.token_hex(4)}:"
        self.prefixes.append(prefix)
        keys = Keys(prefix)
        schema = await self.fresh_schema("arch")
        now_ms = int(time.time() * 1000)
        for first in range(0, n, 1000):  # not timed
            pipe = self.redis.pipeline(transaction=False)
            for i in range(first, min(first + 1000, n)):
                pipe.xadd(keys.stream(rooms[i % len(rooms)]), entry_fields(i, now_ms))  # type: ignore[arg-type]
            await pipe.execute()
        tuning: dict[str, Any] = {}
        if archiver_batch:
            tuning = {"batch_max_rows": archiver_batch, "read_count": archiver_batch}
        worker = Archiver(self.redis, keys, PostgresConfig(url=self.pg_url, schema=schema),
                          ArchiverConfig(name="bench", **tuning))
        cpu_before = sum(os.times()[:2])
        started = time.perf_counter()
        try:
            await worker.start()
            stats = await asyncio.wait_for(worker.run(burst=True), ARCHIVER_TIMEOUT_S)
            elapsed = time.perf_counter() - started
        finally:
            await worker.close()
        cpu_s = sum(os.times()[:2]) - cpu_before
        stored = await self.admin.fetchval(f'SELECT count(*) FROM "{schema}".messages')
        pending = 0
        for room in rooms:
            pending += int((await self.redis.xpending(keys.stream(room), GROUP))["pending"])
        if stored != n or pending != 0 or stats.entries_acked != n:
            raise RuntimeError(f"archiver: stored {stored}, pending {pending}, stats {stats}; expected {n} stored")
        return {"rows_per_s": n / elapsed, "stored": stored, "pending": pending, "cpu_s": cpu_s,
                "stats": asdict(stats)}

    async def cleanup(self) -> None:
        for prefix in self.prefixes:
            keys = [key async for key in self.redis.scan_iter(match=f"{prefix}*", count=1000)]
            for first in range(0, len(keys), 500):
                await self.redis.delete(*keys[first:first + 500])
        for schema in self.schemas:
            await self.admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.prefixes.clear()
        self.schemas.clear()


async def run_archive(redis_url: str, pg_url: str, *, rows: int, rooms: int, copy_batch: int,
                      archiver_batch: int | None, runs: int, progress: Progress) -> dict[str, Any]:
    names = room_names(rooms)
    admin = await asyncpg.connect(pg_url)
    redis = Redis.from_url(redis_url, decode_responses=False)
    results: list[dict[str, Any]] = []
    try:
        for index in range(1, runs + 1):
            progress(f"== archive run {index}/{runs}: {rows} rows, {rooms} rooms, raw COPY batches of {copy_batch}")
            work = ArchiveRun(admin, redis, pg_url)
            result: dict[str, Any] = {"scenario": "archive", "run": index,
                                      "params": {"rows": rows, "rooms": rooms, "copy_batch": copy_batch,
                                                 "archiver_batch": archiver_batch}}
            started = time.perf_counter()
            try:
                copy_rate = await work.raw_copy(rows, names, copy_batch)
                progress(f"   raw COPY: {copy_rate:,.0f} rows/s")
                archived = await work.archiver(rows, names, archiver_batch)
                progress(f"   archiver: {archived['rows_per_s']:,.0f} rows/s")
            finally:
                await work.cleanup()  # keeps the database small between runs
            stats = archived["stats"]
            result.update({
                "raw_copy_rows_per_s": round(copy_rate), "archiver_rows_per_s": round(archived["rows_per_s"]),
                "ratio": round(archived["rows_per_s"] / copy_rate, 3), "expected": rows,
                "delivered": archived["stored"], "pending_after": archived["pending"],
                "lost": rows - archived["stored"], "duplicates": max(0, archived["stored"] - rows),
                "archiver_cpu_s": round(archived["cpu_s"], 3),
                "rows_per_archiver_cpu_s": round(rows / archived["cpu_s"]) if archived["cpu_s"] else None,
                "archiver_batches": stats["batches"],
                "rows_per_batch": round(stats["entries_acked"] / max(stats["batches"], 1)),
                "elapsed_s": round(time.perf_counter() - started, 2),
            })
            progress(summary(result))
            results.append(result)
    finally:
        await redis.aclose()
        await admin.close()
    return aggregate("archive", results)
