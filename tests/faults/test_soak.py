"""Scenario 8: a soak. 60 s (FAULT_SOAK_S) of mixed traffic across two hub nodes: chat, typing, presence, joins
and leaves, connects and disconnects, backend events. At the end every client is gone and each node's asyncio task
count, open file descriptors and RSS, and Redis's CLIENT LIST, are back within a small margin of their start."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from hub.client import publish_event
from tests.conftest import PG_URL, free_port
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import Load, archiver_env, open_fds, rss_kb, wait_for
from tests.faults.invariants import Ledger
from tests.helpers import mint
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.fault

SOAK_S = float(os.environ.get("FAULT_SOAK_S", "60"))
WARM_UP_S = 5.0
ROOMS = ["order_801", "order_802", "order_803"]
ADMIN = mint("admin", roles=["admin"])
# Margins for "back where it started" after a minute of traffic.
TASKS_MARGIN = 5
FDS_MARGIN = 5
# A node's Redis pool opens connections on demand (up to its cap) and keeps them: on a busy machine the soak's
# peaks can open a few more than the warm-up did. A leak grows without bound; three per node does not.
CLIENTS_MARGIN = 6
RSS_MARGIN_KB = 30 * 1024


async def _tasks(api_port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{api_port}/metrics", headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=aiohttp.ClientTimeout(total=5)) as response:
        text = await response.text()
    match = re.search(r"^streamhub_asyncio_tasks (\d+)", text, re.MULTILINE)
    assert match, text[:500]
    return int(match.group(1))


async def _connections(api_port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{api_port}/ws/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
        body = await response.json()
    return int(body["data"]["connection_stats"]["total_connections"])


async def _snapshot(nodes: list[Any], redis: aioredis.Redis) -> dict[str, Any]:
    return {"tasks": [await _tasks(n.api_port) for n in nodes],
            "fds": [open_fds(n.process.pid) for n in nodes],
            "rss_kb": [rss_kb(n.process.pid) for n in nodes],
            "redis_clients": len(await redis.client_list())}


@pytest.mark.timeout(int(SOAK_S) + 150)
async def test_soak_mixed_traffic_on_two_nodes_leaves_no_leak(
        hub_processes: Callable[..., Awaitable[Any]], ledger: Ledger, prefix: str, pg_schema: str,
        private_redis: Callable[..., Awaitable[PrivateRedis]],
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    server = await private_redis()
    nodes = []
    for _ in range(2):
        api_port = free_port()
        node = await hub_processes(REDIS_URL=server.url, HUB_SERVER_API_PORT=str(api_port))
        node.api_port = api_port
        nodes.append(node)
    archiver = archivers("soak", archiver_env(prefix, server.url, PG_URL, pg_schema))
    await archiver.ready()
    admin = aioredis.Redis.from_url(server.url)
    try:
        # Warm-up: a few seconds of the same traffic, so code paths, caches and the Redis connection pools reach
        # their working size; the baseline is taken after it, with nobody connected.
        await _traffic(ledger, nodes, admin, prefix, WARM_UP_S, first_user=100)
        await wait_for(lambda: _all_idle(nodes), 30, "no connection left after the warm-up")
        before = await _snapshot(nodes, admin)
        counts = await _traffic(ledger, nodes, admin, prefix, SOAK_S, first_user=10, keep=True)
        await ledger.verify(PG_URL, pg_schema, extra=counts)
        await ledger.close_clients()
        await wait_for(lambda: _all_idle(nodes), 30, "every connection closed on both nodes")

        after: dict[str, Any] = {}

        async def settled() -> bool:
            after.update(await _snapshot(nodes, admin))
            return (all(a <= b + TASKS_MARGIN for a, b in zip(after["tasks"], before["tasks"], strict=True))
                    and all(a <= b + FDS_MARGIN for a, b in zip(after["fds"], before["fds"], strict=True))
                    and after["redis_clients"] <= before["redis_clients"] + CLIENTS_MARGIN)

        await wait_for(settled, 30, lambda: f"resources back to the start: before {before}, after {after}",
                       poll_s=0.5)
        growth = [a - b for a, b in zip(after["rss_kb"], before["rss_kb"], strict=True)]
        assert max(growth) <= RSS_MARGIN_KB, f"RSS grew {growth} kB: before {before}, after {after}"
        from tests.faults.invariants import Figures, report
        report(Figures(scenario="soak_resources", extra={"before": before, "after": after, "soak_s": SOAK_S}))
    finally:
        await admin.aclose()


async def _traffic(ledger: Ledger, nodes: list[Any], redis: aioredis.Redis, prefix: str, duration_s: float, *,
                   first_user: int, keep: bool = False) -> dict[str, int]:
    """Mixed traffic for ``duration_s``: 6 chatters (3 per node) in every room, typing and presence, churning
    connections with joins and leaves, backend events. With ``keep`` the chatters stay members (the caller
    verifies and closes them); otherwise they are closed and forgotten."""
    stop = asyncio.Event()
    counts = {"typing": 0, "presence": 0, "joins": 0, "leaves": 0, "connects": 0, "events": 0}
    chatters = []
    for index in range(6):
        client = ledger.client(nodes[index % 2].url, str(first_user + index), set(ROOMS))
        await client.connect()
        for room in ROOMS:
            await client.join_room(room)
        chatters.append(client)
    load = Load(ledger)
    for client in chatters:
        load.start(client, ROOMS, interval_s=0.1)
    extras = [asyncio.ensure_future(_typing_and_presence(chatters, stop, counts)),
              asyncio.ensure_future(_churn(ledger, nodes, stop, counts)),
              asyncio.ensure_future(_backend_events(redis, prefix, stop, counts))]
    started = time.monotonic()
    while time.monotonic() - started < duration_s:
        for task in extras:
            if task.done():
                task.result()  # a failing traffic generator fails the test now
        # The soak's length is the point: traffic for duration_s.
        await asyncio.sleep(0.5)  # by design; noqa: sleep-ok
    stop.set()
    await load.stop()
    await asyncio.gather(*extras)
    if not keep:
        for client in chatters:
            await client.close()
            ledger.forget(client)
    return counts


async def _all_idle(nodes: list[Any]) -> bool:
    return all([await _connections(node.api_port) == 0 for node in nodes])


async def _typing_and_presence(clients: list[Any], stop: asyncio.Event, counts: dict[str, int]) -> None:
    for tick in itertools.count():
        if stop.is_set():
            return
        client = clients[tick % len(clients)]
        room = ROOMS[tick % len(ROOMS)]
        if client.start_typing(room) and client.stop_typing(room):
            counts["typing"] += 1
        if tick % 5 == 0:
            await client.set_presence("away" if tick % 10 else "online")
            counts["presence"] += 1
        # Pace of typing indicators: a few per second, like people typing.
        await asyncio.sleep(0.05)  # by design; noqa: sleep-ok


async def _churn(ledger: Ledger, nodes: list[Any], stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Short-lived connections: connect, join, leave, disconnect, over and over, alternating nodes."""
    for turn in itertools.count():
        if stop.is_set():
            return
        client = ledger.client(nodes[turn % 2].url, str(500 + turn % 20), {ROOMS[turn % len(ROOMS)]})
        await client.connect()
        counts["connects"] += 1
        await client.join_room(ROOMS[turn % len(ROOMS)])
        counts["joins"] += 1
        await client.leave_room(ROOMS[turn % len(ROOMS)])
        counts["leaves"] += 1
        await client.close()
        ledger.forget(client)


async def _backend_events(redis: aioredis.Redis, prefix: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    for turn in itertools.count():
        if stop.is_set():
            return
        await publish_event(redis, ROOMS[turn % len(ROOMS)], "order_status_update", {"status": f"s{turn}"},
                            prefix=prefix)
        counts["events"] += 1
        # A backend's pace: a few events per second.
        await asyncio.sleep(0.2)  # by design; noqa: sleep-ok
