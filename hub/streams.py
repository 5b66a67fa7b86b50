"""Room streams in Redis: opening a room, reading ranges, consumer groups, grants, publishing.

Publishing is pipelined: :class:`Publisher` collects the publishes of every connection that arrive
while one round trip is in flight and sends them together, so a node does one round trip for many
messages instead of one EVALSHA round trip per message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from hub.batching import CommandBatcher, PipelineLink, discard
from hub.errors import RateLimited, Unavailable
from hub.keys import Keys
from hub.limits import RateCheck
from hub.lua import Scripts
from hub.protocol import StreamId, format_stream_id, parse_stream_id
from hub.ratelimit import fallback, gcra_decision

log = logging.getLogger("hub.streams")

Entry = tuple[bytes, dict[bytes, bytes]]


# Epochs of this process: a random 64-bit start, then counting up. Unique like a random one per call
# (the start is random per process), without a getrandom() system call for every publish: each
# publish carries an epoch in case it creates its room.
_epochs = itertools.count(secrets.randbits(64))


def _reseed_epochs() -> None:
    global _epochs
    _epochs = itertools.count(secrets.randbits(64))


# Forked workers (hubctl serve --workers) must not count from the same start: two of them could give a room
# recreated after a Redis data loss the epoch it had, and resuming clients would not learn of the loss.
os.register_at_fork(after_in_child=_reseed_epochs)


def new_epoch() -> str:
    """A fresh room epoch: 16 hex digits."""
    return format(next(_epochs) & 0xFFFF_FFFF_FFFF_FFFF, "016x")


@dataclass(frozen=True)
class RoomPosition:
    epoch: str
    min_id: StreamId  # entries below may have been trimmed (the archiver's watermark)
    first_id: StreamId  # oldest entry still in the stream, (0, 0) when empty
    last_id: StreamId  # newest entry, (0, 0) when empty

    def archive_covers(self, epoch: str, last_id: StreamId) -> bool:
        """Whether the entries after ``last_id`` that Redis no longer holds were trimmed by the
        archiver (so PostgreSQL has them): same epoch, and our trim watermark is past the position
        (a trim by anyone else leaves no watermark)."""
        return epoch == self.epoch and last_id <= self.last_id and last_id < self.min_id

    def can_resume_after(self, epoch: str, last_id: StreamId) -> bool:
        """Whether every entry after ``last_id`` is still in the stream.

        Trimming only removes the oldest entries, so a position at or after the first entry is
        whole. An older position is whole only if nothing was ever trimmed past it: the watermark
        says so for our own trimming, and a client's own last entry having vanished says a backend
        trimmed (a position of 0-0, from joining an empty room, has no entry of its own)."""
        if epoch != self.epoch or not (self.min_id <= last_id <= self.last_id):
            return False
        if self.first_id == (0, 0) or last_id >= self.first_id:
            return True
        return last_id == (0, 0)


class Streams:
    """Room-level Redis operations. Every call may raise :class:`~hub.errors.Unavailable`."""

    def __init__(self, redis: Redis, scripts: Scripts, keys: Keys) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        # The node's small per-connection commands (the connect path, group creation) share pipelines.
        self.batcher = CommandBatcher(redis, scripts)

    async def open_room(self, room: str) -> RoomPosition:
        """The room's epoch (created if new), trim watermark and newest id."""
        try:
            epoch, min_id, first_id, last_id = await self.scripts.call(
                "room_open", [self.keys.stream(room), self.keys.meta(room)], [new_epoch()])
        except RedisError as exc:
            raise Unavailable(f"Redis unavailable: {type(exc).__name__}") from exc
        return RoomPosition(epoch.decode(), _sid(min_id), _sid(first_id), _sid(last_id))

    async def open_room_and_read_meta(self, room: str, meta_field: str) -> tuple[RoomPosition, bytes | None]:
        """:meth:`open_room` and one field of the room's meta hash, in one round trip (shared with other
        callers')."""
        keys = [self.keys.stream(room), self.keys.meta(room)]
        opened = self.batcher.script("room_open", keys, [new_epoch()])
        value = self.batcher.command("HGET", self.keys.meta(room), meta_field)
        try:
            epoch, min_id, first_id, last_id = await opened
            mark: bytes | None = await value
        except RedisError as exc:
            discard(value)
            raise Unavailable(f"Redis unavailable: {type(exc).__name__}") from exc
        return RoomPosition(epoch.decode(), _sid(min_id), _sid(first_id), _sid(last_id)), mark

    async def read_after(self, room: str, after: StreamId, count: int) -> list[Entry]:
        """Entries with id > ``after``, oldest first, at most ``count``."""
        try:
            rows = await self.redis.xrange(self.keys.stream(room), min=f"({format_stream_id(after)}",
                                           max="+", count=count)
        except RedisError as exc:
            raise Unavailable(f"Redis unavailable: {type(exc).__name__}") from exc
        return _entries(rows)

    async def read_latest(self, room: str, count: int) -> list[Entry]:
        """The newest ``count`` entries, oldest first."""
        if count <= 0:
            return []
        try:
            rows = await self.redis.xrevrange(self.keys.stream(room), max="+", min="-", count=count)
        except RedisError as exc:
            raise Unavailable(f"Redis unavailable: {type(exc).__name__}") from exc
        return list(reversed(_entries(rows)))

    async def is_granted(self, room: str, user_id: str) -> bool:
        try:
            return bool(await self.redis.sismember(self.keys.acl(room), user_id))
        except RedisError as exc:
            raise Unavailable(f"Redis unavailable: {type(exc).__name__}") from exc

    async def grant(self, room: str, user_ids: Sequence[str]) -> int:
        return int(await self.redis.sadd(self.keys.acl(room), *user_ids))

    async def revoke(self, room: str, user_ids: Sequence[str]) -> int:
        return int(await self.redis.srem(self.keys.acl(room), *user_ids))

    async def append(self, room: str, fields: Sequence[bytes | str], *, sender_id: str = "",
                     idempotency_id: str | None = None, idempotency_ttl_s: int = 86_400) -> str:
        """Append one entry (creating the room's epoch if new). Returns the stream id. With
        ``idempotency_id``, a second append with the same (sender, id) appends nothing and returns
        the first one's id."""
        keys = [self.keys.stream(room), self.keys.meta(room)]
        if idempotency_id is not None:
            keys.append(self.keys.idempotency(room, sender_id, idempotency_id))
        flags = "i" if idempotency_id is not None else ""
        sid, _epoch, _dup, _retry = await self.scripts.call(
            "room_publish", keys,
            [new_epoch(), idempotency_ttl_s, self.keys.events_channel(room), flags, 0, 0, pack_fields(fields)])
        return str(sid.decode())

    async def remember_join(self, user_id: str, room: str) -> None:
        """Note that ``user_id`` joined ``room`` (the rooms list reads it)."""
        try:
            await self.redis.zadd(self.keys.user_rooms(user_id), {room: int(time.time() * 1000)})
        except RedisError as exc:
            log.debug("could not note a join: %s", type(exc).__name__)

    async def create_group(self, room: str, group: str, remember_in: str | None = None) -> None:
        """Create ``group`` on the room's stream at its current end ("$"), or move it there; with
        ``remember_in``, also add the room to that set, in the same round trip (shared with other callers')."""
        stream = self.keys.stream(room)
        created = self.batcher.command("XGROUP CREATE", stream, group, "$", "MKSTREAM")
        remembered = self.batcher.command("SADD", remember_in, room) if remember_in is not None else None
        busy = False
        try:
            await created
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                if remembered is not None:
                    discard(remembered)
                raise
            busy = True
        if remembered is not None:
            await remembered
        if busy:
            await self.redis.xgroup_setid(stream, group, id="$")

    async def restore_group(self, room: str, group: str) -> bool:
        """Recreate ``group`` after its stream vanished (Redis lost data, or a purge), at the start of
        the new stream so everything it holds is delivered. A group that still exists is left as it is.
        Returns True when it had to be created."""
        try:
            await self.redis.xgroup_create(self.keys.stream(room), group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    async def destroy_group(self, room: str, group: str, forget_in: str | None = None) -> None:
        """Remove ``group`` from the room's stream; with ``forget_in``, also remove the room from that set,
        in the same round trip (shared with other callers')."""
        destroyed = self.batcher.command("XGROUP DESTROY", self.keys.stream(room), group)
        forgotten = self.batcher.command("SREM", forget_in, room) if forget_in is not None else None
        try:
            await destroyed
        finally:
            if forgotten is not None:
                await forgotten


@dataclass(frozen=True)
class PublishResult:
    id: str
    epoch: str
    duplicate: bool


def pack_fields(fields: Sequence[bytes | str]) -> bytes:
    """An entry's field/value list as room_publish.lua takes it (msgpack; str as UTF-8)."""
    packed: bytes = msgpack.packb(list(fields), use_bin_type=False)
    return packed


@dataclass
class _Request:
    keys: list[str]  # stream, meta[, idempotency]
    args: list[Any]  # epoch, idempotency TTL, announcement channel
    packed: bytes  # the entry's fields, for room_publish.lua
    future: asyncio.Future[PublishResult]
    rate: RateCheck | None = None

    def script_call(self, with_rate: bool) -> tuple[list[str], list[Any]]:
        """room_publish.lua's KEYS and ARGV, with the rate check inside the script or not."""
        flags = "i" if len(self.keys) > 2 else ""
        if with_rate and self.rate is not None:
            interval_us, burst = self.rate.args[0], self.rate.args[1]
            return [*self.keys, self.rate.key], [*self.args, flags + "r", interval_us, burst, self.packed]
        return self.keys, [*self.args, flags, 0, 0, self.packed]


class Publisher:
    """Pipelines room_publish calls from all connections of a node.

    Guarantees: requests are sent in submission order within one pipeline, and pipelines run one
    at a time, so one connection's messages get increasing stream ids in the order it sent them.
    """

    MAX_BATCH = 512

    def __init__(self, streams: Streams, idempotency_ttl_s: int, *, rate_in_script: bool = True,
                 linger_s: float = 0.0) -> None:
        self._streams = streams
        # Under load, a pipeline goes out at most once per linger: what arrives meanwhile joins it (one
        # Redis write, one read, one burst of announcements for many messages). A message arriving after a
        # quiet spell goes out at once.
        self._linger_s = linger_s
        self._last_sent = 0.0
        # On a single Redis the sender's rate check runs inside room_publish.lua (one round trip per
        # batch); on a cluster the rate key lives in another slot, so rate_gcra.lua runs first.
        self._rate_in_script = rate_in_script
        self._keys = streams.keys
        self._ttl_s = idempotency_ttl_s
        self._queue: list[_Request] = []
        self._wake = asyncio.Event()
        self._link = PipelineLink(streams.redis)
        self.batches = 0  # pipelines sent, for metrics and tests

    def submit(self, room: str, sender_id: str, client_msg_id: str | None, fields: list[bytes | str],
               rate: RateCheck | None = None) -> asyncio.Future[PublishResult]:
        """Queue a publish; with ``rate``, the sender's rate limit is checked first in the same batch
        (a refused message fails with :class:`RateLimited` and is not stored)."""
        keys = [self._keys.stream(room), self._keys.meta(room)]
        if client_msg_id is not None:
            keys.append(self._keys.idempotency(room, sender_id, client_msg_id))
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(keys, [new_epoch(), self._ttl_s, self._keys.events_channel(room)],
                                    pack_fields(fields), future, rate))
        self._wake.set()
        return future

    async def run(self) -> None:
        """Send queued publishes until cancelled (owned by the app's task group)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            loop = asyncio.get_running_loop()
            if self._linger_s > 0:
                wait_s = self._last_sent + self._linger_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)  # the previous pipeline left just now: let this one fill
            while self._queue:
                batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                self._last_sent = loop.time()
                await self._send(batch)

    async def _check_rates(self, batch: list[_Request]) -> list[_Request]:
        """Run the batch's rate checks in one pipeline (in submission order, so GCRA stays exact);
        fail the refused requests, return the rest."""
        rated = [req for req in batch if req.rate is not None]
        if not rated:
            return batch
        scripts = self._streams.scripts
        results: list[Any] | None = None
        for _attempt in (1, 2):
            pipe = self._streams.redis.pipeline(transaction=False)
            for req in rated:
                assert req.rate is not None
                scripts.call_in(pipe, "rate_gcra", [req.rate.key], req.rate.args)
            try:
                results = await pipe.execute(raise_on_error=False)
            except RedisError:
                results = None
                break
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            try:
                await scripts.load()
            except RedisError:
                results = None
                break
        refused: set[int] = set()
        for index, req in enumerate(rated):
            assert req.rate is not None
            reply = results[index] if results is not None else None
            try:
                decision = fallback(req.rate.fail_open) if reply is None or isinstance(reply, Exception) \
                    else gcra_decision(reply)
            except RedisError:
                decision = fallback(req.rate.fail_open)
            if not decision.allowed:
                refused.add(id(req))
                if not req.future.done():
                    req.future.set_exception(RateLimited("too many messages; nothing was stored",
                                                         decision.retry_after_ms))
        return [req for req in batch if id(req) not in refused]

    async def _send(self, batch: list[_Request]) -> None:
        with_rate = self._rate_in_script
        if not with_rate:
            batch = await self._check_rates(batch)
            if not batch:
                return
        scripts = self._streams.scripts
        sha = scripts.by_name["room_publish"].sha
        for attempt in (1, 2):
            commands = []
            for req in batch:
                keys, args = req.script_call(with_rate)
                commands.append(("EVALSHA", sha, len(keys), *keys, *args))
            try:
                # One pipeline under one timer, packed by hiredis (hub/batching.py), not redis-py's
                # pipeline, which packs in Python and arms a timer per reply.
                results = await self._link.exchange(commands)
            except (RedisError, OSError) as exc:
                log.warning("publish pipeline failed: %s", type(exc).__name__)
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(Unavailable("Redis unavailable; nothing was stored"))
                return
            self.batches += 1
            retry: list[_Request] = []
            for req, result in zip(batch, results, strict=True):
                if req.future.done():
                    continue
                if isinstance(result, NoScriptError) and attempt == 1:
                    retry.append(req)
                elif isinstance(result, Exception):
                    log.warning("publish failed: %s", result)
                    req.future.set_exception(Unavailable(_refusal_message(result)))
                elif not result[0]:  # refused by the rate check inside the script: nothing stored
                    req.future.set_exception(RateLimited("too many messages; nothing was stored", int(result[3])))
                else:
                    sid, epoch, duplicate, _retry = result
                    req.future.set_result(PublishResult(sid.decode(), epoch.decode(), bool(duplicate)))
            if not retry:
                return
            try:
                await scripts.load()
            except RedisError:
                for req in retry:
                    req.future.set_exception(Unavailable("Redis unavailable; nothing was stored"))
                return
            batch = retry


def _refusal_message(error: Exception) -> str:
    """What a client is told when Redis answered a publish with an error."""
    if "OOM command not allowed" in str(error):  # also raised inside the publish script
        return "Redis is out of memory (maxmemory reached); nothing was stored; retry later with the same client_msg_id"
    return "Redis refused the message; nothing was stored"


def _entries(rows: Any) -> list[Entry]:
    """redis-py's XRANGE reply (bytes mode) as typed entries."""
    return [(eid, fields or {}) for eid, fields in rows or []]


def _sid(value: bytes) -> StreamId:
    return parse_stream_id(value.decode())
