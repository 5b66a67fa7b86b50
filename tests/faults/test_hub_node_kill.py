"""Scenario 1: kill -9 of a hub node under load. Its clients reconnect to the other node and resume every room
with no gap (recovered: true); messages whose ack died with the node are re-sent with the same client_msg_id and
stored once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import PG_URL, REDIS_URL
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import archiver_env, join_members, start_load, wait_for
from tests.faults.invariants import Ledger

pytestmark = pytest.mark.fault

ROOMS = ["order_101", "order_102"]


@pytest.mark.timeout(120)
async def test_hub_node_killed_under_load_clients_resume_on_the_other_node_with_no_gap(
        hub_processes: Callable[..., Awaitable[Any]], ledger: Ledger, prefix: str, pg_schema: str,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    node_a, node_b = await asyncio.gather(hub_processes(), hub_processes())
    archiver = archivers("nodekill", archiver_env(prefix, REDIS_URL, PG_URL, pg_schema))
    await archiver.ready()

    def prefer(first: Any, other: Any) -> Callable[[], str]:
        # A client's next attempt goes to its own node while that one lives, else to the other.
        return lambda: first.url if first.process.poll() is None else other.url

    users_a, users_b = ["1", "2", "3"], ["4", "5", "6"]
    urls = {user: prefer(node_a, node_b) if user in users_a else prefer(node_b, node_a) for user in users_a + users_b}
    clients = await join_members(ledger, urls, ROOMS)
    load = start_load(ledger, clients, ROOMS, interval_s=0.02)
    await load.wait_acked(list(clients), 60)
    node_a.process.kill()  # SIGKILL: no close frame, no drain, in-flight acks lost
    await asyncio.to_thread(node_a.process.wait, 10)
    await wait_for(lambda: all(clients[u].stats["connects"] >= 2 for u in users_a), 30,
                   "node A's clients reconnected to node B")
    await load.wait_acked(users_a, 30, what="node A's clients acked again through node B")
    await load.stop()
    figures = await ledger.verify(PG_URL, pg_schema, extra={"killed_node_clients": len(users_a)},
                                  diagnostics=lambda: f"archiver log: {archiver.log_tail()}")
    assert figures.gaps_told == 0, "a resume after the node kill was not recovered"
    assert figures.resumes >= len(users_a) * len(ROOMS)
