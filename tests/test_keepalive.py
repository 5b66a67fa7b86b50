"""The node-wide keepalive: quiet connections are pinged, silent ones are closed with 1011, live ones stay."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

from tests.conftest import NodeFactory, url_of
from tests.helpers import connect, mint, wait_until

FAST_KEEPALIVE = {"server.ping_interval_s": 0.3, "server.ping_timeout_s": 0.3}


async def _raw_upgrade(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake and then never writes a byte (it never
    answers a ping): what a peer behind a dead NAT mapping looks like to the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws/connect?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


async def test_a_peer_that_never_answers_pings_is_pinged_then_closed_with_1011(nodes: NodeFactory) -> None:
    app = await nodes.start(**FAST_KEEPALIVE)
    reader, writer = await _raw_upgrade(app.port, mint("silent-peer"))
    try:
        opcodes: list[int] = []
        close_payload = b""
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await _read_frame(reader)
                opcodes.append(opcode)
                if opcode == 0x8:
                    close_payload = payload
                    break
        assert opcodes[0] == 0x1  # connection_established
        assert 0x9 in opcodes, opcodes  # pinged before being given up on
        assert struct.unpack("!H", close_payload[:2])[0] == 1011
        assert close_payload[2:] == b"keepalive ping timeout"
        assert app.keepalive.timeouts == 1
        assert app.node is not None
        await wait_until(lambda: not app.node.registry.sessions, what="the silent session ended")
    finally:
        writer.close()


async def test_an_idle_client_that_answers_pings_stays_open(nodes: NodeFactory) -> None:
    app = await nodes.start(**FAST_KEEPALIVE)
    client = await connect(url_of(app), "quiet-but-alive")
    try:
        # websockets' client answers pings by itself; three pings means it outlived interval + timeout twice over.
        await wait_until(lambda: app.keepalive.pings_sent >= 3, timeout_s=10, what="three keepalive pings")
        assert app.keepalive.timeouts == 0
        await client.send({"type": "ping"})
        assert (await client.expect("pong"))["type"] == "pong"
    finally:
        await client.close()


async def test_a_busy_connection_is_never_pinged(nodes: NodeFactory) -> None:
    app = await nodes.start(**FAST_KEEPALIVE)
    client = await connect(url_of(app), "chatty")
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5  # five ping intervals
        while loop.time() < until:
            await client.send({"type": "ping"})
            await client.expect("pong")
            # A frame every 50 ms keeps the connection well inside the 300 ms interval.
            await asyncio.sleep(0.05)  # by design; noqa: sleep-ok
        assert app.keepalive.pings_sent == 0
    finally:
        await client.close()
