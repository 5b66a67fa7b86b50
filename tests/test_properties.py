"""Property-based tests (hypothesis) of the parsers that face hostile input: client frames, room
names, stream ids. Whatever the input, the answer is a value or a documented client error."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.errors import ClientError, InvalidRoom
from hub.protocol import CLIENT_FRAME_TYPES, format_stream_id, iso_ms, parse_client_frame, parse_stream_id
from hub.rooms import RoomKind, parse_room

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_or_text_parse_or_fail_with_a_client_error(raw: bytes | str) -> None:
    """Arbitrary frames never raise anything but a ClientError with a stable code."""
    try:
        parse_client_frame(raw, 1000, 100)
    except ClientError as exc:
        assert exc.code in {"invalid_frame", "unknown_type", "invalid_message", "message_too_large",
                            "invalid_room"}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CLIENT_FRAME_TYPES)), st.dictionaries(
    st.sampled_from(["room", "content", "message_type", "client_msg_id", "metadata", "since", "history",
                     "order_id", "quote_id", "status", "up_to", "message_ids", "id", "ids", "request_id",
                     "sensitive"]), JSON, max_size=6))
def test_every_frame_type_with_arbitrary_fields_parses_or_fails_cleanly(ftype: str, fields: dict[str, object]) -> None:
    """Known frame types with arbitrary field values give a parsed frame or a ClientError naming the type."""
    raw = json.dumps({"type": ftype, **fields})  # stdlib: also writes integers beyond 64 bits
    try:
        envelope = parse_client_frame(raw, 1000, 100)
    except ClientError as exc:
        # The type is named, unless the frame as a whole was unreadable (orjson refuses >64-bit ints).
        assert exc.request_type == ftype or exc.code == "invalid_frame"
    else:
        assert envelope.type == ftype


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200) | st.integers() | st.none())
def test_room_names_are_canonical_or_refused(value: object) -> None:
    """A room name either parses to a canonical name equal to the input, or is refused with InvalidRoom."""
    try:
        room = parse_room(value)
    except InvalidRoom:
        return
    assert room.name == value
    if room.kind is RoomKind.DIRECT:
        assert room.ids[0] < room.ids[1]
    assert parse_room(room.name) == room


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=10**15), st.integers(min_value=1, max_value=10**15))
def test_direct_rooms_accept_only_the_canonical_order(a: int, b: int) -> None:
    """user_{a}_{b} is valid exactly when a < b."""
    name = f"user_{a}_{b}"
    try:
        parse_room(name)
        assert a < b
    except InvalidRoom:
        assert a >= b


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_stream_ids_parse_canonically_or_are_refused(value: str) -> None:
    """A stream id parses only when it is canonical ms-seq, and formats back to the same text."""
    try:
        sid = parse_stream_id(value)
    except ValueError:
        return
    assert format_stream_id(sid) == value


@given(st.integers(min_value=0, max_value=2**63), st.integers(min_value=0, max_value=2**63))
def test_stream_ids_round_trip(ms: int, seq: int) -> None:
    """Every (ms, seq) formats and parses back unchanged."""
    assert parse_stream_id(format_stream_id((ms, seq))) == (ms, seq)


@given(st.lists(st.integers(min_value=0, max_value=4_102_444_800_000), min_size=1, max_size=20))
def test_iso_ms_formats_every_instant_exactly(instants: list[int]) -> None:
    """iso_ms caches the formatted second: any sequence of instants (same second or not) formats exactly."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for ms in instants:
        expected = (epoch + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert iso_ms(ms) == expected
