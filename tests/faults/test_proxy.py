"""The fault proxy itself, against a small echo server: it forwards, delays, black-holes, resets and refuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.fault


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with FaultProxy(server.sockets[0].getsockname()[1]) as fault_proxy:
        yield fault_proxy
    server.close()
    await server.wait_closed()


async def _round_trip(port: int, payload: bytes, timeout_s: float = 5.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
        return got, time.monotonic() - started
    finally:
        writer.close()


async def test_forwards_both_ways_in_order(proxy: FaultProxy) -> None:
    """A 1 MB payload comes back byte for byte through the proxy."""
    payload = bytes(range(256)) * 4096
    got, _ = await _round_trip(proxy.port, payload)
    assert got == payload
    assert proxy.bytes_forwarded >= 2 * len(payload)


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    """With 0.15 s of latency a round trip takes at least 0.3 s (both directions), and order is kept."""
    proxy.latency_s = 0.15
    payload = b"".join(f"{i:05d}".encode() for i in range(2000))
    got, elapsed = await _round_trip(proxy.port, payload)
    assert got == payload
    assert elapsed >= 0.3, elapsed


async def test_black_hole_forwards_nothing_until_healed_and_new_connections_work_again(proxy: FaultProxy) -> None:
    """While black-holed, a connection accepts bytes and never answers; after heal a new connection works."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"before")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
    proxy.black_hole()
    writer.write(b"lost")
    await writer.drain()
    # Silence can only be shown by waiting: half a second with nothing back is the proof asked for.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.5)
    new_reader, new_writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted into the hole
    new_writer.write(b"x")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(new_reader.read(1), 0.3)
    assert proxy.bytes_dropped >= 5
    proxy.heal()
    got, _ = await _round_trip(proxy.port, b"after")
    assert got == b"after"
    writer.close()
    new_writer.close()


async def test_reset_all_aborts_open_connections_with_rst(proxy: FaultProxy) -> None:
    """reset_all() makes the client's next read fail with a connection reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    assert await proxy.reset_all() == 1
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    assert proxy.connections == 0
    writer.close()


async def test_refuse_new_refuses_connects_and_accept_new_restores_the_same_port(proxy: FaultProxy) -> None:
    """refuse_new() closes the port (ECONNREFUSED) but keeps open connections; accept_new() reopens it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    port = proxy.port
    await proxy.refuse_new()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"still")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
    await proxy.accept_new()
    assert proxy.port == port
    got, _ = await _round_trip(port, b"again")
    assert got == b"again"
    writer.close()
