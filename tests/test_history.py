"""History, search, rooms list and read receipts over real HTTP (both ports), across the Redis/PostgreSQL
seam, plus the resume fallback to the archive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from consumers.archiver import GROUP
from hub.app import App
from hub.keys import Keys
from hub.lua import Scripts
from tests.conftest import NodeFactory, url_of
from tests.helpers import connect, mint
from tests.test_archiver import burst

NO_PG_URL = "postgresql://postgres@127.0.0.1:1/test"
BEYOND_ALL = "99999999999999-0"

# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client; no keep-alive, since the WebSocket port closes after each plain HTTP answer."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    timeout=aiohttp.ClientTimeout(total=20))
    yield session
    await session.close()


def bearer(user_id: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(user_id, **claims)}"}


async def request(http: aiohttp.ClientSession, port: int | None, method: str, path: str,
                  headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                  data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    assert port is not None
    async with http.request(method, f"http://127.0.0.1:{port}{path}", headers=headers or {}, params=params,
                            data=data) as resp:
        raw = await resp.read()
        assert resp.content_type == "application/json", (resp.status, raw[:200])
        body = orjson.loads(raw)
        assert isinstance(body, dict)
        return resp.status, body


async def get(http: aiohttp.ClientSession, app: App, path: str, headers: dict[str, str] | None = None,
              params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET on the API port, and the same GET on the WebSocket port, which must answer the same."""
    status, body = await request(http, app.api_port, "GET", path, headers, params)
    ws_status, ws_body = await request(http, app.port, "GET", path, headers, params)
    assert (ws_status, ws_body) == (status, body), f"WebSocket port differs for {path} {params}"
    return status, body


async def post(http: aiohttp.ClientSession, app: App, path: str, headers: dict[str, str],
               data: bytes) -> tuple[int, dict[str, Any]]:
    return await request(http, app.api_port, "POST", path, {**headers, "Content-Type": "application/json"},
                         data=data)


async def post_status(http: aiohttp.ClientSession, port: int | None, path: str, headers: dict[str, str],
                      data: bytes) -> int | None:
    """The status of a POST with a body, or None when the server closed the connection instead."""
    try:
        async with http.post(f"http://127.0.0.1:{port}{path}", data=data,
                             headers={**headers, "Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return None


def error_code(body: dict[str, Any]) -> str:
    assert body["status"] == "error", body
    code = body["error"]["code"]
    assert isinstance(code, str)
    return code


async def start_node(nodes: NodeFactory, schema: str, **overrides: Any) -> App:
    return await nodes.start(**{"postgres.schema": schema, **overrides})


async def trim(redis: Redis, prefix: str, room: str, floor: str) -> Any:
    keys = Keys(prefix)
    return await Scripts(redis).call("room_trim", [keys.stream(room), keys.meta(room)], [GROUP, floor])


async def xadd_many(redis: Redis, prefix: str, room: str, contents: list[str], sender: str = "2") -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for content in contents:
        pipe.xadd(Keys(prefix).stream(room), {"sender_id": sender, "content": content})
    return [eid.decode() for eid in await pipe.execute()]


async def stream_ids(redis: Redis, prefix: str, room: str) -> list[str]:
    return [eid.decode() for eid, _ in await redis.xrange(Keys(prefix).stream(room))]


async def archived_ids(pg: asyncpg.Connection, room: str) -> list[str]:
    rows = await pg.fetch("SELECT stream_ms, stream_seq FROM messages WHERE room = $1 ORDER BY stream_ms, stream_seq",
                          room)
    return [f"{r['stream_ms']}-{r['stream_seq']}" for r in rows]


async def poll(check: Any, timeout_s: float = 5.0, what: str = "condition") -> Any:
    """Await ``check()`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def sid(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


# ---------------------------------------------------------------------------------------- 1. seam

SEAM_ROOM = "channel_seam"


async def page_all(http: aiohttp.ClientSession, app: App, headers: dict[str, str], *,
                   cursor: bool) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, str] = {"limit": "25"}
    for _ in range(20):
        status, body = await get(http, app, f"/ws/rooms/{SEAM_ROOM}/messages", headers, params)
        assert status == 200, body
        data = body["data"]
        assert data["limit"] == 25 and data["room"] == SEAM_ROOM
        pages.append(data["messages"])
        if not data["has_more"]:
            assert "next_before" not in data
            return pages
        assert len(data["messages"]) == 25
        if cursor:
            assert data["next_before"] == data["messages"][-1]["id"]
            params = {"limit": "25", "before": data["next_before"]}
        else:
            params = {"limit": "25", "offset": str(25 * len(pages))}
    raise AssertionError("paging did not end")


async def test_history_pages_cross_the_redis_postgres_seam_in_xrange_order(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str, pg_schema: str,
        pg: asyncpg.Connection) -> None:
    """Cursor and offset paging over 40 hot entries in Redis and 80 archived ones give exactly the XRANGE ids
    reversed, with no gap or duplicate at the seam and the same frames as before the trim."""
    app = await start_node(nodes, pg_schema)
    client = await connect(url_of(app), "1")
    await client.join(SEAM_ROOM)
    said = [(await client.say(SEAM_ROOM, f"live {i}"))["id"] for i in range(5)]
    await xadd_many(redis_client, prefix, SEAM_ROOM, [f"backend {i}" for i in range(115)])
    original = await stream_ids(redis_client, prefix, SEAM_ROOM)
    assert len(original) == 120 and original[:5] == said
    headers = bearer("1")
    before_trim = [m for page in await page_all(http, app, headers, cursor=True) for m in page]
    assert [m["id"] for m in before_trim] == original[::-1]

    archiver = await burst(redis_client, prefix, pg_schema)
    assert archiver.stats.rows_written == 120
    assert await archived_ids(pg, SEAM_ROOM) == original
    await trim(redis_client, prefix, SEAM_ROOM, original[80])
    hot = await stream_ids(redis_client, prefix, SEAM_ROOM)
    assert hot == original[80:]

    cursor_pages = await page_all(http, app, headers, cursor=True)
    assert [len(p) for p in cursor_pages] == [25, 25, 25, 25, 20]
    walked = [m for page in cursor_pages for m in page]
    assert [m["id"] for m in walked] == original[::-1]
    # The second page starts in Redis (ids 94..80) and ends in PostgreSQL (79..70).
    second = [m["id"] for m in cursor_pages[1]]
    assert second == original[94:69:-1]
    assert set(second[:15]) <= set(hot) and not set(second[15:]) & set(hot)
    # Archived frames look like the hot ones did.
    fields = ("type", "room", "id", "sender_id", "content", "message_type", "created_at")
    assert [{k: m.get(k) for k in fields} for m in walked] == [{k: m.get(k) for k in fields} for m in before_trim]

    offset_pages = await page_all(http, app, headers, cursor=False)
    assert [m["id"] for page in offset_pages for m in page] == original[::-1]

    # A cursor exactly at the seam, and a page reaching across it from offset form.
    status, body = await get(http, app, f"/ws/rooms/{SEAM_ROOM}/messages", headers,
                             {"limit": "10", "before": original[80]})
    assert status == 200 and [m["id"] for m in body["data"]["messages"]] == original[79:69:-1]
    status, body = await get(http, app, f"/ws/rooms/{SEAM_ROOM}/messages", headers,
                             {"limit": "30", "offset": "30"})
    assert status == 200 and [m["id"] for m in body["data"]["messages"]] == original[89:59:-1]
    assert body["data"]["has_more"] is True


# ---------------------------------------------------------------------------------------- 2. params


async def test_history_clamps_limit_and_refuses_bad_requests_with_json_errors(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """limit is clamped to 100; bad parameters, bad rooms, other people's rooms, missing tokens, unknown
    endpoints and wrong methods each get their own status and JSON error code."""
    app = await start_node(nodes, pg_schema)
    room = "channel_params"
    ids = await xadd_many(redis_client, prefix, room, [f"m{i}" for i in range(120)])
    await xadd_many(redis_client, prefix, "order_77", ["secret order"])
    await xadd_many(redis_client, prefix, "user_2_3", ["secret dm"])
    headers = bearer("1")
    path = f"/ws/rooms/{room}/messages"

    status, body = await get(http, app, path, headers, {"limit": "1000"})
    assert status == 200 and body["status"] == "success"
    assert body["data"]["limit"] == 100 and len(body["data"]["messages"]) == 100
    assert [m["id"] for m in body["data"]["messages"]] == ids[:19:-1]
    status, body = await get(http, app, path, headers)
    assert status == 200 and len(body["data"]["messages"]) == 50  # the default limit

    for params in ({"limit": "abc"}, {"limit": "0"}, {"limit": "-5"}, {"offset": "-1"}, {"offset": "99999999"},
                   {"before": "xyz"}, {"before": ids[50], "offset": "5"}):
        status, body = await get(http, app, path, headers, params)
        assert status == 400 and error_code(body) == "invalid_parameter", (params, body)

    for bad_room in ("bogus", "order_007", "user_3_2", "channel_UPPER"):
        status, body = await get(http, app, f"/ws/rooms/{bad_room}/messages", headers)
        assert status == 400 and error_code(body) == "invalid_room", (bad_room, body)

    for private in ("order_77", "user_2_3"):
        status, body = await get(http, app, f"/ws/rooms/{private}/messages", headers)
        assert status == 403 and error_code(body) == "forbidden", (private, body)
    # With a grant the order room reads fine; the DM stays private.
    await redis_client.sadd(Keys(prefix).acl("order_77"), "1")
    status, body = await get(http, app, "/ws/rooms/order_77/messages", headers)
    assert status == 200 and [m["content"] for m in body["data"]["messages"]] == ["secret order"]

    status, body = await get(http, app, path)
    assert status == 401 and error_code(body) == "unauthorized"
    status, body = await get(http, app, path, {"Authorization": "Bearer not-a-token"})
    assert status == 401 and error_code(body) == "unauthorized"
    status, body = await get(http, app, path, params={"token": mint("1")})
    assert status == 200

    status, body = await get(http, app, "/ws/nothing-here", headers)
    assert status == 404 and error_code(body) == "not_found"
    status, body = await request(http, app.api_port, "POST", path, headers, data=b"{}")
    assert status == 405 and error_code(body) == "method_not_allowed"
    status, body = await get(http, app, f"/ws/rooms/{room}/mark-read", headers)
    assert status == 405


# ---------------------------------------------------------------------------------------- 3. no PG


async def test_without_postgres_history_comes_from_redis_and_search_is_unavailable(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str) -> None:
    """A node whose PostgreSQL is unreachable still pages history from Redis and answers search with 503."""
    app = await nodes.start(**{"postgres.url": NO_PG_URL})
    assert app.pool is None
    room = "channel_nopg"
    ids = await xadd_many(redis_client, prefix, room, [f"shipment {i}" for i in range(30)])
    headers = bearer("1")
    status, body = await get(http, app, f"/ws/rooms/{room}/messages", headers, {"limit": "25"})
    assert status == 200 and [m["id"] for m in body["data"]["messages"]] == ids[:4:-1]
    assert body["data"]["has_more"] is True
    status, body = await get(http, app, f"/ws/rooms/{room}/messages", headers,
                             {"limit": "25", "before": body["data"]["next_before"]})
    assert status == 200 and [m["id"] for m in body["data"]["messages"]] == ids[4::-1]
    assert body["data"]["has_more"] is False
    status, body = await get(http, app, "/ws/search", headers, {"query": "shipment"})
    assert status == 503 and error_code(body) == "unavailable"
    status, body = await get(http, app, "/ws/rooms", headers)
    assert status == 200


# ---------------------------------------------------------------------------------------- 4. search


async def test_search_finds_words_only_in_rooms_the_caller_may_read(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """Search over archived rooms returns ranked, paged matches from channels, own DMs and granted rooms, and
    never from rooms the caller may not read."""
    app = await start_node(nodes, pg_schema)
    keys = Keys(prefix)
    await xadd_many(redis_client, prefix, "channel_news", ["shipment shipment shipment update", "nothing here",
                                                           "the shipment arrived"])
    await xadd_many(redis_client, prefix, "user_1_2", ["where is my shipment", "hello"], sender="1")
    await xadd_many(redis_client, prefix, "user_2_4", ["private shipment between others"], sender="4")
    await xadd_many(redis_client, prefix, "order_55", ["order shipment delayed"], sender="orders")
    await xadd_many(redis_client, prefix, "support_9", ["support shipment complaint"], sender="9")
    await redis_client.sadd(keys.acl("order_55"), "3")
    await burst(redis_client, prefix, pg_schema)

    user1 = bearer("1")
    status, body = await get(http, app, "/ws/search", user1, {"query": "shipment"})
    assert status == 200, body
    results = body["data"]["results"]
    assert {(r["room"], r["content"]) for r in results} == {
        ("channel_news", "shipment shipment shipment update"), ("channel_news", "the shipment arrived"),
        ("user_1_2", "where is my shipment")}
    assert all(isinstance(r["rank"], float) for r in results)
    ranks = [r["rank"] for r in results]
    assert ranks == sorted(ranks, reverse=True)
    assert results[0]["content"] == "shipment shipment shipment update"
    paged = []
    for offset in range(4):
        status, body = await get(http, app, "/ws/search", user1, {"query": "shipment", "limit": "1",
                                                                  "offset": str(offset)})
        assert status == 200 and body["data"]["limit"] == 1 and body["data"]["offset"] == offset
        paged += body["data"]["results"]
    assert [r["id"] for r in paged] == [r["id"] for r in results]

    user3 = bearer("3")
    status, body = await get(http, app, "/ws/search", user3, {"query": "shipment"})
    assert status == 200
    assert {r["room"] for r in body["data"]["results"]} == {"channel_news", "order_55"}
    status, body = await get(http, app, "/ws/search", user3, {"query": "shipment", "room_name": "order_55"})
    assert status == 200 and [r["content"] for r in body["data"]["results"]] == ["order shipment delayed"]

    support = bearer("8", roles=["support"])
    status, body = await get(http, app, "/ws/search", support, {"query": "complaint"})
    assert status == 200 and [r["room"] for r in body["data"]["results"]] == ["support_9"]

    status, body = await get(http, app, "/ws/search", user1, {"query": "shipment", "room_name": "order_55"})
    assert status == 403 and error_code(body) == "forbidden"
    status, body = await get(http, app, "/ws/search", user1, {"query": "shipment", "room_name": "user_2_4"})
    assert status == 403 and error_code(body) == "forbidden"
    status, body = await get(http, app, "/ws/search", user1, {"query": "x" * 201})
    assert status == 400 and error_code(body) == "invalid_parameter"
    for empty in ({"query": ""}, {"query": "   "}, {}):
        status, body = await get(http, app, "/ws/search", user1, empty)
        assert status == 400 and error_code(body) == "invalid_parameter", empty
    # SQL-looking input is only ever a search term.
    status, body = await get(http, app, "/ws/search", user1, {"query": "'); DROP TABLE messages; --"})
    assert status == 200 and body["data"]["results"] == []


# ---------------------------------------------------------------------------------------- 5. rooms


async def test_rooms_list_shows_last_message_and_unread_counts_that_follow_mark_read(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """The rooms list shows each joined room's newest message and unread count; mark-read moves the position
    forward only, clamps to the newest id, and refuses malformed bodies."""
    app = await start_node(nodes, pg_schema)
    reader = await connect(url_of(app), "1")
    writer = await connect(url_of(app), "2")
    rooms = ("channel_lobby", "user_1_2")
    for room in rooms:
        await reader.join(room)
        await writer.join(room)
    lobby = [(await writer.say("channel_lobby", f"lobby {i}"))["id"] for i in range(5)]
    direct = [(await writer.say("user_1_2", f"dm {i}"))["id"] for i in range(3)]
    headers = bearer("1")

    async def listed() -> dict[str, dict[str, Any]]:
        status, body = await get(http, app, "/ws/rooms", headers)
        assert status == 200, body
        return {r["room"]: r for r in body["data"]["rooms"]}

    async def both_listed() -> dict[str, dict[str, Any]] | None:
        got = await listed()
        return got if set(rooms) <= set(got) else None

    summary = await poll(both_listed, what="both rooms in the list")
    assert summary["channel_lobby"]["last_message"]["id"] == lobby[-1]
    assert summary["channel_lobby"]["last_message"]["content"] == "lobby 4"
    assert summary["channel_lobby"]["unread_count"] == 5
    assert summary["user_1_2"]["last_message"]["id"] == direct[-1]
    assert summary["user_1_2"]["unread_count"] == 3
    assert summary["user_1_2"]["last_read_id"] is None
    # Newest activity first.
    status, body = await get(http, app, "/ws/rooms", headers)
    assert [r["room"] for r in body["data"]["rooms"]][:2] == ["user_1_2", "channel_lobby"]

    mark = "/ws/rooms/channel_lobby/mark-read"
    status, body = await post(http, app, mark, headers, orjson.dumps({"message_ids": [lobby[2], lobby[1]]}))
    assert status == 200, body
    assert body["data"] == {"room": "channel_lobby", "up_to": lobby[2]}
    summary = await listed()
    assert summary["channel_lobby"]["unread_count"] == 2 and summary["channel_lobby"]["last_read_id"] == lobby[2]
    assert summary["user_1_2"]["unread_count"] == 3

    status, body = await post(http, app, mark, headers, orjson.dumps({"message_ids": [lobby[0]]}))
    assert status == 200 and body["data"]["up_to"] == lobby[2]
    assert (await listed())["channel_lobby"]["unread_count"] == 2

    status, body = await post(http, app, mark, headers, orjson.dumps({"message_ids": [BEYOND_ALL]}))
    assert status == 200 and body["data"]["up_to"] == lobby[-1]
    assert (await listed())["channel_lobby"]["unread_count"] == 0

    for bad in (b"not json", b"[1, 2]", b'"text"', b"{}", b'{"message_ids": "abc"}', b'{"message_ids": []}',
                b'{"message_ids": [1, 2, 3]}', b'{"message_ids": ["1-x"]}', b""):
        status, body = await post(http, app, mark, headers, bad)
        assert status == 400 and error_code(body) == "invalid_parameter", (bad, body)
    status, body = await post(http, app, "/ws/rooms/user_2_3/mark-read", headers,
                              orjson.dumps({"message_ids": [lobby[0]]}))
    assert status == 403 and error_code(body) == "forbidden"

    # The WebSocket port takes no POST body; the position stays where it was.
    before = await listed()
    status_or_none = await post_status(http, app.port, "/ws/rooms/user_1_2/mark-read", headers,
                                       orjson.dumps({"message_ids": [direct[-1]]}))
    assert status_or_none != 200
    assert (await listed())["user_1_2"] == before["user_1_2"]

    # Archived and trimmed out of Redis: the last message and unread count come from PostgreSQL.
    await burst(redis_client, prefix, pg_schema)
    await trim(redis_client, prefix, "user_1_2", BEYOND_ALL)
    await trim(redis_client, prefix, "channel_lobby", lobby[3])
    assert await stream_ids(redis_client, prefix, "user_1_2") == []
    summary = await listed()
    assert summary["user_1_2"]["last_message"]["id"] == direct[-1]
    assert summary["user_1_2"]["last_message"]["content"] == "dm 2"
    assert summary["user_1_2"]["unread_count"] == 3
    status, body = await post(http, app, "/ws/rooms/user_1_2/mark-read", headers,
                              orjson.dumps({"message_ids": [direct[0]]}))
    assert status == 200 and body["data"]["up_to"] == direct[0]
    assert (await listed())["user_1_2"]["unread_count"] == 2
    assert (await listed())["channel_lobby"]["unread_count"] == 0
    await reader.close()
    await writer.close()


# ---------------------------------------------------------------------------------------- 6. receipts


async def test_mark_read_over_websocket_fans_out_read_receipts_across_nodes(
        nodes: NodeFactory, pg_schema: str, pg: asyncpg.Connection) -> None:
    """mark_read answers marked_read and every member, on either node and including the reader's other
    connection, receives read_receipt; the position is copied to PostgreSQL."""
    node_a = await start_node(nodes, pg_schema)
    node_b = await start_node(nodes, pg_schema)
    room = "channel_receipts"
    reader_a = await connect(url_of(node_a), "1")
    reader_b = await connect(url_of(node_b), "1")
    other_b = await connect(url_of(node_b), "2")
    other_a = await connect(url_of(node_a), "3")
    members = (reader_a, reader_b, other_b, other_a)
    for client in members:
        await client.join(room)
    first = await other_b.say(room, "read me")
    second = await other_b.say(room, "and me")

    await reader_a.send({"type": "mark_read", "room": room, "up_to": first["id"], "request_id": "m1"})
    marked = await reader_a.expect("marked_read")
    assert marked == {"type": "marked_read", "room": room, "up_to": first["id"], "request_id": "m1"}
    for client in (reader_b, other_b, other_a):
        receipt = await client.expect("read_receipt")
        assert receipt == {"type": "read_receipt", "room": room, "user_id": "1", "up_to": first["id"]}

    await reader_b.send({"type": "mark_read", "room": room, "message_ids": [second["id"], first["id"]],
                         "request_id": "m2"})
    marked = await reader_b.expect("marked_read", request_id="m2")
    assert marked["up_to"] == second["id"]
    for client in (reader_a, other_b, other_a):
        receipt = await client.expect("read_receipt", up_to=second["id"])
        assert receipt["user_id"] == "1" and receipt["room"] == room

    async def stored() -> Any:
        return await pg.fetchrow("SELECT up_to_ms, up_to_seq FROM read_receipts WHERE room = $1 AND user_id = '1' "
                                 "AND (up_to_ms, up_to_seq) = ($2, $3)", room, *sid(second["id"]))

    await poll(stored, what="the read position in PostgreSQL")
    # Going back is a no-op that answers the current position.
    await reader_a.send({"type": "mark_read", "room": room, "up_to": first["id"], "request_id": "m3"})
    marked = await reader_a.expect("marked_read", request_id="m3")
    assert marked["up_to"] == second["id"]
    # A room the reader may not read is refused; nobody hears of it.
    await reader_a.send({"type": "mark_read", "room": "user_2_3", "up_to": first["id"], "request_id": "m4"})
    refused = await reader_a.expect("error", request_id="m4")
    assert refused["code"] == "forbidden"
    for client in members:
        await client.close()


# ---------------------------------------------------------------------------------------- 7. resume


async def test_resume_older_than_the_redis_window_is_served_from_the_archive(
        nodes: NodeFactory, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """A client away while 50 messages were archived and trimmed gets exactly those 50 from PostgreSQL on
    rejoin; too many to replay, or no PostgreSQL, gives recovered false and no messages."""
    app = await start_node(nodes, pg_schema)
    room = "channel_away"
    reader = await connect(url_of(app), "1")
    writer = await connect(url_of(app), "2")
    joined = await reader.join(room)
    await writer.join(room)
    seen_ack = await writer.say(room, "seen")
    seen = await reader.expect("chat_message", id=seen_ack["id"])
    await reader.close()
    missed = [(await writer.say(room, f"missed {i}"))["id"] for i in range(50)]
    await burst(redis_client, prefix, pg_schema)
    since = {"epoch": joined["epoch"], "last_id": seen["id"]}
    # Trimmed with the newest 10 kept: 40 come from PostgreSQL, 10 from Redis, in one ordered list.
    assert await trim(redis_client, prefix, room, missed[40])
    assert await stream_ids(redis_client, prefix, room) == missed[40:]
    partial = await connect(url_of(app), "1")
    rejoined = await partial.join(room, since=since)
    assert rejoined["recovered"] is True and [m["id"] for m in rejoined["messages"]] == missed
    await partial.close()
    assert await trim(redis_client, prefix, room, BEYOND_ALL)
    assert await redis_client.xlen(Keys(prefix).stream(room)) == 0

    back = await connect(url_of(app), "1")
    rejoined = await back.join(room, since=since)
    assert rejoined["recovered"] is True and rejoined["epoch"] == joined["epoch"]
    assert [m["id"] for m in rejoined["messages"]] == missed
    assert [m["content"] for m in rejoined["messages"]] == [f"missed {i}" for i in range(50)]
    assert all(m["type"] == "chat_message" and m["sender_id"] == "2" for m in rejoined["messages"])
    assert rejoined["last_id"] == missed[-1]
    live = await writer.say(room, "live again")
    assert (await back.expect("chat_message"))["id"] == live["id"]
    await back.close()

    small = await start_node(nodes, pg_schema, **{"rooms.max_replay": 10})
    capped = await connect(url_of(small), "1")
    refused = await capped.join(room, since=since)
    assert refused["recovered"] is False and refused["messages"] == []
    await capped.close()

    blind = await nodes.start(**{"postgres.url": NO_PG_URL})
    assert blind.pool is None
    alone = await connect(url_of(blind), "1")
    refused = await alone.join(room, since=since)
    assert refused["recovered"] is False and refused["messages"] == []
    await alone.close()
    await writer.close()


async def test_resume_from_an_empty_room_position_survives_an_archiver_pass_that_trimmed_nothing(
        nodes: NodeFactory, redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """A client that joined an empty room (last_id 0-0) still recovers every message after an archiver run whose
    hot window trimmed nothing from Redis."""
    app = await start_node(nodes, pg_schema)
    room = "channel_fresh"
    reader = await connect(url_of(app), "1")
    joined = await reader.join(room)
    assert joined["last_id"] == "0-0"
    await reader.close()
    writer = await connect(url_of(app), "2")
    await writer.join(room)
    sent = [(await writer.say(room, f"while away {i}"))["id"] for i in range(5)]
    await burst(redis_client, prefix, pg_schema)
    assert await stream_ids(redis_client, prefix, room) == sent  # the hot window kept everything
    back = await connect(url_of(app), "1")
    rejoined = await back.join(room, since={"epoch": joined["epoch"], "last_id": "0-0"})
    assert rejoined["recovered"] is True and [m["id"] for m in rejoined["messages"]] == sent
    await back.close()
    await writer.close()


async def test_archive_resume_does_not_repeat_a_message_archived_while_the_join_reads(
        nodes: NodeFactory, redis_client: Redis, prefix: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a new message is published and archived between the join's room_open and its archive query (stream
    trimmed empty before), the resume lists that message once, not once from PostgreSQL and again from Redis."""
    app = await start_node(nodes, pg_schema)
    assert app.node is not None
    room = "channel_race"
    reader = await connect(url_of(app), "1")
    joined = await reader.join(room)
    seen = (await reader.say(room, "seen"))["id"]
    await reader.close()
    missed = await xadd_many(redis_client, prefix, room, [f"missed {i}" for i in range(3)])
    await burst(redis_client, prefix, pg_schema)
    assert await trim(redis_client, prefix, room, BEYOND_ALL)
    streams = app.node.streams
    original_open = streams.open_room
    injected: list[str] = []

    async def open_then_race(name: str) -> Any:
        position = await original_open(name)
        if name == room and not injected:  # the interleaving: publish and archive right after room_open
            injected.extend(await xadd_many(redis_client, prefix, room, ["arrived during the join"]))
            await burst(redis_client, prefix, pg_schema)
        return position

    monkeypatch.setattr(streams, "open_room", open_then_race)
    back = await connect(url_of(app), "1")
    rejoined = await back.join(room, since={"epoch": joined["epoch"], "last_id": seen})
    ids = [m["id"] for m in rejoined["messages"]]
    assert rejoined["recovered"] is True
    assert ids == [*missed, *injected], ids
    await back.close()


async def test_history_page_loses_nothing_when_a_trim_lands_between_its_redis_reads(
        nodes: NodeFactory, http: aiohttp.ClientSession, redis_client: Redis, prefix: str, pg_schema: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A trim of archived entries between the page's read of the seam and its read of the hot window leaves no
    gap: the page still lists every id in XRANGE order reversed."""
    app = await start_node(nodes, pg_schema)
    assert app.node is not None
    room = "channel_trimrace"
    original = await xadd_many(redis_client, prefix, room, [f"m{i}" for i in range(120)])
    await burst(redis_client, prefix, pg_schema)
    await trim(redis_client, prefix, room, original[80])
    redis = app.node.history.streams.redis
    original_xrevrange = redis.xrevrange
    key = Keys(prefix).stream(room)
    injected: list[Any] = []

    async def trim_then_xrevrange(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == key and not injected:  # the archiver's periodic trim lands here
            injected.append(await trim(redis_client, prefix, room, original[90]))
        return await original_xrevrange(name, *args, **kwargs)

    monkeypatch.setattr(redis, "xrevrange", trim_then_xrevrange)
    status, body = await request(http, app.api_port, "GET", f"/ws/rooms/{room}/messages", bearer("1"),
                                 {"limit": "100"})
    assert status == 200
    assert [m["id"] for m in body["data"]["messages"]] == original[:19:-1]
