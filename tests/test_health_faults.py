"""Health under Redis faults: /ws/health flips to 503 when Redis stops and back when it returns."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import NodeFactory
from tests.redis_server import PrivateRedis


async def health_status(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/ws/health",
                                                          timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status


@pytest.mark.fault
@pytest.mark.timeout(60)
async def test_health_flips_to_503_when_redis_stops_and_back_when_it_returns(
        nodes: NodeFactory, private_redis: PrivateRedis) -> None:
    """A node's /ws/health answers 200, then 503 while its Redis is down, then 200 again after Redis
    restarts on the same port, without restarting the node."""
    node = await nodes.start(**{"redis.url": private_redis.url})
    assert node.port is not None
    assert await health_status(node.port) == 200
    await asyncio.to_thread(private_redis.kill)
    assert await health_status(node.port) == 503
    await asyncio.to_thread(private_redis.start)
    statuses: list[int] = []

    async def healthy() -> bool:
        statuses.append(await health_status(node.port or 0))
        return statuses[-1] == 200

    deadline = asyncio.get_running_loop().time() + 15
    while not await healthy():
        assert asyncio.get_running_loop().time() < deadline, statuses
        await asyncio.sleep(0.05)
