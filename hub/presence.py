"""Ephemeral room state: typing indicators (TTL keys in Redis, fanned out over the room's event
channel, never stored in the stream or history).

A typing indicator starts with ``typing_start``, is refreshed by repeating it, and ends with
``typing_stop``, when the connection leaves the room or closes, or by itself ``typing_ttl_ms`` after
the last refresh (the node that owns the connection tells the room). Members are told only when the
state changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson
from redis.exceptions import RedisError

from hub.keys import Keys
from hub.lua import Scripts

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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
