"""Archiver throughput benchmark (not a test): end to end (stream -> PostgreSQL, committed and acked)
against plain ``copy_records_to_table`` of the same rows into the same ``messages`` table.

    python tests/bench/archiver_bench.py --rows 50000 --runs 3

(a) raw COPY: N rows, built exactly as the archiver builds them (``consumers.rows.entry_to_row``), copied
    into a freshly migrated ``messages`` table in a temp schema, in batches of ``--batch`` rows.
(b) archiver: N entries XADDed into ``--rooms`` room streams under a fresh key prefix (not timed), then
    ``Archiver.start()`` + ``Archiver.run(burst=True)`` timed until every entry is committed and acked,
    into another freshly migrated schema.

Each run prints rows/s for both, then the medians and the ratio archiver / raw COPY, and a final JSON
line. Uses the local Redis and PostgreSQL (database ``test``); the Redis keys and schemas it made are
removed afterwards, even when a run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from consumers.archiver import GROUP, Archiver  # noqa: E402
from consumers.rows import COLUMNS, Poison, Row, entry_to_row  # noqa: E402
from consumers.schema import ensure_partition, migrate, month_start  # noqa: E402
from hub.config import ArchiverConfig, PostgresConfig  # noqa: E402
from hub.keys import Keys  # noqa: E402

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
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
        assert not isinstance(row, Poison), row
        rows.append(row)
    return rows


async def fresh_schema(admin: asyncpg.Connection, tag: str) -> str:
    name = f"bench_{tag}_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE SCHEMA "{name}"')
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": name})
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return name


async def bench_raw_copy(admin: asyncpg.Connection, n: int, rooms: list[str], batch: int,
                         schemas: list[str]) -> float:
    rows = prepared_rows(n, rooms, ArchiverConfig().max_entry_bytes)
    schema = await fresh_schema(admin, "copy")
    schemas.append(schema)
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
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


async def bench_archiver(admin: asyncpg.Connection, redis: Redis, n: int, rooms: list[str],
                         prefixes: list[str], schemas: list[str],
                         archiver_batch: int | None = None) -> tuple[float, dict[str, Any]]:
    prefix = f"bench{secrets.token_hex(4)}:"
    prefixes.append(prefix)
    keys = Keys(prefix)
    schema = await fresh_schema(admin, "arch")
    schemas.append(schema)
    now_ms = int(time.time() * 1000)
    for first in range(0, n, 1000):  # not timed
        pipe = redis.pipeline(transaction=False)
        for i in range(first, min(first + 1000, n)):
            pipe.xadd(keys.stream(rooms[i % len(rooms)]), entry_fields(i, now_ms))  # type: ignore[arg-type]
        await pipe.execute()
    archiver = Archiver(redis, keys, PostgresConfig(url=PG_URL, schema=schema), ArchiverConfig(
        name="bench", **({"batch_max_rows": archiver_batch, "read_count": archiver_batch} if archiver_batch else {})))
    started = time.perf_counter()
    try:
        await archiver.start()
        stats = await asyncio.wait_for(archiver.run(burst=True), 600)
        elapsed = time.perf_counter() - started
    finally:
        await archiver.close()
    stored = await admin.fetchval(f'SELECT count(*) FROM "{schema}".messages')
    pending = 0
    for room in rooms:
        pending += int((await redis.xpending(keys.stream(room), GROUP))["pending"])
    if stored != n or pending != 0 or stats.entries_acked != n:
        raise RuntimeError(f"archiver: stored {stored}, pending {pending}, stats {stats}; expected {n} stored")
    return n / elapsed, asdict(stats)


async def cleanup(admin: asyncpg.Connection, redis: Redis, prefixes: list[str], schemas: list[str]) -> None:
    for prefix in prefixes:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for first in range(0, len(keys), 500):
            await redis.delete(*keys[first:first + 500])
    for schema in schemas:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rooms = room_names(args.rooms)
    admin = await asyncpg.connect(PG_URL)
    redis = Redis.from_url(REDIS_URL, decode_responses=False)
    prefixes: list[str] = []
    schemas: list[str] = []
    copy_rates: list[float] = []
    archiver_rates: list[float] = []
    archiver_stats: list[dict[str, Any]] = []
    print(f"archiver benchmark: {args.rows} rows, {args.rooms} rooms, raw COPY batches of {args.batch}, "
          f"{args.runs} run(s)")
    print(f"{'run':>5} {'raw COPY rows/s':>16} {'archiver rows/s':>16} {'ratio':>7} {'batches':>8} {'rows/batch':>11}")
    try:
        for run in range(1, args.runs + 1):
            copy_rate = await bench_raw_copy(admin, args.rows, rooms, args.batch, schemas)
            archiver_rate, stats = await bench_archiver(admin, redis, args.rows, rooms, prefixes, schemas,
                                                        args.archiver_batch)
            copy_rates.append(copy_rate)
            archiver_rates.append(archiver_rate)
            archiver_stats.append(stats)
            await cleanup(admin, redis, prefixes, schemas)  # keep the database small between runs
            prefixes.clear()
            schemas.clear()
            per_batch = stats["entries_acked"] / max(stats["batches"], 1)
            print(f"{run:>5} {copy_rate:>16,.0f} {archiver_rate:>16,.0f} {archiver_rate / copy_rate:>7.2f} "
                  f"{stats['batches']:>8} {per_batch:>11,.0f}")
    finally:
        await cleanup(admin, redis, prefixes, schemas)
        await redis.aclose()
        await admin.close()
    copy_median = statistics.median(copy_rates)
    archiver_median = statistics.median(archiver_rates)
    ratio = archiver_median / copy_median
    print(f"{'median':>5} {copy_median:>16,.0f} {archiver_median:>16,.0f} {ratio:>7.2f}")
    print(f"archiver / raw COPY = {ratio:.2f} (target >= 0.6)")
    return {
        "rows": args.rows, "runs": args.runs, "rooms": args.rooms, "copy_batch": args.batch,
        "raw_copy_rows_per_s": [round(r) for r in copy_rates],
        "archiver_rows_per_s": [round(r) for r in archiver_rates],
        "raw_copy_median_rows_per_s": round(copy_median),
        "archiver_median_rows_per_s": round(archiver_median),
        "ratio": round(ratio, 3),
        "archiver_batches": [s["batches"] for s in archiver_stats],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=50_000, help="messages per run (default 50000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--rooms", type=int, default=50, help="room streams for the archiver run (default 50)")
    parser.add_argument("--batch", type=int, default=500, help="rows per raw COPY (default 500)")
    parser.add_argument("--archiver-batch", type=int, default=None,
                        help="the archiver's batch_max_rows and read_count (default: its config default)")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.runs <= 0 or args.rooms <= 0 or args.batch <= 0:
        parser.error("--rows, --runs, --rooms and --batch must be positive")
    return args


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    print(json.dumps(result, sort_keys=True))
