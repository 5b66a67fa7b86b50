"""Scenario 7: a reconnect storm. 500 clients (the project's Python client, jittered exponential backoff) reach a
hub node through the fault proxy; every connection is reset at once and new ones are refused for a moment while
messages keep coming; then the port opens and all 500 reconnect, resume every room with no gap and get every
message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import PG_URL, REDIS_URL
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import archiver_env, wait_for
from tests.faults.invariants import Ledger
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.fault

CLIENTS = 500
ROOMS = [f"order_7{i:02d}" for i in range(1, 11)]


@pytest.mark.timeout(180)
async def test_reconnect_storm_of_500_clients_all_resume_with_no_gap(
        hub_processes: Callable[..., Awaitable[Any]], ledger: Ledger, prefix: str, pg_schema: str,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    node = await hub_processes()
    archiver = archivers("storm", archiver_env(prefix, REDIS_URL, PG_URL, pg_schema))
    await archiver.ready()
    proxy = await FaultProxy(node.port).start()
    try:
        members = []
        for index in range(CLIENTS):
            room = ROOMS[index % len(ROOMS)]
            members.append((ledger.client(proxy.url("ws", ""), str(1000 + index), {room},
                                          backoff=(0.2, 2.0, 2.0), reset_after_s=60.0), room))
        for start in range(0, CLIENTS, 50):  # connect in waves: the storm is the reconnect, not the setup
            wave = members[start:start + 50]
            await asyncio.gather(*(client.connect() for client, _ in wave))
            await asyncio.gather(*(client.join_room(room) for client, room in wave))
        sender = ledger.client(node.url, "1", set(ROOMS))  # directly to the node: keeps talking in the storm
        await sender.connect()
        for room in ROOMS:
            await sender.join_room(room)
        for index in range(20):
            await ledger.send(sender, ROOMS[index % len(ROOMS)])
        await ledger.wait_delivered(20)

        await proxy.refuse_new()
        dropped = await proxy.reset_all()
        dropped_at = time.monotonic()
        for index in range(40):  # missed by everyone behind the proxy: their resumes must bring them
            await ledger.send(sender, ROOMS[index % len(ROOMS)])
        await wait_for(lambda: sum(c.state == "reconnecting" for c, _ in members) == CLIENTS, 20,
                       "every client noticed the reset")
        await proxy.accept_new()
        await wait_for(lambda: sum(1 for c, room in members if c.log.resumed[room] >= 1) == CLIENTS, 90,
                       lambda: f"all resumed ({sum(1 for c, room in members if c.log.resumed[room] >= 1)}"
                               f"/{CLIENTS})", poll_s=0.2)
        recovered_s = time.monotonic() - dropped_at
        for index in range(10):
            await ledger.send(sender, ROOMS[index % len(ROOMS)])
        figures = await ledger.verify(PG_URL, pg_schema, extra={
            "clients": CLIENTS, "connections_reset": dropped, "all_resumed_after_s": round(recovered_s, 1),
            "connects_through_proxy": proxy.accepted})
        assert dropped >= CLIENTS
        assert figures.gaps_told == 0
        assert figures.resumes >= CLIENTS
    finally:
        await ledger.close_clients()
        await proxy.close()
