"""Graceful shutdown under load: SIGTERM with 200 connected clients."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from hub.keys import Keys
from tests.helpers import Client, connect

ROOM = "channel_drain"


@pytest.mark.fault
@pytest.mark.timeout(90)
async def test_sigterm_with_200_clients_sends_reconnect_to_all_and_loses_no_acked_message(
        hub_processes: Any, redis_client: Redis, prefix: str) -> None:
    """SIGTERM while 200 members are connected and messages are being sent: every client gets close
    code 4001, and every acknowledged message is in the room's stream."""
    hub = await hub_processes()
    members: list[Client] = []
    for start in range(0, 200, 20):  # in waves, so a loaded machine does not hit connect/join timeouts
        wave = await asyncio.gather(*(connect(hub.url, str(1000 + i)) for i in range(start, start + 20)))
        await asyncio.gather(*(m.join(ROOM) for m in wave))
        members += wave
    senders = members[:5]
    acked: list[str] = []
    stop_sending = asyncio.Event()
    flowing = asyncio.Event()

    async def send_until_closed(client: Client, index: int) -> None:
        seq = 0
        try:
            while not stop_sending.is_set():
                await client.send({"type": "chat_message", "room": ROOM, "content": f"{index}:{seq}",
                                   "client_msg_id": f"d{index}-{seq}"})
                seq += 1
                ack = await client.expect("ack", timeout_s=10)
                acked.append(ack["id"])
                if len(acked) >= 50:
                    flowing.set()
        except ConnectionClosed:
            pass

    sending = [asyncio.ensure_future(send_until_closed(c, i)) for i, c in enumerate(senders)]
    await asyncio.wait_for(flowing.wait(), 30)  # traffic is flowing
    hub.process.send_signal(signal.SIGTERM)

    async def close_code(client: Client) -> int | None:
        await client.ws.wait_closed()  # frames keep being read into the (unbounded) queue meanwhile
        return client.ws.close_code

    codes = await asyncio.wait_for(asyncio.gather(*(close_code(m) for m in members)), 30)
    stop_sending.set()
    await asyncio.gather(*sending)
    assert codes == [4001] * 200
    assert await asyncio.to_thread(hub.process.wait, 30) == 0
    stored = {eid.decode() for eid, _ in await redis_client.xrange(Keys(prefix).stream(ROOM))}
    assert set(acked) <= stored and len(acked) >= 50
