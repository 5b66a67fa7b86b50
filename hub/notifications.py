"""Notifications that are not chat: per-user inbox streams, system-wide and per-role announcement
streams, and deadline reminders (scheduled in Redis, delivered once by whichever node is up).

Every connection is attached, events-only, to its user's inbox (``inbox:{user}``), to ``system``
and to ``role:{role}`` for each of its roles. These are internal room names (clients cannot join
them by name); their streams are ordinary room streams, so a backend publishes with a plain XADD,
the archiver stores them, and delivery, ordering and resume work as for rooms.

Offline inbox: each inbox remembers the newest entry delivered to any of the user's connections
(``delivered`` in its meta hash). A connection replays what came after it, then the mark moves; so a
notification sent while the user was away arrives on their next connect, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hub.keys import Keys
from hub.lua import Scripts
from hub.protocol import StreamId, format_stream_id, iso_ms
from hub.redis_client import publish

log = logging.getLogger("hub.notifications")

INBOX_PREFIX = "inbox:"
SYSTEM_ROOM = "system"
ROLE_PREFIX = "role:"
# The inbox meta hash's field holding the newest entry delivered to any of the user's connections.
DELIVERED_FIELD = "delivered"
# A reminder delivered more than this after its due time says so (data.late): it fell due while no
# node ran (or was added for a past time).
LATE_AFTER_MS = 2000


def inbox_room(user_id: str) -> str:
    return f"{INBOX_PREFIX}{user_id}"


def role_room(role: str) -> str:
    return f"{ROLE_PREFIX}{role}"


def is_internal(room: str) -> bool:
    """Rooms the hub attaches connections to by itself (never joined by name)."""
    return room == SYSTEM_ROOM or room.startswith((INBOX_PREFIX, ROLE_PREFIX))


def auto_rooms(user_id: str, roles: Iterable[str]) -> list[str]:
    return [inbox_room(user_id), SYSTEM_ROOM, *(role_room(r) for r in sorted(roles))]


class Inbox:
    def __init__(self, scripts: Scripts, keys: Keys) -> None:
        self._scripts = scripts
        self._redis = scripts.redis
        self._keys = keys

    async def mark_delivered(self, room: str, up_to: StreamId) -> None:
        """Move the inbox's delivered mark forward (never back)."""
        await self._scripts.call("inbox_delivered", [self._keys.meta(room)], [format_stream_id(up_to)])

    async def acknowledge(self, user_id: str, ids: list[StreamId]) -> None:
        key = self._keys.inbox_acks(user_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(key, *(format_stream_id(i) for i in ids))
        pipe.expire(key, 90 * 86400)
        await pipe.execute()

    async def acknowledged(self, user_id: str) -> set[str]:
        raw: Any = await self._redis.smembers(self._keys.inbox_acks(user_id))
        return {r.decode() for r in raw}


# ---------------------------------------------------------------------- reminders


@dataclass(frozen=True)
class Reminder:
    id: str
    room: str
    due_ms: int
    text: str
    data: dict[str, Any]

    def encode(self) -> str:
        return orjson.dumps({"id": self.id, "room": self.room, "due_ms": self.due_ms, "text": self.text,
                             "data": self.data}).decode()

    @staticmethod
    def decode(raw: bytes | str) -> Reminder | None:
        try:
            obj = orjson.loads(raw)
            return Reminder(str(obj["id"]), str(obj["room"]), int(obj["due_ms"]), str(obj.get("text", "")),
                            dict(obj.get("data") or {}))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


# Published on the control channel after a reminder is added: every node's scheduler looks again at once
# (its next due time may now be sooner). A backend that ZADDs a reminder may publish it too.
REMINDERS_WAKE = b'{"op":"reminders"}'


def is_reminders_wake(data: bytes) -> bool:
    """Whether a control-channel message is :data:`REMINDERS_WAKE` (in any JSON spelling)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("op") == "reminders"


async def schedule_reminder(redis: Redis, keys: Keys, room: str, due_ms: int, text: str,
                            data: dict[str, Any] | None = None) -> Reminder:
    """Schedule a deadline_reminder for ``room`` (a room name or an internal ``inbox:USER``)."""
    reminder = Reminder(secrets.token_hex(8), room, due_ms, text, data or {})
    await redis.zadd(keys.reminders_due(), {reminder.encode(): due_ms})
    await publish(redis, keys.control_channel(), REMINDERS_WAKE)
    return reminder


class ReminderScheduler:
    """Run by every node: claims due reminders (a lease, so a node that dies mid-delivery hands them
    to another), publishes each idempotently (its id is the client_msg_id), then drops it.

    It sleeps until the earliest reminder is due (the claim script says when), or until a new reminder
    is announced (:data:`REMINDERS_WAKE` on the control channel, see :meth:`wake`), and polls at least
    every ``idle_poll_s``, so a reminder a backend adds with a plain ZADD and no announcement is seen
    within that. Not a fixed 0.25 s poll: on an idle node, four wake-ups a second were most of its CPU,
    and with many nodes they add up to a steady load on Redis for nothing.
    """

    BATCH = 100

    def __init__(self, scripts: Scripts, keys: Keys, publish: Any, idle_poll_s: float = 5.0,
                 lease_ms: int = 10_000) -> None:
        self._scripts = scripts
        self._keys = keys
        self._publish = publish  # async (room, fields, idempotency id) -> None
        self._idle_poll_s = idle_poll_s
        self._lease_ms = lease_ms
        self.delivered = 0
        self.polls = 0  # claims run (for tests)
        # The earliest due time (ms) the last claim saw in Redis; None when nothing is scheduled.
        self.next_due_ms: int | None = None
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Look at the reminders again now (one was added)."""
        self._woken.set()

    async def run(self) -> None:
        """Claim and publish due reminders until cancelled."""
        while True:
            delay_s = self._idle_poll_s
            try:
                if await self.tick() >= self.BATCH:
                    delay_s = 0.0  # more may be due at once
                elif self.next_due_ms is not None:
                    delay_s = min(delay_s, max(0.0, (self.next_due_ms - time.time() * 1000) / 1000))
            except RedisError as exc:
                log.warning("reminder poll failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._woken.wait()
            self._woken.clear()

    async def tick(self) -> int:
        """Claim and publish what is due now; returns how many were claimed."""
        now_ms = int(time.time() * 1000)
        reply: Any = await self._scripts.call(
            "reminders_claim", [self._keys.reminders_due(), self._keys.reminders_claimed()],
            [now_ms, self._lease_ms, self.BATCH])
        next_due, *claimed = reply
        self.polls += 1
        self.next_due_ms = int(next_due) if int(next_due) >= 0 else None
        done = 0
        for raw in claimed:
            reminder = Reminder.decode(raw)
            if reminder is None:
                log.warning("dropping a malformed reminder")
                await self._scripts.redis.zrem(self._keys.reminders_claimed(), raw)
                continue
            late_ms = max(0, now_ms - reminder.due_ms)
            data = {**reminder.data, "text": reminder.text, "due_at": iso_ms(reminder.due_ms)}
            if late_ms > LATE_AFTER_MS:
                data["late"] = True
                data["late_by_ms"] = late_ms
            fields: list[bytes | str] = ["type", "deadline_reminder", "sender_id", "reminders",
                                         "content", reminder.text, "data", orjson.dumps(data),
                                         "created_at", str(now_ms)]
            await self._publish(reminder.room, fields, f"reminder-{reminder.id}")
            await self._scripts.redis.zrem(self._keys.reminders_claimed(), raw)
            done += 1
        self.delivered += done
        return len(claimed)
