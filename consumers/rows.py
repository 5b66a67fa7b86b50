"""Stream entries -> message rows (pure). An entry that cannot become a row gets a reason instead,
so the archiver can dead-letter it without blocking its batch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from hub.protocol import CLIENT_MESSAGE_TYPES, EVENT_TYPES, parse_stream_id

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Column order of messages_staging for COPY.
COLUMNS = ("room", "epoch", "stream_ms", "stream_seq", "stream_ts", "type", "sender_id", "content",
           "message_type", "client_msg_id", "metadata", "data", "created_at")


@dataclass(frozen=True)
class Poison:
    reason: str


Row = tuple[Any, ...]


_STORED_FIELDS = (b"type", b"sender_id", b"content", b"message_type", b"client_msg_id", b"metadata", b"data",
                  b"created_at")


def entry_to_row(room: str, epoch: str, entry_id: bytes, fields: dict[bytes, bytes],
                 max_entry_bytes: int) -> Row | Poison:
    """The ``messages`` row for one stream entry, or why it cannot be stored. Fields the hub does not
    store are ignored; the stored ones must be UTF-8 without NUL (PostgreSQL text refuses NUL)."""
    try:
        ms, seq = parse_stream_id(entry_id.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return Poison("malformed stream id")
    size = sum(map(len, fields)) + sum(map(len, fields.values()))
    if size > max_entry_bytes:
        return Poison(f"entry is {size} bytes, over archiver.max_entry_bytes={max_entry_bytes}")
    text: dict[bytes, str] = {}
    for name in _STORED_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if b"\x00" in value:
            return Poison(f"field {name.decode()!r} contains a NUL byte")
        try:
            text[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            return Poison(f"field {name.decode()!r} is not valid UTF-8")
    etype = text.get(b"type") or "chat_message"
    if etype != "chat_message" and etype not in EVENT_TYPES:
        return Poison(f"unknown type {etype[:40]!r}")
    content = text.get(b"content")
    if etype == "chat_message" and content is None:
        return Poison("chat_message without content")
    message_type = text.get(b"message_type")
    if message_type is not None and message_type not in CLIENT_MESSAGE_TYPES:
        return Poison(f"unknown message_type {message_type[:40]!r}")
    metadata = _json_object(text.get(b"metadata"))
    if isinstance(metadata, Poison):
        return Poison(f"metadata: {metadata.reason}")
    data = _json_object(text.get(b"data"))
    if isinstance(data, Poison):
        return Poison(f"data: {data.reason}")
    stream_ts = _EPOCH + timedelta(milliseconds=ms)
    created_at = stream_ts
    created_text = text.get(b"created_at")
    if created_text is not None and created_text.isdigit() and len(created_text) <= 15:
        # Exact milliseconds (no float): sealed content's AAD includes this value.
        created_at = _EPOCH + timedelta(milliseconds=int(created_text))
    return (room, epoch, ms, seq, stream_ts, etype, text.get(b"sender_id"), content,
            (message_type or "text") if etype == "chat_message" else message_type,
            text.get(b"client_msg_id"), metadata, data, created_at)


def _json_object(value: str | None) -> str | Poison | None:
    """The JSON text for a jsonb column (validated as an object), None when absent."""
    if value is None:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return Poison("not valid JSON")
    if not isinstance(parsed, dict):
        return Poison("not a JSON object")
    if "\\u0000" in value:
        return Poison("contains a NUL character")
    return value
