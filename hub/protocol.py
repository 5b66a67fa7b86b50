"""The wire protocol: JSON text frames (orjson). Pure functions, no I/O.

Client frames are validated into small dataclasses here; everything the hub sends is encoded here,
including the WebSocket frame bytes for fan-out (a server frame is unmasked, so one encoding serves
every recipient).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from hub.errors import ClientError, InvalidFrame, InvalidMessage, MessageTooLarge, UnknownType

CLIENT_MESSAGE_TYPES = frozenset({"text", "file", "image", "system"})
# Backend event types delivered from room streams besides chat messages.
EVENT_TYPES = frozenset({
    "order_status_update", "quote_update", "payment_update", "system_notification", "deadline_reminder",
})
_CLIENT_MSG_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
_STREAM_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})", re.ASCII)
_EPOCH = re.compile(r"[0-9a-f]{1,64}", re.ASCII)
MAX_METADATA_BYTES = 4096
# Sealed content starts with this (hub.crypto's envelope format); checked before calling an opener.
ENVELOPE_PREFIX = "enc:"

StreamId = tuple[int, int]


def parse_stream_id(value: str) -> StreamId:
    m = _STREAM_ID.fullmatch(value)
    if m is None:
        raise ValueError(value)
    return int(m.group(1)), int(m.group(2))


def format_stream_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


# ------------------------------------------------------------------ client -> server


@dataclass(frozen=True)
class Since:
    epoch: str
    last_id: StreamId


@dataclass(frozen=True)
class JoinRoom:
    room: Any
    since: Since | None
    history: int


@dataclass(frozen=True)
class LeaveRoom:
    room: Any


@dataclass(frozen=True)
class ChatMessage:
    room: Any
    content: str
    message_type: str
    client_msg_id: str | None
    metadata: bytes | None  # JSON object, already encoded
    sensitive: bool = False  # the sender asks for the content to be sealed at rest


@dataclass(frozen=True)
class Typing:
    room: Any
    is_typing: bool


@dataclass(frozen=True)
class SubscribeUpdates:
    kind: str  # "order" or "quote"
    target_id: Any
    subscribe: bool


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class SetPresence:
    status: str  # "online" or "away"


@dataclass(frozen=True)
class PresenceQuery:
    room: Any


@dataclass(frozen=True)
class NotificationAck:
    ids: list[StreamId]


@dataclass(frozen=True)
class MarkRead:
    room: Any
    up_to: StreamId


@dataclass(frozen=True)
class Refresh:
    token: str  # a newer token for the same user; moves the connection's expiry deadline


ClientFrame = (JoinRoom | LeaveRoom | ChatMessage | Typing | SubscribeUpdates | Ping | MarkRead | SetPresence
               | PresenceQuery | NotificationAck | Refresh)


@dataclass(frozen=True)
class Envelope:
    type: str
    request_id: str | int | None
    frame: ClientFrame


def parse_client_frame(raw: str | bytes, max_content_bytes: int, max_history: int) -> Envelope:
    """Validate one client frame. Raises a :class:`~hub.errors.ClientError` subclass on bad input;
    the error carries ``request_type``/``request_id`` when they could be read."""
    if isinstance(raw, bytes):
        raise InvalidFrame("binary frames are not supported; send JSON text frames")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidFrame("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidFrame("frame must be a JSON object")
    request_id = obj.get("request_id")
    if request_id is not None and not (
        (isinstance(request_id, str) and len(request_id) <= 64)
        or (isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 2**53)
    ):
        request_id = None
    ftype = obj.get("type")
    try:
        if not isinstance(ftype, str):
            raise InvalidFrame("frame needs a string field 'type'")
        parser = _PARSERS.get(ftype)
        if parser is None:
            raise UnknownType(f"unknown frame type {ftype[:40]!r}")
        return Envelope(ftype, request_id, parser(obj, max_content_bytes, max_history))
    except ClientError as exc:
        exc.request_type = ftype if isinstance(ftype, str) and ftype in _PARSERS else None
        exc.request_id = request_id
        raise


def _join(obj: dict[str, Any], _max_content: int, max_history: int) -> JoinRoom:
    since_obj = obj.get("since")
    since = None
    if since_obj is not None:
        if not isinstance(since_obj, dict):
            raise InvalidFrame("since must be an object {epoch, last_id}")
        epoch, last_id = since_obj.get("epoch"), since_obj.get("last_id")
        if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
            raise InvalidFrame("since.epoch must be the epoch string a room_joined frame gave")
        try:
            sid = parse_stream_id(last_id) if isinstance(last_id, str) else None
        except ValueError:
            sid = None
        if sid is None:
            raise InvalidFrame("since.last_id must be a stream id like '1700000000000-0'")
        since = Since(epoch, sid)
    history = obj.get("history", 0)
    if not isinstance(history, int) or isinstance(history, bool) or history < 0:
        raise InvalidFrame("history must be a non-negative integer")
    return JoinRoom(obj.get("room"), since, min(history, max_history))


def _leave(obj: dict[str, Any], _max_content: int, _max_history: int) -> LeaveRoom:
    return LeaveRoom(obj.get("room"))


def _chat(obj: dict[str, Any], max_content: int, _max_history: int) -> ChatMessage:
    content = obj.get("content")
    if not isinstance(content, str):
        raise InvalidMessage("content must be a string")
    if not content:
        raise InvalidMessage("content must not be empty")
    encoded_len = len(content.encode("utf-8", "surrogatepass"))
    if encoded_len > max_content:
        raise MessageTooLarge(f"content is {encoded_len} bytes; the limit is {max_content}")
    if "\x00" in content or _has_lone_surrogate(content):
        raise InvalidMessage("content must be valid Unicode text without NUL characters")
    message_type = obj.get("message_type", "text")
    if message_type not in CLIENT_MESSAGE_TYPES:
        raise InvalidMessage("message_type must be text, file, image or system")
    cmid = obj.get("client_msg_id")
    if cmid is not None and (not isinstance(cmid, str) or not _CLIENT_MSG_ID.fullmatch(cmid)):
        raise InvalidMessage("client_msg_id must be 1-64 of A-Z a-z 0-9 _ . : -")
    metadata = obj.get("metadata")
    meta_bytes = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidMessage("metadata must be a JSON object")
        try:
            meta_bytes = orjson.dumps(metadata)
        except orjson.JSONEncodeError:  # orjson reads 1024 levels but writes only ~255
            raise InvalidMessage("metadata is nested too deeply") from None
        if len(meta_bytes) > MAX_METADATA_BYTES:
            raise InvalidMessage(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    sensitive = obj.get("sensitive", False)
    if not isinstance(sensitive, bool):
        raise InvalidMessage("sensitive must be true or false")
    return ChatMessage(obj.get("room"), content, message_type, cmid, meta_bytes, sensitive)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _typing_start(obj: dict[str, Any], _a: int, _b: int) -> Typing:
    return Typing(obj.get("room"), True)


def _typing_stop(obj: dict[str, Any], _a: int, _b: int) -> Typing:
    return Typing(obj.get("room"), False)


def _subscriber(kind: str, subscribe: bool) -> Any:
    field = f"{kind}_id"

    def parse(obj: dict[str, Any], _a: int, _b: int) -> SubscribeUpdates:
        value = obj.get(field)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InvalidFrame(f"{field} must be an integer")
        return SubscribeUpdates(kind, value, subscribe)

    return parse


def _ping(obj: dict[str, Any], _a: int, _b: int) -> Ping:
    return Ping()


MAX_MARK_IDS = 1000


def parse_read_position(message_ids: Any, up_to: Any) -> StreamId:
    """``up_to`` (a stream id) or the newest of ``message_ids`` (stream ids): the read position."""
    if up_to is None and not (isinstance(message_ids, list) and message_ids):
        raise InvalidFrame("give up_to (a message id) or message_ids (a non-empty list of message ids)")
    return max(parse_id_list(message_ids, up_to))


def _presence(obj: dict[str, Any], _a: int, _b: int) -> SetPresence:
    status = obj.get("status")
    if status not in ("online", "away"):
        raise InvalidFrame('status must be "online" or "away"')
    return SetPresence(status)


def _presence_query(obj: dict[str, Any], _a: int, _b: int) -> PresenceQuery:
    return PresenceQuery(obj.get("room"))


def parse_id_list(value: Any, single: Any = None) -> list[StreamId]:
    """A non-empty list of stream ids (or one id given alone)."""
    values = [single] if single is not None else value
    if not isinstance(values, list) or not values or len(values) > MAX_MARK_IDS:
        raise InvalidFrame(f"give id (a message id) or ids (a list of 1-{MAX_MARK_IDS} message ids)")
    ids = []
    for item in values:
        try:
            ids.append(parse_stream_id(item) if isinstance(item, str) else None)
        except ValueError:
            ids.append(None)
        if ids[-1] is None:
            raise InvalidFrame("message ids are the stream ids messages carry, like '1700000000000-0'")
    return [i for i in ids if i is not None]


def _notification_ack(obj: dict[str, Any], _a: int, _b: int) -> NotificationAck:
    return NotificationAck(parse_id_list(obj.get("ids"), obj.get("id")))


def _mark_read(obj: dict[str, Any], _a: int, _b: int) -> MarkRead:
    return MarkRead(obj.get("room"), parse_read_position(obj.get("message_ids"), obj.get("up_to")))


MAX_TOKEN_CHARS = 8192


def _refresh(obj: dict[str, Any], _a: int, _b: int) -> Refresh:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidFrame("refresh needs a string field 'token'")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidFrame(f"token is longer than {MAX_TOKEN_CHARS} characters")
    return Refresh(token)


_PARSERS: dict[str, Any] = {
    "join_room": _join,
    "leave_room": _leave,
    "chat_message": _chat,
    "typing_start": _typing_start,
    "typing_stop": _typing_stop,
    "subscribe_order_updates": _subscriber("order", True),
    "unsubscribe_order_updates": _subscriber("order", False),
    "subscribe_quote_updates": _subscriber("quote", True),
    "unsubscribe_quote_updates": _subscriber("quote", False),
    "ping": _ping,
    "mark_read": _mark_read,
    "presence": _presence,
    "presence_query": _presence_query,
    "notification_ack": _notification_ack,
    "refresh": _refresh,
}
CLIENT_FRAME_TYPES = frozenset(_PARSERS)


# ------------------------------------------------------------------ server -> client


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame)


def text_frame(payload: bytes) -> bytes:
    """The bytes of one unmasked, unfragmented WebSocket text frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def iso_ms(ms: int) -> str:
    """``ms`` since the epoch as ``2026-11-30T10:00:00.123Z``. Every frame carries one, and most fall in the
    same second as the previous one: the seconds part is formatted once per second."""
    global _iso_second, _iso_prefix
    second, millis = divmod(ms, 1000)
    if second != _iso_second:
        _iso_prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _iso_second = second
    return f"{_iso_prefix}.{millis:03d}Z"


_iso_second = -1
_iso_prefix = ""


def error_frame(code: str, message: str, *, request_type: str | None = None, room: str | None = None,
                request_id: str | int | None = None, retryable: bool = False,
                **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_type is not None:
        frame["request_type"] = request_type
    if room is not None:
        frame["room"] = room
    if request_id is not None:
        frame["request_id"] = request_id
    if retryable:
        frame["retryable"] = True
    frame.update(extra)
    return frame


# ------------------------------------------------------------------ stream entries

# Fields a stream entry may carry (README documents them for backends that XADD directly).
F_TYPE = b"type"
F_SENDER = b"sender_id"
F_CONTENT = b"content"
F_MESSAGE_TYPE = b"message_type"
F_CLIENT_MSG_ID = b"client_msg_id"
F_METADATA = b"metadata"
F_DATA = b"data"
F_CREATED_AT = b"created_at"


def chat_entry_fields(sender_id: str, msg: ChatMessage, created_at_ms: int, content: str) -> list[bytes | str]:
    """Flat field/value list for XADD of a client's chat message (``content`` as it is to be stored:
    the message's own, or its sealed envelope)."""
    fields: list[bytes | str] = [
        "type", "chat_message", "sender_id", sender_id, "content", content,
        "message_type", msg.message_type, "created_at", str(created_at_ms),
    ]
    if msg.client_msg_id is not None:
        fields += ["client_msg_id", msg.client_msg_id]
    if msg.metadata is not None:
        fields += ["metadata", msg.metadata]
    return fields


@dataclass(frozen=True)
class Delivery:
    """One stream entry turned into what members receive."""

    entry_id: StreamId
    frame: dict[str, Any]  # the JSON object (for replays inside room_joined)
    wire: bytes  # the complete WebSocket frame, encoded once for every recipient
    is_chat: bool  # chat (for members) or a backend event (members and update subscribers)


# Opens sealed content: (room, sender_id, created_at_ms, content) -> plaintext.
Opener = Callable[[str, str, int, str], str]


def entry_to_delivery(room: str, entry_id: bytes, fields: dict[bytes, bytes],
                      opener: Opener | None = None) -> Delivery | None:
    """Decode one stream entry, from the hub or a backend's raw XADD. Returns None for entries that
    are not deliverable (unknown type, malformed), which the caller counts and logs; never raises on
    hostile bytes."""
    decoded = entry_to_frame(room, entry_id, fields, opener)
    if decoded is None:
        return None
    sid, frame, is_chat = decoded
    return Delivery(sid, frame, text_frame(orjson.dumps(frame)), is_chat)


def entry_to_frame(room: str, entry_id: bytes, fields: dict[bytes, bytes],
                   opener: Opener | None = None) -> tuple[StreamId, dict[str, Any], bool] | None:
    """The frame a stream entry becomes, or None when it is not deliverable. ``opener`` turns sealed
    content back into plaintext (content that does not start with the envelope prefix is left as is)."""
    sid_text = entry_id.decode("ascii", "replace")
    try:
        sid = parse_stream_id(sid_text)
    except ValueError:
        return None
    etype = _text(fields.get(F_TYPE)) or "chat_message"
    created_ms = _int(fields.get(F_CREATED_AT))
    if created_ms is None or not (0 <= created_ms < 2**47):
        created_ms = sid[0]
    frame: dict[str, Any] = {"type": etype, "room": room, "id": sid_text}
    sender = _text(fields.get(F_SENDER))
    if etype == "chat_message":
        content = _text(fields.get(F_CONTENT))
        if content is None:
            return None
        frame["sender_id"] = sender or "system"
        if opener is not None and content.startswith(ENVELOPE_PREFIX):
            content = opener(room, sender or "", created_ms, content)
        frame["content"] = content
        mtype = _text(fields.get(F_MESSAGE_TYPE)) or "text"
        frame["message_type"] = mtype if mtype in CLIENT_MESSAGE_TYPES else "text"
        frame["created_at"] = iso_ms(created_ms)
        cmid = _text(fields.get(F_CLIENT_MSG_ID))
        if cmid is not None:
            frame["client_msg_id"] = cmid
        meta = _json_object(fields.get(F_METADATA))
        if meta is not None:
            frame["metadata"] = meta
        return sid, frame, True
    if etype not in EVENT_TYPES:
        return None
    if sender is not None:
        frame["sender_id"] = sender
    frame["created_at"] = iso_ms(created_ms)
    data = _json_object(fields.get(F_DATA))
    frame["data"] = data if data is not None else {}
    content = _text(fields.get(F_CONTENT))
    if content is not None:
        frame["content"] = content
    return sid, frame, False


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace")


def _int(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
