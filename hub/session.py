"""One WebSocket connection: its identity, its outgoing buffer, its read loop.

Every frame the hub sends to a client goes through :meth:`Session.send_wire`: bytes are appended
to the session's pending list and written with one ``transport.write`` per event-loop turn by the
node's :class:`Outbox`; a big room's chat is written in the delivering pass instead, when nothing else of
the turn is queued for the connection (:meth:`Session.send_wires_now`). Nothing ever awaits a client's
socket, so one stalled client cannot slow a room; a client whose unsent bytes exceed the limit is closed
with 4008 "slow".

The session also owns its token's lifetime: a timer sends ``token_expiring`` ``auth.expiry_warning_s``
before the deadline (the token's exp plus ``auth.leeway_s``) and another closes the connection with
4502 at the deadline, unless a ``refresh`` frame brought a newer token for the same user first.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from hub.auth import VerifiedToken
from hub.errors import AuthError, ClientError, CloseCode, Forbidden, InvalidToken, RateLimited, Unavailable
from hub.limits import Lease
from hub.protocol import encode, error_frame, iso_ms, text_frame
from hub.wsframes import at_frame_boundary, serve_text_frames

if TYPE_CHECKING:
    from hub.node import Node
    from hub.tokens import TokenGuard

log = logging.getLogger("hub.session")
PublishCallback = Callable[["asyncio.Future[Any]"], None]
_ids = itertools.count(1)


class HubConnection(ServerConnection):
    """websockets' server connection plus what the handshake learnt about the client.

    Our fields are slots: added to websockets' ~30 instance attributes they would push the instance
    dict past CPython's shared-key limit and cost ~1.5 KB per connection.
    """

    __slots__ = ("client_ip", "client_type", "client_version", "device_id", "frame_handler", "held_response",
                 "last_data_at", "lease", "pinged_at", "verified")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by process_request after the token is verified; None until then (and for HTTP requests).
        self.verified: VerifiedToken | None = None
        # The connection's slots under its IP and user caps; released when the session ends.
        self.lease: Lease | None = None
        self.client_ip = ""
        self.client_type = ""
        self.client_version = ""
        self.device_id = ""
        # For the node-wide keepalive (hub/keepalive.py): when the peer last sent anything, and when
        # we last pinged it (event-loop time).
        self.last_data_at = 0.0
        self.pinged_at = 0.0
        # The accepted handshake's HTTP 101 response, held back to go out in one write with the session's first
        # frames (the hello): one socket write per connect instead of two. b"" marks a response to hold; None
        # once nothing is (or will be) held. See send_data() and take_held_response().
        self.held_response: bytes | None = None
        # websockets waits on these only while its own writes are paused (we write to the transport
        # ourselves); it appends, removes and iterates, which a list does in 56 bytes instead of a
        # deque's ~760.
        self.drain_waiters = []  # type: ignore[assignment]
        # The session's handler for a text message it can serve at once (see process_event); None until the
        # session serves, and for HTTP requests.
        self.frame_handler: Callable[[str], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.last_data_at = self.loop.time()
        # Like drain_waiters: the received-frame queue (made here by websockets) is a deque, ~760
        # bytes even when empty.
        frames = self.recv_messages.frames
        if isinstance(frames.queue, collections.deque):
            frames.queue = _FrameQueue()  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_data_at = self.loop.time()
        handler = self.frame_handler
        if handler is not None and not self.recv_messages.frames.queue and at_frame_boundary(self.protocol):
            # Chat frames are served here, without websockets' parser (hub/wsframes.py); what remains is its.
            consumed = serve_text_frames(data, handler, self.protocol.max_message_size)
            if consumed == len(data):
                return
            if consumed:
                data = data[consumed:]
        super().data_received(data)

    def process_event(self, event: Any) -> None:
        """A complete text message with nothing queued before it goes straight to the session's frame handler,
        which serves it now if it can (a chat message while nothing else of the session's is being handled):
        not through websockets' message queue and a wake-up of the session's task, which cost about as much
        as the rest of a publish. Everything else (and a message the handler declines) takes websockets' way."""
        handler = self.frame_handler
        if handler is not None and type(event) is Frame and event.opcode is Opcode.TEXT and event.fin \
                and not self.recv_messages.frames.queue:
            try:
                text = str(event.data, "utf-8")
            except UnicodeDecodeError:
                pass  # websockets closes the connection with 1007
            else:
                if handler(text):
                    return
        super().process_event(event)

    def hold_response(self) -> None:
        """Hold the handshake response (an accepted upgrade) until the session's first write."""
        self.held_response = b""

    def take_held_response(self) -> bytes:
        """The held handshake response, to be written before anything else; b"" when none is held."""
        held, self.held_response = self.held_response, None
        return held or b""

    def send_data(self) -> None:
        """websockets' write of what its protocol has to send. The accepted handshake's response is held
        (see hold_response); whatever websockets sends after it (a close, a ping) releases it first."""
        if self.held_response is None:
            super().send_data()
            return
        if self.held_response == b"" and self.protocol.state is State.OPEN:
            self.held_response = b"".join(self.protocol.data_to_send())  # the 101 alone: no EOF when OPEN
            return
        held = self.take_held_response()
        if held:
            self.transport.write(held)
        super().send_data()


class _FrameQueue(list[Any]):
    """The deque operations websockets' received-frame queue uses (append, popleft, extendleft, len),
    on a list: it rarely holds more than one frame, and an empty list is 56 bytes."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def extendleft(self, items: Iterable[Any]) -> None:
        for item in items:
            self.insert(0, item)


class Outbox:
    """Writes every session's pending frames once per event-loop turn, or, with a write delay, once
    per delay window (server.write_delay_ms): frames due to one connection within it share one write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write_delay_s: float = 0.0,
                 limit_bytes: int = 1 << 20) -> None:
        self._loop = loop
        self._dirty: list[Session] = []
        self._scheduled = False
        self._write_delay_s = write_delay_s
        # With a write delay, every frame waits for the window (Session.send_wires_now queues too).
        self.delays = write_delay_s > 0
        # A connection with more than this still unsent from earlier writes when more is due is slow
        # (server.outbox_limit_bytes).
        self.limit_bytes = limit_bytes
        # Transport writes made, and frames they carried (for metrics and tests).
        self.writes = 0
        self.frames = 0

    def mark(self, session: Session) -> None:
        self._dirty.append(session)
        if not self._scheduled:
            self._scheduled = True
            if self._write_delay_s > 0:
                self._loop.call_later(self._write_delay_s, self._flush)
            else:
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                session.flush()
            except Exception:  # one broken transport must not stop the others' writes
                log.exception("flush failed for %s", session.id)


class Session:
    """State of one connection, from after the handshake until it closes."""

    __slots__ = (
        "_abort_handle",
        "_busy",
        "_dirty",
        "_expiry_due",
        "_expiry_warned",
        "_inflight",
        "_outbox",
        "_pending",
        "_protocol",
        "_transport",
        "auto_away",
        "closing",
        "connection",
        "guard",
        "id",
        "last_frame_at",
        "node",
        "principal",
        "rooms",
        "status",
        "token",
        "user_id",
    )

    def __init__(self, connection: HubConnection, node: Node, outbox: Outbox, guard: TokenGuard) -> None:
        assert connection.verified is not None
        self.connection = connection
        self.node = node
        self.guard = guard
        # The connection's current token and identity; a refresh replaces both (same user id).
        self.principal = connection.verified.principal
        self.token = connection.verified
        self.user_id = self.principal.user_id
        self.id = f"{node.node_id}-{next(_ids)}"
        self._outbox = outbox
        self._transport = connection.transport
        self._protocol = connection.protocol  # (its state is checked before every write)
        # Frames waiting for this turn's write; emptied by flush().
        self._pending: list[bytes] = []
        self._dirty = False
        # True while the session's task handles a frame (or before it serves): a later frame must then wait its
        # turn in websockets' queue instead of being served at once (see handle_now).
        self._busy = True
        # Set once the session stops accepting frames (closing, slow, or closed).
        self.closing = False
        # Timer that aborts the TCP connection if the client never answers our close frame.
        self._abort_handle: asyncio.TimerHandle | None = None
        # Rooms this session joined or subscribed to updates of (the registry holds the details).
        # A list, not a set: a connection is in a few rooms (an empty set is 216 bytes, a list 56).
        self.rooms: list[str] = []
        self.last_frame_at = time.monotonic()
        # Presence of this connection: "online" or "away" (set by the client, or by idleness when
        # auto_away is True, which the next frame undoes).
        self.status = "online"
        self.auto_away = False
        # Made on the first publish (see the inflight property).
        self._inflight: asyncio.Semaphore | None = None
        # The token's next deadline (event-loop time) on the node's heap: the token_expiring warning,
        # then the close. Set once the session serves, replaced by a refresh, None when cancelled.
        self._expiry_due: float | None = None
        self._expiry_warned = False

    # ------------------------------------------------------------------ outgoing

    def send(self, frame: dict[str, Any]) -> None:
        self.send_wire(text_frame(encode(frame)))

    def send_wire(self, wire: bytes) -> bool:
        """Queue one complete WebSocket frame; written at the end of this loop turn. False when the
        session is closing or its peer already started closing (nothing queued)."""
        if self.closing or self._protocol.state is not State.OPEN:
            return False
        self._pending.append(wire)
        if not self._dirty:
            self._dirty = True
            self._outbox.mark(self)
        return True

    def send_error(self, exc: ClientError, room: str | None = None, **extra: Any) -> None:
        if isinstance(exc, RateLimited):
            extra["retry_after_ms"] = exc.retry_after_ms
        self.send(error_frame(exc.code, exc.message, request_type=exc.request_type, room=room,
                              request_id=exc.request_id, retryable=exc.retryable, **extra))

    def send_wires_now(self, data: bytes, frames: int) -> bool:
        """Write ``data`` (``frames`` complete frames, a room's deliveries of this turn) at once, when nothing
        else of this turn is queued for the connection: one pass over a big room's members instead of a
        queueing pass and a writing pass. Otherwise it is queued after what is, like :meth:`send_wire`. False
        when the session is closing (nothing written or queued)."""
        if self.closing or self._protocol.state is not State.OPEN:
            return False
        if self._dirty or self._outbox.delays or self.connection.held_response is not None:
            self._pending.append(data)
            self._outbox.frames += frames - 1  # (flush counts the list's items)
            if not self._dirty:
                self._dirty = True
                self._outbox.mark(self)
            return True
        self._write(data, frames)
        return True

    def flush(self) -> None:
        self._dirty = False
        if not self._pending:
            return
        count = len(self._pending)
        data = self._pending[0] if count == 1 else b"".join(self._pending)
        self._pending.clear()
        if self.closing or self._protocol.state is not State.OPEN:
            return
        if self.connection.held_response is not None:
            data = self.connection.take_held_response() + data
        self._write(data, count)

    def _write(self, data: bytes, frames: int) -> None:
        # Slow means: more than the limit is still unsent from earlier turns when more is due. Measured
        # before this write, not after it, so one burst (a busy pipeline's worth of messages landing in
        # one turn) does not cut off a client that reads as fast as it can.
        if self._transport.get_write_buffer_size() > self._outbox.limit_bytes:
            self.node.metrics.slow_disconnects += 1
            log.info("closing slow connection %s (user %s)", self.id, self.user_id)
            self.close(CloseCode.SLOW, "slow: the client did not read fast enough",
                       self.node.config.server.slow_close_grace_s)
            return
        self._transport.write(data)
        self._outbox.writes += 1
        self._outbox.frames += frames

    def close(self, code: int, reason: str, grace_s: float) -> None:
        """Start the close handshake without waiting on the socket; abort after ``grace_s``."""
        if self.closing:
            return
        self.closing = True
        self._cancel_expiry()
        self._pending.clear()
        conn = self.connection
        if conn.protocol.state is State.OPEN:
            conn.protocol.send_close(code, reason)
            try:
                conn.send_data()
            except Exception:  # the transport is already gone
                conn.transport.abort()
                return
        self._abort_handle = asyncio.get_running_loop().call_later(grace_s, conn.transport.abort)

    # ------------------------------------------------------------------ incoming

    async def run(self) -> None:
        """Serve the connection until it closes. Never raises for client behaviour."""
        conn = self.connection
        if self.guard.watch.recently_revoked(self.token):
            # Revoked while this connection was being set up (after the handshake's Redis check).
            self.close(CloseCode.TOKEN_REVOKED, "token revoked", self.node.config.server.slow_close_grace_s)
        else:
            await self.node.session_connected(self, {
                "type": "connection_established",
                "connection_id": self.id,
                "user_id": self.user_id,
                "server_time": _now_iso(),
                "heartbeat_s": self.node.config.server.ping_interval_s,
            })
            self._schedule_expiry()
        conn.frame_handler = self.handle_now
        try:
            self._busy = False
            async for raw in conn:
                self.last_frame_at = time.monotonic()
                if self.closing:
                    continue
                self._busy = True
                try:
                    await self.node.handle_frame(self, raw)
                finally:
                    self._busy = False
        except ConnectionClosed:
            pass
        finally:
            conn.frame_handler = None
            self.closing = True
            self._cancel_expiry()
            if self._abort_handle is not None:
                self._abort_handle.cancel()
            await self.node.session_closed(self)

    def handle_now(self, raw: str) -> bool:
        """Serve a received text message synchronously, from the connection's data callback, if it can be
        (see Node.handle_frame_now) and nothing of this session's is being handled; False leaves it to the
        session's task, in order."""
        if self._busy or self.closing:
            return False
        if not self.node.handle_frame_now(self, raw):
            return False
        self.last_frame_at = time.monotonic()
        return True

    def take_publish_slot(self) -> bool:
        """Take an in-flight publish slot if one is free now (no waiting); see inflight."""
        slots = self.inflight
        if slots.locked():
            return False
        acquire = slots.acquire()
        try:
            acquire.send(None)  # not locked: acquire() returns without suspending
        except StopIteration:
            return True
        acquire.close()
        raise RuntimeError("a free semaphore suspended its acquire()")

    # ------------------------------------------------------------------ token lifetime

    @property
    def deadline(self) -> float:
        """When the connection is closed unless refreshed (epoch seconds): exp plus the leeway."""
        return self.token.expires_at + self.guard.config.leeway_s

    def _schedule_expiry(self) -> None:
        """The token's next deadline on the node's heap (hub/deadlines.py): first the warning, which
        then sets the close at the deadline."""
        self._cancel_expiry()
        if self.closing:
            return
        left = self.deadline - time.time()
        warning_s = self.guard.config.expiry_warning_s
        # A token already inside the warning window is warned about at once.
        due_in = max(0.0, left - warning_s) if warning_s > 0 and left > 0 else max(0.0, left)
        self._expiry_warned = not (warning_s > 0 and left > 0)
        self._set_expiry_due(due_in)

    def _set_expiry_due(self, due_in: float) -> None:
        when = asyncio.get_running_loop().time() + due_in
        self._expiry_due = when
        self.node.deadlines.add(when, self)

    def _cancel_expiry(self) -> None:
        if self._expiry_due is not None:
            self._expiry_due = None
            self.node.deadlines.cancelled()

    def wants_deadline(self, when: float) -> bool:
        return when == self._expiry_due

    def deadline_due(self, when: float) -> None:
        if when != self._expiry_due:
            return  # cancelled or replaced (refresh, close)
        self._expiry_due = None
        if self._expiry_warned:
            self._expire()
        else:
            self._warn_expiry()

    def _warn_expiry(self) -> None:
        self._expiry_warned = True
        left = self.deadline - time.time()
        self._set_expiry_due(max(0.0, left))
        if left > 0:
            self.send({"type": "token_expiring", "expires_at": iso_ms(int(self.deadline * 1000)), "in_s": int(left)})

    def _expire(self) -> None:
        if self.closing:
            return
        if self.deadline - time.time() > 0.05:  # the wall clock moved back since the timer was set
            self._schedule_expiry()
            return
        log.info("closing %s (user %s): token expired", self.id, self.user_id)
        self.guard.audit.record("token_expired", who=self.user_id, ip=self.connection.client_ip, what="connection",
                                connection=self.id)
        self.close(CloseCode.TOKEN_EXPIRED, "token expired", self.node.config.server.slow_close_grace_s)

    async def refresh(self, token: str) -> dict[str, Any]:
        """Adopt a newer token: verified like at the handshake, same ``sub``, not revoked. It replaces
        the connection's identity (roles, room claims) and moves the deadline. Raises
        :class:`InvalidToken` (the current token stays) or :class:`Unavailable`."""
        guard = self.guard
        try:
            verified = guard.verifier.verify(token)
            if verified.principal.user_id != self.user_id:
                raise AuthError("the token is for another user")
            try:
                revoked = await guard.store.is_revoked(verified) or guard.watch.recently_revoked(verified)
            except (RedisError, OSError):
                raise Unavailable("cannot check the token for revocation now; retry") from None
            if revoked:
                raise AuthError("token revoked")
        except AuthError as exc:
            guard.audit.record("auth_failure", who=self.user_id, ip=self.connection.client_ip, what="refresh",
                               reason=exc.message)
            raise InvalidToken(exc.message) from None
        self.token = verified
        self.principal = verified.principal
        self._schedule_expiry()
        return {"type": "token_refreshed", "expires_at": iso_ms(int(self.deadline * 1000))}

    def note_refusal(self, exc: ClientError, room: str | None) -> None:
        """Audit the refusals that matter for security: ACL denials and rate-limit hits."""
        if isinstance(exc, Forbidden):
            event = "acl_denied"
        elif isinstance(exc, RateLimited):
            event = "rate_limited"
        else:
            return
        self.guard.audit.record(event, who=self.user_id, ip=self.connection.client_ip, what=room,
                                request=exc.request_type)

    @property
    def inflight(self) -> asyncio.Semaphore:
        """Publishes in flight; the read loop waits when the client has too many. Made on the first
        publish (most connections never publish)."""
        if self._inflight is None:
            self._inflight = asyncio.Semaphore(self.node.config.server.max_inflight_publishes)
        return self._inflight

    def after_publish(self, callback: PublishCallback) -> PublishCallback:
        """Wrap a publish completion callback so it frees the in-flight slot first."""

        def done(future: asyncio.Future[Any]) -> None:
            self.inflight.release()
            callback(future)

        return done


def _now_iso() -> str:
    return iso_ms(int(time.time() * 1000))
