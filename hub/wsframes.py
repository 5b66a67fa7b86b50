"""Received WebSocket text frames served without websockets' frame parser, on the hot path.

websockets parses every received frame with generator-based coroutines (a reader generator, an enum lookup per
opcode, a Frame object, an event list, a queue), which costs about as much CPU as the rest of a chat publish.
A client's chat frames are the simplest kind: complete, unfragmented, masked text frames. While websockets'
parser waits at a frame boundary with nothing buffered, :func:`serve_text_frames` reads such frames off the
received bytes itself and hands their text to the session's handler; at the first frame that is anything else
(a control frame, a fragment, a compressed or oversized frame, invalid UTF-8, a partial frame, a message the
handler declines) it stops, and that frame and everything after it go to websockets, which then sees exactly
the bytes it would have seen next. Errors are websockets' to report: nothing here closes a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask  # websockets' C unmasking
except ImportError:  # pragma: no cover - a websockets built without its C extension
    from websockets.utils import apply_mask

_FIN_TEXT = 0x81  # FIN set, no RSV bits (no extension data), opcode 1 (text)
_AT_EOF_CODE = StreamReader.at_eof.__code__
_PARSE_CODE = Protocol.parse.__code__

# Frames served here since the process started (for tests; websockets parsed the others).
frames_served = 0


def at_frame_boundary(protocol: Protocol) -> bool:
    """Whether websockets' parser waits for the first byte of a frame, with nothing buffered and no fragmented
    message open: only then may received bytes bypass it. (Its parser coroutine is suspended at the top of its
    loop, in ``reader.at_eof()``, between frames; anywhere else it is inside a frame.)"""
    if protocol.state is not State.OPEN or protocol.current_size is not None or protocol.extensions \
            or protocol.reader.buffer:
        return False
    # The parser is a chain of generators (a server's handshake parser delegates to the frame parser), each
    # suspended in a ``yield from`` of the next; the innermost is at_eof, called straight from Protocol.parse.
    outer: Any = None
    inner: Any = protocol.parser
    for _ in range(4):
        delegate = getattr(inner, "gi_yieldfrom", None)
        if delegate is None:
            break
        outer, inner = inner, delegate
    return getattr(inner, "gi_code", None) is _AT_EOF_CODE and getattr(outer, "gi_code", None) is _PARSE_CODE


def serve_text_frames(data: bytes, handler: Callable[[str], bool], max_size: int | None) -> int:
    """Hand the text of each complete masked text frame at the start of ``data`` to ``handler`` while it
    serves them (returns True). Returns how many bytes were consumed: the rest is websockets' to parse."""
    global frames_served
    consumed = served = 0
    size = len(data)
    while size - consumed >= 6:
        if data[consumed] != _FIN_TEXT:
            break
        second = data[consumed + 1]
        if not second & 0x80:  # an unmasked client frame: websockets closes with 1002
            break
        length = second & 0x7F
        if length < 126:
            header = 6
        elif length == 126 and size - consumed >= 8:
            length = int.from_bytes(data[consumed + 2:consumed + 4], "big")
            header = 8
        else:
            break  # 64-bit lengths (beyond 64 KiB) and partial headers
        if max_size is not None and length > max_size:
            break  # websockets closes with 1009
        end = consumed + header + length
        if end > size:
            break  # the frame's end has not arrived yet
        payload = apply_mask(data[consumed + header:end], data[consumed + header - 4:consumed + header])
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            break  # websockets closes with 1007
        if not handler(text):
            break
        consumed = end
        served += 1
    frames_served += served
    return consumed
