"""The REST endpoints (history, search, rooms, read receipts), independent of the HTTP server.

Both servers call :meth:`Api.handle`: the WebSocket port answers the bodiless GETs through
websockets' ``process_request``, and the API port (aiohttp) answers everything, including the POST
with a JSON body that websockets cannot read. Authentication and room access are the same as for
joining: a token (``Authorization: Bearer`` or ``?token=``), then the room's rules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import asyncpg
import orjson
from redis.exceptions import RedisError

from hub.errors import AuthError, ClientError, Forbidden, HubError, InvalidRoom
from hub.history import MAX_OFFSET, MAX_QUERY_CHARS, dm_pattern
from hub.notifications import inbox_room
from hub.protocol import (
    StreamId,
    entry_to_frame,
    format_stream_id,
    parse_id_list,
    parse_read_position,
    parse_stream_id,
)
from hub.rooms import Principal, Room, parse_room
from hub.tokens import TokenGuard

if TYPE_CHECKING:
    from hub.node import Node

log = logging.getLogger("hub.api")

MAX_LIMIT = 100
MAX_BODY_BYTES = 65_536
_ROOM_PATH = re.compile(r"/ws/rooms/([^/]+)/(messages|mark-read|presence)")


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def ok(data: dict[str, Any]) -> Reply:
    return Reply(200, {"status": "success", "data": data})


def fail(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"status": "error", "error": {"code": code, "message": message}})


class BadParameter(ClientError):
    code = "invalid_parameter"


class Api:
    def __init__(self, node: Node, guard: TokenGuard) -> None:
        self._node = node
        # Token checks as at the handshake (verification, revocation) and the audit writer.
        self._guard = guard

    def handles(self, path: str) -> bool:
        return path in ("/ws/rooms", "/ws/search", "/ws/notifications", "/ws/notifications/ack") \
            or _ROOM_PATH.fullmatch(path) is not None

    async def handle(self, method: str, path: str, query: str, headers: Mapping[str, str],
                     body: bytes | None) -> Reply:
        """Answer one request. Never raises: every failure is a JSON error with a stable code."""
        params = parse_qs(query, keep_blank_values=True, max_num_fields=32)
        user_id: str | None = None
        try:
            who = await self._authenticate(headers, params)
            user_id = who.user_id
            match = _ROOM_PATH.fullmatch(path)
            if path == "/ws/rooms" and method == "GET":
                return await self._rooms(who)
            if path == "/ws/search" and method == "GET":
                return await self._search(who, params)
            if path == "/ws/notifications" and method == "GET":
                return await self._notifications(who, params)
            if path == "/ws/notifications/ack" and method == "POST":
                return await self._ack_notifications(who, body)
            if match and match.group(2) == "messages" and method == "GET":
                return await self._messages(who, unquote(match.group(1)), params)
            if match and match.group(2) == "presence" and method == "GET":
                room = await self._room(who, unquote(match.group(1)))
                return ok({"room": room.name, "users": await self._node.presence.in_room(room.name)})
            if match and match.group(2) == "mark-read" and method == "POST":
                return await self._mark_read(who, unquote(match.group(1)), body)
            return fail(405, "method_not_allowed", f"{method} is not allowed here")
        except AuthError as exc:
            return fail(401, "unauthorized", exc.message)
        except Forbidden as exc:
            self._guard.audit.record("acl_denied", who=user_id, what=path[:200], request=method, reason=exc.message)
            return fail(403, "forbidden", exc.message)
        except InvalidRoom as exc:
            return fail(400, "invalid_room", exc.message)
        except ClientError as exc:
            return fail(503 if exc.retryable else 400, exc.code, exc.message)
        except (RedisError, OSError) as exc:
            log.warning("REST request failed: %s", type(exc).__name__)
            return fail(503, "unavailable", "a backing store is unavailable; retry")
        except asyncpg.QueryCanceledError:
            return fail(503, "timeout", "the query took too long; narrow it")
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("REST query failed: %s", type(exc).__name__)
            return fail(503, "unavailable", "the archive is unavailable; retry")
        except HubError as exc:
            return fail(500, exc.code, exc.message)

    async def _authenticate(self, headers: Mapping[str, str], params: dict[str, list[str]]) -> Principal:
        auth = headers.get("Authorization", "") or headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if token is None and params.get("token"):
            token = params["token"][0]
        verified = self._guard.verifier.verify(token)
        if await self._guard.store.is_revoked(verified):
            raise AuthError("token revoked")
        return verified.principal

    async def _room(self, who: Principal, name: str) -> Room:
        room = parse_room(name, self._node.config.rooms.max_name_length)
        await self._node.check_access(room, who)
        return room

    # ------------------------------------------------------------------ endpoints

    async def _messages(self, who: Principal, name: str, params: dict[str, list[str]]) -> Reply:
        room = await self._room(who, name)
        limit = _int_param(params, "limit", 50, 1, None)
        limit = min(limit, MAX_LIMIT)  # clamped, not refused
        offset = _int_param(params, "offset", 0, 0, MAX_OFFSET)
        before = _id_param(params, "before")
        if before is not None and offset:
            raise BadParameter("use either before (a cursor) or offset, not both")
        page = await self._node.history.page(room.name, limit=limit, before=before, offset=offset)
        data: dict[str, Any] = {"room": room.name, "messages": page.messages, "has_more": page.has_more,
                                "limit": limit}
        if page.has_more and page.messages:
            data["next_before"] = page.messages[-1]["id"]
        return ok(data)

    async def _search(self, who: Principal, params: dict[str, list[str]]) -> Reply:
        history = self._node.history
        if history.pool is None:
            return fail(503, "unavailable", "search needs the PostgreSQL archive, which is not reachable")
        query = (params.get("query") or params.get("q") or [""])[0].strip()
        if not query:
            raise BadParameter("query is required")
        if len(query) > MAX_QUERY_CHARS:
            raise BadParameter(f"query is longer than {MAX_QUERY_CHARS} characters")
        limit = min(_int_param(params, "limit", 20, 1, None), MAX_LIMIT)
        offset = _int_param(params, "offset", 0, 0, 1000)
        room_name = (params.get("room_name") or [""])[0]
        if room_name:
            room = await self._room(who, room_name)
            results = await history.search(query, "room = $1", [room.name], limit, offset)
            return ok({"query": query, "results": results, "limit": limit, "offset": offset})
        results = await self._search_readable(who, query, limit, offset)
        return ok({"query": query, "results": results, "limit": limit, "offset": offset})

    async def _search_readable(self, who: Principal, query: str, limit: int, offset: int) -> list[dict[str, Any]]:
        """Search every room ``who`` may read. Rooms admitted by rule are filtered in SQL; rooms
        that depend on a grant are checked against Redis per candidate, so results are never from a
        room the caller cannot read."""
        node = self._node
        if who.is_admin and node.config.rooms.admin_all_rooms:
            return await node.history.search(query, "true", [], limit, offset)
        conditions = ["room LIKE 'channel\\_%'", "room = ANY($1::text[])"]
        params: list[Any] = [sorted(who.token_rooms)]
        pattern = dm_pattern(who.user_id)
        if pattern is not None:
            params.append(pattern)
            conditions.append(f"room ~ ${len(params)}")
        if "support" in who.roles:
            conditions.append("room LIKE 'support\\_%'")
        # Grant-based rooms are candidates, checked one by one below.
        conditions.append("room ~ '^(order|quote|support)_[0-9]+$'")
        rooms_sql = " OR ".join(conditions)
        accepted: list[dict[str, Any]] = []
        allowed: dict[str, bool] = {}
        skipped, scan_offset, chunk = 0, 0, max(limit * 4, 40)
        for _ in range(10):  # bounded: at most 10 chunks of candidates
            candidates = await node.history.search(query, rooms_sql, params, chunk, scan_offset)
            scan_offset += len(candidates)
            for frame in candidates:
                name = frame["room"]
                if name not in allowed:
                    try:
                        await node.check_access(parse_room(name), who)
                        allowed[name] = True
                    except (Forbidden, InvalidRoom):
                        allowed[name] = False
                if not allowed[name]:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                accepted.append(frame)
                if len(accepted) == limit:
                    return accepted
            if len(candidates) < chunk:
                break
        return accepted

    async def _rooms(self, who: Principal) -> Reply:
        node = self._node
        redis = node.streams.redis
        names: set[str] = set(who.token_rooms)
        joined = await redis.zrevrange(node.keys.user_rooms(who.user_id), 0, 499)
        names.update(n.decode() if isinstance(n, bytes) else str(n) for n in joined)
        history = node.history
        pattern = dm_pattern(who.user_id)
        if history.pool is not None and pattern is not None:
            try:
                rows = await history.pool.fetch("SELECT room FROM rooms WHERE room ~ $1 LIMIT 500", pattern)
                names.update(r["room"] for r in rows)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("rooms list without the archive: %s", type(exc).__name__)
        listed = []
        for name in sorted(names):
            try:
                room = parse_room(name)
                await node.check_access(room, who)
            except (Forbidden, InvalidRoom):
                continue
            listed.append(await self._room_summary(room, who))
        listed.sort(key=lambda r: r["last_message"]["id_sort"] if r["last_message"] else (0, 0), reverse=True)
        for entry in listed:
            if entry["last_message"]:
                entry["last_message"].pop("id_sort")
        return ok({"rooms": listed})

    async def _room_summary(self, room: Room, who: Principal) -> dict[str, Any]:
        node = self._node
        redis = node.streams.redis
        key = node.keys.stream(room.name)
        newest: Any = await redis.xrevrange(key, max="+", min="-", count=1)
        last: dict[str, Any] | None = None
        if newest:
            decoded = entry_to_frame(room.name, newest[0][0], newest[0][1] or {}, node.sealer.open)
            if decoded is not None:
                last = decoded[1] | {"id_sort": decoded[0]}
        if last is None and node.history.pool is not None:
            page = await node.history.page(room.name, limit=1)
            if page.messages:
                last = page.messages[0] | {"id_sort": parse_stream_id(page.messages[0]["id"])}
        read = await node.receipts.position(room.name, who.user_id)
        unread = await self._unread(room.name, read)
        return {"room": room.name, "kind": room.kind.value, "last_message": last, "unread_count": unread,
                "last_read_id": format_stream_id(read) if read else None}

    async def _unread(self, room: str, read: StreamId | None) -> int:
        """Messages after the read position, counted up to 1,000 (the hot window, then the archive)."""
        node = self._node
        redis = node.streams.redis
        key = node.keys.stream(room)
        start = f"({format_stream_id(read)}" if read else "-"
        hot: Any = await redis.xrange(key, min=start, max="+", count=1000)
        count = len(hot)
        first: Any = await redis.xrange(key, min="-", max="+", count=1)
        seam = parse_stream_id(first[0][0].decode()) if first else None
        pool = node.history.pool
        if count < 1000 and pool is not None and (read is None or seam is None or read < seam):
            low = read or (0, 0)
            high = seam or (2**62, 0)
            try:
                cold = await pool.fetchval(
                    "SELECT count(*) FROM (SELECT 1 FROM messages WHERE room = $1 AND (stream_ms, stream_seq) > "
                    "($2, $3) AND (stream_ms, stream_seq) < ($4, $5) LIMIT $6) AS m",
                    room, low[0], low[1], high[0], high[1], 1000 - count)
                count += int(cold)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
        return count

    async def _notifications(self, who: Principal, params: dict[str, list[str]]) -> Reply:
        """The caller's inbox, newest first; with unread=true only those not acknowledged."""
        limit = min(_int_param(params, "limit", 50, 1, None), MAX_LIMIT)
        unread = (params.get("unread") or ["false"])[0].lower() in ("1", "true", "yes")
        before = _id_param(params, "before")
        acked = await self._node.inbox.acknowledged(who.user_id)
        room = inbox_room(who.user_id)
        found: list[dict[str, Any]] = []
        has_more = True
        for _ in range(20):  # bounded scan when most are acknowledged
            page = await self._node.history.page(room, limit=MAX_LIMIT, before=before)
            for frame in page.messages:
                frame["read"] = frame["id"] in acked
                if not (unread and frame["read"]):
                    found.append(frame)
            has_more = page.has_more
            if len(found) >= limit or not has_more or not page.messages:
                break
            before = parse_stream_id(page.messages[-1]["id"])
        return ok({"notifications": found[:limit], "has_more": has_more or len(found) > limit})

    async def _ack_notifications(self, who: Principal, body: bytes | None) -> Reply:
        obj = _json_body(body, '{"ids": [...]} or {"id": "..."}')
        try:
            ids = parse_id_list(obj.get("ids"), obj.get("id"))
        except ClientError as exc:
            raise BadParameter(exc.message) from None
        await self._node.inbox.acknowledge(who.user_id, ids)
        return ok({"acknowledged": [format_stream_id(i) for i in ids]})

    async def _mark_read(self, who: Principal, name: str, body: bytes | None) -> Reply:
        room = await self._room(who, name)
        obj = _json_body(body, '{"message_ids": [...]} or {"up_to": "..."}')
        try:
            up_to = parse_read_position(obj.get("message_ids"), obj.get("up_to"))
        except ClientError as exc:
            raise BadParameter(exc.message) from None
        position = await self._node.receipts.mark(room.name, who.user_id, up_to)
        return ok({"room": room.name, "up_to": format_stream_id(position)})


def _json_body(body: bytes | None, shape: str) -> dict[str, Any]:
    if not body:
        raise BadParameter(f"the body must be JSON: {shape}")
    if len(body) > MAX_BODY_BYTES:
        raise BadParameter("the body is too large")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadParameter("the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadParameter("the body must be a JSON object")
    return obj


def _int_param(params: dict[str, list[str]], name: str, default: int, low: int, high: int | None) -> int:
    values = params.get(name)
    if not values:
        return default
    text = values[0].strip()
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        raise BadParameter(f"{name} must be an integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise BadParameter(f"{name} must be between {low} and {high}" if high is not None
                           else f"{name} must be at least {low}")
    return value


def _id_param(params: dict[str, list[str]], name: str) -> StreamId | None:
    values = params.get(name)
    if not values:
        return None
    try:
        return parse_stream_id(values[0])
    except ValueError:
        raise BadParameter(f"{name} must be a message id like '1700000000000-0'") from None

