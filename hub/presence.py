"""Ephemeral room state: typing indicators and presence (Redis, fanned out over the room's event
channel, never stored in the stream or history).

A typing indicator starts with ``typing_start``, is refreshed by repeating it, and ends with
``typing_stop``, when the connection leaves the room or closes, or by itself ``typing_ttl_ms`` after
the last refresh (the node that owns the connection tells the room). Members are told only when the
state changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import NoScriptError, RedisError

from hub.keys import Keys
from hub.lua import Scripts
from hub.protocol import iso_ms
from hub.tasks import cancel_and_wait

if TYPE_CHECKING:
    from hub.session import Session

log = logging.getLogger("hub.presence")

# The Redis key outlives the local timer by this much, so the timer's stop still finds it.
_KEY_GRACE_MS = 1000


class TypingIndicators:
    def __init__(self, scripts: Scripts, keys: Keys, ttl_ms: int) -> None:
        self._scripts = scripts
        self._keys = keys
        self._ttl_ms = ttl_ms
        # (session, room) -> timer that ends the indicator if it is not refreshed.
        self._timers: dict[tuple[Session, str], asyncio.TimerHandle] = {}
        # Stops started by timers; owned here and awaited in close().
        self._tasks: set[asyncio.Task[None]] = set()

    async def update(self, session: Session, room: str, is_typing: bool) -> bool:
        """Start/refresh or stop ``session``'s indicator in ``room``. True when members were told."""
        timer = self._timers.pop((session, room), None)
        if timer is not None:
            timer.cancel()
        if is_typing:
            loop = asyncio.get_running_loop()
            self._timers[(session, room)] = loop.call_later(
                self._ttl_ms / 1000, self._expire, session, room)
        elif timer is None:
            return False  # not typing here: nothing to stop
        frame = orjson.dumps({"type": "typing_indicator", "room": room, "user_id": session.user_id,
                              "is_typing": is_typing})
        changed = await self._scripts.call(
            "typing_set", [self._keys.typing(room, session.user_id)],
            ["1" if is_typing else "0", self._ttl_ms + _KEY_GRACE_MS, self._keys.events_channel(room), frame])
        return bool(changed)

    def is_typing(self, session: Session, room: str) -> bool:
        return (session, room) in self._timers

    async def stop_all(self, session: Session, rooms: set[str] | None = None) -> None:
        """End the session's indicators (in ``rooms``, or everywhere) as it leaves or closes."""
        for sess, room in list(self._timers):
            if sess is session and (rooms is None or room in rooms):
                try:
                    await self.update(session, room, False)
                except RedisError as exc:
                    log.debug("typing stop failed: %s", type(exc).__name__)

    def _expire(self, session: Session, room: str) -> None:
        self._timers.pop((session, room), None)
        # Put the timer back so update(False) sees an indicator to stop.
        self._timers[(session, room)] = asyncio.get_running_loop().call_later(3600, lambda: None)
        task = asyncio.ensure_future(self._stop_quietly(session, room))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_quietly(self, session: Session, room: str) -> None:
        try:
            await self.update(session, room, False)
        except RedisError as exc:
            log.debug("typing expiry failed: %s", type(exc).__name__)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await cancel_and_wait(list(self._tasks))


class Presence:
    """Who is in a room: per (room, user) the user's connections there and whether each is online
    or away. Liveness comes from the nodes: a connection counts while its node's heartbeat key
    lives; when a node dies, another node's reaper removes its connections and the rooms are told.
    """

    def __init__(self, scripts: Scripts, keys: Keys, node_id: str) -> None:
        self._scripts = scripts
        self._redis = scripts.redis
        self._keys = keys
        self._node_id = node_id
        # Node ids whose heartbeat key was alive at the last reaper pass; None before the first.
        self.live_nodes: set[str] | None = None

    async def update(self, session: Session, room: str, status: str | None) -> str:
        """Set (``"online"``/``"away"``) or clear (None) ``session``'s presence in ``room``. Returns the
        user's presence in the room afterwards."""
        entry = f"{room} {session.user_id} {session.id}"
        pipe = self._redis.pipeline(transaction=False)
        self._scripts.call_in(pipe, "presence_set", [self._keys.room_presence(room)], [
            session.user_id, session.id, status or "", self._keys.events_channel(room), room,
            iso_ms(int(time.time() * 1000))])
        index = self._keys.node_presence(self._node_id)
        if status is None:
            pipe.srem(index, entry)
        else:
            pipe.sadd(index, entry)
        results = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], NoScriptError):
            await self._scripts.load()
            return await self.update(session, room, status)
        if isinstance(results[0], Exception):
            raise results[0]
        raw = results[0]
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def in_room(self, room: str, limit: int = 500) -> list[dict[str, str]]:
        """Users present in ``room`` (online or away), connections of dead nodes left out."""
        raw: Any = await self._redis.hgetall(self._keys.room_presence(room))
        users = []
        for user, value in raw.items():
            status = "offline"
            for part in value.decode().split(";"):
                conn, _, flag = part.partition("=")
                if not self._alive(conn):
                    continue
                if flag == "o":
                    status = "online"
                    break
                status = "away"
            if status != "offline":
                users.append({"user_id": user.decode(), "status": status})
            if len(users) >= limit:
                break
        users.sort(key=lambda u: u["user_id"])
        return users

    def _alive(self, conn_id: str) -> bool:
        node = conn_id.rsplit("-", 1)[0]
        return node == self._node_id or self.live_nodes is None or node in self.live_nodes

    async def reap_dead_nodes(self) -> list[str]:
        """Find nodes whose heartbeat expired; for each (one reaper per dead node, by lock) remove
        its connections' presence (rooms are told) and its consumer groups. Returns reaped ids."""
        members: Any = await self._redis.smembers(self._keys.nodes())
        node_ids = [n.decode() for n in members]
        if not node_ids:
            self.live_nodes = {self._node_id}
            return []
        pipe = self._redis.pipeline(transaction=False)
        for node in node_ids:
            pipe.exists(self._keys.node(node))
        alive = await pipe.execute()
        self.live_nodes = {n for n, a in zip(node_ids, alive, strict=True) if a} | {self._node_id}
        reaped = []
        for node in node_ids:
            if node in self.live_nodes:
                continue
            if not await self._redis.set(self._keys.reaper_lock(node), self._node_id, nx=True, ex=60):
                continue  # another node is reaping it
            await self._reap(node)
            reaped.append(node)
        return reaped

    async def _reap(self, node: str) -> None:
        log.warning("node %s is dead (heartbeat expired): removing its presence and consumer groups", node)
        now = iso_ms(int(time.time() * 1000))
        entries: Any = await self._redis.smembers(self._keys.node_presence(node))
        for entry in entries:
            room, user, conn = entry.decode().split(" ")
            await self._scripts.call("presence_set", [self._keys.room_presence(room)],
                                     [user, conn, "", self._keys.events_channel(room), room, now])
        rooms: Any = await self._redis.smembers(self._keys.node_rooms(node))
        pipe = self._redis.pipeline(transaction=False)
        for room in rooms:
            pipe.xgroup_destroy(self._keys.stream(room.decode()), node)
        pipe.delete(self._keys.node_presence(node), self._keys.node_rooms(node))
        pipe.srem(self._keys.nodes(), node)
        await pipe.execute(raise_on_error=False)
