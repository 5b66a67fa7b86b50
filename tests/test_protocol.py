"""The wire protocol: pure parsing and encoding helpers, and hostile frames over real WebSockets.

Every frame a client can send that the hub refuses gets an ``error`` frame with a documented code and
the connection stays open; only a frame over ``server.max_frame_bytes`` closes it (1009)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from hub.app import App
from hub.errors import (
    ERROR_CODES,
    ClientError,
    InvalidFrame,
    InvalidMessage,
    MessageTooLarge,
    UnknownType,
)
from hub.keys import Keys
from hub.protocol import (
    MAX_METADATA_BYTES,
    ChatMessage,
    JoinRoom,
    LeaveRoom,
    Ping,
    Since,
    SubscribeUpdates,
    Typing,
    entry_to_delivery,
    format_stream_id,
    iso_ms,
    parse_client_frame,
    parse_stream_id,
    text_frame,
)
from tests.conftest import NodeFactory, url_of
from tests.helpers import Client, connect

ROOM = "channel_proto"
OTHER = "channel_other"
MAX_CONTENT = 65_536
MAX_HISTORY = 100


def parse(frame: dict[str, Any] | str | bytes, max_content: int = MAX_CONTENT) -> Any:
    raw = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
    return parse_client_frame(raw, max_content, MAX_HISTORY)


def nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


# ====================================================================== text_frame


@pytest.mark.parametrize(("size", "header_len"), [
    (0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (70_000, 10),
])
def test_text_frame_matches_websockets_encoding(size: int, header_len: int) -> None:
    """text_frame produces byte-for-byte the unmasked text frame websockets itself would serialize,
    with the 2/4/10-byte header the payload length calls for."""
    payload = bytes(i % 251 for i in range(size))
    wire = text_frame(payload)
    assert wire == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert len(wire) == header_len + size
    assert wire[header_len:] == payload
    assert wire[0] == 0x81  # FIN + text opcode, no RSV bits


# ====================================================================== parse_stream_id


@pytest.mark.parametrize(("text", "expected"), [
    ("0-0", (0, 0)),
    ("1-0", (1, 0)),
    ("1700000000000-5", (1700000000000, 5)),
    ("18446744073709551615-18446744073709551615", (2**64 - 1, 2**64 - 1)),
])
def test_parse_stream_id_accepts_canonical_ids(text: str, expected: tuple[int, int]) -> None:
    """Canonical Redis stream ids parse to (ms, seq) and format back to the same text."""
    assert parse_stream_id(text) == expected
    assert format_stream_id(parse_stream_id(text)) == text


@pytest.mark.parametrize("text", [
    "", "abc", "1", "1-", "-1", "1-2-3", "01-0", "1-01", "-1-0", " 1-0", "1-0 ", "1-0\n", "1_0", "+1-0",
    "1.5-0", "1-*", "*", "\u0661-\u0660", "1" * 21 + "-0", "0-" + "1" * 21,
])
def test_parse_stream_id_rejects_everything_else(text: str) -> None:
    """Malformed, padded, non-ASCII-digit, leading-zero or over-long ids raise ValueError."""
    with pytest.raises(ValueError):
        parse_stream_id(text)


# ====================================================================== parse_client_frame: accepted


def test_parse_join_defaults_and_history_cap() -> None:
    """join_room defaults to no resume and no history, caps history at max_history and parses since."""
    env = parse({"type": "join_room", "room": ROOM})
    assert env.type == "join_room" and env.request_id is None
    assert env.frame == JoinRoom(ROOM, None, 0)
    assert parse({"type": "join_room", "room": ROOM, "history": 10**12}).frame.history == MAX_HISTORY
    assert parse({"type": "join_room", "room": ROOM, "history": 7}).frame.history == 7
    env = parse({"type": "join_room", "room": ROOM, "since": {"epoch": "ab12", "last_id": "5-1"},
                 "request_id": "r"})
    assert env.frame.since == Since("ab12", (5, 1)) and env.request_id == "r"


def test_parse_chat_defaults_and_metadata_encoding() -> None:
    """chat_message defaults message_type to text and re-encodes metadata compactly."""
    env = parse({"type": "chat_message", "room": ROOM, "content": "hi"})
    assert env.frame == ChatMessage(ROOM, "hi", "text", None, None)
    raw = '{"type":"chat_message","room":"r","content":"x","client_msg_id":"a.b:c-d_1",' \
          '"message_type":"image","metadata":{ "k" : [1, 2] }}'
    frame = parse(raw).frame
    assert frame.message_type == "image" and frame.client_msg_id == "a.b:c-d_1"
    assert frame.metadata == b'{"k":[1,2]}'


def test_parse_other_frame_types() -> None:
    """leave_room, typing, subscriptions (int or str ids) and ping parse into their dataclasses."""
    assert parse({"type": "leave_room", "room": ROOM}).frame == LeaveRoom(ROOM)
    assert parse({"type": "typing_start", "room": ROOM}).frame == Typing(ROOM, True)
    assert parse({"type": "typing_stop", "room": ROOM}).frame == Typing(ROOM, False)
    assert parse({"type": "subscribe_order_updates", "order_id": 5}).frame == SubscribeUpdates("order", 5, True)
    assert parse({"type": "unsubscribe_order_updates", "order_id": "5"}).frame == SubscribeUpdates(
        "order", "5", False)
    assert parse({"type": "subscribe_quote_updates", "quote_id": 9}).frame == SubscribeUpdates("quote", 9, True)
    assert parse({"type": "unsubscribe_quote_updates", "quote_id": 9}).frame == SubscribeUpdates(
        "quote", 9, False)
    assert parse({"type": "ping"}).frame == Ping()


def test_parse_content_limit_counts_utf8_bytes_inclusively() -> None:
    """The content limit is in UTF-8 bytes and content exactly at the limit is accepted."""
    assert parse({"type": "chat_message", "room": ROOM, "content": "\u00e9" * 5}, max_content=10)
    with pytest.raises(MessageTooLarge):
        parse({"type": "chat_message", "room": ROOM, "content": "\u00e9" * 5 + "a"}, max_content=10)


def test_parse_metadata_limit_is_inclusive() -> None:
    """Metadata whose compact encoding is exactly MAX_METADATA_BYTES is accepted; one byte more is not."""
    overhead = len(orjson.dumps({"k": ""}))
    exact = {"k": "x" * (MAX_METADATA_BYTES - overhead)}
    assert len(parse({"type": "chat_message", "room": ROOM, "content": "c", "metadata": exact}).frame.metadata) \
        == MAX_METADATA_BYTES
    over = {"k": "x" * (MAX_METADATA_BYTES - overhead + 1)}
    with pytest.raises(InvalidMessage):
        parse({"type": "chat_message", "room": ROOM, "content": "c", "metadata": over})


@pytest.mark.parametrize(("request_id", "echoed"), [
    ("r-1", "r-1"), ("x" * 64, "x" * 64), ("", ""), (0, 0), (42, 42), (-7, -7), (2**53 - 1, 2**53 - 1),
    ("x" * 65, None), (2**53, None), (1.5, None), (True, None), (None, None), ([1], None), ({"a": 1}, None),
])
def test_parse_request_id_rules(request_id: Any, echoed: Any) -> None:
    """request_id is kept only when it is a string of at most 64 characters or a safe (53-bit) integer."""
    assert parse({"type": "ping", "request_id": request_id}).request_id == echoed


# ====================================================================== parse_client_frame: refused


@pytest.mark.parametrize(("raw", "error", "request_type", "request_id"), [
    (b'{"type":"ping"}', InvalidFrame, None, None),
    ("{", InvalidFrame, None, None),
    ("[]", InvalidFrame, None, None),
    ('"ping"', InvalidFrame, None, None),
    ('{"request_id":"q"}', InvalidFrame, None, "q"),
    ('{"type":7,"request_id":3}', InvalidFrame, None, 3),
    ('{"type":"nope","request_id":"q"}', UnknownType, None, "q"),
    ('{"type":"chat_message","room":"r","request_id":"q"}', InvalidMessage, "chat_message", "q"),
    ('{"type":"join_room","room":"r","history":-1,"request_id":9}', InvalidFrame, "join_room", 9),
    ('{"type":"subscribe_order_updates","order_id":true}', InvalidFrame, "subscribe_order_updates", None),
])
def test_parse_errors_carry_request_type_and_id(raw: str | bytes, error: type[ClientError],
                                                request_type: str | None, request_id: Any) -> None:
    """Refused frames raise the right ClientError carrying request_type (only for known types) and the
    request_id when they could be read."""
    with pytest.raises(error) as info:
        parse(raw)
    assert info.value.request_type == request_type
    assert info.value.request_id == request_id


def test_parse_deeply_nested_json_is_an_invalid_frame() -> None:
    """10,000 nested arrays raise InvalidFrame (orjson's depth limit), not RecursionError."""
    with pytest.raises(InvalidFrame):
        parse(nested_arrays(10_000))
    with pytest.raises(InvalidFrame):
        parse('{"type":"ping","x":' + nested_arrays(10_000) + "}")


def test_parse_deeply_nested_metadata_is_an_invalid_message() -> None:
    """Metadata nested deeper than orjson can re-encode (but shallow enough to decode) raises
    InvalidMessage rather than a stray TypeError."""
    raw = '{"type":"chat_message","room":"r","content":"x","metadata":{"a":' + nested_arrays(300) + "}}"
    with pytest.raises(InvalidMessage):
        parse(raw)


# ====================================================================== entry_to_delivery


def test_entry_to_delivery_full_chat_entry() -> None:
    """A hub-written chat entry becomes a chat_message frame with every field, encoded once as a frame."""
    fields = {
        b"type": b"chat_message", b"sender_id": b"42", b"content": "h\u00e9llo".encode(),
        b"message_type": b"file", b"created_at": b"1700000000123", b"client_msg_id": b"c-1",
        b"metadata": b'{"name":"a.pdf"}',
    }
    d = entry_to_delivery(ROOM, b"1700000000124-3", fields)
    assert d is not None and d.is_chat and d.entry_id == (1700000000124, 3)
    assert d.frame == {
        "type": "chat_message", "room": ROOM, "id": "1700000000124-3", "sender_id": "42",
        "content": "h\u00e9llo", "message_type": "file", "created_at": "2023-11-14T22:13:20.123Z",
        "client_msg_id": "c-1", "metadata": {"name": "a.pdf"},
    }
    payload = orjson.dumps(d.frame)
    assert d.wire == text_frame(payload) and orjson.loads(payload) == d.frame


def test_entry_to_delivery_minimal_raw_xadd_chat() -> None:
    """A backend's bare XADD (content only) is a chat from "system", typed text, timed by its id."""
    d = entry_to_delivery(ROOM, b"1700000000000-0", {b"content": b"hello"})
    assert d is not None and d.is_chat
    assert d.frame == {"type": "chat_message", "room": ROOM, "id": "1700000000000-0", "sender_id": "system",
                       "content": "hello", "message_type": "text", "created_at": iso_ms(1700000000000)}


@pytest.mark.parametrize("created_at", [b"soon", b"-5", b"1e9", b"9" * 19, b"999999999999999", b""])
def test_entry_to_delivery_bad_created_at_falls_back_to_the_id(created_at: bytes) -> None:
    """A garbage, negative, float, over-long or out-of-range created_at is replaced by the id's time."""
    d = entry_to_delivery(ROOM, b"1700000000000-0", {b"content": b"x", b"created_at": created_at})
    assert d is not None and d.frame["created_at"] == "2023-11-14T22:13:20.000Z"


def test_entry_to_delivery_sanitises_hostile_chat_fields() -> None:
    """Unknown message_type becomes text, bad UTF-8 is replaced, non-object metadata is dropped."""
    d = entry_to_delivery(ROOM, b"5-0", {b"content": b"\xff\xfeok", b"message_type": b"video",
                                         b"metadata": b"[1,2]", b"sender_id": b"\xc3"})
    assert d is not None
    assert d.frame["content"] == "\ufffd\ufffdok" and d.frame["sender_id"] == "\ufffd"
    assert d.frame["message_type"] == "text" and "metadata" not in d.frame
    d = entry_to_delivery(ROOM, b"5-0", {b"content": b"x", b"metadata": b"{not json"})
    assert d is not None and "metadata" not in d.frame


def test_entry_to_delivery_typed_event() -> None:
    """A backend event keeps its type, sender, data object and optional content, and is not a chat."""
    fields = {b"type": b"order_status_update", b"sender_id": b"backend", b"data": b'{"status":"paid"}',
              b"content": b"Order paid", b"created_at": b"1700000000000"}
    d = entry_to_delivery("order_7", b"1700000000001-0", fields)
    assert d is not None and not d.is_chat
    assert d.frame == {"type": "order_status_update", "room": "order_7", "id": "1700000000001-0",
                       "sender_id": "backend", "created_at": "2023-11-14T22:13:20.000Z",
                       "data": {"status": "paid"}, "content": "Order paid"}


@pytest.mark.parametrize("data", [None, b"not json", b"[1]", b'"s"', b"null", b"\xff"])
def test_entry_to_delivery_event_with_missing_or_bad_data_gets_empty_object(data: bytes | None) -> None:
    """An event whose data is absent or not a JSON object is delivered with data {} and no sender."""
    fields = {b"type": b"payment_update"}
    if data is not None:
        fields[b"data"] = data
    d = entry_to_delivery("order_7", b"9-9", fields)
    assert d is not None and d.frame["data"] == {} and "sender_id" not in d.frame and "content" not in d.frame


@pytest.mark.parametrize(("entry_id", "fields"), [
    (b"1-0", {b"type": b"launch_missiles", b"content": b"x"}),
    (b"1-0", {b"type": b"typing_start", b"content": b"x"}),
    (b"1-0", {b"type": b"chat_message"}),
    (b"1-0", {}),
    (b"garbage", {b"content": b"x"}),
    (b"1-2-3", {b"content": b"x"}),
    (b"\xff\xfe", {b"content": b"x"}),
])
def test_entry_to_delivery_returns_none_for_undeliverable_entries(entry_id: bytes,
                                                                   fields: dict[bytes, bytes]) -> None:
    """Unknown types, chats without content and malformed ids are not deliverable (None, no exception)."""
    assert entry_to_delivery(ROOM, entry_id, fields) is None


# ====================================================================== hostile frames over WebSockets


async def joined_client(app: App, user_id: str = "1", roles: list[str] | None = None) -> Client:
    client = await connect(url_of(app), user_id, roles=roles)
    await client.join(ROOM)
    return client


async def send_raw(client: Client, raw: str | bytes | dict[str, Any]) -> None:
    await client.ws.send(raw if isinstance(raw, str | bytes) else orjson.dumps(raw).decode())


async def expect_error(client: Client, raw: str | bytes | dict[str, Any], code: str,
                       request_type: str | None = None) -> dict[str, Any]:
    """Send ``raw``; the very next frame must be an error with ``code`` and ``request_type``."""
    await send_raw(client, raw)
    frame = await client.next_frame()
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["code"] in ERROR_CODES
    assert isinstance(frame["message"], str) and frame["message"]
    assert frame.get("request_type") == request_type, frame
    return frame


async def assert_still_serving(client: Client) -> None:
    """ping gets pong on the same connection, and a chat in the joined room is acked and echoed."""
    await client.send({"type": "ping", "request_id": "alive"})
    await client.expect("pong", request_id="alive")
    ack = await client.say(ROOM, "still here")
    echo = await client.expect("chat_message", id=ack["id"])
    assert echo["content"] == "still here"


def chat(**fields: Any) -> dict[str, Any]:
    return {"type": "chat_message", "room": ROOM, "content": "hello", **fields}


def join(**fields: Any) -> dict[str, Any]:
    return {"type": "join_room", "room": OTHER, **fields}


HOSTILE: list[tuple[str, str | bytes | dict[str, Any], str, str | None]] = [
    # (case id, frame, expected code, expected request_type)
    ("not-json-brace", "{", "invalid_frame", None),
    ("not-json-word", "hello", "invalid_frame", None),
    ("empty-text", "", "invalid_frame", None),
    ("trailing-garbage", '{"type":"ping"} x', "invalid_frame", None),
    ("json-array", '[{"type":"ping"}]', "invalid_frame", None),
    ("json-empty-array", "[]", "invalid_frame", None),
    ("json-string", '"ping"', "invalid_frame", None),
    ("json-number", "42", "invalid_frame", None),
    ("json-null", "null", "invalid_frame", None),
    ("json-true", "true", "invalid_frame", None),
    ("binary-json", b'{"type":"ping"}', "invalid_frame", None),
    ("binary-garbage", b"\x00\xff\x81", "invalid_frame", None),
    ("binary-empty", b"", "invalid_frame", None),
    ("missing-type", {"room": ROOM}, "invalid_frame", None),
    ("empty-object", {}, "invalid_frame", None),
    ("type-number", {"type": 5}, "invalid_frame", None),
    ("type-null", {"type": None}, "invalid_frame", None),
    ("type-list", {"type": ["ping"]}, "invalid_frame", None),
    ("type-object", {"type": {"ping": 1}}, "invalid_frame", None),
    ("unknown-type", {"type": "launch_missiles"}, "unknown_type", None),
    ("type-wrong-case", {"type": "PING"}, "unknown_type", None),
    ("type-empty", {"type": ""}, "unknown_type", None),
    ("content-missing", {"type": "chat_message", "room": ROOM}, "invalid_message", "chat_message"),
    ("content-number", chat(content=5), "invalid_message", "chat_message"),
    ("content-null", chat(content=None), "invalid_message", "chat_message"),
    ("content-list", chat(content=["x"]), "invalid_message", "chat_message"),
    ("content-empty", chat(content=""), "invalid_message", "chat_message"),
    ("content-nul", chat(content="a\x00b"), "invalid_message", "chat_message"),
    ("content-lone-surrogate", '{"type":"chat_message","room":"channel_proto","content":"\\ud800"}',
     "invalid_frame", None),
    ("message-type-unknown", chat(message_type="video"), "invalid_message", "chat_message"),
    ("message-type-number", chat(message_type=1), "invalid_message", "chat_message"),
    ("message-type-null", chat(message_type=None), "invalid_message", "chat_message"),
    ("message-type-upper", chat(message_type="TEXT"), "invalid_message", "chat_message"),
    ("client-msg-id-spaces", chat(client_msg_id="has spaces"), "invalid_message", "chat_message"),
    ("client-msg-id-65", chat(client_msg_id="a" * 65), "invalid_message", "chat_message"),
    ("client-msg-id-empty", chat(client_msg_id=""), "invalid_message", "chat_message"),
    ("client-msg-id-number", chat(client_msg_id=5), "invalid_message", "chat_message"),
    ("client-msg-id-unicode", chat(client_msg_id="\u00fcber"), "invalid_message", "chat_message"),
    ("metadata-string", chat(metadata="x"), "invalid_message", "chat_message"),
    ("metadata-list", chat(metadata=[1]), "invalid_message", "chat_message"),
    ("metadata-number", chat(metadata=5), "invalid_message", "chat_message"),
    ("metadata-too-big", chat(metadata={"k": "x" * MAX_METADATA_BYTES}), "invalid_message", "chat_message"),
    ("metadata-too-deep",
     '{"type":"chat_message","room":"channel_proto","content":"x","metadata":{"a":' + nested_arrays(300) + "}}",
     "invalid_message", "chat_message"),
    ("system-from-user", chat(message_type="system"), "forbidden", "chat_message"),
    ("since-string", join(since="abc"), "invalid_frame", "join_room"),
    ("since-list", join(since=["e", "1-0"]), "invalid_frame", "join_room"),
    ("since-empty-object", join(since={}), "invalid_frame", "join_room"),
    ("since-epoch-missing", join(since={"last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-epoch-not-hex", join(since={"epoch": "xyz!", "last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-epoch-upper", join(since={"epoch": "ABCD", "last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-epoch-empty", join(since={"epoch": "", "last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-epoch-65", join(since={"epoch": "a" * 65, "last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-epoch-number", join(since={"epoch": 12, "last_id": "1-0"}), "invalid_frame", "join_room"),
    ("since-last-id-abc", join(since={"epoch": "ab", "last_id": "abc"}), "invalid_frame", "join_room"),
    ("since-last-id-1-2-3", join(since={"epoch": "ab", "last_id": "1-2-3"}), "invalid_frame", "join_room"),
    ("since-last-id-number", join(since={"epoch": "ab", "last_id": 5}), "invalid_frame", "join_room"),
    ("since-last-id-missing", join(since={"epoch": "ab"}), "invalid_frame", "join_room"),
    ("history-negative", join(history=-1), "invalid_frame", "join_room"),
    ("history-string", join(history="5"), "invalid_frame", "join_room"),
    ("history-bool", join(history=True), "invalid_frame", "join_room"),
    ("history-float", join(history=1.5), "invalid_frame", "join_room"),
    ("history-huge-int", '{"type":"join_room","room":"channel_other","history":' + "9" * 40 + "}",
     "invalid_frame", "join_room"),
    ("history-overflow", '{"type":"join_room","room":"channel_other","history":' + "9" * 400 + "}",
     "invalid_frame", None),
    ("order-id-true", {"type": "subscribe_order_updates", "order_id": True}, "invalid_frame",
     "subscribe_order_updates"),
    ("order-id-float", {"type": "subscribe_order_updates", "order_id": 1.5}, "invalid_frame",
     "subscribe_order_updates"),
    ("order-id-list", {"type": "subscribe_order_updates", "order_id": [1]}, "invalid_frame",
     "subscribe_order_updates"),
    ("order-id-missing", {"type": "subscribe_order_updates"}, "invalid_frame", "subscribe_order_updates"),
    ("order-id-huge", '{"type":"subscribe_order_updates","order_id":' + "1" * 30 + "}", "invalid_frame",
     "subscribe_order_updates"),
    ("order-id-u64", {"type": "subscribe_order_updates", "order_id": 2**63}, "invalid_room",
     "subscribe_order_updates"),
    ("quote-id-false", {"type": "unsubscribe_quote_updates", "quote_id": False}, "invalid_frame",
     "unsubscribe_quote_updates"),
    ("nested-10000", nested_arrays(10_000), "invalid_frame", None),
    ("nested-10000-in-object", '{"type":"ping","x":' + nested_arrays(10_000) + "}", "invalid_frame", None),
    ("nested-objects-5000", '{"a":' * 5000 + "1" + "}" * 5000, "invalid_frame", None),
    ("float-infinity", '{"type":"ping","x":1e999}', "invalid_frame", None),
]


@pytest.mark.parametrize(("raw", "code", "request_type"), [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
async def test_hostile_frame_gets_error_and_connection_stays_open(
        node: App, raw: str | bytes | dict[str, Any], code: str, request_type: str | None) -> None:
    """Each hostile frame is answered with an error frame carrying the documented code (and the
    request_type when the type was known), and the connection keeps serving pings and chats."""
    client = await joined_client(node)
    await expect_error(client, raw, code, request_type)
    await assert_still_serving(client)
    await client.close()


async def test_many_hostile_frames_on_one_connection(node: App) -> None:
    """One connection survives every hostile frame in turn, each answered in order."""
    client = await joined_client(node)
    for _case_id, raw, code, request_type in HOSTILE:
        await expect_error(client, raw, code, request_type)
    await assert_still_serving(client)
    await client.close()


async def test_unknown_type_message_echoes_at_most_40_characters(node: App) -> None:
    """An unknown type is named in the error, truncated to 40 characters, and request_type is absent."""
    client = await joined_client(node)
    frame = await expect_error(client, {"type": "Z" * 5000}, "unknown_type")
    assert "Z" * 40 in frame["message"] and "Z" * 41 not in frame["message"]
    assert len(frame["message"]) < 200
    await assert_still_serving(client)


async def test_chat_over_max_content_bytes_is_refused_and_not_stored(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """Content over server.max_content_bytes (in UTF-8 bytes) gets message_too_large and appends nothing;
    content exactly at the limit is stored."""
    app = await nodes.start(**{"server.max_content_bytes": 1000})
    stream = Keys(prefix).stream(ROOM)
    client = await joined_client(app)
    await expect_error(client, chat(content="a" * 1001, request_id="big"), "message_too_large", "chat_message")
    frame = await expect_error(client, chat(content="\u00e9" * 501), "message_too_large", "chat_message")
    assert "1002" in frame["message"] and "1000" in frame["message"]
    assert await redis_client.xlen(stream) == 0
    ack = await client.say(ROOM, "\u00e9" * 500)
    assert await redis_client.xlen(stream) == 1
    echo = await client.expect("chat_message", id=ack["id"])
    assert echo["content"] == "\u00e9" * 500
    await client.say(ROOM, "a" * 1000)
    assert await redis_client.xlen(stream) == 2
    await assert_still_serving(client)


async def test_refused_chats_store_nothing(node: App, redis_client: Redis, prefix: str) -> None:
    """None of the refused chat_message frames appends to the room stream."""
    client = await joined_client(node)
    for _case_id, raw, code, request_type in HOSTILE:
        if request_type == "chat_message":
            await expect_error(client, raw, code, request_type)
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 0


async def test_system_messages_need_support_or_admin(node: App, redis_client: Redis, prefix: str) -> None:
    """message_type system is forbidden for ordinary users (nothing stored) and accepted from support and
    admin."""
    user = await joined_client(node, "1")
    frame = await expect_error(user, chat(message_type="system", request_id="s1"), "forbidden", "chat_message")
    assert frame["room"] == ROOM and frame["request_id"] == "s1"
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 0
    for user_id, role in (("2", "support"), ("3", "admin")):
        staff = await joined_client(node, user_id, roles=[role])
        ack = await staff.say(ROOM, f"from {role}", message_type="system")
        echo = await staff.expect("chat_message", id=ack["id"])
        assert echo["message_type"] == "system" and echo["sender_id"] == user_id
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 2
    await assert_still_serving(user)


async def test_frame_over_max_frame_bytes_closes_with_1009_and_node_keeps_serving(nodes: NodeFactory) -> None:
    """A frame bigger than server.max_frame_bytes closes that connection with 1009; a frame just under
    it is an ordinary error, and other clients of the node are unaffected."""
    app = await nodes.start(**{"server.max_frame_bytes": 4096, "server.max_content_bytes": 1000})
    bystander = await joined_client(app, "2")
    victim = await joined_client(app, "1")
    under = orjson.dumps(chat(content="a" * 3900)).decode()
    assert len(under) < 4096
    await expect_error(victim, under, "message_too_large", "chat_message")
    await victim.ws.send(orjson.dumps(chat(content="a" * 5000)).decode())
    with pytest.raises(ConnectionClosed):
        while True:
            await victim.recv()
    assert victim.ws.close_code == 1009
    await assert_still_serving(bystander)
    newcomer = await joined_client(app, "3")
    await assert_still_serving(newcomer)


@pytest.mark.parametrize("request_id", ["req-1", 17, "x" * 64, 0, -5])
async def test_request_id_is_echoed_everywhere(node: App, request_id: str | int) -> None:
    """A string (<= 64 chars) or integer request_id comes back on pong, room_joined, ack, room_left and on
    error frames from parsing and from dispatch."""
    client = await connect(url_of(node), "1")
    await client.send({"type": "ping", "request_id": request_id})
    pong = await client.next_frame()
    assert pong["type"] == "pong" and "server_time" in pong and pong["request_id"] == request_id
    await client.send({"type": "join_room", "room": ROOM, "request_id": request_id})
    joined = await client.next_frame()
    assert joined["type"] == "room_joined" and joined["request_id"] == request_id
    await client.send({**chat(), "request_id": request_id})
    ack = await client.expect("ack")
    assert ack["request_id"] == request_id
    await client.expect("chat_message", id=ack["id"])
    for raw, code in (({"request_id": request_id}, "invalid_frame"),
                      ({"type": "nope", "request_id": request_id}, "unknown_type"),
                      (chat(content="", request_id=request_id), "invalid_message"),
                      (join(history=-1, request_id=request_id), "invalid_frame"),
                      ({"type": "chat_message", "room": OTHER, "content": "x", "request_id": request_id},
                       "not_joined"),
                      ({"type": "join_room", "room": "bad room", "request_id": request_id}, "invalid_room")):
        await send_raw(client, raw)
        err = await client.next_frame()
        assert err["type"] == "error" and err["code"] == code and err["request_id"] == request_id, err
    await client.send({"type": "leave_room", "room": ROOM, "request_id": request_id})
    left = await client.next_frame()
    assert left == {"type": "room_left", "room": ROOM, "reason": "left", "request_id": request_id}


@pytest.mark.parametrize("raw_request_id", ['"' + "x" * 65 + '"', "1.5", "true", "null", "[1]", '{"a":1}',
                                            str(2**53), "1" * 30])
async def test_invalid_request_id_is_not_echoed(node: App, raw_request_id: str) -> None:
    """A request_id that is too long, a float, a bool, a container or an unsafe integer is dropped from
    pong, room_joined, ack, room_left and error frames, and the frame is still served."""
    client = await connect(url_of(node), "1")
    rid = ',"request_id":' + raw_request_id + "}"
    for raw, expected in (
        ('{"type":"ping"' + rid, "pong"),
        ('{"type":"join_room","room":"channel_proto"' + rid, "room_joined"),
        ('{"type":"chat_message","room":"channel_proto","content":"x"' + rid, "ack"),
        ('{"type":"chat_message","room":"channel_proto","content":""' + rid, "error"),
        ('{"type":"nope"' + rid, "error"),
        ('{"type":"leave_room","room":"channel_proto"' + rid, "room_left"),
    ):
        await send_raw(client, raw)
        frame = await client.expect(expected)
        assert "request_id" not in frame, frame
    await client.close()


async def test_burst_of_mixed_garbage_is_answered_in_order(node: App) -> None:
    """500 mixed hostile frames and pings sent back to back are all answered, one each, in order, and the
    connection still serves afterwards."""
    client = await joined_client(node)
    kinds: list[tuple[Any, str, str | None]] = [
        (lambda i: "{", "invalid_frame", None),
        (lambda i: f'[{i}]', "invalid_frame", None),
        (lambda i: b"\x00binary", "invalid_frame", None),
        (lambda i: {"type": f"bogus{i}", "request_id": i}, "unknown_type", "rid"),
        (lambda i: chat(content="", request_id=i), "invalid_message", "rid"),
        (lambda i: join(since="abc", request_id=i), "invalid_frame", "rid"),
        (lambda i: {"type": "chat_message", "room": OTHER, "content": "x", "request_id": i}, "not_joined", "rid"),
        (lambda i: {"type": "ping", "request_id": i}, "pong", "rid"),
        (lambda i: nested_arrays(2000), "invalid_frame", None),
        (lambda i: {"type": "subscribe_order_updates", "order_id": [i], "request_id": f"s{i}"}, "invalid_frame",
         "srid"),
    ]
    plan = [(i, *kinds[i % len(kinds)]) for i in range(500)]
    for i, make, _expected, _rid in plan:
        await send_raw(client, make(i))
    for i, _make, expected, rid in plan:
        frame = await client.next_frame()
        if expected == "pong":
            assert frame["type"] == "pong", (i, frame)
        else:
            assert frame["type"] == "error" and frame["code"] == expected, (i, frame)
        if rid == "rid":
            assert frame["request_id"] == i, (i, frame)
        elif rid == "srid":
            assert frame["request_id"] == f"s{i}", (i, frame)
        else:
            assert "request_id" not in frame, (i, frame)
    await assert_still_serving(client)
    assert node.node is not None and node.node.metrics.frames_received >= 500


async def test_a_fragmented_message_is_reassembled_and_handled(node: App) -> None:
    """A chat message sent as three WebSocket fragments (continuation frames) is one message."""
    client = await connect(url_of(node), "frag")
    await client.join("channel_fragments")
    frame = orjson.dumps({"type": "chat_message", "room": "channel_fragments", "content": "in three parts"}).decode()
    await client.ws.send([frame[:10], frame[10:25], frame[25:]])
    ack = await client.expect("ack")
    echo = await client.expect("chat_message")
    assert echo["content"] == "in three parts" and echo["id"] == ack["id"]
