"""The node's stream reader: one consumer group per room with local members, woken per room.

Cost follows rooms with new data, not rooms joined: the relay subscribes to the keyspace
notification of each active room's stream key (which also fires for a backend's raw ``XADD``) and
reads only the rooms that were woken, many streams per ``XREADGROUP`` call. A slow sweep re-reads
every active room now and then, as a safety net for notifications lost while the subscription
connection was down.

Most entries need no read at all: room_publish.lua publishes each client message on the room's
``:ev`` channel right after its XADD, so it reaches the node on the subscription connection just
behind the XADD's keyspace notification. Each notification counts one unread entry for the room;
each announced entry takes one back and, when nothing else is unread (no raw XADD or sweep ahead
of it, no read in progress), is delivered directly. Only rooms with unread entries left are read,
and before such a read the group's cursor is moved up to what was delivered directly, so the read
returns only what was not.

Inboxes (one per connected user) have no group: the node reads each with XREAD after a cursor it keeps
itself, starting where the first attaching connection's position says (:meth:`Relay.start_inbox`). So a
connect creates, and a disconnect destroys, nothing in Redis for its inbox (a group per user cost two
commands each way and a keyspace notification to every node); rooms keep their groups.

Ordering: within a room, entries are read in stream order and handed to the registry in that order;
one read loop means one room is never fanned out by two tasks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from hub.config import RelayConfig
from hub.keys import Keys
from hub.notifications import INBOX_PREFIX, Inbox
from hub.protocol import Delivery, Opener, StreamId, entry_to_delivery, format_stream_id, parse_stream_id
from hub.redis_client import xreadgroup_many
from hub.registry import Registry
from hub.streams import Streams
from hub.subscriptions import Subscriptions
from hub.tasks import cancel_and_wait

log = logging.getLogger("hub.relay")

# The position of an empty stream.
_EMPTY: StreamId = (0, 0)


class Relay:
    def __init__(self, redis: Redis, streams: Streams, keys: Keys, registry: Registry, node_id: str,
                 config: RelayConfig, on_acl_change: Callable[[str], Coroutine[Any, Any, None]],
                 opener: Opener | None = None, *, silence_s: float = 5.0) -> None:
        self._redis = redis
        # A subscription connection silent this long is pinged; without a pong within as long again it is
        # re-made (a black-holed connection never errors by itself: it just stops delivering wake-ups). With
        # Redis Cluster each master's connection is probed on its own (see hub.subscriptions).
        self._silence_s = silence_s
        self._streams = streams
        self._keys = keys
        self._registry = registry
        self._group = node_id
        self._consumer = node_id
        self._config = config
        self._on_acl_change = on_acl_change
        # Opens sealed content before fan-out (members receive plaintext).
        self._opener = opener
        # The node's counters (delivery by room type, latency); set by the node.
        self.metrics: Any = None
        self._inbox = Inbox(streams.scripts, keys)
        # Rooms whose group exists and whose notifications we receive (and active inboxes).
        self.active: set[str] = set()
        # Active inbox -> the newest entry read (delivered after it); None until start_inbox() says.
        self._inbox_cursors: dict[str, StreamId | None] = {}
        # Inboxes woken while their cursor was unknown: read once it is.
        self._inbox_woken: set[str] = set()
        # Rooms to read on the next turn of the read loop: those with unread entries (see _unread).
        self._dirty: set[str] = set()
        # The read loop is woken once per event-loop turn at most, after the subscription's buffered
        # messages were dispatched: by then most wake-ups were matched by their announcements.
        self._kick_scheduled = False
        # Per room: wake-ups (keyspace notifications, sweeps) not matched by an announced entry yet.
        # A room is read only while this is above zero.
        self._unread: dict[str, int] = {}
        # Per room: the newest entry handed to the registry (by a read or directly).
        self._delivered_up_to: dict[str, StreamId] = {}
        # Rooms whose group cursor is behind _delivered_up_to (entries delivered directly).
        self._cursor_behind: set[str] = set()
        # Rooms being read now, and those an announcement arrived for meanwhile (read again after).
        self._reading: set[str] = set()
        self._reread: set[str] = set()
        # Rooms whose announced entries arrive without their keyspace notification (see _on_announced).
        self._unpaired: set[str] = set()
        # Rooms with an announced entry left for the next read: later ones are not delivered before it.
        self._held: set[str] = set()
        self._wake = asyncio.Event()
        # The subscription connections (keyspace notifications + control channel): one, or one per cluster
        # master; made in start().
        self._pubsub: Subscriptions | None = None
        # keyspace channel -> (room, what): "s" for the stream, "acl" for the grant set.
        self._channels: dict[str, tuple[str, str]] = {}
        # Subscribe confirmations we wait for, per channel, in the order we asked.
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        # Pending ACL re-checks (owned here, awaited on close).
        self._acl_tasks: set[asyncio.Task[None]] = set()
        # Called with each control-channel message (token revocations); set by the app, must not raise.
        self.on_control: Callable[[bytes], None] | None = None
        # Called with a room whose stream vanished (its live members may have missed entries); set by the
        # node, must not raise.
        self.on_stream_lost: Callable[[str], None] | None = None
        # Announced entries per room, handed over together once the announcements that arrived with them are
        # dispatched (_flush_announced, scheduled by the first): one joined write per member for all of a room's
        # messages that came in one read of the subscription connection, not a write per message.
        self._announced: dict[str, list[Delivery]] = {}
        self._announced_flush_due = False
        self.entries_delivered = 0
        self.entries_announced = 0  # delivered straight from room_publish.lua's announcement
        self.undeliverable_entries = 0
        self.streams_lost = 0  # streams found without our group (Redis lost data, or a purge)
        self.reads = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Lost notifications (a reconnect, a failover) wake every active room.
        self._pubsub = Subscriptions(self._redis, self._dispatch, on_gap=self._wake_all, silence_s=self._silence_s,
                                     name="relay")
        await self._pubsub.subscribe(self._keys.control_channel())
        # Every connection reads its user's inbox: two patterns cover all of them, so a connect
        # costs no SUBSCRIBE round trip and the node keeps no channel per user.
        await self._pubsub.psubscribe(*self._keys.inbox_patterns())

    async def run(self) -> None:
        """Run the read loop, the subscription listener and the sweep until cancelled (or one of them fails)."""
        assert self._pubsub is not None
        # Not a TaskGroup: it cancels its tasks once, and a cancellation that redis-py's wait_for swallows (see
        # hub.tasks) left the read loop running and the node's shutdown waiting forever. Each is cancelled until
        # it is done, here and (shielded) when this task is cancelled again meanwhile.
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._pubsub.run()), loop.create_task(self._read_loop()),
                 loop.create_task(self._sweep())]
        try:
            await asyncio.gather(*tasks)
        finally:
            await asyncio.shield(cancel_and_wait(tasks))

    async def close(self) -> None:
        await cancel_and_wait(list(self._acl_tasks))
        if self._pubsub is not None:
            await self._pubsub.aclose()

    # ------------------------------------------------------------------ activation

    async def activate(self, room: str) -> None:
        """Start reading ``room``: subscribe to its wake-ups, then create the node's group at the
        stream's end. Callers hold the registry's room lock. Entries added after this returns are
        delivered live; anything older is the joining client's replay.

        An inbox needs no Redis here: no group, and the node's inbox patterns carry its wake-ups. Its
        reading starts after the position the attaching connection passes to :meth:`start_inbox`."""
        if room.startswith(INBOX_PREFIX):
            self._inbox_cursors[room] = None
            self.active.add(room)
            return
        assert self._pubsub is not None
        channels = self._room_channels(room)
        for channel, what in channels.items():
            self._channels[channel] = (room, what)
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            fut: asyncio.Future[None] = loop.create_future()
            self._confirmations.setdefault(channel, []).append(fut)
            waits.append(fut)
        try:
            if channels:
                await self._pubsub.subscribe(*channels)
                # The group must not be created before Redis confirmed the subscription, or an entry
                # added in between would wait for the sweep.
                async with asyncio.timeout(10):
                    await asyncio.gather(*waits)
            await self._streams.create_group(room, self._group, remember_in=self._keys.node_rooms(self._group))
        except BaseException:
            for fut in waits:
                fut.cancel()
            await self._unsubscribe(room)
            raise
        self.active.add(room)
        self.wake(room)

    def start_inbox(self, room: str, position: StreamId) -> None:
        """Read the just activated inbox ``room`` after ``position`` (the newest entry when the attaching
        connection opened it: anything older is that connection's replay). The first position given wins:
        the connection that activated the inbox asked Redis first, so later ones are no older (and members
        filter what their replay had)."""
        if room in self._inbox_cursors and self._inbox_cursors[room] is None:
            # Most inboxes are empty: share one (0, 0) rather than keep a tuple per connected user.
            self._inbox_cursors[room] = _EMPTY if position == _EMPTY else position
            if room in self._inbox_woken:
                self._inbox_woken.discard(room)
                self.wake(room)

    async def deactivate(self, room: str) -> None:
        """Stop reading ``room`` (its last local member left). Callers hold the room lock."""
        self.active.discard(room)
        self._dirty.discard(room)
        self._forget_positions(room)
        if self._inbox_cursors.pop(room, ...) is not ...:
            self._inbox_woken.discard(room)
            return
        await self._unsubscribe(room)
        try:
            await self._streams.destroy_group(room, self._group, forget_in=self._keys.node_rooms(self._group))
        except RedisError as exc:
            # The group is left behind; maintenance removes groups of rooms this node no longer
            # reads, and activate() moves an old group to the stream's end.
            log.warning("could not remove group of %s: %s", room, type(exc).__name__)

    def _forget_positions(self, room: str) -> None:
        self._unread.pop(room, None)
        self._delivered_up_to.pop(room, None)
        self._cursor_behind.discard(room)
        self._reread.discard(room)
        self._unpaired.discard(room)
        self._held.discard(room)

    def _room_channels(self, room: str) -> dict[str, str]:
        """The channels an active room needs: stream wake-ups, grant changes, ephemeral events.
        Inboxes need none of their own: the node's inbox patterns cover them, and they have no grants."""
        if room.startswith(INBOX_PREFIX):
            return {}
        return {
            self._keys.keyspace_channel(self._keys.stream(room)): "s",
            self._keys.keyspace_channel(self._keys.acl(room)): "acl",
            self._keys.events_channel(room): "ev",
        }

    async def _unsubscribe(self, room: str) -> None:
        channels = list(self._room_channels(room))
        for channel in channels:
            self._channels.pop(channel, None)
        if self._pubsub is not None and channels:  # (no arguments would unsubscribe from everything)
            # On failure the dropped channels are forgotten anyway: a reconnect does not resubscribe them.
            with contextlib.suppress(RedisError):
                await self._pubsub.unsubscribe(*channels)

    async def destroy_all_groups(self) -> None:
        """On shutdown: remove this node's groups so they do not linger with growing lag."""
        pipe = self._redis.pipeline(transaction=False)
        for room in self.active:
            if room not in self._inbox_cursors:
                pipe.xgroup_destroy(self._keys.stream(room), self._group)
        pipe.delete(self._keys.node_rooms(self._group))
        try:
            await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            log.warning("could not remove this node's groups: %s", type(exc).__name__)

    # ------------------------------------------------------------------ wake-ups

    @property
    def rooms_waiting(self) -> int:
        """Rooms woken but not read yet."""
        return len(self._dirty)

    def wake(self, room: str) -> None:
        """Count one unread entry in ``room`` (or one read to do) and get the read loop going."""
        self._unread[room] = self._unread.get(room, 0) + 1
        self._dirty.add(room)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._dirty:
            self._wake.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        raw_channel = message["channel"]
        channel: str = raw_channel.decode() if isinstance(raw_channel, bytes) else str(raw_channel)
        if kind == "subscribe":
            waiters = self._confirmations.get(channel)
            if waiters:
                fut = waiters.pop(0)
                if not waiters:
                    del self._confirmations[channel]
                if not fut.done():
                    fut.set_result(None)
            return
        if kind == "pmessage":
            self._dispatch_inbox(channel, message["data"])
            return
        if kind != "message":
            return
        target = self._channels.get(channel)
        if target is None:
            if self.on_control is not None and channel == self._keys.control_channel():
                data = message["data"]
                self.on_control(data if isinstance(data, bytes) else str(data).encode())
            return
        room, what = target
        if what == "s":
            self._unpaired.discard(room)  # notifications come on this connection (again)
            self.wake(room)
        elif what == "ev":
            data = message["data"]
            payload = data if isinstance(data, bytes) else str(data).encode()
            if payload[:1] == b"{":  # ephemeral events are JSON objects; announced entries are msgpack arrays
                if room in self._announced:
                    self._hand_over(room, [])  # the room's messages announced before it go first
                self._registry.deliver_ephemeral(room, payload)
            else:
                self._on_announced(room, payload)
        else:
            task: asyncio.Task[None] = asyncio.ensure_future(self._on_acl_change(room))
            self._acl_tasks.add(task)
            task.add_done_callback(self._acl_tasks.discard)

    def _dispatch_inbox(self, channel: str, data: Any) -> None:
        """A message on the inbox patterns: wake or feed the inbox if a local connection reads it."""
        key = self._keys.keyspace_key(channel)
        room = self._keys.room_of_key(key if key is not None else channel)
        if room is None or room not in self.active:
            return  # another node's user
        if key is not None:
            self.wake(room)
        else:
            self._registry.deliver_ephemeral(room, data if isinstance(data, bytes) else str(data).encode())

    def _on_announced(self, room: str, payload: bytes) -> None:
        """An entry room_publish.lua announced: deliver it now unless a read must come first."""
        decoded = _decode_announcement(payload)
        unread = self._unread.get(room, 0)
        if unread > 0 and room not in self._unpaired:
            unread -= 1  # this entry's own keyspace notification, which came just before
            self._unread[room] = unread
            if unread == 0 and room not in self._held:
                self._dirty.discard(room)  # its wake-up is served: no read needed
        elif room in self.active and not room.startswith(INBOX_PREFIX) and not (
                decoded is not None and decoded[1] <= self._delivered_up_to.get(room, _EMPTY)):
            # Its keyspace notification did not come first on this connection: the room's slot moved to another
            # Redis Cluster master (the announcement still reaches the old one over the cluster bus) and the
            # subscriptions have not followed yet, so a raw XADD's notification would be missed too. The stream
            # is read instead (in order, with anything missed) until a notification arrives here again.
            self._unpaired.add(room)
            self.wake(room)
            return
        if room in self._reading:
            self._reread.add(room)  # the read in flight may or may not include it
            return
        if room not in self.active or room.startswith(INBOX_PREFIX):
            return
        if unread > 0:
            self._held.add(room)
            return  # an earlier entry is still to be read: the read delivers both, in order
        if room in self._held:
            # An entry announced before this one waits for a read, so this one must too. (On a Redis Cluster
            # replica, notifications come by replication and announcements over the cluster bus: after a
            # failover, until the subscriptions follow, two entries' notifications can both come before
            # their announcements, and the second announcement would pair with the first's notification.)
            self.wake(room)
            return
        if decoded is None:
            log.warning("unreadable entry announcement in %s; reading the stream instead", room)
            self.wake(room)
            return
        raw_id, entry_id, fields = decoded
        if entry_id <= self._delivered_up_to.get(room, _EMPTY):
            return  # a read already delivered it
        self._delivered_up_to[room] = entry_id
        self._cursor_behind.add(room)
        self.entries_announced += 1
        delivery = entry_to_delivery(room, raw_id, fields, self._opener)
        if delivery is None:
            self._undeliverable(room, raw_id)
        else:
            pending = self._announced.get(room)
            if pending is not None:
                pending.append(delivery)
                return
            self._announced[room] = [delivery]
            if not self._announced_flush_due:
                self._announced_flush_due = True
                asyncio.get_running_loop().call_soon(self._flush_announced)

    def _flush_announced(self) -> None:
        self._announced_flush_due = False
        while self._announced:
            self._hand_over(next(iter(self._announced)), [])

    def _undeliverable(self, room: str, raw_id: bytes) -> None:
        self.undeliverable_entries += 1
        log.warning("undeliverable entry %s in %s (unknown type or malformed)", raw_id.decode("ascii", "replace"),
                    room)

    def _hand_over(self, room: str, deliveries: list[Delivery]) -> int:
        """Fan ``deliveries`` out to the room's local members, after the room's announced entries still held
        (they come first: a read delivers only entries past them); count them. Returns frames queued."""
        announced = self._announced.pop(room, None)
        if announced is not None:
            deliveries = announced + deliveries
        queued = self._registry.deliver(room, deliveries)
        self.entries_delivered += len(deliveries)
        if self.metrics is not None and deliveries:
            kind = room.split("_", 1)[0].split(":", 1)[0]
            self.metrics.delivered_by_kind[kind] = self.metrics.delivered_by_kind.get(kind, 0) + queued
            now_ms = time.time() * 1000
            for delivery in deliveries:
                self.metrics.observe_latency(max(0.0, now_ms - delivery.entry_id[0]))
        return queued

    def _wake_all(self) -> None:
        for room in self.active:
            self.wake(room)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._config.sweep_interval_s)
            self._wake_all()

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Rooms whose every wake-up was matched by an announced entry were served already.
            woken = [r for r in self._dirty if r in self.active and self._unread.get(r, 0) > 0]
            self._dirty.clear()
            inboxes = [r for r in woken if r in self._inbox_cursors]
            rooms = [r for r in woken if r not in self._inbox_cursors]
            try:
                if inboxes:
                    for room in inboxes:
                        self._unread.pop(room, None)  # inboxes are never announced: each wake-up is a read
                    await self._read_inboxes(inboxes)
                for start in range(0, len(rooms), self._config.streams_per_read):
                    await self._read(rooms[start:start + self._config.streams_per_read])
                backoff = 0.05
            except RedisError as exc:
                log.warning("stream read failed (%s); retrying", type(exc).__name__)
                for room in woken:
                    self.wake(room)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()

    async def _read(self, rooms: list[str]) -> None:
        for room in rooms:
            self._unread[room] = 0  # this read covers every wake-up so far
            self._held.discard(room)  # and every entry announced so far
            self._reading.add(room)
        try:
            await self._read_rooms(rooms)
        finally:
            for room in rooms:
                self._reading.discard(room)
                if room in self._reread or self._unread.get(room, 0) > 0:
                    self._reread.discard(room)
                    self.wake(room)

    async def _xreadgroup(self, rooms: list[str]) -> Any:
        """One XREADGROUP over ``rooms``, after moving the cursor of those that had entries delivered
        directly up to them (same round trip)."""
        streams = {self._keys.stream(room): ">" for room in rooms}
        behind = [room for room in rooms if room in self._cursor_behind and room in self._delivered_up_to]
        if not behind:
            # NOACK: the node's group is only a read cursor (">" reads, never the pending list), so
            # entries are not kept pending and need no XACK round trip after delivery.
            # (One call per slot on Redis Cluster: every room is its own slot.)
            return await xreadgroup_many(self._redis, self._group, self._consumer, streams,
                                         count=self._config.read_count, noack=True)
        # Rare (a raw XADD, a sweep, a lost wake-up): worth a round trip of its own.
        pipe = self._redis.pipeline(transaction=False)
        for room in behind:
            pipe.xgroup_setid(self._keys.stream(room), self._group, id=format_stream_id(self._delivered_up_to[room]))
        await pipe.execute(raise_on_error=False)  # a vanished group shows in the read, as NOGROUP
        self._cursor_behind.difference_update(behind)
        return await xreadgroup_many(self._redis, self._group, self._consumer, streams,
                                     count=self._config.read_count, noack=True)

    async def _read_rooms(self, rooms: list[str]) -> None:
        try:
            response = await self._xreadgroup(rooms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A stream (and its group) vanished: Redis lost data or a purge ran. Recreate the missing
            # groups at the new streams' start (the others are untouched), then read all again.
            for room in rooms:
                if await self._streams.restore_group(room, self._group):
                    self._delivered_up_to.pop(room, None)  # the new stream's ids start over
                    self.streams_lost += 1
                    log.warning("the stream of %s was lost (Redis data loss or purge): reading it anew", room)
                    if self.on_stream_lost is not None:
                        self.on_stream_lost(room)
                self.wake(room)
            return
        self.reads += 1
        if not response:
            return
        delivered_marks: list[tuple[str, StreamId]] = []
        for key, entries in _stream_items(response):
            name = self._keys.room_of_key(key.decode() if isinstance(key, bytes) else key)
            if name is None or not entries:
                continue
            self._deliver_entries(name, entries, delivered_marks)
        for room, last in delivered_marks:
            # Handed to the user's live connections: an offline replay must not repeat it.
            await self._inbox.mark_delivered(room, last)

    async def _read_inboxes(self, rooms: list[str]) -> None:
        """XREAD each woken inbox after the node's cursor: one command per inbox (each its own slot on a
        cluster), all sent in one pipeline."""
        reads = []
        for room in rooms:
            cursor = self._inbox_cursors.get(room)
            if cursor is None:
                self._inbox_woken.add(room)  # read once start_inbox() says where from
                continue
            reads.append((room, cursor, self._streams.batcher.command(
                "XREAD", "COUNT", self._config.read_count, "STREAMS", self._keys.stream(room),
                format_stream_id(cursor))))
        failure: RedisError | None = None
        delivered_marks: list[tuple[str, StreamId]] = []
        for room, cursor, read in reads:
            try:
                response = await read
            except RedisError as exc:
                failure = exc
                continue
            # Left (and maybe attached again, with a new start) while we read: its members' replays
            # cover what this read found.
            if self._inbox_cursors.get(room) != cursor or not response:
                continue
            self.reads += 1
            for _key, entries in _stream_items(response):
                if entries:
                    self._inbox_cursors[room] = parse_stream_id(entries[-1][0].decode("ascii"))
                    self._deliver_entries(room, entries, delivered_marks)
        for room, last in delivered_marks:
            await self._inbox.mark_delivered(room, last)
        if failure is not None:
            raise failure

    def _deliver_entries(self, name: str, entries: list[tuple[bytes, dict[bytes, bytes]]],
                         delivered_marks: list[tuple[str, StreamId]]) -> None:
        """Fan one read's entries of ``name`` out to its local members (noting an inbox's delivered mark);
        read again if the read was full. Entries an announcement already delivered are skipped."""
        is_inbox = name.startswith(INBOX_PREFIX)
        up_to = _EMPTY if is_inbox else self._delivered_up_to.get(name, _EMPTY)
        deliveries: list[Delivery] = []
        for entry_id, fields in entries:
            delivery = entry_to_delivery(name, entry_id, fields or {}, self._opener)
            if delivery is None:
                self._undeliverable(name, entry_id)
            elif delivery.entry_id > up_to:  # (an announced entry the cursor had not passed yet)
                deliveries.append(delivery)
        if not is_inbox:  # (an inbox's position is its cursor)
            last_read = parse_stream_id(entries[-1][0].decode("ascii"))
            if last_read > up_to:
                self._delivered_up_to[name] = last_read
        queued = self._hand_over(name, deliveries)
        if queued and is_inbox:
            delivered_marks.append((name, deliveries[-1].entry_id))
        if len(entries) >= self._config.read_count:
            self.wake(name)  # more may be waiting


def _decode_announcement(payload: bytes) -> tuple[bytes, StreamId, dict[bytes, bytes]] | None:
    """room_publish.lua's msgpack [id, field, value, ...] as (raw id, id, fields); None if unreadable."""
    try:
        items = msgpack.unpackb(payload, raw=True)
        raw_id = items[0]
        return raw_id, parse_stream_id(raw_id.decode("ascii")), dict(zip(items[1::2], items[2::2], strict=True))
    except (ValueError, TypeError, IndexError, AttributeError, msgpack.UnpackException):
        return None


def _stream_items(response: Any) -> list[tuple[Any, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREADGROUP replies are a list of [key, entries] (RESP2) or a dict (RESP3)."""
    if isinstance(response, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in response.items()]
    return [(k, v) for k, v in response]
