"""The audit log: events for refused handshakes, ACL denials, rate-limit hits and admin commands land in
the hub:audit stream with who/ip/what/when and never a token or a message body; the writer never blocks;
the audit archiver copies the stream into an append-only PostgreSQL table exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from typing import Any

import asyncpg
import jwt
import pytest
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from cli.main import cli
from consumers.audit_archiver import GROUP, AuditArchiver, entry_to_audit_row
from hub.app import App
from hub.audit import Audit, audit_fields, write_event
from hub.config import ArchiverConfig, AuditConfig, PostgresConfig
from hub.keys import Keys
from tests.conftest import PG_URL, ROOT, NodeFactory, hub_env, url_of
from tests.helpers import connect, mint

CLIENT_LOG = logging.getLogger("tests.audit.client")
CLIENT_LOG.setLevel(logging.WARNING)
BODY = "the-secret-message-body-4711"


async def audit_entries(redis: Redis, app: App) -> list[dict[str, str]]:
    """Every audit entry, decoded, once the node's queued events are written."""
    assert app.audit is not None
    await app.audit.flush()
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await redis.xrange(app.keys.audit())]


def only(entries: list[dict[str, str]], **match: str) -> dict[str, str]:
    found = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, entries)
    return found[0]


async def stream_text(redis: Redis, key: str) -> bytes:
    """Every field name and value of every entry of ``key``, concatenated."""
    return b"\n".join(k + b"=" + v for _, fields in await redis.xrange(key) for k, v in fields.items())


async def test_refusals_are_audited_without_tokens_or_bodies(nodes: NodeFactory, redis_client: Redis) -> None:
    """A failed handshake, an ACL denial and a rate-limit hit each leave one event with event, who, ip,
    what and when; no token string and no message body appears anywhere in the stream."""
    app = await nodes.start(**{"server.message_rate_limit_per_min": 60, "server.message_burst": 1})
    forged = mint("9", secret="another-secret-0123456789abcdef0123456789")
    with pytest.raises(InvalidStatus):
        async with ws_connect(f"{url_of(app)}/ws/connect?token={forged}", open_timeout=10, logger=CLIENT_LOG):
            pass
    good = mint("1", roles=["customer"])
    client = await connect(url_of(app), "1", token=good, logger=CLIENT_LOG)
    await client.send({"type": "join_room", "room": "order_77", "request_id": "j"})
    assert (await client.expect("error", request_id="j"))["code"] == "forbidden"
    await client.join("channel_audit")
    await client.say("channel_audit", BODY + "-first")
    await client.send({"type": "chat_message", "room": "channel_audit", "content": BODY, "request_id": "m"})
    assert (await client.expect("error", request_id="m"))["code"] == "rate_limited"

    entries = await audit_entries(redis_client, app)
    failure = only(entries, event="auth_failure")
    assert failure["ip"] == "127.0.0.1" and failure["what"] == "handshake"
    assert failure["reason"] == "token signature invalid" and "who" not in failure
    denial = only(entries, event="acl_denied")
    assert denial == {**denial, "who": "1", "ip": "127.0.0.1", "what": "order_77", "request": "join_room",
                      "node": app.node_id}
    limited = only(entries, event="rate_limited")
    assert limited == {**limited, "who": "1", "ip": "127.0.0.1", "what": "channel_audit",
                       "request": "chat_message"}
    for entry in entries:
        assert entry["when"].endswith("Z") and entry["when"][:4].isdigit()
    text = await stream_text(redis_client, app.keys.audit())
    for secret in (forged, good, *forged.split(".")[1:], *good.split(".")[1:], BODY):
        assert secret.encode() not in text
    await client.close()


async def test_connection_limit_refusal_is_audited(nodes: NodeFactory, redis_client: Redis) -> None:
    """A connect refused with 429 by the per-user cap leaves a rate_limited event for "connect"."""
    app = await nodes.start(**{"server.max_connections_per_user": 1})
    first = await connect(url_of(app), "3", logger=CLIENT_LOG)
    with pytest.raises(InvalidStatus) as info:
        await connect(url_of(app), "3", logger=CLIENT_LOG)
    assert info.value.response.status_code == 429
    entry = only(await audit_entries(redis_client, app), event="rate_limited")
    assert entry["who"] == "3" and entry["what"] == "connect" and entry["ip"] == "127.0.0.1"
    await first.close()


async def hubctl(prefix: str, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={"HUB_CONFIG": None, **hub_env(prefix)})


async def test_admin_commands_are_audited_after_success(prefix: str, redis_client: Redis) -> None:
    """grant, revoke, publish and revoke-token each record one admin_action (command, what, operator)
    once they succeed; publish's content is not recorded, and a refused command records nothing."""
    for args in (["grant", "order_5", "1", "2"], ["revoke", "order_5", "2"],
                 ["publish", "channel_x", "--content", BODY], ["revoke-token", "--jti", "abc"],
                 ["revoke-token", "--user", "9"]):
        result = await hubctl(prefix, *args)
        assert result.exit_code == 0, result.output
    refused = await hubctl(prefix, "grant", "Order_5", "1")
    assert refused.exit_code != 0
    keys = Keys(prefix)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await redis_client.xrange(keys.audit())]
    assert [(e["event"], e["command"], e["what"]) for e in entries] == [
        ("admin_action", "grant", "order_5"), ("admin_action", "revoke", "order_5"),
        ("admin_action", "publish", "channel_x"), ("admin_action", "revoke-token", "jti:abc"),
        ("admin_action", "revoke-token", "user:9")]
    assert entries[0]["users"] == "1,2" and entries[1]["users"] == "2"
    assert entries[2]["type"] == "chat_message" and "-" in entries[2]["id"]
    assert all(e["who"].startswith(("os:", "uid:")) and e["node"].startswith("hubctl@") for e in entries)
    assert BODY.encode() not in await stream_text(redis_client, keys.audit())


# ---------------------------------------------------------------------- the writer


def test_audit_fields_refuse_secrets_and_redact_token_shapes() -> None:
    """Field names that would carry a credential or a body are refused, unknown events too, and a
    token-shaped value is redacted and truncated."""
    for name in ("token", "content", "body", "message", "data"):
        with pytest.raises(ValueError):
            audit_fields("acl_denied", "n1", {name: "x"})
    with pytest.raises(ValueError):
        audit_fields("something_else", "n1", {})
    token = mint("1")
    fields = audit_fields("auth_failure", "n1", {"who": None, "reason": f"bad {token}", "what": "w" * 500})
    assert "who" not in fields and token not in fields["reason"] and "[redacted-jwt]" in fields["reason"]
    assert len(fields["what"]) == 200 and fields["event"] == "auth_failure" and fields["node"] == "n1"


async def test_record_never_blocks_and_drops_when_the_queue_is_full() -> None:
    """With Redis unreachable and a queue of 3, record() returns at once every time, keeps 3 events and
    counts the rest as dropped; close() gives up within its timeout and counts what it could not write."""
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    audit = Audit(dead, Keys("x:"), AuditConfig(queue_size=3), "n1")
    audit.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(10):
            audit.record("acl_denied", who="1", what="order_1")
        assert loop.time() - started < 0.05
        await asyncio.sleep(0)  # the writer takes one batch out of the queue and starts failing
        assert audit.dropped >= 6
        await audit.close(timeout_s=0.3)
        assert audit.written == 0 and audit.dropped == 10
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------- the archive


def archiver_config(**overrides: Any) -> ArchiverConfig:
    return ArchiverConfig(**{"name": "audit-test", "batch_max_rows": 3, **overrides})


async def test_audit_archiver_stores_each_event_once_in_an_append_only_table(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """Events written to hub:audit are stored in audit_log once (redelivering them all adds nothing), with
    their fields; every entry is acknowledged; UPDATE, DELETE and TRUNCATE on audit_log raise."""
    keys = Keys(prefix)
    config = AuditConfig()
    for i in range(7):
        await write_event(redis_client, keys, config, "n1", "acl_denied", who=str(i), ip="10.0.0.1",
                          what=f"order_{i}", request="join_room")
    await redis_client.xadd(keys.audit(), {"odd": "entry"})  # a backend's malformed entry is kept, not lost
    pg_config = PostgresConfig(url=PG_URL, schema=pg_schema)
    for expected_new in (8, 0):
        if expected_new == 0:
            await redis_client.xgroup_setid(keys.audit(), GROUP, id="0")  # redeliver everything
        archiver = AuditArchiver(redis_client, keys, pg_config, archiver_config())
        try:
            await archiver.start()
            stats = await asyncio.wait_for(archiver.run(burst=True), 30)
        finally:
            await archiver.close()
        assert stats.rows_written == expected_new
    assert (await redis_client.xpending(keys.audit(), GROUP))["pending"] == 0
    rows = await pg.fetch("SELECT * FROM audit_log ORDER BY stream_ms, stream_seq")
    assert len(rows) == 8
    assert [(r["event"], r["who"], r["what"], r["ip"], r["node"]) for r in rows[:7]] == [
        ("acl_denied", str(i), f"order_{i}", "10.0.0.1", "n1") for i in range(7)]
    assert rows[0]["detail"] == '{"request": "join_room"}'
    assert rows[7]["event"] == "unknown" and rows[7]["detail"] == '{"odd": "entry"}'
    for statement in ("UPDATE audit_log SET who = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await pg.execute(statement)
    assert await pg.fetchval("SELECT count(*) FROM audit_log WHERE who = 'x'") == 0


async def test_entries_left_pending_by_a_dead_audit_archiver_are_claimed(
        redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """Entries another consumer read but never acknowledged are claimed once idle and stored once."""
    keys = Keys(prefix)
    for i in range(4):
        await write_event(redis_client, keys, AuditConfig(), "n1", "admin_action", what=f"w{i}")
    await redis_client.xgroup_create(keys.audit(), GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "dead-one", {keys.audit(): ">"}, count=10)
    await asyncio.sleep(0.01)  # the entries must have been idle longer than claim_idle_ms
    archiver = AuditArchiver(redis_client, keys, PostgresConfig(url=PG_URL, schema=pg_schema),
                             archiver_config(claim_idle_ms=1))
    try:
        await archiver.start()
        stats = await asyncio.wait_for(archiver.run(burst=True), 30)
    finally:
        await archiver.close()
    assert stats.rows_written == 4
    assert await pg.fetchval("SELECT count(*) FROM audit_log") == 4
    assert (await redis_client.xpending(keys.audit(), GROUP))["pending"] == 0


def test_malformed_when_is_kept_in_detail() -> None:
    """An entry whose when field is not ISO 8601 keeps its stream-id time and the raw value in detail."""
    row = entry_to_audit_row(b"1700000000123-4", {b"event": b"x", b"when": b"yesterday"})
    assert (row.stream_ms, row.stream_seq, row.event) == (1700000000123, 4, "x")
    assert row.at.timestamp() == 1700000000.123 and row.detail == '{"when":"yesterday"}'


async def test_hubctl_archiver_burst_drains_messages_and_audit(redis_client: Redis, prefix: str,
                                                               pg_schema: str, pg: asyncpg.Connection) -> None:
    """hubctl archiver --burst archives room streams and the audit stream, then exits."""
    keys = Keys(prefix)
    await redis_client.xadd(keys.stream("channel_a"), {"content": "hello"})
    for i in range(3):
        await write_event(redis_client, keys, AuditConfig(), "n1", "rate_limited", who=str(i), what="connect")
    env = {**os.environ, **hub_env(prefix, HUB_POSTGRES_SCHEMA=pg_schema)}
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", "archiver", "--burst"],
                                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rows written: 1," in result.stdout and "audit events archived: 3" in result.stdout
    assert await pg.fetchval("SELECT count(*) FROM messages") == 1
    assert await pg.fetchval("SELECT count(*) FROM audit_log WHERE event = 'rate_limited'") == 3


def test_forged_token_strings_never_reach_audit_fields() -> None:
    """Even a caller passing a raw token as a detail value gets it redacted (defence in depth)."""
    token = jwt.encode({"sub": "1"}, "k" * 32, algorithm="HS256")
    assert token not in str(audit_fields("auth_failure", "n", {"reason": token}))
