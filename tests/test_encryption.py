"""Encryption at rest, end to end: sealed in Redis and PostgreSQL, plaintext to members, rotation."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import aiohttp
import asyncpg
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from cli.main import cli
from hub.keys import Keys
from tests.conftest import PG_URL, REDIS_URL, NodeFactory, url_of
from tests.helpers import connect, mint
from tests.test_archiver import burst

K1 = "k1:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2:" + base64.b64encode(b"2" * 32).decode()
SECRET_TEXT = "the price is 1890 EUR, final offer"
CARD_TEXT = "pay with 4111 1111 1111 1111 please"


async def stream_contents(redis: Redis, prefix: str, room: str) -> list[bytes]:
    return [fields[b"content"] for _, fields in await redis.xrange(Keys(prefix).stream(room))]


async def history(node: Any, room: str, user: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.api_port}/ws/rooms/{room}/messages?limit=100",
            headers={"Authorization": f"Bearer {mint(user)}"}) as r:
        assert r.status == 200
        return list((await r.json())["data"]["messages"])


async def test_quote_room_content_is_sealed_at_rest_and_plain_for_members(
        nodes: NodeFactory, redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    """A quote room message is ciphertext in XRANGE and in PostgreSQL, plaintext for members live and
    in history, never in logs, and not searchable; a card number is sealed in any room."""
    caplog.set_level(logging.DEBUG)
    await redis_client.sadd(Keys(prefix).acl("quote_5"), "1", "2")
    node = await nodes.start(**{"encryption.key": K1, "postgres.schema": pg_schema})
    sender, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    for client in (sender, reader):
        await client.join("quote_5")
        await client.join("channel_pay")
    await sender.say("quote_5", SECRET_TEXT)
    await sender.say("channel_pay", CARD_TEXT)
    await sender.say("channel_pay", "nothing secret here")
    assert (await reader.expect("chat_message", room="quote_5"))["content"] == SECRET_TEXT
    assert (await reader.expect("chat_message", room="channel_pay"))["content"] == CARD_TEXT
    [sealed] = await stream_contents(redis_client, prefix, "quote_5")
    assert sealed.startswith(b"enc:v1:k1:") and b"1890" not in sealed
    channel = await stream_contents(redis_client, prefix, "channel_pay")
    assert channel[0].startswith(b"enc:v1:k1:") and channel[1] == b"nothing secret here"
    await burst(redis_client, prefix, pg_schema)
    stored = await pg.fetch("SELECT content FROM messages WHERE room IN ('quote_5', 'channel_pay') ORDER BY stream_ms")
    assert sum(1 for r in stored if r["content"].startswith("enc:v1:k1:")) == 2
    assert not any("1890" in r["content"] or "4111" in r["content"] for r in stored)
    trimmed = await redis_client.delete(Keys(prefix).stream("quote_5"))  # history now comes from PostgreSQL
    assert trimmed == 1
    assert [m["content"] for m in await history(node, "quote_5", "2")] == [SECRET_TEXT]
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.api_port}/ws/search?query=price&room_name=quote_5",
            headers={"Authorization": f"Bearer {mint('2')}"}) as r:
        assert (await r.json())["data"]["results"] == []
    assert not any(SECRET_TEXT in rec.getMessage() or "4111 1111" in rec.getMessage() for rec in caplog.records)


async def test_a_sealed_message_moved_to_another_room_does_not_open(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """Copying a quote room's ciphertext into another room's stream yields the unreadable marker."""
    await redis_client.sadd(Keys(prefix).acl("quote_6"), "1")
    node = await nodes.start(**{"encryption.key": K1})
    client = await connect(url_of(node), "1")
    await client.join("quote_6")
    await client.join("channel_copy")
    await client.say("quote_6", SECRET_TEXT)
    [(_, fields)] = await redis_client.xrange(Keys(prefix).stream("quote_6"))
    await redis_client.xadd(Keys(prefix).stream("channel_copy"), fields)
    moved = await client.expect("chat_message", room="channel_copy")
    assert SECRET_TEXT not in moved["content"] and "cannot be decrypted" in moved["content"]


@pytest.mark.timeout(60)
async def test_rotation_keeps_old_messages_readable_and_rotate_keys_moves_them(
        nodes: NodeFactory, redis_client: Redis, prefix: str, pg_schema: str, pg: asyncpg.Connection) -> None:
    """Messages sealed under k1 still read after k2 becomes current (k1 kept in the ring);
    hubctl rotate-keys re-seals the archive under k2, after which k1 is no longer needed."""
    await redis_client.sadd(Keys(prefix).acl("quote_7"), "1")
    old = await nodes.start(**{"encryption.key": K1, "postgres.schema": pg_schema})
    client = await connect(url_of(old), "1")
    await client.join("quote_7")
    await client.say("quote_7", "old secret")
    await client.close()
    new = await nodes.start(**{"encryption.key": K2, "encryption.keys": (K1,), "postgres.schema": pg_schema})
    client = await connect(url_of(new), "1")
    await client.join("quote_7")
    await client.say("quote_7", "new secret")
    contents = await stream_contents(redis_client, prefix, "quote_7")
    assert contents[0].startswith(b"enc:v1:k1:") and contents[1].startswith(b"enc:v1:k2:")
    await burst(redis_client, prefix, pg_schema)
    await redis_client.delete(Keys(prefix).stream("quote_7"))
    assert [m["content"] for m in await history(new, "quote_7", "1")] == ["new secret", "old secret"]
    env = {"REDIS_URL": REDIS_URL, "DATABASE_URL": PG_URL, "HUB_POSTGRES_SCHEMA": pg_schema,
           "HUB_REDIS_KEY_PREFIX": prefix, "WEBSOCKET_ENCRYPTION_KEY": K2, "HUB_ENCRYPTION_KEYS": K1,
           "PATH": os.environ["PATH"]}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["rotate-keys"], env=env)
    assert result.exit_code == 0 and "re-encrypted 1 message" in result.output, result.output
    again = await asyncio.to_thread(CliRunner().invoke, cli, ["rotate-keys"], env=env)
    assert "re-encrypted 0 message" in again.output
    rows = await pg.fetch("SELECT content FROM messages WHERE room = 'quote_7'")
    assert all(r["content"].startswith("enc:v1:k2:") for r in rows)
    only_k2 = await nodes.start(**{"encryption.key": K2, "postgres.schema": pg_schema})
    assert [m["content"] for m in await history(only_k2, "quote_7", "1")] == ["new secret", "old secret"]
