"""Operations: ``hubctl stats``, ``check`` and ``dlq`` against real Redis and PostgreSQL, and the
``/metrics`` and ``/ws/connection-stats`` endpoints of a live node."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect

from cli.main import cli
from consumers.archiver import GROUP
from hub import __version__
from hub.app import App
from hub.embedded import EmbeddedRedis
from hub.keys import Keys
from tests.conftest import PG_URL, NodeFactory, hub_env, url_of
from tests.helpers import Client, collect_chat, connect, mint, wait_until
from tests.test_archiver import burst

CLOSED_PG_URL = "postgresql://postgres@127.0.0.1:1/test"


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """hubctl reads ./hub.yaml: run every command from an empty directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def hubctl(*args: str, env: dict[str, str]) -> Result:
    """Run hubctl in a thread (commands call asyncio.run) while this loop keeps serving clients."""
    runner = CliRunner()
    full_env: dict[str, str | None] = {"HUB_CONFIG": None, **env}
    return await asyncio.to_thread(runner.invoke, cli, list(args), env=full_env)


def ops_env(prefix: str, schema: str, **extra: str) -> dict[str, str]:
    return hub_env(prefix, **{"DATABASE_URL": PG_URL, "HUB_POSTGRES_SCHEMA": schema, **extra})


async def stats_json(prefix: str, schema: str, *args: str, **extra: str) -> dict[str, Any]:
    result = await hubctl("stats", "--json", *args, env=ops_env(prefix, schema, **extra))
    assert result.exit_code == 0, result.output
    parsed = orjson.loads(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll a condition held in Redis (written by another task of this loop) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {check.__name__}")
        await asyncio.sleep(0.01)


async def group_pending(redis: Redis, key: str, group: str) -> int:
    return int((await redis.xpending(key, group))["pending"])


def by(items: list[dict[str, Any]], field: str) -> dict[Any, dict[str, Any]]:
    return {item[field]: item for item in items}


async def http_get(port: int | None, path: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


async def connect_as(app: App, user_id: str, client_type: str) -> Client:
    """A client declaring its own client_type (the shared helper always says "test")."""
    ws = await ws_connect(f"{url_of(app)}/ws/connect?token={mint(user_id)}&client_type={client_type}",
                          open_timeout=10, max_queue=None)
    client = Client(ws, user_id)
    client.established = await client.recv()
    return client


# ---------------------------------------------------------------------------------------------- stats


async def test_stats_shows_nodes_connections_rooms_streams_groups_and_archive_lag(
        nodes: NodeFactory, prefix: str, pg_schema: str, redis_client: Redis) -> None:
    """With a node serving three connections (two of user 1) in two rooms and an archiver burst done,
    ``stats --json`` shows the node alive with 3 connections, the rooms by type with their entries and
    last-minute volume, the node's and the archiver's groups with nothing pending or lagging, 8 rows
    (one a notification) in PostgreSQL with no archive lag, then 3 unarchived entries once a backend
    adds them; the table names the same node and rooms."""
    app = await nodes.start()
    keys = Keys(prefix)
    alice, alice_phone, bob = (await connect(url_of(app), "1"), await connect(url_of(app), "1"),
                               await connect(url_of(app), "2"))
    for client in (alice, bob):
        await client.join("channel_ops")
        await client.join("user_1_2")
    for i in range(5):
        await alice.say("channel_ops", f"m{i}")
    await bob.say("user_1_2", "hi")
    await alice.say("user_1_2", "hello")
    await collect_chat(bob, 7)
    notified = await hubctl("publish", "inbox:1", "--type", "system_notification", "--content", "hello",
                            env=ops_env(prefix, pg_schema))
    assert notified.exit_code == 0, notified.output
    await alice.expect("system_notification")

    async def acknowledged() -> bool:
        # (The node reads inboxes with XREAD from its own cursor: inbox:1 has no node group to look at.)
        return all([await group_pending(redis_client, keys.stream(r), app.node_id) == 0
                    for r in ("channel_ops", "user_1_2")])

    await eventually(acknowledged)  # the relay's XACK follows the fan-out, so it may land after bob read
    await app._heartbeat_once()  # the node hash's connection count is written by the heartbeat
    archived = await burst(redis_client, prefix, pg_schema)
    assert archived.stats.rows_written == 8

    stats = await stats_json(prefix, pg_schema, "--top", "20")
    (node,) = stats["nodes"]
    assert node["node_id"] == app.node_id and node["alive"] is True
    assert node["connections"] == 3 and node["version"] == __version__ and node["uptime_s"] >= 0
    assert stats["connections"]["total"] == 3 and stats["connections"]["users"] == 2
    assert stats["connections"]["top_users"][0] == {"user_id": "1", "connections": 2}
    types = by(stats["rooms_by_type"], "type")
    assert types["channel"]["rooms"] == 1 and types["channel"]["entries"] == 5
    assert types["user"]["rooms"] == 1 and types["user"]["entries"] == 2
    assert types["channel"]["messages_last_minute"] == 5 and types["channel"]["messages_last_hour"] == 5
    streams = by(stats["streams"], "room")
    assert streams["channel_ops"]["length"] == 5 and streams["channel_ops"]["memory_bytes"] > 0
    groups = by(stats["groups"], "group")
    mine = groups[app.node_id]
    assert mine["role"] == "node" and mine["rooms"] >= 2 and mine["pending"] == 0 and mine["lag"] == 0
    archiver = groups[GROUP]
    assert archiver["role"] == "archiver" and archiver["pending"] == 0 and archiver["lag"] == 0
    assert archiver["lag_unknown_rooms"] == 0
    pg = stats["postgres"]
    assert pg["error"] is None and pg["rows"] == 8 and pg["rooms"] == 3
    assert pg["rows_by_type"] == {"channel": 5, "inbox": 1, "user": 2} and pg["unarchived_entries"] == 0
    lag = by(pg["archive_lag"], "room")["channel_ops"]
    assert lag["archived_id"] == lag["stream_last_id"] == streams["channel_ops"]["last_id"]
    assert lag["behind_ms"] == 0 and lag["unarchived"] == 0
    assert stats["dead_letters"] == []

    for i in range(3):
        await redis_client.xadd(keys.stream("channel_ops"), {"sender_id": "orders", "content": f"late {i}"})
    later = await stats_json(prefix, pg_schema, "--top", "20")
    assert later["postgres"]["unarchived_entries"] == 3 and later["postgres"]["rooms_behind"] == 1
    behind = by(later["postgres"]["archive_lag"], "room")["channel_ops"]
    assert behind["unarchived"] == 3 and behind["archived_id"] == lag["archived_id"]
    assert by(later["streams"], "room")["channel_ops"]["length"] == 8

    table = await hubctl("stats", env=ops_env(prefix, pg_schema))
    assert table.exit_code == 0, table.output
    assert "Nodes: 1 alive" in table.stdout and app.node_id in table.stdout
    assert "channel_ops" in table.stdout and "PostgreSQL: 8 rows in 3 rooms" in table.stdout
    for client in (alice, alice_phone, bob):
        await client.close()


async def test_stats_watch_prints_one_json_document_per_refresh(prefix: str, pg_schema: str,
                                                                redis_client: Redis) -> None:
    """``stats --json --watch`` prints one parseable JSON line per refresh (bounded here by the hidden
    --count)."""
    await redis_client.xadd(Keys(prefix).stream("channel_w"), {"content": "x"})
    result = await hubctl("stats", "--json", "--watch", "0.1", "--count", "2", env=ops_env(prefix, pg_schema))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(orjson.loads(line)["rooms_total"] == 1 for line in lines)


async def test_stats_on_redis_6_2_computes_group_lag_and_survives_postgres_down(
        prefix: str, tmp_path: Path) -> None:
    """On Redis 6.2 (the embedded one, whose XINFO GROUPS has no lag) a group's lag is counted from its
    last-delivered id, and an unreachable PostgreSQL is reported inside the stats, not as a failure."""
    embedded = EmbeddedRedis(tmp_path / "redis62")
    url = await asyncio.to_thread(embedded.start)
    client = Redis.from_url(url)
    try:
        key = Keys(prefix).stream("channel_old")
        for i in range(5):
            await client.xadd(key, {"content": f"e{i}"})
        await client.xgroup_create(key, "reader", id="0")
        await client.xreadgroup("reader", "c1", {key: ">"}, count=2)
        stats = await stats_json(prefix, "public", REDIS_URL=url, DATABASE_URL=CLOSED_PG_URL)
    finally:
        await client.aclose()
        await asyncio.to_thread(embedded.stop)
    assert stats["redis_version"].startswith("6.")
    reader = by(stats["groups"], "group")["reader"]
    assert reader["role"] == "other" and reader["pending"] == 2 and reader["lag"] == 3
    assert reader["lag_unknown_rooms"] == 0
    assert "127.0.0.1:1" in stats["postgres"]["error"]


async def test_stats_with_redis_unreachable_is_a_clean_error(prefix: str, pg_schema: str) -> None:
    """With REDIS_URL on a closed port, ``stats`` exits 1 with "Error: Redis..." and no traceback."""
    result = await hubctl("stats", env=ops_env(prefix, pg_schema, REDIS_URL="redis://127.0.0.1:1/0"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Error: Redis" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- check


async def test_check_passes_with_everything_up(node: App, prefix: str, pg_schema: str) -> None:
    """With Redis, a node (which turns keyspace notifications on) and a migrated schema, ``check`` prints
    ok for each of the six checks and exits 0; ``--json`` says the same."""
    result = await hubctl("check", env=ops_env(prefix, pg_schema))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "config"], ["ok", "redis"], ["ok", "keyspace-events"], ["ok", "lua"], ["ok", "postgres"],
        ["ok", "schema"]]
    as_json = await hubctl("check", "--json", env=ops_env(prefix, pg_schema))
    assert as_json.exit_code == 0 and orjson.loads(as_json.stdout)["ok"] is True


@pytest.mark.parametrize(("extra", "failed", "needle"), [
    ({"DATABASE_URL": CLOSED_PG_URL}, "postgres", "127.0.0.1:1"),
    ({"HUB_POSTGRES_SCHEMA": "t_never_migrated"}, "schema", "hubctl migrate"),
    ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "redis", "127.0.0.1:1"),
    ({"JWT_SECRET": "short"}, "config", "auth.secret"),
])
async def test_check_fails_naming_the_broken_part(prefix: str, pg_schema: str, extra: dict[str, str],
                                                  failed: str, needle: str) -> None:
    """PostgreSQL on a closed port, an unmigrated schema, Redis on a closed port or a bad JWT secret:
    ``check`` exits 1 with a FAIL line naming that check and why, and no traceback."""
    result = await hubctl("check", env=ops_env(prefix, pg_schema, **extra))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    line = next(line for line in result.stdout.splitlines() if line.split()[1] == failed)
    assert line.startswith("FAIL") and needle in line, result.stdout
    if failed != "redis":
        assert any(line.split()[:2] == ["ok", "redis"] for line in result.stdout.splitlines())


# ---------------------------------------------------------------------------------------------- dlq


async def test_dlq_list_show_and_drop_a_poison_entry(prefix: str, pg_schema: str, redis_client: Redis) -> None:
    """Two poison entries (content with a NUL byte) dead-lettered by an archiver burst: ``dlq list``
    shows them with room, entry id and reason, ``show`` prints the reason and the original fields,
    ``drop`` without --yes removes nothing, an unknown id removes nothing, ``drop ID --yes`` removes
    exactly that one and ``drop --all --yes`` the rest."""
    keys = Keys(prefix)
    stream, dead = keys.stream("channel_p"), keys.dead_letters(GROUP)
    poison = []
    for i in range(4):
        fields: dict[str, Any] = {"sender_id": "1", "content": f"fine {i}"}
        if i % 2:
            fields["content"] = f"bad \x00 nul {i}".encode()
        entry_id = (await redis_client.xadd(stream, fields)).decode()
        if i % 2:
            poison.append(entry_id)
    archived = await burst(redis_client, prefix, pg_schema)
    assert archived.stats.dead_lettered == 2
    env = ops_env(prefix, pg_schema)

    listed = await hubctl("dlq", "list", "--json", env=env)
    assert listed.exit_code == 0, listed.output
    body = orjson.loads(listed.stdout)
    assert body["stream"] == dead and body["total"] == 2
    records = body["dead_letters"]
    assert [r["entry_id"] for r in records] == poison and all(r["room"] == "channel_p" for r in records)
    assert all("NUL" in r["reason"] for r in records)
    assert records[0]["fields"] == {"sender_id": "1", "content": "bad \x00 nul 1"}
    first, second = records[0]["id"], records[1]["id"]
    table = await hubctl("dlq", "list", env=env)
    assert table.exit_code == 0 and first in table.stdout and "channel_p" in table.stdout
    stats = await stats_json(prefix, pg_schema)
    assert [(d["consumer"], d["entries"]) for d in stats["dead_letters"]] == [(GROUP, 2)]

    shown = await hubctl("dlq", "show", first, env=env)
    assert shown.exit_code == 0, shown.output
    assert f"entry id  {poison[0]}" in shown.stdout and "reason" in shown.stdout and "NUL" in shown.stdout
    assert "content    bad \\x00 nul 1" in shown.stdout

    dry = await hubctl("dlq", "drop", first, env=env)
    assert dry.exit_code == 0 and "would remove 1" in dry.stdout and "nothing removed" in dry.stdout
    unknown = await hubctl("dlq", "drop", first, "1-0", "--yes", env=env)
    assert unknown.exit_code == 1 and "no dead letter 1-0" in unknown.output
    assert await redis_client.xlen(dead) == 2

    dropped = await hubctl("dlq", "drop", first, "--yes", env=env)
    assert dropped.exit_code == 0 and "removed 1" in dropped.stdout
    assert [eid.decode() for eid, _ in await redis_client.xrange(dead)] == [second]
    gone = await hubctl("dlq", "show", first, env=env)
    assert gone.exit_code == 1 and f"no dead letter {first}" in gone.output

    dry_all = await hubctl("dlq", "drop", "--all", env=env)
    assert "would remove 1" in dry_all.stdout and second in dry_all.stdout
    assert await redis_client.xlen(dead) == 1
    all_gone = await hubctl("dlq", "drop", "--all", "--yes", env=env)
    assert all_gone.exit_code == 0 and "removed 1" in all_gone.stdout
    assert await redis_client.xlen(dead) == 0


@pytest.mark.parametrize("args", [["dlq", "drop"], ["dlq", "drop", "1-0", "--all"], ["dlq", "show", "nope"]])
async def test_dlq_refuses_bad_arguments(prefix: str, pg_schema: str, args: list[str]) -> None:
    """``drop`` needs IDs or --all (not both) and ids must look like stream ids: exit 2, nothing touched."""
    result = await hubctl(*args, env=ops_env(prefix, pg_schema))
    assert result.exit_code == 2, result.output


# ---------------------------------------------------------------------------------------------- endpoints


async def test_metrics_endpoint_is_prometheus_text_counting_connections(node: App) -> None:
    """GET /metrics on both ports parses with prometheus_client's parser; the connection gauge equals
    the open test connections (3, then 2 after one closes), and published messages and client errors
    by code are counted."""
    clients = [await connect(url_of(node), user) for user in ("1", "1", "2")]
    await clients[0].join("channel_m")
    await clients[0].say("channel_m", "one")
    await clients[0].say("channel_m", "two")
    await clients[1].send({"type": "chat_message", "room": "channel_m", "content": "not joined"})
    assert (await clients[1].expect("error"))["code"] == "not_joined"

    for port in (node.port, node.api_port):
        status, content_type, body = await http_get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["streamhub_connections"].samples[0].value == 3
        assert families["streamhub_connected_users"].samples[0].value == 2
        assert families["streamhub_messages_published"].samples[0].value == 2
        errors = {s.labels["code"]: s.value for s in families["streamhub_client_errors"].samples
                  if s.name.endswith("_total")}
        assert errors == {"not_joined": 1}
        info = families["streamhub_node_info"].samples[0]
        assert info.labels == {"node_id": node.node_id, "version": __version__}
        by_type = {s.labels["type"]: s.value for s in families["streamhub_rooms"].samples}
        assert by_type["channel"] == 1

    await clients[2].close()
    assert node.node is not None
    registry = node.node.registry
    await wait_until(lambda: len(registry.sessions) == 2, what="the closed session to be removed")
    _, _, body = await http_get(node.port, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["streamhub_connections"].samples[0].value == 2
    assert families["streamhub_connections_opened"].samples[0].value == 3
    for client in clients[:2]:
        await client.close()


async def test_connection_stats_endpoint_counts_users_rooms_and_client_types(node: App) -> None:
    """GET /ws/connection-stats on both ports returns this node's totals, unique users, rooms, the
    per-client_type counts and the users with the most connections."""
    clients = [await connect(url_of(node), "1"), await connect(url_of(node), "1"),
               await connect_as(node, "2", "web")]
    await clients[0].join("channel_cs")
    await clients[2].join("channel_cs")
    await clients[2].join("user_1_2")
    for port in (node.port, node.api_port):
        status, content_type, body = await http_get(port, "/ws/connection-stats")
        assert status == 200 and content_type.startswith("application/json")
        reply = orjson.loads(body)
        assert reply == {"status": "success", "data": {
            "node_id": node.node_id,
            "total_connections": 3,
            "unique_users": 2,
            "total_rooms": 2,
            "connections_by_client_type": {"test": 2, "web": 1},
            "top_users": [{"user_id": "1", "connections": 2}, {"user_id": "2", "connections": 1}],
        }}
    for client in clients:
        await client.close()


async def test_stats_show_each_archivers_batch_figures(
        redis_client: Redis, prefix: str, pg_schema: str) -> None:
    """After an archiver run, hubctl stats --json lists it with its batches, rows and last batch."""
    from tests.test_archiver import burst

    for i in range(5):
        await redis_client.xadd(Keys(prefix).stream("channel_af"), {"content": f"a{i}"})
    await burst(redis_client, prefix, pg_schema, name="arch-stats")
    env = {"REDIS_URL": hub_env(prefix)["REDIS_URL"], "DATABASE_URL": PG_URL, "HUB_POSTGRES_SCHEMA": pg_schema,
           "HUB_REDIS_KEY_PREFIX": prefix}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["stats", "--json"], env=env)
    assert result.exit_code == 0, result.output
    [archiver] = [c for c in orjson.loads(result.output)["consumers"] if c["consumer"] == "arch-stats"]
    assert archiver["rows_written"] == 5 and archiver["batches"] == 1 and archiver["last_batch_entries"] == 5
