"""Scenario 4: Redis paused (DEBUG SLEEP) and then black-holed by the fault proxy for a few seconds, under load.

Node A reaches Redis through the proxy, node B directly. Both keep serving what they can (WebSocket pings,
errors instead of hangs), report 503 on /ws/health while they cannot reach Redis, and recover by themselves:
no restart, no client action beyond retrying its unacked message with the same client_msg_id. The invariant
checker proves that no ack was given for a message that was not written (every ack is in PostgreSQL once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from tests.conftest import PG_URL, NodeFactory, url_of
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import Load, archiver_env, health_status, wait_for
from tests.faults.invariants import Ledger
from tests.faults.proxy import FaultProxy
from tests.redis_server import PrivateRedis, debug_command_args

pytestmark = pytest.mark.fault

ROOMS = ["order_401", "order_402"]
SLEEP_S = 2
BLACK_HOLE_S = 3.0


@pytest.mark.timeout(120)
async def test_redis_paused_and_black_holed_nodes_keep_serving_and_recover(
        nodes: NodeFactory, ledger: Ledger, prefix: str, pg_schema: str,
        private_redis: Callable[..., Awaitable[PrivateRedis]],
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    server = await private_redis(extra_args=debug_command_args())
    proxy = await FaultProxy(server.port).start()
    try:
        settings = {"redis.socket_timeout_s": 1.0, "relay.node_heartbeat_s": 0.3, "relay.sweep_interval_s": 2}
        node_a = await nodes.start(**{"redis.url": proxy.url(), **settings})
        node_b = await nodes.start(**{"redis.url": server.url, **settings})
        assert node_a.port and node_b.port
        archiver = archivers("stall", archiver_env(prefix, server.url, PG_URL, pg_schema))
        await archiver.ready()

        members = {"11": (node_a, set(ROOMS)), "12": (node_a, {ROOMS[0]}), "21": (node_b, set(ROOMS)),
                   "22": (node_b, {ROOMS[1]})}
        clients = {}
        for user, (node, allowed) in members.items():
            client = ledger.client(url_of(node), user, allowed)
            await client.connect()
            for room in sorted(allowed):
                await client.join_room(room)
            clients[user] = client
        load = Load(ledger)
        for user in members:
            load.start(clients[user], sorted(members[user][1]))
        await load.wait_acked(list(members), 40)

        # Redis paused: both nodes see it; health turns 503 while the pause lasts.
        debug = aioredis.Redis(port=server.port, socket_timeout=SLEEP_S + 10)
        sleeping = asyncio.ensure_future(debug.execute_command("DEBUG", "SLEEP", SLEEP_S))
        statuses_during_sleep = set()

        async def both_unhealthy() -> bool:
            statuses = {await health_status(node_a.port or 0), await health_status(node_b.port or 0)}
            statuses_during_sleep.update(statuses)
            return statuses == {503} or sleeping.done()

        await wait_for(both_unhealthy, SLEEP_S + 5, "503 from both nodes during DEBUG SLEEP")
        await sleeping
        await debug.aclose()
        assert 503 in statuses_during_sleep, statuses_during_sleep
        paused_until = time.monotonic()
        await wait_for(lambda: _all_healthy(node_a.port or 0, node_b.port or 0), 15, "both nodes healthy again")
        await load.wait_acked(list(members), 20, what="acks flowing again after the pause")
        recovered_pause_s = time.monotonic() - paused_until

        # Node A's Redis black-holed: A turns unhealthy but still answers its clients; B carries on.
        proxy.black_hole()
        holed_at = time.monotonic()
        await wait_for(lambda: _status_is(node_a.port or 0, 503), 10, "node A unhealthy in the black hole")
        assert await health_status(node_b.port) == 200
        pong = await asyncio.wait_for(clients["11"].ping(), 5)
        assert pong["type"] == "pong", pong
        await load.wait_acked(["21", "22"], 10, what="node B's senders acked during the black hole")
        left_s = BLACK_HOLE_S - (time.monotonic() - holed_at)
        if left_s > 0:
            # The fault's duration: a few seconds of black hole, as the scenario asks.
            await asyncio.sleep(left_s)  # by design; noqa: sleep-ok
        proxy.heal()
        healed_at = time.monotonic()
        await wait_for(lambda: _status_is(node_a.port or 0, 200), 15, "node A healthy after the black hole")
        await load.wait_acked(["11", "12"], 10, what="node A's senders acked again")
        recovered_hole_s = time.monotonic() - healed_at
        await load.stop()
        figures = await ledger.verify(PG_URL, pg_schema, extra={
            "recovered_after_pause_s": round(recovered_pause_s, 2),
            "recovered_after_black_hole_s": round(recovered_hole_s, 2),
            "bytes_dropped_by_proxy": proxy.bytes_dropped})
        assert figures.errors.get("unavailable", 0) > 0, "no publish failed: the faults did not bite"
        assert archiver.alive()
    finally:
        await proxy.close()


async def _status_is(port: int, status: int) -> bool:
    return await health_status(port) == status


async def _all_healthy(*ports: int) -> bool:
    return all([await health_status(port) == 200 for port in ports])
