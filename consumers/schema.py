"""Schema migrations: versioned SQL files in ``consumers/migrations``, each applied in its own
transaction and recorded in ``hub_schema_migrations``; applying twice is a no-op.

A transaction-scoped advisory lock makes concurrent ``hubctl migrate`` runs (several archivers
starting at once) take turns instead of racing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_LOCK_ID = 0x5EA4_B0B  # advisory lock key for migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def read_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"migration file name must be NNNN_name.sql: {path.name}")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..N without gaps, got {versions}")
    return migrations


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('hub_schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await conn.fetch("SELECT version FROM hub_schema_migrations")}


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet applied, in order. Returns those applied now."""
    applied_now = []
    for migration in read_migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute("""
                CREATE TABLE IF NOT EXISTS hub_schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )""")
            if migration.version in await applied_versions(conn):
                continue
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO hub_schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            applied_now.append(migration)
    return applied_now


async def is_current(conn: asyncpg.Connection) -> bool:
    return {m.version for m in read_migrations()} <= await applied_versions(conn)


def partition_name(month_start: datetime) -> str:
    return f"messages_{month_start:%Y_%m}"


def month_start(ts: datetime) -> datetime:
    return datetime(ts.year, ts.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return datetime(start.year + (start.month == 12), start.month % 12 + 1, 1, tzinfo=UTC)


async def ensure_partition(conn: asyncpg.Connection, start: datetime) -> None:
    """Create the monthly partition holding ``start`` if it does not exist (idempotent, race-safe)."""
    name = partition_name(start)
    end = next_month(start)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID + 1)
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF messages '
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")
