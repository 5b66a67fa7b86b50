"""The node's index of local members: room -> sessions, user -> sessions.

Fan-out lives here: a delivery's frame bytes were encoded once by the relay and are handed to each
member's session without awaiting anything. A member that is still joining buffers live deliveries
until its replay has been sent, which is how a join gets no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from hub.protocol import Delivery, StreamId, text_frame

if TYPE_CHECKING:
    from hub.session import Session


# A room with at least this many local members has its chat written to each member in the delivering pass
# (Session.send_wires_now) rather than queued for the end of the turn: in a big room the second pass over
# the members costs more than the write it could share with a member's other frames of the turn; a small
# room's members (a 1:1 chat) more often have their own ack due in the same turn, and share the write.
DIRECT_WRITE_MIN_MEMBERS = 8


@dataclass(slots=True)
class Membership:
    session: Session
    joined: bool = False  # receives chat and events (join_room)
    updates: bool = False  # receives backend events only (subscribe_*_updates)
    # Live deliveries held while the join's replay is being read; None once live.
    buffer: list[Delivery] | None = None


@dataclass(slots=True)
class LocalRoom:
    members: dict[Session, Membership] = field(default_factory=dict)


class Registry:
    def __init__(self) -> None:
        self.rooms: dict[str, LocalRoom] = {}
        self.users: dict[str, list[Session]] = {}
        self.sessions: set[Session] = set()
        # Serialises activating and deactivating a room's reader (one lock per room with members
        # or with a join in progress).
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, room: str) -> asyncio.Lock:
        lock = self._locks.get(room)
        if lock is None:
            lock = self._locks[room] = asyncio.Lock()
        return lock

    def forget_lock(self, room: str) -> None:
        lock = self._locks.get(room)
        if lock is not None and not lock.locked() and room not in self.rooms:
            del self._locks[room]

    def add_session(self, session: Session) -> None:
        self.sessions.add(session)
        # A list, not a set: most users have one connection (56 bytes, not 216).
        self.users.setdefault(session.user_id, []).append(session)

    def remove_session(self, session: Session) -> None:
        self.sessions.discard(session)
        peers = self.users.get(session.user_id)
        if peers is not None:
            if session in peers:
                peers.remove(session)
            if not peers:
                del self.users[session.user_id]

    def membership(self, room: str, session: Session) -> Membership | None:
        local = self.rooms.get(room)
        return local.members.get(session) if local else None

    def add(self, room: str, session: Session) -> Membership:
        local = self.rooms.get(room)
        if local is None:
            local = self.rooms[room] = LocalRoom()
        member = local.members.get(session)
        if member is None:
            member = local.members[session] = Membership(session)
            session.rooms.append(room)
        return member

    def remove(self, room: str, session: Session) -> bool:
        """Drop the session from the room. Returns True when the room has no local member left."""
        local = self.rooms.get(room)
        if room in session.rooms:
            session.rooms.remove(room)
        if local is None:
            return False
        local.members.pop(session, None)
        if not local.members:
            del self.rooms[room]
            return True
        return False

    def has_members(self, room: str) -> bool:
        return room in self.rooms

    def deliver(self, room: str, deliveries: Sequence[Delivery]) -> int:
        """Hand each delivery to every local member that should see it. Returns frames queued to
        connections that are not closing."""
        local = self.rooms.get(room)
        if local is None:
            return 0
        queued = 0
        members = list(local.members.values())
        if len(members) >= DIRECT_WRITE_MIN_MEMBERS and all(delivery.is_chat for delivery in deliveries):
            # Every joined member gets the same bytes: joined once, written in this one pass.
            count = len(deliveries)
            data = deliveries[0].wire if count == 1 else b"".join(delivery.wire for delivery in deliveries)
            for member in members:
                if member.joined:
                    if member.buffer is None:
                        queued += count if member.session.send_wires_now(data, count) else 0
                    else:
                        member.buffer.extend(deliveries)
            return queued
        for delivery in deliveries:
            wire = delivery.wire
            events_too = not delivery.is_chat  # (update subscribers get backend events, not chat)
            for member in members:
                if member.joined or events_too:
                    if member.buffer is None:
                        queued += member.session.send_wire(wire)
                    else:
                        member.buffer.append(delivery)
        return queued

    def deliver_ephemeral(self, room: str, payload: bytes) -> None:
        """Fan out an ephemeral event (typing, presence, read receipts) to joined members. Not
        buffered during a join and not replayed."""
        local = self.rooms.get(room)
        if local is None:
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        # A user's own typing and presence are not echoed to their connections; read receipts are
        # (they sync unread counts across the user's devices).
        author = event.get("user_id") if event.get("type") in ("typing_indicator", "presence_update") else None
        wire = text_frame(payload)
        for member in local.members.values():
            if member.joined and member.buffer is None and member.session.user_id != author:
                member.session.send_wire(wire)

    @staticmethod
    def go_live(member: Membership, after: StreamId, replayed: set[StreamId] | None = None) -> None:
        """End a join's buffering: send what arrived live with id > ``after``, then deliver directly.

        ``replayed`` is given when the member already received events live (an updates subscriber
        joining): its buffered events were not sent yet, so each goes out unless the replay had it.
        """
        buffered, member.buffer = member.buffer or [], None
        for delivery in buffered:
            if delivery.entry_id > after or (
                    replayed is not None and not delivery.is_chat and delivery.entry_id not in replayed):
                member.session.send_wire(delivery.wire)
