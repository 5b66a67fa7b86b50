"""Many callers' small Redis commands sent as one pipeline: one round trip per batch, not per call.

The connect path is a handful of single commands per handshake (the revocation lookup, the connect
rate, two connection leases, the inbox's room_open and delivered mark). Sent one round trip each, they
cost a node more CPU than everything else a connect does (redis-py spends 50-80 µs of CPU per round
trip). Through a :class:`CommandBatcher` (one per node, hub.streams.Streams.batcher) every command that
any connection issues while a pipeline is in flight (or in the same event-loop turn, or in the turn after
a batch answered) goes out together in the next one. Rooms' group creation and removal and the inbox
reads go through it too.

Guarantees: one pipeline is in flight at a time and commands are sent in call order, so two commands
one caller issues in order run in that order. Each command is still its own command (or its own
atomic script run): nothing is wrapped in MULTI, so a batch makes exactly the decisions the same
commands would make unbatched. Each caller gets its own reply or its own error (a command's error
does not fail its neighbours); when the pipeline itself fails (connection lost), every caller of
that batch gets that error. A script Redis forgot (restart) is loaded again and retried once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # hiredis (redis[hiredis]) packs a command in C, 8x faster than redis-py's Python packer
    from hiredis import pack_command
except ImportError:  # pragma: no cover - redis-py's own packer then
    pack_command = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from hub.lua import Scripts

# A queued call: the command's arguments, the script's name (None for a plain command), its future.
_Call = tuple[tuple[Any, ...], "str | None", "asyncio.Future[Any]"]


def discard(*futures: asyncio.Future[Any]) -> None:
    """Let go of replies a caller no longer wants (it failed on an earlier one): pending ones are
    cancelled (the batch skips them), finished ones have their error retrieved (no "never retrieved"
    warning)."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


class CommandBatcher:
    """Coalesces single commands and script calls from many callers into pipelines."""

    MAX_BATCH = 512

    def __init__(self, redis: Redis, scripts: Scripts | None = None) -> None:
        self._redis = redis
        self._scripts = scripts
        self._link = PipelineLink(redis)
        self._queue: list[_Call] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # pipelines sent, for metrics and tests

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"GET", key``); the future gets its reply as redis-py parses it."""
        return self._queue_call(args, None)

    def script(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one run of the Lua script ``name`` (EVALSHA)."""
        assert self._scripts is not None, "script calls need the Scripts"
        sha = self._scripts.by_name[name].sha
        return self._queue_call(("EVALSHA", sha, len(keys), *keys, *args), name)

    def _queue_call(self, args: tuple[Any, ...], script: str | None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, script, future))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                await self._send(batch)
                # Let the callers this batch answered run first: most queue their next command at once
                # (the connect path is a few steps of one or two commands), which then joins the next
                # batch instead of waiting for the one after it.
                await asyncio.sleep(0)
        finally:
            self._task = None

    async def _send(self, batch: list[_Call]) -> None:
        for attempt in (1, 2):
            try:
                results = await self._exchange([args for args, _script, _future in batch])
            except (RedisError, OSError) as exc:
                for _args, _script, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            self.batches += 1
            retry: list[_Call] = []
            for call, result in zip(batch, results, strict=True):
                future = call[2]
                if future.done():  # the caller gave up (cancelled)
                    continue
                if isinstance(result, NoScriptError) and attempt == 1 and call[1] is not None:
                    retry.append(call)
                elif isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if not retry:
                return
            assert self._scripts is not None
            try:
                await self._scripts.load()  # Redis restarted and forgot the scripts
            except (RedisError, OSError) as exc:
                for _args, _script, future in retry:
                    if not future.done():
                        future.set_exception(exc)
                return
            batch = retry

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return await self._link.exchange(commands)


class PipelineLink:
    """Sends one sender's pipelines (the publisher's, a command batcher's: one in flight at a time) over a
    Redis connection of its own.

    Each pipeline goes out as redis-py's would, on one connection, retried on a connection error by the
    client's retry policy like it; but under one timer for the whole exchange where redis-py's pipeline
    arms one per reply (a tenth of the connect path's CPU at 4,000 connects), packed by hiredis, and on a
    connection taken from the pool once and kept: taking and returning it for every pipeline (the pool's
    lock, its liveness check of the socket, its bookkeeping) cost as much CPU as sending the pipeline.
    The pool still owns the connection: closing the client disconnects it, and a broken one reconnects
    on the next send. Through Sentinel, the connection is taken per pipeline (see exchange). On a Redis
    Cluster, the cluster client's pipeline routes each command by its key.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._connection: Any = None

    async def exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` as one pipeline and read their replies (a command's error in its place); raises
        RedisError/OSError when the pipeline itself fails. Not for concurrent use."""
        redis = self._redis
        if not isinstance(redis, Redis):  # a cluster's client
            pipe = redis.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))
        pool = redis.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            # Not kept: a Sentinel pool moves its idle connections to a new master after a failover, and an
            # old master keeps its clients (a kept connection would go on writing there until it turns
            # read-only, and those writes are lost).
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                return await _exchange_on(redis, connection, commands)
            finally:
                await pool.release(connection)
        if self._connection is None:
            self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        return await _exchange_on(redis, self._connection, commands)


async def _exchange_on(redis: Redis, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    replies: list[Any] = await connection.retry.call_with_retry(
        lambda: _send_and_read(redis, connection, commands), lambda _error: connection.disconnect())
    return replies


async def _send_and_read(redis: Redis, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    callbacks = redis.response_callbacks
    timeout = connection.socket_timeout
    connection.socket_timeout = None  # for the reads below: the one timer covers them
    replies: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            await connection.send_packed_command(_packed(commands) if pack_command is not None
                                                 else connection.pack_commands(commands))
            for args in commands:
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    replies.append(exc)
                    continue
                callback = callbacks.get(args[0])
                replies.append(callback(reply) if callback is not None else reply)
    except TimeoutError:
        # The cancelled read disconnected the connection (no reply can be read out of order).
        raise RedisTimeoutError("Timeout reading a pipelined batch from Redis") from None
    finally:
        connection.socket_timeout = timeout
    return replies


def _packed(commands: list[tuple[Any, ...]]) -> bytes:
    """The commands in RESP, as redis-py would pack them (it splits a command name like "XGROUP CREATE")."""
    assert pack_command is not None
    return b"".join(pack_command((*args[0].split(), *args[1:]) if " " in args[0] else args) for args in commands)
