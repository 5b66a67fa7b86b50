"""A hub node: what it does for its sessions (join, leave, publish, subscribe) and access checks.

The node owns the registry (local members), the relay (stream reader) and the publisher (pipelined
writes). Sessions call :meth:`Node.handle_frame` for every frame they receive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from hub.config import Config
from hub.deadlines import Deadlines
from hub.errors import ClientError, CloseCode, Forbidden, InvalidFrame, NotJoined, RateLimited, Unavailable
from hub.history import History
from hub.keys import Keys
from hub.limits import Limits
from hub.notifications import DELIVERED_FIELD, Inbox, auto_rooms, is_internal
from hub.presence import Presence, TypingIndicators
from hub.protocol import (
    ChatMessage,
    Delivery,
    Envelope,
    JoinRoom,
    LeaveRoom,
    MarkRead,
    NotificationAck,
    Ping,
    PresenceQuery,
    Refresh,
    SetPresence,
    StreamId,
    SubscribeUpdates,
    Typing,
    chat_entry_fields,
    entry_to_delivery,
    format_stream_id,
    iso_ms,
    parse_client_frame,
    parse_stream_id,
)
from hub.receipts import Receipts
from hub.registry import Membership, Registry
from hub.relay import Relay
from hub.rooms import AccessRules, Principal, Room, check_publish, needs_grant, parse_room
from hub.sealing import Sealer
from hub.session import Session
from hub.streams import Entry, Publisher, PublishResult, Streams

log = logging.getLogger("hub.node")


@dataclass(frozen=True)
class CatchUp:
    epoch: str
    last_id: StreamId  # the position the member is live from: replay and live never overlap past it
    recovered: bool
    replay: list[Delivery]  # from the Redis window
    archived: list[dict[str, Any]] = field(default_factory=list)  # older, from PostgreSQL, oldest first

    def frame(self, room: str) -> dict[str, Any]:
        return {"type": "room_joined", "room": room, "epoch": self.epoch, "last_id": format_stream_id(self.last_id),
                "recovered": self.recovered, "messages": [*self.archived, *(d.frame for d in self.replay)]}


@dataclass
class Metrics:
    """Plain counters on the hot paths (a dict increment each); /metrics reads them at scrape time."""

    connections_opened: int = 0
    frames_received: int = 0
    client_errors: dict[str, int] = field(default_factory=dict)
    messages_published: int = 0
    slow_disconnects: int = 0
    disconnects: dict[int, int] = field(default_factory=dict)  # by close code (0: none received)
    published_by_kind: dict[str, int] = field(default_factory=dict)  # messages in, by room type
    delivered_by_kind: dict[str, int] = field(default_factory=dict)  # frames out, by room type
    # Delivery latency (stream id time -> handed to sockets), once per entry: bucket upper bounds (ms).
    latency_buckets_ms: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)
    latency_counts: list[int] = field(default_factory=lambda: [0] * 12)  # one per bucket + the overflow
    latency_sum_ms: float = 0.0
    redis_rtt_ms: float = 0.0  # the last heartbeat's PING
    # Resumes whose epoch is not the room's: Redis lost the room's data (answered recovered false).
    epoch_mismatches: int = 0

    def observe_latency(self, ms: float) -> None:
        for index, bound in enumerate(self.latency_buckets_ms):
            if ms <= bound:
                self.latency_counts[index] += 1
                break
        else:
            self.latency_counts[-1] += 1
        self.latency_sum_ms += ms


class Node:
    def __init__(self, config: Config, node_id: str, streams: Streams, publisher: Publisher,
                 keys: Keys, pool: asyncpg.Pool | None = None) -> None:
        self.config = config
        self.node_id = node_id
        self.streams = streams
        self.publisher = publisher
        self.keys = keys
        self.registry = Registry()
        # Token deadlines of every session (one timer for all).
        self.deadlines = Deadlines()
        self.sealer = Sealer(config.encryption)
        self.relay = Relay(streams.redis, streams, keys, self.registry, node_id, config.relay,
                           self._recheck_room_access, self.sealer.open,
                           silence_s=config.redis.socket_timeout_s)
        self.typing = TypingIndicators(streams.scripts, keys, config.rooms.typing_ttl_ms)
        self.presence = Presence(streams.scripts, keys, node_id)
        self.inbox = Inbox(streams.scripts, keys)
        self.limits = Limits(streams.scripts, keys, config.server, node_id, int(config.relay.node_ttl_s * 1000),
                             batcher=streams.batcher)
        self.history = History(streams, pool, self.sealer.open)
        self.receipts = Receipts(streams.scripts, keys, pool)
        self.rules = AccessRules(config.rooms.admin_all_rooms, config.rooms.channel_publish_roles)
        self.metrics = Metrics()
        self.relay.metrics = self.metrics
        self.relay.on_stream_lost = self._room_data_lost
        self.started_at = time.time()
        # room -> the epoch whose change was logged (bounded: cleared past 10,000 rooms).
        self._epoch_reported: dict[str, str] = {}

    # ------------------------------------------------------------------ sessions

    def session_opened(self, session: Session) -> None:
        self.registry.add_session(session)
        self.metrics.connections_opened += 1

    async def session_connected(self, session: Session, hello: dict[str, Any]) -> None:
        """Attach a new connection to its user's inbox (replaying what arrived while they were away),
        the system stream and its roles' streams (events only, no presence), then send ``hello``
        (connection_established), the inbox replay, and go live: once the client has the hello, no
        notification published from then on can miss it."""
        limit = self.config.rooms.max_replay
        attached: list[tuple[str, Membership, StreamId, list[Delivery]]] = []
        for room in auto_rooms(session.user_id, session.principal.roles):
            try:
                member = await self._attach(room, session, buffering=True)
                member.joined = True
                replay: list[Delivery] = []
                # Events-only rooms (system, roles) replay nothing: whatever the relay delivered since
                # the attach is new to this connection, so it all goes out (no position needed).
                last: StreamId = (0, 0)
                if room.startswith("inbox:"):
                    position, mark = await self.streams.open_room_and_read_meta(room, DELIVERED_FIELD)
                    self.relay.start_inbox(room, position.last_id)  # live from here; the replay has the rest
                    since = parse_stream_id(mark.decode()) if mark else (0, 0)
                    if position.last_id > since:  # else nothing arrived while the user was away
                        replay = self._deliveries(room, await self.streams.read_after(room, since, limit))
                    last = max(position.last_id, replay[-1].entry_id) if replay else position.last_id
                attached.append((room, member, last, replay))
            except (Unavailable, RedisError) as exc:
                log.warning("could not attach %s to %s: %s", session.id, room, type(exc).__name__)
        # No await from here to the last go_live: the hello, the replays and live frames keep order.
        session.send(hello)
        for _room, member, last, replay in attached:
            for delivery in replay:
                session.send_wire(delivery.wire)
            self.registry.go_live(member, last)
        for room, _member, _last, replay in attached:
            if replay:
                await self.inbox.mark_delivered(room, replay[-1].entry_id)

    async def session_closed(self, session: Session) -> None:
        self.registry.remove_session(session)
        lease = session.connection.lease
        if lease is not None:
            session.connection.lease = None
            await self.limits.release(lease)
        for room in list(session.rooms):
            await self._leave(room, session)

    # ------------------------------------------------------------------ frames

    async def handle_frame(self, session: Session, raw: str | bytes) -> None:
        self.metrics.frames_received += 1
        try:
            envelope = parse_client_frame(raw, self.config.server.max_content_bytes,
                                          self.config.rooms.max_join_history)
        except ClientError as exc:
            self._count_error(exc)
            session.send_error(exc)
            return
        except Exception:
            log.exception("internal error parsing a frame")
            session.send_error(ClientError("internal error; the connection stays open", code="internal_error"))
            return
        if session.auto_away:
            await self.set_status(session, "online", auto=False)
        try:
            await self._dispatch(session, envelope)
        except ClientError as exc:
            self._refuse(session, envelope, exc)
        except Exception:
            log.exception("internal error handling %s", envelope.type)
            self._internal_error(session, envelope)

    def handle_frame_now(self, session: Session, raw: str) -> bool:
        """handle_frame for a chat message whose publish can be submitted without waiting (the session has a
        free in-flight slot and is not auto-away), called synchronously as the frame arrives; False, with
        nothing done, for any other frame (the session's task handles it, parsing it again)."""
        if session.auto_away:
            return False
        try:
            envelope = parse_client_frame(raw, self.config.server.max_content_bytes,
                                          self.config.rooms.max_join_history)
        except Exception:
            return False  # handle_frame reports it
        frame = envelope.frame
        if not isinstance(frame, ChatMessage):
            return False
        self.metrics.frames_received += 1
        try:
            room = self._check_publish(session, frame)
            if not session.take_publish_slot():
                self.metrics.frames_received -= 1  # handle_frame counts it
                return False
            self._submit_publish(session, envelope, frame, room)
        except ClientError as exc:
            self._refuse(session, envelope, exc)
        except Exception:
            log.exception("internal error handling %s", envelope.type)
            self._internal_error(session, envelope)
        return True

    def _refuse(self, session: Session, envelope: Envelope, exc: ClientError) -> None:
        exc.request_type = envelope.type
        exc.request_id = envelope.request_id
        self._count_error(exc)
        session.note_refusal(exc, _room_of(envelope))  # audits ACL denials and rate-limit hits
        session.send_error(exc, room=_room_of(envelope))

    def _internal_error(self, session: Session, envelope: Envelope) -> None:
        err = ClientError("internal error; the connection stays open", code="internal_error")
        err.request_type, err.request_id = envelope.type, envelope.request_id
        session.send_error(err, room=_room_of(envelope))

    def _count_error(self, exc: ClientError) -> None:
        self.metrics.client_errors[exc.code] = self.metrics.client_errors.get(exc.code, 0) + 1

    async def _dispatch(self, session: Session, env: Envelope) -> None:
        frame = env.frame
        if isinstance(frame, ChatMessage):
            await self._publish(session, env, frame)
        elif isinstance(frame, JoinRoom):
            await self._join(session, env, frame)
        elif isinstance(frame, LeaveRoom):
            room = self._parse(frame.room)
            member = self.registry.membership(room.name, session)
            if member is None or not member.joined:
                raise NotJoined("you have not joined this room")
            await self._unjoin(room.name, session)
            session.send(_with_request_id({"type": "room_left", "room": room.name, "reason": "left"}, env))
        elif isinstance(frame, SubscribeUpdates):
            await self._subscribe_updates(session, env, frame)
        elif isinstance(frame, Typing):
            room = self._parse(frame.room)
            member = self.registry.membership(room.name, session)
            if member is None or not member.joined:
                raise NotJoined("join the room before sending typing indicators")
            if frame.is_typing:
                decision = await self.limits.typing(session.user_id)
                if not decision.allowed:
                    raise RateLimited("too many typing indicators", decision.retry_after_ms)
            try:
                await self.typing.update(session, room.name, frame.is_typing)
            except RedisError as exc:
                raise Unavailable("Redis unavailable; typing indicator not sent") from exc
        elif isinstance(frame, MarkRead):
            room = self._parse(frame.room)
            await self.check_access(room, session.principal, session)
            position = await self.receipts.mark(room.name, session.user_id, frame.up_to)
            session.send(_with_request_id({"type": "marked_read", "room": room.name,
                                           "up_to": format_stream_id(position)}, env))
        elif isinstance(frame, SetPresence):
            await self.set_status(session, frame.status, auto=False)
            session.send(_with_request_id({"type": "presence_set", "status": frame.status}, env))
        elif isinstance(frame, PresenceQuery):
            room = self._parse(frame.room)
            await self.check_access(room, session.principal, session)
            users = await self.presence.in_room(room.name)
            session.send(_with_request_id({"type": "presence_state", "room": room.name, "users": users}, env))
        elif isinstance(frame, NotificationAck):
            await self.inbox.acknowledge(session.user_id, frame.ids)
            session.send(_with_request_id({"type": "notification_acked",
                                           "ids": [format_stream_id(i) for i in frame.ids]}, env))
        elif isinstance(frame, Ping):
            session.send(_with_request_id({"type": "pong", "server_time": iso_ms(_now_ms())}, env))
        elif isinstance(frame, Refresh):
            session.send(_with_request_id(await session.refresh(frame.token), env))
        else:  # pragma: no cover - parse_client_frame only returns the types above
            raise InvalidFrame("unsupported frame")

    def _parse(self, value: Any) -> Room:
        return parse_room(value, self.config.rooms.max_name_length)

    async def _check_read(self, room: Room, session: Session) -> None:
        await self.check_access(room, session.principal)

    async def check_access(self, room: Room, who: Principal, session: Session | None = None) -> None:
        """Raise :class:`Forbidden` unless ``who`` may read ``room`` (a joined session may)."""
        if session is not None:
            member = self.registry.membership(room.name, session)
            if member is not None and member.joined:
                return
        if needs_grant(room, who, self.rules) and not await self.streams.is_granted(room.name, who.user_id):
            raise Forbidden("you may not access this room")

    # ------------------------------------------------------------------ join / leave

    async def _join(self, session: Session, env: Envelope, frame: JoinRoom) -> None:
        room = self._parse(frame.room)
        await self._check_read(room, session)
        existing = self.registry.membership(room.name, session)
        if existing is not None and existing.joined:
            # Already live in this room: answer the catch-up question again. Messages already
            # delivered on this connection may repeat in the replay (same ids).
            catch_up = await self._catch_up(room.name, frame)
            session.send(_with_request_id(catch_up.frame(room.name) | {"already_joined": True}, env))
            return
        member = await self._attach(room.name, session, buffering=True)
        was_updates_only = member.updates
        member.joined = True
        try:
            catch_up = await self._catch_up(room.name, frame)
        except BaseException:
            if was_updates_only:
                member.joined = False
                member.buffer = None
            else:
                await self._leave(room.name, session)
            raise
        if session.closing or self.registry.membership(room.name, session) is not member:
            return  # the client went away (or was removed) while we read
        try:
            await self.presence.update(session, room.name, session.status)
            present = await self.presence.in_room(room.name)
        except RedisError as exc:
            log.warning("presence unavailable for a join: %s", type(exc).__name__)
            present = []
        if session.closing or self.registry.membership(room.name, session) is not member:
            await self._forget_presence(session, room.name)  # it may have closed during the update
            await self._leave(room.name, session)
            return
        session.send(_with_request_id(catch_up.frame(room.name) | {"presence": present}, env))
        replayed = {d.entry_id for d in catch_up.replay} if was_updates_only else None
        self.registry.go_live(member, catch_up.last_id, replayed)
        await self.streams.remember_join(session.user_id, room.name)

    def _deliveries(self, room: str, entries: list[Entry]) -> list[Delivery]:
        """Stream entries as frames for a replay (sealed content opened; undeliverable ones left out)."""
        decoded = (entry_to_delivery(room, eid, fields, self.sealer.open) for eid, fields in entries)
        return [d for d in decoded if d is not None]

    async def _catch_up(self, room: str, frame: JoinRoom) -> CatchUp:
        """What a join replays: everything after ``since`` when the stream still holds it all (same
        epoch, nothing trimmed past it, not too much), or the newest ``history`` entries."""
        position = await self.streams.open_room(room)
        limit = self.config.rooms.max_replay
        recovered = False
        archived: list[dict[str, Any]] = []
        entries: list[Entry] = []
        since = frame.since
        if since is not None and position.can_resume_after(since.epoch, since.last_id):
            entries = await self.streams.read_after(room, since.last_id, limit + 1)
            recovered = len(entries) <= limit
        elif since is not None and position.archive_covers(since.epoch, since.last_id):
            # Older than the Redis window: the archive holds what the trim removed. Read Redis
            # first; the archive then answers strictly below the first entry Redis returned (or the
            # newest id at open), so a trim or an archive run in between leaves no gap and no repeat.
            entries = await self.streams.read_after(room, since.last_id, limit + 1)
            upper = _sid_of(entries[0][0]) if entries else (position.last_id[0], position.last_id[1] + 1)
            older = await self.history.archived_between(room, since.epoch, since.last_id, upper, limit)
            if older is not None and len(older) + len(entries) <= limit:
                archived, recovered = older, True
        elif since is None and frame.history:
            entries = await self.streams.read_latest(room, frame.history)
        if since is not None and since.epoch != position.epoch:
            self._note_epoch_change(room, since.epoch, position.epoch)
        if since is not None and not recovered:
            entries = []  # a partial replay would be a silent gap: the client fetches history instead
        replay = self._deliveries(room, entries)
        last = max(position.last_id, replay[-1].entry_id) if replay else position.last_id
        return CatchUp(position.epoch, last, recovered, replay, archived)

    def _room_data_lost(self, room: str) -> None:
        """The room's stream vanished under live members: entries acknowledged before the loss may never
        reach them, and a live connection would never learn it. Close their connections with 4010 so they
        resume: the new epoch answers recovered false and the client refetches history (never a silent gap)."""
        local = self.registry.rooms.get(room)
        if local is None:
            return
        sessions = [session for session in local.members if not session.closing]
        if sessions:
            log.warning("closing %d connection(s) in %s with 4010: the room's data was lost", len(sessions), room)
        for session in sessions:
            session.close(CloseCode.ROOM_DATA_LOST, "room data lost: reconnect and resume",
                          self.config.server.slow_close_grace_s)

    def _note_epoch_change(self, room: str, old: str, new: str) -> None:
        """Count a resume from another epoch; say it once per room and epoch on this node (every member of
        the room comes back with the old epoch)."""
        self.metrics.epoch_mismatches += 1
        if self._epoch_reported.get(room) == new:
            return
        if len(self._epoch_reported) >= 10_000:
            self._epoch_reported.clear()
        self._epoch_reported[room] = new
        log.warning("room %s has a new epoch (%s, was %s): Redis lost its data; resumes get recovered false "
                    "and clients refetch history", room, new, old)

    async def _attach(self, room: str, session: Session, *, buffering: bool) -> Membership:
        """Add the session to ``room`` and make sure the relay reads it. With ``buffering``, live
        deliveries are held until :meth:`Registry.go_live` (a join's replay goes first)."""
        async with self.registry.lock(room):
            member = self.registry.add(room, session)
            if buffering:
                member.buffer = []
            if room not in self.relay.active:
                try:
                    await self.relay.activate(room)
                except Exception as exc:
                    self.registry.remove(room, session)
                    raise Unavailable(f"could not start reading the room: {type(exc).__name__}") from exc
            return member

    async def _unjoin(self, room: str, session: Session) -> None:
        member = self.registry.membership(room, session)
        if member is not None and member.updates:
            member.joined = False
            await self._forget_presence(session, room)
            return
        await self._leave(room, session)

    async def _forget_presence(self, session: Session, room: str) -> None:
        """The session stops being in ``room``: its typing ends and its presence there goes."""
        if self.typing.is_typing(session, room):
            await self.typing.stop_all(session, {room})
        try:
            await self.presence.update(session, room, None)
        except RedisError as exc:
            # Left behind: the connection id outlives nothing but this node, whose reaper removes it.
            log.debug("presence removal failed: %s", type(exc).__name__)

    async def set_status(self, session: Session, status: str, *, auto: bool) -> None:
        """Change the session's presence (client request, or idleness when ``auto``) in every room
        it joined; the rooms are told when the user's presence there changes."""
        session.auto_away = auto and status == "away"
        if session.status == status:
            return
        session.status = status
        for room in list(session.rooms):
            member = self.registry.membership(room, session)
            if member is not None and member.joined and not is_internal(room):
                try:
                    await self.presence.update(session, room, status)
                except RedisError as exc:
                    log.debug("presence update failed: %s", type(exc).__name__)

    async def _leave(self, room: str, session: Session) -> None:
        member = self.registry.membership(room, session)
        if member is not None and member.joined and not is_internal(room):
            await self._forget_presence(session, room)
        async with self.registry.lock(room):
            if self.registry.remove(room, session) and room in self.relay.active:
                await self.relay.deactivate(room)
        self.registry.forget_lock(room)

    async def _subscribe_updates(self, session: Session, env: Envelope, frame: SubscribeUpdates) -> None:
        room = self._parse(f"{frame.kind}_{frame.target_id}")
        topic = f"{frame.kind}_updates"
        if frame.subscribe:
            await self._check_read(room, session)
            member = self.registry.membership(room.name, session)
            if member is None:
                member = await self._attach(room.name, session, buffering=False)
            member.updates = True
            session.send(_with_request_id({"type": "subscribed", "topic": topic, "room": room.name,
                                           f"{frame.kind}_id": int(room.ids[0])}, env))
        else:
            member = self.registry.membership(room.name, session)
            if member is None or not member.updates:
                raise NotJoined("not subscribed to these updates")
            member.updates = False
            if not member.joined:
                await self._leave(room.name, session)
            session.send(_with_request_id({"type": "unsubscribed", "topic": topic, "room": room.name,
                                           f"{frame.kind}_id": int(room.ids[0])}, env))

    async def _recheck_room_access(self, room_name: str) -> None:
        """The room's grants changed: remove local members who lost access (within a second)."""
        local = self.registry.rooms.get(room_name)
        if local is None:
            return
        room = self._parse(room_name)
        for session in list(local.members):
            try:
                await self._check_read(room, session)
            except Forbidden:
                await self._leave(room_name, session)
                session.send({"type": "room_left", "room": room_name, "reason": "access_revoked"})
            except Unavailable:
                return  # keep members; the next change re-checks

    # ------------------------------------------------------------------ publish

    async def _publish(self, session: Session, env: Envelope, msg: ChatMessage) -> None:
        room = self._check_publish(session, msg)
        await session.inflight.acquire()
        self._submit_publish(session, env, msg, room)

    def _check_publish(self, session: Session, msg: ChatMessage) -> Room:
        """The message's room, if the session may publish this message there; raises ClientError if not."""
        room = self._parse(msg.room)
        member = self.registry.membership(room.name, session)
        if member is None or not member.joined:
            raise NotJoined("join the room before sending messages")
        check_publish(room, session.principal, self.rules)
        if msg.message_type == "system" and not (session.principal.roles & {"admin", "support"}):
            raise Forbidden("only support and admin may send system messages")
        return room

    def _submit_publish(self, session: Session, env: Envelope, msg: ChatMessage, room: Room) -> None:
        """Hand a checked message to the publisher (the caller holds an in-flight slot); the ack or the error
        goes to the session when Redis answers."""
        created_at_ms = _now_ms()
        stored = self.sealer.seal(room.name, session.user_id, created_at_ms, msg.content, msg.sensitive)
        fields = chat_entry_fields(session.user_id, msg, created_at_ms, stored)
        # The rate check runs in the publisher's pipeline, batched with everyone's: no round trip here.
        future = self.publisher.submit(room.name, session.user_id, msg.client_msg_id, fields,
                                       self.limits.message_rate(session.user_id))
        request_id = env.request_id

        def acked(fut: asyncio.Future[PublishResult]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                err = exc if isinstance(exc, ClientError) else Unavailable("publish failed")
                err.request_type, err.request_id = "chat_message", request_id
                self._count_error(err)
                session.note_refusal(err, room.name)  # audits rate-limit hits
                extra = {"client_msg_id": msg.client_msg_id} if msg.client_msg_id is not None else {}
                session.send_error(err, room=room.name, **extra)
                return
            result = fut.result()
            if not result.duplicate:
                self.metrics.messages_published += 1
                kind = room.kind.value
                self.metrics.published_by_kind[kind] = self.metrics.published_by_kind.get(kind, 0) + 1
            ack: dict[str, Any] = {"type": "ack", "room": room.name, "id": result.id}
            if msg.client_msg_id is not None:
                ack["client_msg_id"] = msg.client_msg_id
            if result.duplicate:
                ack["duplicate"] = True
            if request_id is not None:
                ack["request_id"] = request_id
            session.send(ack)

        future.add_done_callback(session.after_publish(acked))


def _sid_of(entry_id: bytes) -> StreamId:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq)


def _with_request_id(frame: dict[str, Any], env: Envelope) -> dict[str, Any]:
    if env.request_id is not None:
        frame["request_id"] = env.request_id
    return frame


def _room_of(env: Envelope) -> str | None:
    room = getattr(env.frame, "room", None)
    return room if isinstance(room, str) and len(room) <= 128 else None


def _now_ms() -> int:
    return int(time.time() * 1000)
