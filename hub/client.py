"""An asyncio client for the hub, for Python apps and backend services (the Python twin of
``clients/js/streamhub.js``), plus :func:`publish_event` for backends that publish with ``XADD``.

What the client does for the application, and why (the README's "Protocol" and "Resume" sections):

- Reconnects after every unplanned close (codes 1000-4499, network errors, dead connections) with
  exponential backoff and full jitter, so a restarted node does not get every client back in the same
  millisecond. It never gives up silently: each attempt is a ``state`` event, ``max_attempts`` defaults
  to unlimited, and the only other stops are :meth:`HubClient.close` and credentials the hub refuses
  (HTTP 401 or close codes 4500-4999: an ``auth_error`` event and :class:`HubAuthError`). With
  ``get_token`` an auth failure fetches a fresh token and tries again instead.
- Tracks ``{epoch, last_id}`` for every joined room and resumes each after a reconnect; when the hub
  cannot replay the gap (``recovered: false``) it emits a ``gap`` event so the application refetches.
- Drops room frames whose id is not newer than the room's last id (ids increase within a room), so a
  replay overlapping what was already delivered never shows a message twice.
- Queues messages while disconnected, each with a ``client_msg_id``, and sends them once the room is
  joined again; a message whose ack was lost is re-sent with the same id, which the hub de-duplicates
  (``ack.duplicate: true``), so a retry never stores a message twice.
- Sends application pings every heartbeat interval and drops the connection when nothing arrived for
  two intervals (a dead TCP connection can look open for minutes).
- Answers ``token_expiring`` with a ``refresh`` frame when ``get_token`` is given.

Every frame is handled on the event loop in the read task, synchronously, so the bookkeeping (room
positions, pending sends) never interleaves with itself; writes go through one writer task per
connection so they keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

log = logging.getLogger("hub.client")

Frame = dict[str, Any]
Handler = Callable[[Frame], Any]
TokenSource = Callable[[], Awaitable[str]]

# Frame types that carry a room's stream id (``id``): what resume and de-duplication track.
ROOM_FRAME_TYPES = frozenset({
    "chat_message", "order_status_update", "quote_update", "payment_update", "system_notification",
    "deadline_reminder",
})
EVENT_TYPES = ROOM_FRAME_TYPES - {"chat_message"}
DEFAULT_BACKOFF = (0.5, 30.0, 2.0)  # initial_s, max_s, factor


class HubClientError(Exception):
    """An error frame from the hub (``code`` from its error table) or one raised by this client
    (``timeout``, ``closed``, ``left``, ``queue_full``, ``max_attempts``, ``unauthorized``)."""

    def __init__(self, code: str, message: str = "", retry_after_ms: int | None = None,
                 frame: Frame | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code
        self.retry_after_ms = retry_after_ms
        self.frame = frame

    @classmethod
    def from_frame(cls, frame: Frame) -> HubClientError:
        retry = frame.get("retry_after_ms")
        return cls(str(frame.get("code", "error")), str(frame.get("message", "")),
                   retry if isinstance(retry, int) else None, frame)


class HubAuthError(HubClientError):
    """The hub refused the credentials (HTTP 401 at the handshake, or close code 4500-4999)."""


def backoff_delay(attempt: int, backoff: tuple[float, float, float] = DEFAULT_BACKOFF,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before reconnect attempt ``attempt`` (1, 2, ...): uniform in ``[0, ceiling]`` ("full
    jitter"), ceiling ``min(max_s, initial_s * factor ** (attempt - 1))``."""
    initial, ceiling_max, factor = backoff
    exponent = min(max(attempt, 1) - 1, 64)  # bounded: factor ** huge overflows a float
    ceiling = min(ceiling_max, initial * factor ** exponent)
    return max(0.0, ceiling * rand())


def id_key(stream_id: str) -> tuple[int, int]:
    """A stream id ("1732550400000-0") as a comparable tuple; malformed ids sort first."""
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


def new_client_msg_id() -> str:
    return f"py-{secrets.token_hex(12)}"


@dataclass
class _Room:
    name: str
    history: int = 0
    epoch: str | None = None
    last_id: str | None = None
    live: bool = False  # room_joined received on the current connection
    join_request_id: str | None = None
    sent_since: bool = False
    joined_frame: Frame | None = None
    waiters: list[asyncio.Future[Frame]] = field(default_factory=list)
    # Ids of update-subscription events that arrived before room_joined: the replay may repeat them.
    seen_while_joining: set[str] | None = None


@dataclass
class _Send:
    cmid: str
    room: str
    frame: Frame
    future: asyncio.Future[Frame]
    request_id: str | None = None  # set while written on the current connection
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Request:
    frame: Frame
    future: asyncio.Future[Frame]
    resend: bool = True  # written again after a reconnect (idempotent requests)
    request_id: str | None = None
    timer: asyncio.TimerHandle | None = None


class EventStream:
    """An async iterator over the client's events, registered when created (so nothing emitted after
    ``events()`` returned is missed). Unbounded: iterate it, or ``aclose()`` it when done."""

    def __init__(self, client: HubClient, types: frozenset[str] | None) -> None:
        self._client = client
        self._types = types
        self._queue: asyncio.Queue[Frame] = asyncio.Queue()
        client._streams.add(self)

    def _put(self, frame: Frame) -> None:
        if self._types is None or frame.get("type") in self._types:
            self._queue.put_nowait(frame)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Frame:
        return await self._queue.get()

    async def get(self, timeout_s: float | None = None) -> Frame:
        """The next event, or TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            return await self._queue.get()

    def drain(self) -> list[Frame]:
        """The events already received, without waiting."""
        got: list[Frame] = []
        while not self._queue.empty():
            got.append(self._queue.get_nowait())
        return got

    async def aclose(self) -> None:
        self._client._streams.discard(self)


class HubClient:
    """One logical connection to the hub that survives reconnects. Events (``on(type, handler)`` or
    ``events()``): every server frame by its ``type``, ``"*"`` for all of them, and the client's own
    ``state``, ``gap``, ``auth_error`` and ``connection_error`` (dicts with a ``type`` key too)."""

    def __init__(self, url: str | Callable[[], str], *, token: str | None = None,
                 get_token: TokenSource | None = None, heartbeat_s: float | None = None,
                 backoff: tuple[float, float, float] = DEFAULT_BACKOFF, max_attempts: int | None = None,
                 connect_timeout_s: float = 10.0, ack_timeout_s: float = 15.0, request_timeout_s: float = 15.0,
                 reset_after_s: float = 5.0, max_queue: int = 1000, client_type: str = "python") -> None:
        if token is None and get_token is None:
            raise ValueError("HubClient: give token or get_token")
        # A callable url lets a service point the next attempt at another node (failover, tests).
        self._url = url
        self._token = token
        self._get_token = get_token
        self._heartbeat_s = heartbeat_s
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._connect_timeout_s = connect_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._request_timeout_s = request_timeout_s
        # A connection that lived this long resets the attempt count; a server that accepts and closes
        # at once keeps the delay growing, so a flapping node never causes a reconnect storm.
        self._reset_after_s = reset_after_s
        self._max_queue = max_queue
        self._client_type = client_type

        self._handlers: dict[str, list[Handler]] = {}
        self._streams: set[EventStream] = set()
        self._state: Literal["closed", "connecting", "open", "reconnecting"] = "closed"
        self._stopped = True
        self._run_task: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[Frame] | None = None
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[bytes] | None = None  # the current connection's writer queue
        self._established = False
        self._last_frame_at = 0.0
        self._failures = 0
        self._request_ids = itertools.count(1)
        self._replies: dict[str, tuple[str, str]] = {}  # request_id -> (kind, key) on this connection
        self._rooms: dict[str, _Room] = {}
        self._sends: dict[str, _Send] = {}  # client_msg_id -> send, in send order
        self._requests: list[_Request] = []
        self._subs: dict[int | str, None] = {}  # order ids subscribed to (renewed after reconnects)
        self._presence = "online"
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connection_id: str | None = None
        self.user_id: str | None = None
        self.stats = {"connects": 0, "duplicates_dropped": 0}

    # ------------------------------------------------------------------ events

    def on(self, event_type: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(frame)`` for each event of ``event_type`` (``"*"``: all server frames); a
        coroutine function is scheduled as a task. Returns a function that unsubscribes."""
        self._handlers.setdefault(event_type, []).append(handler)
        return lambda: self._handlers.get(event_type, []).remove(handler)

    def events(self, types: Iterable[str] | None = None) -> EventStream:
        """An async iterator over events (all, or only ``types``), starting now."""
        return EventStream(self, frozenset(types) if types is not None else None)

    def _emit(self, event: Frame, *, frame: bool = False) -> None:
        etype = str(event.get("type"))
        handlers = list(self._handlers.get(etype, ()))
        if frame:
            handlers += self._handlers.get("*", ())
        for handler in handlers:
            try:
                result = handler(event)
                if asyncio.iscoroutine(result):
                    self._spawn(result)
            except Exception:  # one faulty handler must not break the client's own bookkeeping
                log.exception("hub client: a %s handler raised", etype)
        for stream in list(self._streams):
            stream._put(event)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """``closed``, ``connecting``, ``open`` or ``reconnecting``."""
        return self._state

    @property
    def pending_count(self) -> int:
        """Messages sent but not acknowledged yet (queued or in flight)."""
        return len(self._sends)

    def room_position(self, room: str) -> tuple[str | None, str | None] | None:
        """``(epoch, last_id)`` of a joined room, or None."""
        st = self._rooms.get(room)
        return (st.epoch, st.last_id) if st else None

    def set_token(self, token: str) -> None:
        """Replace the static token (used from the next connection on, e.g. after an auth error)."""
        self._token = token

    def _set_state(self, state: Literal["closed", "connecting", "open", "reconnecting"], **detail: Any) -> None:
        previous, self._state = self._state, state
        self._emit({"type": "state", "state": state, "previous": previous, **detail})

    # ------------------------------------------------------------------ connect / close

    async def connect(self) -> Frame:
        """Start connecting (and keep reconnecting until :meth:`close`). Returns the first
        ``connection_established`` frame; raises :class:`HubAuthError` if the hub refuses the token
        (static token), or :class:`HubClientError` ``max_attempts``."""
        if self._stopped:
            self._stopped = False
            self._failures = 0
            self._opened = asyncio.get_running_loop().create_future()
            self._set_state("connecting", attempt=0)
            self._run_task = asyncio.create_task(self._run(), name="hub-client")
        assert self._opened is not None
        return await asyncio.shield(self._opened)

    async def close(self) -> None:
        """Close for good: no reconnect; pending sends and requests fail with ``closed``."""
        was_stopped = self._stopped
        self._stopped = True
        ws, task = self._ws, self._run_task
        self._run_task = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1000, "client closed"), 2.0)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_connection()
        self._fail_all(HubClientError("closed", "the client was closed"))
        self._rooms.clear()
        self._subs.clear()
        for pending in list(self._tasks):
            pending.cancel()
        if not was_stopped or self._state != "closed":
            self._set_state("closed", reason="client")

    async def __aenter__(self) -> HubClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _fail_all(self, error: HubClientError) -> None:
        for entry in list(self._sends.values()):
            self._settle_send(entry, error=error)
        for req in list(self._requests):
            self._settle_request(req, error=error)
        for st in self._rooms.values():
            self._reject_waiters(st, error)
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error)
            self._opened.exception()  # mark retrieved: connect() may never be awaited again

    def _halt(self, error: HubClientError, **detail: Any) -> None:
        """Stop reconnecting (auth refused, max_attempts): tell the application and fail what waits.
        Rooms are kept, so set_token() + connect() resumes them."""
        self._stopped = True
        self._fail_all(error)
        self._set_state("closed", reason=error.code, **detail)

    def _connect_url(self, token: str) -> str:
        base = self._url() if callable(self._url) else self._url
        parts = urlsplit(base)
        path = parts.path if parts.path not in ("", "/") else "/ws/connect"
        query = urlencode({"token": token, "client_type": self._client_type})
        return urlunsplit((parts.scheme, parts.netloc, path, query, ""))

    async def _fetch_token(self) -> str:
        if self._get_token is None:
            assert self._token is not None
            return self._token
        # Bounded: a get_token that never returns must not leave the client silently stuck.
        return await asyncio.wait_for(self._get_token(), self._connect_timeout_s)

    async def _run(self) -> None:
        """The reconnect loop: one connection at a time, backoff between them."""
        while not self._stopped:
            code, reason, status, lived_s = await self._one_connection()
            if self._stopped:
                return
            auth_problem = status == 401 or (code is not None and 4500 <= code <= 4999)
            if lived_s >= self._reset_after_s:
                self._failures = 0
            self._failures += 1
            if auth_problem:
                self._emit({"type": "auth_error", "code": code, "reason": reason, "status": status,
                            "attempt": self._failures})
                if self._get_token is None:  # the same token would be refused again
                    self._halt(HubAuthError("unauthorized", reason or f"refused: {status or code}"),
                               code=code, status=status)
                    return
                # With get_token the next attempt fetches a fresh token, after the usual backoff.
            if self._max_attempts is not None and self._failures > self._max_attempts:
                self._halt(HubClientError("max_attempts", f"gave up after {self._failures - 1} attempts"),
                           code=code)
                return
            delay = backoff_delay(self._failures, self._backoff)
            self._set_state("reconnecting", attempt=self._failures, delay_s=delay, code=code, reason=reason,
                            status=status)
            await asyncio.sleep(delay)

    async def _one_connection(self) -> tuple[int | None, str, int | None, float]:
        """Connect, serve frames until the connection ends; returns (close code, reason, HTTP status
        of a refused handshake, seconds it was established)."""
        try:
            token = await self._fetch_token()
            ws = await connect(self._connect_url(token), open_timeout=self._connect_timeout_s,
                               ping_interval=None,  # our application pings also keep the idle timer
                               max_queue=None, close_timeout=2.0)
        except InvalidStatus as exc:
            status = exc.response.status_code
            self._emit({"type": "connection_error", "stage": "handshake", "status": status, "error": str(exc)})
            return None, f"HTTP {status}", status, 0.0
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._emit({"type": "connection_error", "stage": "connect", "error": repr(exc)})
            return None, str(exc), None, 0.0
        self._ws = ws
        self.stats["connects"] += 1
        established_at: float | None = None
        helpers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                first = orjson.loads(await ws.recv())
            if not isinstance(first, dict) or first.get("type") != "connection_established":
                return None, "no connection_established", None, 0.0
            self._outbox = asyncio.Queue()
            helpers.append(asyncio.create_task(self._writer(ws, self._outbox)))
            established_at = time.monotonic()
            heartbeat = self._on_established(first)
            helpers.append(asyncio.create_task(self._heartbeat(ws, heartbeat)))
            async for raw in ws:
                self._on_message(raw)
        except (ConnectionClosed, OSError, TimeoutError, orjson.JSONDecodeError):
            pass
        finally:
            for helper in helpers:
                helper.cancel()
            self._drop_connection()
            if self._stopped:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
            elif ws.protocol.state is not State.CLOSED:
                # Timed out or garbled before connection_established: do not leave the socket behind.
                ws.transport.abort()
        rcvd = ws.protocol.close_rcvd
        lived = time.monotonic() - established_at if established_at is not None else 0.0
        return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else "connection lost"), None, lived

    async def _writer(self, ws: ClientConnection, outbox: asyncio.Queue[bytes]) -> None:
        # One writer per connection keeps frames in the order the bookkeeping produced them.
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send((await outbox.get()).decode())

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        """Ping every interval; abort the socket when nothing arrived for two intervals (a dead peer
        would make a polite close wait for the close timeout)."""
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_frame_at > 2 * interval:
                self._emit({"type": "connection_error", "stage": "heartbeat", "error": "heartbeat timeout"})
                ws.transport.abort()
                return
            self._write({"type": "ping"})

    def _drop_connection(self) -> None:
        """Forget the socket and everything in flight on it; the next connection re-sends."""
        self._ws = None
        self._outbox = None
        self._established = False
        self._replies.clear()
        for st in self._rooms.values():
            st.live = False
            st.join_request_id = None
            st.seen_while_joining = None
        for entry in self._sends.values():
            if entry.timer is not None:
                entry.timer.cancel()
            entry.timer = None
            entry.request_id = None  # not acked: re-sent with the same client_msg_id
        for req in list(self._requests):
            if req.timer is not None:
                req.timer.cancel()
            req.timer = None
            req.request_id = None
            if not req.resend:
                self._settle_request(req, error=HubClientError("closed", "connection lost before the reply"))

    def _write(self, frame: Frame) -> bool:
        if self._outbox is None:
            return False
        self._outbox.put_nowait(orjson.dumps(frame))
        return True

    def _request_id(self) -> str:
        return f"r{next(self._request_ids)}"

    # ------------------------------------------------------------------ incoming frames

    def _on_message(self, raw: str | bytes) -> None:
        self._last_frame_at = time.monotonic()
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return  # the hub sends JSON text frames only
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return
        ftype = frame["type"]
        if ftype == "room_joined":
            self._on_room_joined(frame)
        elif ftype == "ack":
            self._on_ack(frame)
        elif ftype == "error":
            self._on_error(frame)
        elif ftype == "room_left":
            self._on_room_left(frame)
        elif ftype in ROOM_FRAME_TYPES:
            self._on_room_frame(frame)
        else:
            self._resolve_reply(frame)
            self._emit(frame, frame=True)
            if ftype == "token_expiring" and self._get_token is not None:
                self._spawn(self._refresh())

    def _on_established(self, frame: Frame) -> float:
        """Resume everything on a new connection; returns the heartbeat interval to use."""
        self._established = True
        self._last_frame_at = time.monotonic()
        self.connection_id = frame.get("connection_id")
        self.user_id = frame.get("user_id")
        server_hb = frame.get("heartbeat_s")
        interval = self._heartbeat_s or (float(server_hb) if isinstance(server_hb, int | float) and server_hb > 0
                                         else 20.0)
        self._set_state("open", attempt=self._failures, connection_id=self.connection_id)
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(frame)
        self._emit(frame, frame=True)
        # Presence first, so members never see an "away" user flash online; then every room (with since
        # when we have a position), subscriptions, pending requests, and sends that wait for no room.
        # Sends for a room wait for its room_joined, so they follow the resume's replay.
        if self._presence != "online":
            self._write({"type": "presence", "status": self._presence})
        for st in self._rooms.values():
            self._write_join(st)
        pending_subs = {r.frame.get("order_id") for r in self._requests if r.frame["type"] == "subscribe_order_updates"}
        for order_id in self._subs:
            if order_id not in pending_subs:
                self._write({"type": "subscribe_order_updates", "order_id": order_id})
        for req in self._requests:
            self._write_request(req)
        for entry in self._sends.values():
            if entry.room not in self._rooms:
                self._write_send(entry)
        return interval

    def _resolve_reply(self, frame: Frame) -> None:
        rid = frame.get("request_id")
        if not isinstance(rid, str) or rid not in self._replies:
            return
        kind, _ = self._replies.pop(rid)
        if kind == "request":
            for req in self._requests:
                if req.request_id == rid:
                    self._settle_request(req, reply=frame)
                    break

    def _on_room_frame(self, frame: Frame) -> None:
        """A chat message or backend event of a room: advance the room's position, drop repeats."""
        st = self._rooms.get(str(frame.get("room")))
        fid = frame.get("id")
        if st is not None and isinstance(fid, str):
            if not st.live:
                # Before room_joined only update-subscription events arrive; the join's replay may repeat
                # them. Remember them, but keep the position (moving it could skip unreplayed chat).
                if st.seen_while_joining is not None:
                    st.seen_while_joining.add(fid)
            elif st.last_id is not None and id_key(fid) <= id_key(st.last_id):
                self.stats["duplicates_dropped"] += 1
                return
            else:
                st.last_id = fid
        self._emit(frame, frame=True)

    # ------------------------------------------------------------------ rooms

    async def join_room(self, room: str, history: int = 0) -> Frame:
        """Join a room and keep it joined (resumed) across reconnects; returns ``room_joined`` (its
        ``messages`` are also emitted one by one). Raises HubClientError (``forbidden``, ...)."""
        st = self._rooms.get(room)
        if st is not None and st.live and st.joined_frame is not None:
            return st.joined_frame
        if st is None:
            st = self._rooms[room] = _Room(room, history=history)
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        st.waiters.append(waiter)
        if self._established and st.join_request_id is None:
            self._write_join(st)
        # No timeout while disconnected: the join is written on the next connection.
        return await waiter

    def _write_join(self, st: _Room) -> None:
        rid = self._request_id()
        frame: Frame = {"type": "join_room", "room": st.name, "request_id": rid}
        st.sent_since = st.epoch is not None and st.last_id is not None
        if st.sent_since:
            frame["since"] = {"epoch": st.epoch, "last_id": st.last_id}
        elif st.history > 0:
            frame["history"] = st.history
        self._replies[rid] = ("join", st.name)
        st.join_request_id = rid
        st.seen_while_joining = set()
        self._write(frame)

    def _on_room_joined(self, frame: Frame) -> None:
        rid = frame.get("request_id")
        if isinstance(rid, str):
            self._replies.pop(rid, None)
        st = self._rooms.get(str(frame.get("room")))
        if st is None or (rid is not None and rid != st.join_request_id):
            self._emit(frame, frame=True)  # a join answered after the room was left: not ours
            return
        previous = (st.epoch, st.last_id)
        # Keep the old position as the de-duplication baseline only when the hub replayed exactly what
        # followed it; otherwise this is a fresh view of the room (first join, history, or a gap).
        continuous = st.sent_since and frame.get("recovered") is True and frame.get("epoch") == st.epoch
        if not continuous:
            st.last_id = None
        st.epoch = frame.get("epoch")
        st.live = True
        st.history = 0
        st.joined_frame = frame
        seen, st.seen_while_joining = st.seen_while_joining, None
        self._emit(frame, frame=True)
        if st.sent_since and frame.get("recovered") is False:
            self._emit({"type": "gap", "room": st.name, "epoch": st.epoch, "last_id": frame.get("last_id"),
                        "previous_epoch": previous[0], "previous_last_id": previous[1]})
        messages = frame.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and not (seen and message.get("id") in seen):
                self._on_room_frame(message)
        last = frame.get("last_id")
        if isinstance(last, str) and (st.last_id is None or id_key(last) > id_key(st.last_id)):
            st.last_id = last
        self._resolve_waiters(st, frame)
        # Messages queued for this room go out now, in the order they were sent.
        for entry in self._sends.values():
            if entry.room == st.name:
                self._write_send(entry)

    def _resolve_waiters(self, st: _Room, frame: Frame) -> None:
        waiters, st.waiters = st.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(frame)

    def _reject_waiters(self, st: _Room, error: HubClientError) -> None:
        waiters, st.waiters = st.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def _forget_room(self, st: _Room, error: HubClientError) -> None:
        self._rooms.pop(st.name, None)
        self._reject_waiters(st, error)
        for entry in list(self._sends.values()):
            if entry.room == st.name and entry.request_id is None:
                self._settle_send(entry, error=HubClientError(error.code, f"{error.message}: message not sent"))

    def _on_room_left(self, frame: Frame) -> None:
        self._resolve_reply(frame)
        st = self._rooms.get(str(frame.get("room")))
        if st is not None and frame.get("reason") == "access_revoked":
            self._forget_room(st, HubClientError("access_revoked", f"removed from {st.name}"))
        self._emit(frame, frame=True)

    async def leave_room(self, room: str) -> Frame:
        """Leave a room: no longer resumed; its queued messages fail with ``left``."""
        st = self._rooms.get(room)
        local: Frame = {"type": "room_left", "room": room, "reason": "left"}
        if st is None:
            return local
        written = (self._established and st.join_request_id is not None) or st.live
        self._forget_room(st, HubClientError("left", f"left {room}"))
        if not written:
            return local
        # The hub handles a connection's frames in order, so the leave follows the join.
        return await self._request({"type": "leave_room", "room": room}, resend=False, default=local)

    # ------------------------------------------------------------------ messages

    async def send_message(self, room: str, content: str, *, message_type: str = "text",
                           metadata: dict[str, Any] | None = None, client_msg_id: str | None = None,
                           sensitive: bool = False) -> Frame:
        """Send a chat message; returns its ``ack`` once the hub stored it (``duplicate: true`` when a
        retry of the same ``client_msg_id`` found it stored). Offline, it waits in the queue and goes out
        after the room is resumed. Raises HubClientError on the matching error frame, ``timeout`` after
        ``ack_timeout_s`` on a live connection, ``closed``/``left``."""
        cmid = client_msg_id or new_client_msg_id()
        existing = self._sends.get(cmid)
        if existing is not None:  # the same message again: one send, one answer
            return await asyncio.shield(existing.future)
        if len(self._sends) >= self._max_queue:
            raise HubClientError("queue_full", "too many unacknowledged messages")
        frame: Frame = {"type": "chat_message", "room": room, "content": content, "message_type": message_type,
                        "client_msg_id": cmid}
        if metadata is not None:
            frame["metadata"] = metadata
        if sensitive:
            frame["sensitive"] = True
        entry = _Send(cmid, room, frame, asyncio.get_running_loop().create_future())
        self._sends[cmid] = entry
        st = self._rooms.get(room)
        if self._established and (st is None or st.live):
            self._write_send(entry)
        return await asyncio.shield(entry.future)  # shielded: a cancelled caller keeps the send queued

    def _write_send(self, entry: _Send) -> None:
        if entry.request_id is not None or not self._established:
            return
        rid = self._request_id()
        if not self._write({**entry.frame, "request_id": rid}):
            return
        entry.request_id = rid
        self._replies[rid] = ("send", entry.cmid)
        entry.timer = asyncio.get_running_loop().call_later(
            self._ack_timeout_s, lambda: self._settle_send(entry, error=HubClientError("timeout", "no ack")))

    def _settle_send(self, entry: _Send, *, ack: Frame | None = None, error: HubClientError | None = None) -> None:
        if self._sends.get(entry.cmid) is not entry:
            return
        del self._sends[entry.cmid]
        if entry.timer is not None:
            entry.timer.cancel()
        if entry.request_id is not None:
            self._replies.pop(entry.request_id, None)
        if entry.future.done():
            return
        if error is not None:
            entry.future.set_exception(error)
            entry.future.exception()  # retrieved: a caller that was cancelled must not log a warning
        else:
            entry.future.set_result(ack or {})

    def _on_ack(self, frame: Frame) -> None:
        # Matched by client_msg_id (the README's rule: the echo and the ack may come in either order).
        entry = self._sends.get(str(frame.get("client_msg_id")))
        rid = frame.get("request_id")
        if entry is None and isinstance(rid, str) and self._replies.get(rid, ("", ""))[0] == "send":
            entry = self._sends.get(self._replies[rid][1])
        if isinstance(rid, str):
            self._replies.pop(rid, None)
        if entry is not None:
            self._settle_send(entry, ack=frame)
        self._emit(frame, frame=True)

    def _on_error(self, frame: Frame) -> None:
        rid = frame.get("request_id")
        kind, key = self._replies.pop(rid, ("", "")) if isinstance(rid, str) else ("", "")
        error = HubClientError.from_frame(frame)
        if kind == "send" or (not kind and isinstance(frame.get("client_msg_id"), str)):
            entry = self._sends.get(key or str(frame.get("client_msg_id")))
            if entry is not None:
                self._settle_send(entry, error=error)
        elif kind == "join":
            st = self._rooms.get(key)
            if st is not None and st.join_request_id == rid:
                self._forget_room(st, error)  # forbidden, invalid_room, ...: never resumed
        elif kind == "request":
            for req in self._requests:
                if req.request_id == rid:
                    self._settle_request(req, error=error)
                    break
        self._emit(frame, frame=True)

    # ------------------------------------------------------------------ other requests

    async def _request(self, frame: Frame, *, resend: bool = True, default: Frame | None = None) -> Frame:
        """A request answered by one reply with the same request_id. Written now if connected, else on
        the next connection; re-sent after a reconnect when ``resend`` (idempotent requests)."""
        req = _Request(frame, asyncio.get_running_loop().create_future(), resend)
        self._requests.append(req)
        if self._established:
            self._write_request(req)
        try:
            return await req.future
        except HubClientError as exc:
            if default is not None and exc.code == "closed":
                return default
            raise
        finally:
            self._settle_request(req, error=HubClientError("cancelled"))

    def _write_request(self, req: _Request) -> None:
        if req.request_id is not None or req not in self._requests:
            return
        rid = self._request_id()
        if not self._write({**req.frame, "request_id": rid}):
            return
        req.request_id = rid
        self._replies[rid] = ("request", rid)
        req.timer = asyncio.get_running_loop().call_later(
            self._request_timeout_s,
            lambda: self._settle_request(req, error=HubClientError("timeout", f"no reply to {req.frame['type']}")))

    def _settle_request(self, req: _Request, *, reply: Frame | None = None,
                        error: HubClientError | None = None) -> None:
        if req not in self._requests:
            return
        self._requests.remove(req)
        if req.timer is not None:
            req.timer.cancel()
        if req.request_id is not None:
            self._replies.pop(req.request_id, None)
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(reply or {})

    def start_typing(self, room: str) -> bool:
        """Show "typing" in a joined room (ephemeral: not queued while offline). Returns whether sent."""
        return self._typing(room, "typing_start")

    def stop_typing(self, room: str) -> bool:
        return self._typing(room, "typing_stop")

    def _typing(self, room: str, ftype: str) -> bool:
        st = self._rooms.get(room)
        return st is not None and st.live and self._write({"type": ftype, "room": room})

    async def subscribe_order_updates(self, order_id: int | str) -> Frame:
        """Receive an order room's backend events without joining it; renewed after every reconnect."""
        self._subs[order_id] = None
        try:
            return await self._request({"type": "subscribe_order_updates", "order_id": order_id})
        except HubClientError:
            self._subs.pop(order_id, None)  # refused (forbidden, invalid): do not renew it
            raise

    async def unsubscribe_order_updates(self, order_id: int | str) -> Frame:
        self._subs.pop(order_id, None)
        local: Frame = {"type": "unsubscribed", "topic": "order_updates", "room": f"order_{order_id}",
                        "order_id": order_id}
        if not self._established:
            return local
        return await self._request({"type": "unsubscribe_order_updates", "order_id": order_id}, resend=False,
                                   default=local)

    async def mark_read(self, room: str, up_to: str) -> Frame:
        """Mark a room read up to a message id; returns ``marked_read``."""
        return await self._request({"type": "mark_read", "room": room, "up_to": up_to})

    async def set_presence(self, status: Literal["online", "away"]) -> Frame:
        """``online`` or ``away`` in every joined room; kept across reconnects. Returns ``presence_set``."""
        if status not in ("online", "away"):
            raise HubClientError("invalid_frame", 'status must be "online" or "away"')
        self._presence = status
        return await self._request({"type": "presence", "status": status})

    async def presence_query(self, room: str) -> Frame:
        return await self._request({"type": "presence_query", "room": room})

    async def ping(self) -> Frame:
        """An application ping; returns the ``pong``."""
        return await self._request({"type": "ping"})

    async def refresh_token(self, token: str | None = None) -> Frame | None:
        """Hand the open connection a newer token before the current one expires (else the hub closes
        it with 4502). Returns ``token_refreshed``, or None when not connected."""
        if token is not None and self._get_token is None:
            self._token = token
        fresh = token if token is not None else await self._fetch_token()
        if not self._established:
            return None  # the next connection authenticates with a current token anyway
        return await self._request({"type": "refresh", "token": fresh}, resend=False)

    async def _refresh(self) -> None:
        try:
            await self.refresh_token()
        except (HubClientError, TimeoutError, OSError) as exc:
            # Not fatal: at the deadline the hub closes with 4502 and the reconnect fetches a token.
            self._emit({"type": "connection_error", "stage": "refresh", "error": repr(exc)})


# ---------------------------------------------------------------------- backend publishing


async def publish_event(redis: Any, room: str, type: str, data: dict[str, Any] | None = None, *,
                        sender_id: str | None = "backend", content: str | None = None, prefix: str = "hub:",
                        message_type: str | None = None, metadata: dict[str, Any] | None = None,
                        sealer: Any = None, sensitive: bool = False) -> str:
    """Append one entry to a room's stream with ``XADD``, as README's "Backend publishing" documents:
    key ``<prefix>{<room>}:s``, fields ``type``, ``sender_id``, ``content``, ``data`` (events) or
    ``message_type``/``metadata`` (chat), ``created_at``. ``room`` may be a room (``order_123``) or an
    internal target (``inbox:42``, ``system``, ``role:support``). Returns the entry id.

    ``sealer`` (a :class:`hub.sealing.Sealer`) applies the hub's encryption policy to chat content, so a
    backend's sensitive message is stored sealed like a client's. ``redis`` is a ``redis.asyncio.Redis``.
    """
    if not room or any(c in room for c in "{}\r\n\x00 "):
        raise ValueError(f"not a room name: {room!r}")
    if type != "chat_message" and type not in EVENT_TYPES:
        raise ValueError(f"type must be chat_message or one of {sorted(EVENT_TYPES)}")
    if type == "chat_message" and not content:
        raise ValueError("a chat_message needs content")
    # created_at is always written: a sealed message's associated data binds it, and readers use it.
    created_ms = int(time.time() * 1000)
    fields: dict[str, str | bytes] = {"type": type, "created_at": str(created_ms)}
    if sender_id is not None:
        fields["sender_id"] = sender_id
    if type == "chat_message":
        assert content is not None
        if sealer is not None:
            content = sealer.seal(room, sender_id or "", created_ms, content, sensitive)
        fields["content"] = content or ""
        fields["message_type"] = message_type or "text"
        if metadata is not None:
            fields["metadata"] = orjson.dumps(metadata)
    else:
        fields["data"] = orjson.dumps(data or {})
        if content is not None:
            fields["content"] = content
    entry_id = await redis.xadd(f"{prefix}{{{room}}}:s", fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


__all__ = [
    "DEFAULT_BACKOFF", "EventStream", "HubAuthError", "HubClient", "HubClientError", "backoff_delay",
    "new_client_msg_id", "publish_event",
]

