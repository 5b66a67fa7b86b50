"""Scheduled maintenance: once per period for the whole cluster, with the spec's cadence."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import asyncpg
import orjson
from click.testing import CliRunner
from redis.asyncio import Redis

from cli.main import cli
from consumers.scheduler import Scheduler
from consumers.schema import ensure_partition
from hub.keys import Keys
from tests.conftest import PG_URL, REDIS_URL
from tests.test_archiver import burst


def scheduler(redis: Redis, prefix: str, schema: str, now: datetime, retention: int = 0, owner: str = "a") -> Scheduler:
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(PG_URL, server_settings={"search_path": schema})

    return Scheduler(redis, Keys(prefix), connect, retention, owner, clock=lambda: now)


async def test_each_job_runs_once_per_period_across_archivers(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """Three schedulers ticking at once run each job once for the period; the next day's tick runs
    only the daily job again."""
    day = datetime(2026, 11, 25, 10, tzinfo=UTC)
    ticks = await asyncio.gather(*(scheduler(redis_client, prefix, pg_schema, day, owner=str(i)).tick()
                                   for i in range(3)))
    ran = sorted(job for t in ticks for job in t)
    assert ran == ["daily-rollup:2026-11-25", "monthly-retention:2026-11", "weekly-report:2026-W48"]
    next_day = await scheduler(redis_client, prefix, pg_schema, datetime(2026, 11, 26, 10, tzinfo=UTC)).tick()
    assert next_day == ["daily-rollup:2026-11-26"]


async def test_weekly_report_and_hubctl_report_count_the_archive(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """The weekly report stored by the maintenance and `hubctl report --json` both count the week's
    archived messages by room type."""
    keys = Keys(prefix)
    for i in range(3):
        await redis_client.xadd(keys.stream("order_5"), {"sender_id": f"u{i}", "content": "x"})
    await redis_client.xadd(keys.stream("channel_a"), {"sender_id": "u9", "content": "y"})
    await burst(redis_client, prefix, pg_schema)
    now = datetime.now(UTC)
    await scheduler(redis_client, prefix, pg_schema, now).tick()
    year, week, _ = now.isocalendar()
    stored = orjson.loads(await redis_client.get(keys.maintenance_result("weekly-report", f"{year}-W{week:02d}")))
    assert stored["messages"] == 4 and stored["by_room_type"]["order"] == {"messages": 3, "senders": 3, "rooms": 1}
    env = {"REDIS_URL": REDIS_URL, "DATABASE_URL": PG_URL, "HUB_POSTGRES_SCHEMA": pg_schema,
           "HUB_REDIS_KEY_PREFIX": prefix, "PATH": os.environ["PATH"]}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["report", "--json"], env=env)
    assert result.exit_code == 0, result.output
    printed = orjson.loads(result.output)
    assert printed["messages"] == 4 and printed["busiest_rooms"][0] == {"room": "order_5", "messages": 3}


async def test_monthly_retention_drops_only_partitions_past_the_horizon(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """With 2 months of retention in November, partitions before September are dropped, later kept."""
    for month in (6, 7, 8, 9, 10, 11):
        await ensure_partition(pg, datetime(2026, month, 1, tzinfo=UTC))
    now = datetime(2026, 11, 25, tzinfo=UTC)
    await scheduler(redis_client, prefix, pg_schema, now, retention=2).tick()
    left = sorted(r["relname"] for r in await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'messages'::regclass"))
    assert left == ["messages_2026_09", "messages_2026_10", "messages_2026_11"]
