"""Text frames served without websockets' parser (hub/wsframes.py): only complete, masked, unfragmented text
frames at a frame boundary; everything else, and everything after it, is left to websockets in order."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import SERVER, Protocol, State
from websockets.server import ServerProtocol

from hub import wsframes
from hub.app import App
from hub.wsframes import at_frame_boundary, serve_text_frames
from tests.conftest import url_of
from tests.helpers import connect


def _masked(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=True, extensions=[])


def _text(payload: str | bytes) -> bytes:
    return _masked(Opcode.TEXT, payload.encode() if isinstance(payload, str) else payload)


def _serve(data: bytes, max_size: int | None = 1 << 20, decline: str | None = None) -> tuple[int, list[str]]:
    served: list[str] = []

    def handler(text: str) -> bool:
        if text == decline:
            return False
        served.append(text)
        return True

    return serve_text_frames(data, handler, max_size), served


def test_complete_text_frames_are_served_and_a_partial_one_is_left() -> None:
    whole = _text("one") + _text("x" * 300)  # a 7-bit and a 16-bit length
    partial = _text("three")[:-2]
    consumed, served = _serve(whole + partial)
    assert served == ["one", "x" * 300]
    assert consumed == len(whole)


@pytest.mark.parametrize("first", [
    _masked(Opcode.PING, b"p"),  # a control frame
    _masked(Opcode.TEXT, b"frag", fin=False),  # the first fragment of a message
    _masked(Opcode.BINARY, b"bin"),
    Frame(Opcode.TEXT, b"plain").serialize(mask=False, extensions=[]),  # unmasked: websockets closes 1002
    _text(b"\xff\xfe"),  # invalid UTF-8: websockets closes 1007
    _text("y" * 70_000),  # a 64-bit length
    _text("z" * 2000),  # over max_size below: websockets closes 1009
], ids=["ping", "fragment", "binary", "unmasked", "bad-utf8", "64-bit-length", "too-big"])
def test_anything_else_stops_the_fast_path_before_it(first: bytes) -> None:
    consumed, served = _serve(_text("before") + first + _text("after"), max_size=1000)
    assert served == ["before"]
    assert consumed == len(_text("before"))


def test_a_declined_message_and_what_follows_are_left_to_websockets() -> None:
    data = _text("a") + _text("join") + _text("b")
    consumed, served = _serve(data, decline="join")
    assert (consumed, served) == (len(_text("a")), ["a"])


@pytest.mark.parametrize("side", ["protocol", "server"])
def test_the_boundary_is_only_between_frames_with_nothing_buffered(side: str) -> None:
    protocol: Protocol = Protocol(SERVER) if side == "protocol" else ServerProtocol(state=State.OPEN)
    assert at_frame_boundary(protocol)
    frame = _text("hello")
    protocol.receive_data(frame[:2])  # the header: the parser is now inside the frame, its buffer empty
    assert not protocol.reader.buffer
    assert not at_frame_boundary(protocol)
    protocol.receive_data(frame[2:])
    assert at_frame_boundary(protocol)
    protocol.receive_data(_masked(Opcode.TEXT, b"frag", fin=False))  # a fragmented message is open
    assert not at_frame_boundary(protocol)
    protocol.receive_data(_masked(Opcode.CONT, b"ment"))
    assert at_frame_boundary(protocol)
    assert [e.data for e in protocol.events_received()] == [b"hello", b"frag", b"ment"]


@pytest.mark.timeout(30)
async def test_mixed_writes_split_anywhere_are_all_served_in_order(node: App) -> None:
    """Chat frames, a ping, a fragmented chat and a join, written as one byte stream cut at awkward places:
    every chat is acked in order and the join served between them; the whole frames that arrive at a frame
    boundary (the first and the last) bypass websockets' parser, the others do not."""
    client = await connect(url_of(node), "1")
    room = "channel_wsframes"
    await client.join(room)

    # (Each frame is serialized once: a frame's mask is drawn anew by every serialization.)
    frames = {n: _text(orjson.dumps({"type": "chat_message", "room": room, "content": f"m{n}", "request_id": f"c{n}"}))
              for n in (0, 1, 2, 4, 5)}
    chat = frames.__getitem__
    fragmented = orjson.dumps({"type": "chat_message", "room": room, "content": "m3", "request_id": "c3"})
    ping = _masked(Opcode.PING, b"hi")
    pieces = [
        chat(0),  # whole, at a boundary: served without websockets
        chat(1)[:2],  # a header alone: websockets now waits inside a frame with nothing buffered
        chat(1)[2:] + ping[:3],  # so this goes to websockets, which keeps the ping's start buffered
        ping[3:] + chat(2) + _masked(Opcode.TEXT, fragmented[:10], fin=False) + _masked(Opcode.CONT, fragmented[10:])
        + _text(orjson.dumps({"type": "join_room", "room": "channel_wsframes_2", "request_id": "j"})) + chat(4)[:-5],
        chat(4)[-5:],
        chat(5),  # whole, at a boundary again
    ]
    served_before = wsframes.frames_served
    for piece in pieces:
        client.ws.transport.write(piece)
        await asyncio.sleep(0.02)  # by design: each piece arrives on its own; noqa: sleep-ok
    acks = [(await client.expect("ack", request_id=f"c{n}"))["request_id"] for n in range(6)]
    assert acks == [f"c{n}" for n in range(6)]
    await client.expect("room_joined", room="channel_wsframes_2")
    got = [(await client.expect("chat_message", content=f"m{n}"))["content"] for n in range(6)]
    assert got == [f"m{n}" for n in range(6)]
    assert wsframes.frames_served - served_before == 2
    assert client.ws.state.name == "OPEN"
