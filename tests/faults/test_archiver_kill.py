"""Scenario 2: kill -9 of the archiver mid-batch (entries read, not yet acknowledged), twice, then a restart with
the same consumer name: every acked message is stored exactly once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from consumers.archiver import GROUP
from hub.keys import Keys
from tests.conftest import PG_URL, REDIS_URL, NodeFactory, url_of
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import archiver_env, join_members, start_load, wait_for
from tests.faults.invariants import Ledger

pytestmark = pytest.mark.fault

ROOMS = ["order_201", "order_202", "order_203"]


async def _held_by(redis: Redis, keys: Keys, consumer: str) -> int:
    """Entries the consumer read and has not acknowledged (its batch in flight)."""
    held = 0
    for room in ROOMS:
        if not await redis.exists(keys.stream(room)):
            continue
        groups = await redis.xinfo_groups(keys.stream(room))
        if not any(g["name"] in (GROUP, GROUP.encode()) for g in groups):
            continue
        for info in await redis.xinfo_consumers(keys.stream(room), GROUP):
            if info["name"] in (consumer, consumer.encode()):
                held += int(info["pending"])
    return held


@pytest.mark.timeout(120)
async def test_archiver_killed_mid_batch_twice_every_acked_message_stored_once(
        nodes: NodeFactory, ledger: Ledger, prefix: str, pg_schema: str, redis_client: Redis,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    node = await nodes.start()
    # Batches wait up to 300 ms for more entries, so a kill lands while one is held.
    env = archiver_env(prefix, REDIS_URL, PG_URL, pg_schema, HUB_ARCHIVER_BATCH_MAX_AGE_MS="300")
    keys = Keys(prefix)
    clients = await join_members(ledger, dict.fromkeys(("1", "2", "3"), url_of(node)), ROOMS)
    load = start_load(ledger, clients, ROOMS, interval_s=0.01)
    held_at_kill = []
    for _kill in range(2):
        # The same consumer name each time: a restarted archiver re-reads what it held when it died.
        archiver = archivers("kill9", env)
        await archiver.ready()
        held: list[int] = [0]

        async def mid_batch(proc: ArchiverProcess = archiver, seen: list[int] = held) -> bool:
            assert proc.alive(), proc.log_tail()
            seen[0] = await _held_by(redis_client, keys, proc.name)
            return seen[0] > 0

        await wait_for(mid_batch, 30, f"archiver {archiver.name} holding a batch")
        archiver.kill()  # SIGKILL between read and acknowledge
        held_at_kill.append(held[0])
    # The final restart: it stores what the killed one held (its own pending entries first) and carries on.
    survivor = archivers("kill9", env)
    await survivor.ready()
    await load.wait_acked(list(clients), 60)
    await load.stop()
    figures = await ledger.verify(PG_URL, pg_schema, extra={"kills": 2, "entries_held_at_each_kill": held_at_kill},
                                  diagnostics=lambda: f"survivor log: {survivor.log_tail()}")
    assert await _held_by(redis_client, keys, "kill9") == 0
    assert figures.duplicated == 0
