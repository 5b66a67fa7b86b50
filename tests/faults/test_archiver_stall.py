"""The archiver's Redis link black-holed (packets dropped, no error, no close) for several times its socket timeout,
under load: its commands time out instead of waiting for TCP keepalive (hours), it reconnects once the link heals,
and every acked message is stored in PostgreSQL once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import PG_URL, NodeFactory, url_of
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import archiver_env, join_members, start_load
from tests.faults.invariants import Ledger
from tests.faults.proxy import FaultProxy
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.fault

ROOMS = ["order_501", "order_502"]
BLACK_HOLE_S = 4.0


@pytest.mark.timeout(120)
async def test_archiver_behind_a_black_hole_recovers_by_itself(
        nodes: NodeFactory, ledger: Ledger, prefix: str, pg_schema: str,
        private_redis: Callable[..., Awaitable[PrivateRedis]],
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    server = await private_redis()
    proxy = await FaultProxy(server.port).start()
    try:
        node = await nodes.start(**{"redis.url": server.url})
        archiver = archivers("hole", archiver_env(prefix, proxy.url(), PG_URL, pg_schema,
                                                  HUB_REDIS_SOCKET_TIMEOUT_S="1"))
        await archiver.ready()
        clients = await join_members(ledger, dict.fromkeys(("1", "2"), url_of(node)), ROOMS)
        load = start_load(ledger, clients, ROOMS, interval_s=0.02)
        await load.wait_acked(list(clients), 30)
        proxy.black_hole()
        # The fault's duration: several socket timeouts, while the node goes on accepting messages.
        await asyncio.sleep(BLACK_HOLE_S)  # by design; noqa: sleep-ok
        await load.wait_acked(list(clients), 30)
        proxy.heal()
        await load.wait_acked(list(clients), 30)
        await load.stop()
        figures = await ledger.verify(PG_URL, pg_schema, settle_s=30, extra={"black_hole_s": BLACK_HOLE_S},
                                      diagnostics=lambda: f"archiver log: {archiver.log_tail()}")
        assert figures.duplicated == 0
        assert archiver.alive(), archiver.log_tail()
    finally:
        await proxy.close()
