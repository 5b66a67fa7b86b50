"""hub.batching.CommandBatcher: many callers' commands share pipelines, each caller gets its own reply
or its own error, a forgotten script is loaded and retried, and a lost connection fails its batch."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from hub.batching import CommandBatcher
from hub.lua import Scripts
from tests.redis_server import PrivateRedis


async def test_concurrent_callers_share_pipelines_and_get_their_own_replies(prefix: str, redis_client: Redis) -> None:
    """600 callers in one loop turn: two pipelines (MAX_BATCH 512), replies in the callers' order."""
    batcher = CommandBatcher(redis_client)
    keys = [f"{prefix}b{i}" for i in range(600)]
    await redis_client.mset({key: str(i) for i, key in enumerate(keys)})
    replies = await asyncio.gather(*(batcher.command("GET", key) for key in keys))
    assert replies == [str(i).encode() for i in range(600)]
    assert batcher.batches == 2


async def test_one_callers_error_does_not_fail_its_neighbours(prefix: str, redis_client: Redis) -> None:
    """A WRONGTYPE in the middle of a batch fails that caller only; commands run in call order."""
    batcher = CommandBatcher(redis_client)
    await redis_client.rpush(f"{prefix}list", "x")
    first = batcher.command("SET", f"{prefix}k", "1")
    wrong = batcher.command("GET", f"{prefix}list")
    last = batcher.command("GET", f"{prefix}k")  # sees the SET queued before it
    assert await first is True
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await wrong
    assert await last == b"1"
    assert batcher.batches == 1


async def test_a_script_redis_forgot_is_loaded_and_retried(private_redis: PrivateRedis) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) queued script calls still get their replies."""
    redis = Redis.from_url(private_redis.url)
    try:
        scripts = Scripts(redis)
        await scripts.load()
        batcher = CommandBatcher(redis, scripts)
        await redis.script_flush()
        replies = await asyncio.gather(
            *(batcher.script("rate_gcra", [f"rl:{i}"], [1000, 5, 1]) for i in range(3)),
            batcher.command("PING"))
        assert [reply[0] for reply in replies[:3]] == [1, 1, 1]  # each allowed: its own fresh key
        assert replies[3] is True
    finally:
        await redis.aclose()


async def test_a_lost_connection_fails_every_caller_of_the_batch() -> None:
    """Redis unreachable: every queued caller gets the connection error (none hangs)."""
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        batcher = CommandBatcher(dead)
        futures = [batcher.command("GET", f"k{i}") for i in range(5)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results)
    finally:
        await dead.aclose()
