"""The audit archiver: copies the ``hub:audit`` stream into the append-only ``audit_log`` table.

Guarantees:
- At least once from Redis, exactly once in PostgreSQL: a batch is XACKed only after the transaction
  holding its rows committed, and the insert's ``ON CONFLICT DO NOTHING`` on the stream id makes a
  redelivered entry a no-op.
- One consumer group (``audit-archiver``) shared by every archiver: entries are split between them,
  and entries a dead archiver read but never acknowledged are claimed after
  ``archiver.claim_idle_ms``. A restarted archiver re-reads its own pending entries first.
- Never loses an entry to a malformed field: what cannot be read is stored as it is in ``detail``
  (the stream id and its time are always valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from consumers.archiver import default_consumer_name
from consumers.pg_retry import until_written
from hub.config import ArchiverConfig, PostgresConfig
from hub.keys import Keys

log = logging.getLogger("consumers.audit_archiver")

GROUP = "audit-archiver"
_COLUMNS = ("event", "who", "ip", "what", "node")
# How long a read waits for new entries when the stream is idle (long-running mode).
_BLOCK_MS = 1000


@dataclass
class AuditStats:
    rows_written: int = 0  # rows new to PostgreSQL
    entries_acked: int = 0
    retries: int = 0


@dataclass(frozen=True)
class AuditRow:
    stream_ms: int
    stream_seq: int
    at: datetime
    event: str
    who: str | None
    ip: str | None
    what: str | None
    node: str | None
    detail: str  # JSON object


def entry_to_audit_row(entry_id: bytes, fields: dict[bytes, bytes]) -> AuditRow:
    """One stream entry as a row; never raises (the stream id is Redis-made and always valid)."""
    ms_text, _, seq_text = entry_id.decode("ascii").partition("-")
    stream_ms, stream_seq = int(ms_text), int(seq_text or 0)
    decoded = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()}
    at = datetime.fromtimestamp(stream_ms / 1000, tz=UTC)
    when = decoded.pop("when", None)
    if when is not None:
        try:
            parsed = datetime.fromisoformat(when.replace("Z", "+00:00"))
            if parsed.tzinfo is not None:
                at = parsed
        except ValueError:
            decoded["when"] = when  # kept as written, in detail
    values = {name: decoded.pop(name, None) for name in _COLUMNS}
    return AuditRow(stream_ms, stream_seq, at, values["event"] or "unknown", values["who"] or None,
                    values["ip"] or None, values["what"] or None, values["node"] or None,
                    orjson.dumps(decoded).decode())


class AuditArchiver:
    def __init__(self, redis: Redis, keys: Keys, pg: PostgresConfig, config: ArchiverConfig) -> None:
        self._redis = redis
        self._keys = keys
        self._pg = pg
        self._config = config
        self.consumer = config.name or default_consumer_name()
        self.stats = AuditStats()
        # The PostgreSQL connection; None while disconnected (re-made on the next write).
        self._conn: asyncpg.Connection | None = None
        self._last_claim = time.monotonic()

    async def start(self) -> None:
        """Create the group (at the stream's beginning), then store what this consumer had read
        before a crash."""
        await self._ensure_group()
        while await self._step("0"):
            pass

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._keys.audit(), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def run(self, *, burst: bool = False) -> AuditStats:
        """Archive until cancelled; with ``burst``, until nothing is left to read or claim."""
        backoff = 0.05
        while True:
            try:
                got = await self._step(">", block_ms=None if burst else _BLOCK_MS)
                due = time.monotonic() - self._last_claim >= self._config.sweep_interval_s
                if (burst and not got) or due:
                    self._last_claim = time.monotonic()
                    got += await self._claim()
            except RedisError as exc:
                # Redis restarting: wait and go on instead of exiting; a Redis that lost its data lost our
                # group too, so it is made again.
                log.warning("Redis unavailable (%s); retrying in %.2fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._config.max_retry_delay_s)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError):
                        await self._ensure_group()
                continue
            backoff = 0.05
            if burst and not got:
                return self.stats

    async def _step(self, start: str, block_ms: int | None = None) -> int:
        """Read one batch (new entries with ">", this consumer's pending ones with "0"), store it,
        acknowledge it. Returns the entries read."""
        response: Any = await self._redis.xreadgroup(GROUP, self.consumer, {self._keys.audit(): start},
                                                     count=self._config.batch_max_rows, block=block_ms)
        entries = _entries(response)
        await self._store(entries)
        return len(entries)

    async def _claim(self) -> int:
        """Take over entries another (dead) archiver read but never acknowledged."""
        reply: Any = await self._redis.xautoclaim(self._keys.audit(), GROUP, self.consumer,
                                                  self._config.claim_idle_ms, start_id="0-0",
                                                  count=self._config.batch_max_rows)
        entries = reply[1] if reply and len(reply) > 1 else []
        if entries:
            log.info("claimed %d audit entries from a dead archiver", len(entries))
        await self._store(entries)
        return len(entries)

    async def _store(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> None:
        if not entries:
            return
        # An entry trimmed away while pending has no fields left: there is nothing to store.
        rows = [entry_to_audit_row(eid, fields) for eid, fields in entries if fields is not None]
        await until_written(lambda: self._insert(rows), self._drop_connection, self._config.max_retry_delay_s,
                            self._count_retry)
        await self._redis.xack(self._keys.audit(), GROUP, *[eid for eid, _ in entries])
        self.stats.entries_acked += len(entries)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    async def _insert(self, rows: list[AuditRow]) -> None:
        if not rows:
            return
        conn = await self._connection()
        inserted = await conn.fetchval("""
            WITH inserted AS (
                INSERT INTO audit_log (stream_ms, stream_seq, at, event, who, ip, what, node, detail)
                SELECT ms, seq, at, event, who, ip, what, node, detail::jsonb
                FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                            $7::text[], $8::text[], $9::text[])
                     AS t(ms, seq, at, event, who, ip, what, node, detail)
                ON CONFLICT DO NOTHING
                RETURNING 1
            )
            SELECT count(*) FROM inserted""",
            [r.stream_ms for r in rows], [r.stream_seq for r in rows], [r.at for r in rows],
            [r.event for r in rows], [r.who for r in rows], [r.ip for r in rows], [r.what for r in rows],
            [r.node for r in rows], [r.detail for r in rows])
        self.stats.rows_written += int(inserted or 0)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._pg.url, timeout=5, server_settings={
                "search_path": self._pg.schema, "application_name": f"streamhub-audit-archiver:{self.consumer}"})
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()


def _entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """XREADGROUP's reply for one stream: a list of [key, entries] (RESP2) or a dict (RESP3)."""
    if not response:
        return []
    if isinstance(response, dict):
        values = next(iter(response.values()))
        return list(values[0] if values and isinstance(values[0], list) else values)
    return list(response[0][1])
