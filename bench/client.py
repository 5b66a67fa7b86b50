"""One lean load-generating connection: websockets' sans-I/O client protocol on an asyncio transport.

No task, queue or keepalive timer per connection (websockets' asyncio client has all three): bytes arrive
in :meth:`LoadClient.data_received`, frames are decoded with orjson and handed to a :class:`Listener`
synchronously, and protocol pings are answered by the sans-I/O layer itself. Compression is off (no
extension is offered). This keeps the generator's cost per received message to a few microseconds, so it
is not the bottleneck at the loads the scenarios ask for (``hubctl bench calibrate`` measures its ceiling).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol, cast

import orjson
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

# Frames larger than this close the connection (the hub's own limit is 1 MiB).
MAX_FRAME_BYTES = 4 * 1024 * 1024


class Listener(Protocol):
    """Receives what connections read. Called synchronously from the event loop's read callbacks."""

    def chat(self, client: LoadClient, frame: dict[str, Any], received_at: float) -> None: ...

    def ack(self, client: LoadClient, frame: dict[str, Any], received_at: float) -> None: ...

    def other(self, client: LoadClient, frame: dict[str, Any]) -> None: ...

    def closed(self, client: LoadClient, code: int | None) -> None: ...


class HandshakeRefused(Exception):
    """The hub answered the WebSocket upgrade with an HTTP error (401 bad token, 429 limits, ...)."""


class LoadClient(asyncio.Protocol):
    """One authenticated connection. ``established`` resolves on the hub's ``connection_established``."""

    def __init__(self, conn_id: int, url: str, listener: Listener) -> None:
        self.id = conn_id
        self._ws = ClientProtocol(parse_uri(url), max_size=MAX_FRAME_BYTES)
        self._listener = listener
        loop = asyncio.get_running_loop()
        # Set by connection_made; None before the TCP connect completes and after connection_lost.
        self._transport: asyncio.Transport | None = None
        # Resolved by the connection_established frame; failed by a refused handshake or an early close.
        self.established: asyncio.Future[None] = loop.create_future()
        # Resolved by connection_lost: close_all() waits on it.
        self.lost: asyncio.Future[None] = loop.create_future()
        # Rooms this connection asked to join -> resolved by room_joined, failed by an error frame for it.
        self._joins: dict[str, asyncio.Future[None]] = {}
        # True from connection_established until the connection closes.
        self.open = False
        # Close code the hub sent (None: no close frame, the TCP connection just ended).
        self.close_code: int | None = None
        # Sequence number of this connection's next publish (bench.load.Publisher reads it).
        self.seq = 0
        # Delivery tracking per publisher id: [highest seq seen, set of seqs seen] (bench.stats.Tracker).
        self.streams: dict[int, tuple[list[int], set[int]]] = {}
        # True for connections that publish: a disconnect of one is counted apart.
        self.is_publisher = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._ws.send_request(self._ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        ws = self._ws
        ws.receive_data(data)
        received_at = time.perf_counter()
        for event in ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self._on_text(event.data, received_at)
            elif isinstance(event, Response):
                self._on_response()
        self._flush()

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        was_open = self.open
        self.open = False
        self.close_code = self._ws.close_rcvd.code if self._ws.close_rcvd is not None else None
        error = ConnectionError(f"connection closed (code {self.close_code})")
        if not self.established.done():
            self.established.set_exception(error)
        for waiter in self._joins.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._joins.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        if was_open:
            self._listener.closed(self, self.close_code)

    # ---------------------------------------------------------------- frames

    def _on_response(self) -> None:
        exc = self._ws.handshake_exc
        if exc is None or self.established.done():
            return
        if isinstance(exc, InvalidStatus):
            self.established.set_exception(HandshakeRefused(f"HTTP {exc.response.status_code}"))
        else:
            self.established.set_exception(HandshakeRefused(f"handshake failed: {exc}"))

    def _on_text(self, data: bytes | bytearray | memoryview, received_at: float) -> None:
        frame = orjson.loads(data)
        ftype = frame.get("type")
        if ftype == "chat_message":
            self._listener.chat(self, frame, received_at)
        elif ftype == "ack":
            self._listener.ack(self, frame, received_at)
        elif ftype == "room_joined":
            waiter = self._joins.pop(frame.get("room"), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif ftype == "connection_established":
            self.open = True
            if not self.established.done():
                self.established.set_result(None)
        else:
            if ftype == "error" and frame.get("request_type") == "join_room":
                waiter = self._joins.pop(frame.get("room"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(RuntimeError(f"join refused: {frame.get('code')}"))
            self._listener.other(self, frame)

    # ---------------------------------------------------------------- sending

    def send(self, frame: dict[str, Any]) -> bool:
        """Queue one JSON text frame; False when the connection is not open (nothing sent)."""
        if self._transport is None or self._ws.state is not State.OPEN:
            return False
        self._ws.send_text(orjson.dumps(frame))
        self._flush()
        return True

    async def join(self, room: str, timeout_s: float) -> None:
        """Join ``room`` and wait for its room_joined (the hub requires it before publishing)."""
        waiter = asyncio.get_running_loop().create_future()
        self._joins[room] = waiter
        if not self.send({"type": "join_room", "room": room}):
            self._joins.pop(room, None)
            raise ConnectionError("connection closed before join")
        async with asyncio.timeout(timeout_s):
            await waiter

    def close(self) -> None:
        """Start the closing handshake (code 1000); ``lost`` resolves when the hub has closed TCP."""
        if self._transport is not None and self._ws.state is State.OPEN:
            self._ws.send_close(1000)
            self._flush()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for data in self._ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()


async def open_client(conn_id: int, host: str, port: int, path: str, listener: Listener,
                      timeout_s: float) -> LoadClient:
    """Connect, upgrade and wait for ``connection_established``; aborts the socket on any failure."""
    loop = asyncio.get_running_loop()
    client = LoadClient(conn_id, f"ws://{host}:{port}{path}", listener)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: client, host, port)
            await client.established
    except BaseException:
        client.abort()
        raise
    return client


async def close_all(clients: list[LoadClient], timeout_s: float) -> None:
    """Close every connection with a closing handshake; abort those not closed within ``timeout_s``."""
    for client in clients:
        client.close()
    pending = [client.lost for client in clients if not client.lost.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)
    for client in clients:
        if not client.lost.done():
            client.abort()
