"""Scenario 6: Redis out of memory (``maxmemory`` below what it uses, ``noeviction``) under load: publishes get a
clear ``unavailable`` error saying Redis is out of memory, nothing is acked that was not stored, and once memory
is back the same messages (same client_msg_id) go through, stored once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from tests.conftest import PG_URL, NodeFactory, url_of
from tests.faults.conftest import ArchiverProcess
from tests.faults.harness import Load, archiver_env, wait_for
from tests.faults.invariants import Ledger
from tests.helpers import connect
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.fault

ROOMS = ["order_601", "order_602"]


@pytest.mark.timeout(120)
async def test_redis_out_of_memory_gives_a_clear_error_and_loses_nothing_acked(
        nodes: NodeFactory, ledger: Ledger, prefix: str, pg_schema: str,
        private_redis: Callable[..., Awaitable[PrivateRedis]],
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    server = await private_redis(extra_args=("--maxmemory-policy", "noeviction"))
    node = await nodes.start(**{"redis.url": server.url})
    archiver = archivers("oom", archiver_env(prefix, server.url, PG_URL, pg_schema))
    await archiver.ready()
    clients = {}
    for user in ("1", "2"):
        client = ledger.client(url_of(node), user, set(ROOMS))
        await client.connect()
        for room in ROOMS:
            await client.join_room(room)
        clients[user] = client
    probe = await connect(url_of(node), "9", rooms=ROOMS)
    await probe.join(ROOMS[0])
    load = Load(ledger)
    for client in clients.values():
        load.start(client, ROOMS)
    await load.wait_acked(list(clients), 30)
    admin = aioredis.Redis.from_url(server.url)
    try:
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory", str(max(1, used // 2)))  # tiny: every write is refused
        refused_before = ledger.errors["unavailable"]
        await probe.send({"type": "chat_message", "room": ROOMS[0], "content": "over the limit",
                          "client_msg_id": "oom-probe"})
        error = await probe.expect("error", timeout_s=10)
        assert error["code"] == "unavailable" and "out of memory" in error["message"], error
        await wait_for(lambda: ledger.errors["unavailable"] >= refused_before + 10, 20, "publishes refused")
        await admin.config_set("maxmemory", "0")
    finally:
        await admin.aclose()
    await load.wait_acked(list(clients), 30, what="acks after memory came back")
    await load.stop()
    figures = await ledger.verify(PG_URL, pg_schema, extra={"refused_while_oom": ledger.errors["unavailable"]},
                                  diagnostics=lambda: f"archiver log: {archiver.log_tail()}")
    assert figures.errors.get("unavailable", 0) >= 10
    await probe.close()
