"""Maintenance scheduled inside the archiver processes, no cron needed.

Cadence from the platform spec: daily statistics rollup, weekly usage report, monthly drop of
message partitions past retention. (Hourly clean-up of stale connections, typing and presence runs in
every hub node: the node reaper, each heartbeat.) Each job runs once per period for the whole
cluster, however many archivers run: a Redis lock per (job, period) is taken with SET NX, and the
job's result is stored in Redis under that period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from consumers.schema import month_start, partition_name
from hub.keys import Keys

log = logging.getLogger("consumers.scheduler")


@dataclass(frozen=True)
class Job:
    name: str
    period: Callable[[datetime], str]  # the period a time falls in, e.g. "2026-11-25"
    ttl_s: int  # how long the lock (and the stored result) is kept
    run: Callable[[asyncpg.Connection, datetime], Awaitable[dict[str, Any]]]


def day_of(now: datetime) -> str:
    return now.strftime("%Y-%m-%d")


def week_of(now: datetime) -> str:
    year, week, _ = now.isocalendar()
    return f"{year}-W{week:02d}"


def month_of(now: datetime) -> str:
    return now.strftime("%Y-%m")


async def daily_rollup(pg: asyncpg.Connection, now: datetime) -> dict[str, Any]:
    """Yesterday's messages and senders by room type."""
    end = datetime(now.year, now.month, now.day, tzinfo=UTC)
    return await usage(pg, end - timedelta(days=1), end)


async def weekly_report(pg: asyncpg.Connection, now: datetime) -> dict[str, Any]:
    """The last seven days' usage (what ``hubctl report`` prints)."""
    return await usage(pg, now - timedelta(days=7), now)


async def usage(pg: asyncpg.Connection, start: datetime, end: datetime, top: int = 10) -> dict[str, Any]:
    """Messages, senders and rooms by room type, and the busiest rooms, between ``start`` and ``end``."""
    by_type = await pg.fetch(
        "SELECT split_part(room, '_', 1) AS kind, count(*) AS messages, count(DISTINCT sender_id) AS senders, "
        "count(DISTINCT room) AS rooms FROM messages WHERE stream_ts >= $1 AND stream_ts < $2 "
        "GROUP BY 1 ORDER BY 2 DESC", start, end)
    busiest = await pg.fetch(
        "SELECT room, count(*) AS messages FROM messages WHERE stream_ts >= $1 AND stream_ts < $2 "
        "GROUP BY room ORDER BY 2 DESC, room LIMIT $3", start, end, top)
    senders = await pg.fetchval(
        "SELECT count(DISTINCT sender_id) FROM messages WHERE stream_ts >= $1 AND stream_ts < $2", start, end)
    return {
        "from": start.isoformat(), "to": end.isoformat(),
        "messages": sum(int(r["messages"]) for r in by_type), "active_senders": int(senders or 0),
        "by_room_type": {r["kind"]: {"messages": int(r["messages"]), "senders": int(r["senders"]),
                                     "rooms": int(r["rooms"])} for r in by_type},
        "busiest_rooms": [{"room": r["room"], "messages": int(r["messages"])} for r in busiest],
    }


def drop_old_partitions(retention_months: int) -> Callable[[asyncpg.Connection, datetime], Awaitable[dict[str, Any]]]:
    async def run(pg: asyncpg.Connection, now: datetime) -> dict[str, Any]:
        """Drop monthly message partitions that end before the retention horizon (0: keep all)."""
        if retention_months <= 0:
            return {"dropped": [], "retention_months": 0}
        horizon = month_start(now)
        for _ in range(retention_months):
            horizon = month_start(horizon - timedelta(days=1))
        # The partitions of this schema's messages table (search_path), named messages_YYYY_MM.
        rows = await pg.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'messages'::regclass AND c.relname ~ '^messages_[0-9]{4}_[0-9]{2}$'")
        keep_from = partition_name(horizon)
        dropped = sorted(r["relname"] for r in rows if r["relname"] < keep_from)
        for name in dropped:
            await pg.execute(f'DROP TABLE IF EXISTS "{name}"')
        return {"dropped": dropped, "retention_months": retention_months}

    return run


def jobs(retention_months: int) -> list[Job]:
    return [
        Job("daily-rollup", day_of, 2 * 86400, daily_rollup),
        Job("weekly-report", week_of, 60 * 86400, weekly_report),
        Job("monthly-retention", month_of, 62 * 86400, drop_old_partitions(retention_months)),
    ]


class Scheduler:
    def __init__(self, redis: Redis, keys: Keys, connect: Callable[[], Awaitable[asyncpg.Connection]],
                 retention_months: int, owner: str, clock: Callable[[], datetime] | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._connect = connect
        self._jobs = jobs(retention_months)
        self._owner = owner
        self._clock = clock or (lambda: datetime.now(UTC))
        self.ran: list[str] = []  # "job:period" this scheduler ran (for tests and logs)

    async def tick(self) -> list[str]:
        """Run every job whose current period nobody ran yet. Returns the "job:period" run here."""
        now = self._clock()
        ran = []
        for job in self._jobs:
            period = job.period(now)
            lock = self._keys.maintenance(job.name, period)
            if not await self._redis.set(lock, self._owner, nx=True, ex=job.ttl_s):
                continue
            try:
                pg = await self._connect()
                try:
                    result = await job.run(pg, now)
                finally:
                    await pg.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                await self._redis.delete(lock)  # let the next tick (here or elsewhere) try again
                log.warning("maintenance %s for %s failed: %s", job.name, period, type(exc).__name__)
                continue
            await self._redis.set(self._keys.maintenance_result(job.name, period), orjson.dumps(result),
                                  ex=job.ttl_s)
            log.info("maintenance %s for %s done", job.name, period)
            ran.append(f"{job.name}:{period}")
        self.ran += ran
        return ran

    async def run(self, interval_s: float = 60.0) -> None:
        while True:
            try:
                await self.tick()
            except RedisError as exc:
                log.warning("maintenance tick failed: %s", type(exc).__name__)
            await asyncio.sleep(interval_s)


def latest_period(job: str, today: date) -> str:
    now = datetime(today.year, today.month, today.day, tzinfo=UTC)
    return {"daily-rollup": day_of, "weekly-report": week_of, "monthly-retention": month_of}[job](now)
