"""History reads: the Redis hot window merged with the PostgreSQL archive, and full-text search.

The seam: Redis holds a room's entries from its first entry F onwards (older ones were trimmed,
and trimming only ever removes entries the archiver committed). A page takes entries >= F from
Redis and entries < F from PostgreSQL, so the two never overlap and nothing falls between them.
Without PostgreSQL (not configured or unreachable) history is the Redis window alone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from hub.protocol import ENVELOPE_PREFIX, Opener, StreamId, entry_to_frame, format_stream_id, iso_ms
from hub.streams import Entry, Streams

log = logging.getLogger("hub.history")

MAX_OFFSET = 10_000
MAX_QUERY_CHARS = 200


@dataclass(frozen=True)
class Page:
    messages: list[dict[str, Any]]  # newest first
    has_more: bool


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def row_created_ms(row: Any) -> int:
    """The row's created_at in ms, exactly as it was when the content was sealed."""
    return int((row["created_at"] - _EPOCH) // timedelta(milliseconds=1))


def row_to_frame(row: Any, opener: Opener | None = None) -> dict[str, Any]:
    """The frame an archived row becomes: the same shape as live delivery."""
    sid = format_stream_id((row["stream_ms"], row["stream_seq"]))
    frame: dict[str, Any] = {"type": row["type"], "room": row["room"], "id": sid}
    created_ms = row_created_ms(row)
    created = iso_ms(created_ms)
    if row["type"] == "chat_message":
        content = row["content"]
        if opener is not None and content is not None and content.startswith(ENVELOPE_PREFIX):
            content = opener(row["room"], row["sender_id"] or "", created_ms, content)
        frame.update(sender_id=row["sender_id"] or "system", content=content,
                     message_type=row["message_type"] or "text", created_at=created)
        if row["client_msg_id"] is not None:
            frame["client_msg_id"] = row["client_msg_id"]
        if row["metadata"] is not None:
            frame["metadata"] = orjson.loads(row["metadata"])
        return frame
    if row["sender_id"] is not None:
        frame["sender_id"] = row["sender_id"]
    frame["created_at"] = created
    frame["data"] = orjson.loads(row["data"]) if row["data"] is not None else {}
    if row["content"] is not None:
        frame["content"] = row["content"]
    return frame


_ROW_COLUMNS = "room, stream_ms, stream_seq, type, sender_id, content, message_type, client_msg_id, " \
               "metadata, data, created_at"


class History:
    def __init__(self, streams: Streams, pool: asyncpg.Pool | None, opener: Opener | None = None) -> None:
        self.streams = streams
        self.opener = opener
        # None when PostgreSQL is not reachable; history then comes from Redis alone.
        self.pool = pool

    async def page(self, room: str, *, limit: int, before: StreamId | None = None, offset: int = 0) -> Page:
        """Up to ``limit`` messages, newest first: older than ``before`` when given, else skipping the
        ``offset`` newest.

        One XREVRANGE decides the seam: if it returns fewer entries than asked, it reached the
        stream's start, and everything older (trimmed, hence archived) comes from PostgreSQL below
        the oldest entry it returned. A trim running meanwhile cannot open a gap."""
        key = self.streams.keys.stream(room)
        top = f"({format_stream_id(before)}" if before is not None else "+"
        want = limit + 1 + offset
        rows: Any = await self.streams.redis.xrevrange(key, max=top, min="-", count=want)
        hot: list[Entry] = [(eid, fields or {}) for eid, fields in rows]
        reached_start = len(hot) < want
        seam = _sid(hot[-1][0]) if hot else before
        skipped = min(offset, len(hot))
        hot, offset = hot[skipped:], offset - skipped
        messages = [f for f in (self._frame(room, e) for e in hot[:limit]) if f is not None]
        if not reached_start or self.pool is None:
            return Page(messages, len(hot) > limit)
        remaining = limit - len(hot)
        cold = await self._archived(room, seam, remaining + 1, offset)
        messages += [row_to_frame(r, self.opener) for r in cold[:remaining]]
        return Page(messages, len(cold) > remaining)

    async def _archived(self, room: str, below: StreamId | None, limit: int, offset: int) -> list[Any]:
        assert self.pool is not None
        if below is None:
            return list(await self.pool.fetch(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE room = $1 "
                "ORDER BY stream_ms DESC, stream_seq DESC LIMIT $2 OFFSET $3", room, limit, offset))
        return list(await self.pool.fetch(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE room = $1 AND (stream_ms, stream_seq) < ($2, $3) "
            "ORDER BY stream_ms DESC, stream_seq DESC LIMIT $4 OFFSET $5", room, below[0], below[1], limit, offset))

    async def archived_between(self, room: str, epoch: str, after: StreamId, below: StreamId | None,
                               limit: int) -> list[dict[str, Any]] | None:
        """Archived messages of ``epoch`` with after < id < below, oldest first, or None when
        PostgreSQL cannot answer. At most ``limit`` + 1 (the caller detects "too many")."""
        if self.pool is None:
            return None
        upper = below if below is not None else (2**63 - 1, 2**63 - 1)
        try:
            rows = await self.pool.fetch(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE room = $1 AND epoch = $2 "
                "AND (stream_ms, stream_seq) > ($3, $4) AND (stream_ms, stream_seq) < ($5, $6) "
                "ORDER BY stream_ms, stream_seq LIMIT $7",
                room, epoch, after[0], after[1], upper[0], upper[1], limit + 1)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("archive unavailable for a resume: %s", type(exc).__name__)
            return None
        return [row_to_frame(r, self.opener) for r in rows]

    def _frame(self, room: str, entry: Entry) -> dict[str, Any] | None:
        decoded = entry_to_frame(room, entry[0], entry[1], self.opener)
        return decoded[1] if decoded is not None else None

    async def search(self, query: str, rooms_sql: str, params: list[Any], limit: int,
                     offset: int) -> list[dict[str, Any]]:
        """Ranked full-text matches among rooms selected by ``rooms_sql`` (a parameterised SQL
        condition on ``room`` built by the caller from its access rules)."""
        assert self.pool is not None
        base = len(params)
        sql = (f"SELECT {_ROW_COLUMNS}, ts_rank(search, q) AS rank FROM messages, "
               f"plainto_tsquery('simple', ${base + 1}) AS q WHERE search @@ q AND ({rooms_sql}) "
               # Sealed content is never searched (its index would only hold ciphertext).
               f"AND (content IS NULL OR content NOT LIKE '{ENVELOPE_PREFIX}%') "
               f"ORDER BY rank DESC, stream_ms DESC, stream_seq DESC LIMIT ${base + 2} OFFSET ${base + 3}")
        rows = await self.pool.fetch(sql, *params, query, limit, offset)
        return [row_to_frame(r, self.opener) | {"rank": round(float(r["rank"]), 6)} for r in rows]





def _sid(value: bytes) -> StreamId:
    ms, _, seq = value.decode().partition("-")
    return int(ms), int(seq)


def dm_pattern(user_id: str) -> str | None:
    """A POSIX regex matching the direct rooms of a numeric ``user_id``, or None."""
    if not re.fullmatch(r"[1-9][0-9]{0,17}", user_id):
        return None
    return f"^user_([0-9]+_{user_id}|{user_id}_[0-9]+)$"
