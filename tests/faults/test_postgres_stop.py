"""Scenario 5: PostgreSQL stopped with ``-m immediate`` and restarted while clients publish: the hub keeps
acknowledging (Redis holds the messages), the archiver waits and retries, and after the restart every acked
message is in PostgreSQL exactly once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import REDIS_URL, NodeFactory, url_of
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import archiver_env, join_members, start_load
from tests.faults.invariants import Ledger
from tests.pg_cluster import PgCluster
from tests.test_archiver_faults import needs_pg_binaries, run_cli

pytestmark = pytest.mark.fault

ROOMS = ["order_501", "order_502"]


@pytest.mark.timeout(150)
@needs_pg_binaries
async def test_postgres_stopped_immediately_during_load_every_acked_message_lands_once(
        nodes: NodeFactory, ledger: Ledger, prefix: str, private_pg: PgCluster,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    url = private_pg.url()
    env = archiver_env(prefix, REDIS_URL, url, "public")
    await run_cli(env, "migrate")
    node = await nodes.start(**{"postgres.url": url, "postgres.schema": "public"})
    archiver = archivers("pgstop", env)
    await archiver.ready()
    clients = await join_members(ledger, dict.fromkeys(("1", "2", "3"), url_of(node)), ROOMS)
    load = start_load(ledger, clients, ROOMS)
    await load.wait_acked(list(clients), 40)
    await private_pg.astop("immediate")
    acked_at_stop = len(ledger.acked)
    retries_before = archiver.count_in_log("PostgreSQL unavailable")
    await load.wait_acked(list(clients), 60, what="acks while PostgreSQL is down")
    assert archiver.count_in_log("PostgreSQL unavailable") > retries_before, "the archiver never noticed"
    acked_while_down = len(ledger.acked) - acked_at_stop
    await private_pg.astart()
    await load.wait_acked(list(clients), 30)
    await load.stop()
    await ledger.verify(url, "public", extra={"acked_while_postgres_down": acked_while_down},
                        diagnostics=lambda: f"archiver log: {archiver.log_tail()}")
    assert archiver.alive(), archiver.log_tail()
