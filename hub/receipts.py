"""Read receipts: each user's read position per room, in Redis (live truth, fanned out to members
as ``read_receipt``) with a copy in PostgreSQL for reporting."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from hub.keys import Keys
from hub.lua import Scripts
from hub.protocol import StreamId, format_stream_id, parse_stream_id

log = logging.getLogger("hub.receipts")


class Receipts:
    def __init__(self, scripts: Scripts, keys: Keys, pool: asyncpg.Pool | None) -> None:
        self._scripts = scripts
        self._keys = keys
        self.pool = pool
        # PostgreSQL copies in flight; owned here and awaited in close().
        self._writes: set[asyncio.Task[None]] = set()

    async def mark(self, room: str, user_id: str, up_to: StreamId) -> StreamId:
        """Move ``user_id``'s position in ``room`` forward to ``up_to`` (never back, never past the
        newest message). Returns the position now stored."""
        raw = await self._scripts.call(
            "read_mark", [self._keys.read_receipts(room), self._keys.stream(room)],
            [user_id, format_stream_id(up_to), self._keys.events_channel(room), room])
        position = parse_stream_id(raw.decode() if isinstance(raw, bytes) else str(raw))
        if self.pool is not None and position != (0, 0):
            task = asyncio.ensure_future(self._copy(room, user_id, position))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        return position

    async def position(self, room: str, user_id: str) -> StreamId | None:
        raw: Any = await self._scripts.redis.hget(self._keys.read_receipts(room), user_id)
        return parse_stream_id(raw.decode()) if raw else None

    async def _copy(self, room: str, user_id: str, position: StreamId) -> None:
        assert self.pool is not None
        try:
            await self.pool.execute("""
                INSERT INTO read_receipts AS r (room, user_id, up_to_ms, up_to_seq) VALUES ($1, $2, $3, $4)
                ON CONFLICT (room, user_id) DO UPDATE SET up_to_ms = EXCLUDED.up_to_ms,
                    up_to_seq = EXCLUDED.up_to_seq, updated_at = now()
                WHERE (EXCLUDED.up_to_ms, EXCLUDED.up_to_seq) > (r.up_to_ms, r.up_to_seq)""",
                room, user_id, position[0], position[1])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("read receipt copy to PostgreSQL failed: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
