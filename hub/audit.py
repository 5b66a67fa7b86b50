"""The audit log: security-relevant events appended to one capped Redis stream (``hub:audit``).

Events: ``auth_failure`` (a refused handshake or refresh), ``acl_denied`` (a room the user may not
read or write), ``rate_limited`` (a message, typing or connect limit hit), ``revoked`` (a live
connection closed because its token was revoked), ``token_expired`` (a connection closed at its
token's exp) and ``admin_action`` (a hubctl command that changed something).

Guarantees:
- :meth:`Audit.record` never blocks and never waits on Redis: the event goes to a bounded queue that
  one background task (owned here, drained on :meth:`Audit.close`) writes with pipelined XADDs. When
  the queue is full (Redis slow or away) the event is dropped and counted in ``dropped``.
- An event holds only short fields: ``event``, ``when``, ``who``, ``ip``, ``what``, ``node`` and a few
  detail fields. Fields named like a credential or a message body are refused, values are truncated
  and anything token-shaped is redacted, so the log never holds a token or a message body.
- The stream is capped (XADD MAXLEN ~ ``audit.stream_max_len``); ``consumers/audit_archiver.py``
  copies it into the append-only ``audit_log`` table.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hub.config import AuditConfig
from hub.keys import Keys
from hub.logs import redact
from hub.protocol import iso_ms
from hub.tasks import cancel_and_wait

log = logging.getLogger("hub.audit")

EVENTS = frozenset({"auth_failure", "acl_denied", "rate_limited", "revoked", "token_expired", "admin_action"})
# Field names that would carry a secret or a message body: a caller passing one is a bug.
FORBIDDEN_FIELDS = frozenset({"token", "jwt", "secret", "password", "authorization", "content", "body",
                              "message", "data", "metadata", "text"})
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
MAX_VALUE_CHARS = 200
MAX_DETAIL_FIELDS = 8
# Events written per pipelined round trip.
WRITE_BATCH = 256

AuditValue = str | int | float | bool | None


def audit_fields(event: str, node: str, fields: Mapping[str, AuditValue], when_ms: int | None = None) -> dict[str, str]:
    """The stream entry for one event. Raises ValueError for an unknown event or a forbidden field
    (a programming error, caught by the tests, never by a client's input)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    entry = {"event": event, "when": iso_ms(int(time.time() * 1000) if when_ms is None else when_ms),
             "node": _clean(node)}
    extra = 0
    for name, value in fields.items():
        if name in FORBIDDEN_FIELDS or not _FIELD_NAME.fullmatch(name) or name in ("event", "when", "node"):
            raise ValueError(f"audit field {name!r} is not allowed")
        if value is None:
            continue
        if name not in ("who", "ip", "what"):
            extra += 1
            if extra > MAX_DETAIL_FIELDS:
                raise ValueError("too many audit detail fields")
        entry[name] = _clean(str(value))
    return entry


def _clean(value: str) -> str:
    """Short, single-line, and nothing token-shaped."""
    text = redact(value[:MAX_VALUE_CHARS * 2]).replace("\n", " ").replace("\r", " ")
    return text[:MAX_VALUE_CHARS]


async def write_event(redis: Redis, keys: Keys, config: AuditConfig, node: str, event: str,
                      **fields: AuditValue) -> None:
    """Append one event now (for one-shot callers such as hubctl); raises RedisError on failure."""
    if not config.enabled:
        return
    await redis.xadd(keys.audit(), audit_fields(event, node, fields),  # type: ignore[arg-type]
                     maxlen=config.stream_max_len, approximate=True)


class Audit:
    """A node's audit writer: :meth:`record` queues, one background task writes."""

    def __init__(self, redis: Redis, keys: Keys, config: AuditConfig, node: str) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._node = node
        # Events waiting for the writer; bounded, so a Redis outage costs events, never memory or latency.
        self._queue: asyncio.Queue[dict[str, str]] = asyncio.Queue(config.queue_size)
        # The writer task: None before start() and after close().
        self._task: asyncio.Task[None] | None = None
        # Events the writer took from the queue and has not written yet (it retries them); empty when idle.
        self._batch: list[dict[str, str]] = []
        self.written = 0
        self.dropped = 0  # queue full, or still queued when close() gave up
        self.write_errors = 0

    def record(self, event: str, **fields: AuditValue) -> None:
        """Queue one event (who, ip, what and short details; never a token or a message body)."""
        if not self._config.enabled:
            return
        entry = audit_fields(event, self._node, fields)
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit queue full: %d event(s) dropped so far", self.dropped)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write_loop(), name="audit")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout_s``), then stop the writer."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            log.warning("audit: %d event(s) not written before shutdown", self._queue.qsize())
        await cancel_and_wait([self._task])
        self._task = None
        self.dropped += len(self._batch)
        self._batch = []
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1

    async def flush(self) -> None:
        """Wait until every event queued so far is written (tests, shutdown)."""
        await self._queue.join()

    async def _write_loop(self) -> None:
        while True:
            batch = self._batch = [await self._queue.get()]
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            delay = 0.05
            while True:
                try:
                    await self._write(batch)
                    break
                except (RedisError, OSError) as exc:
                    # Keep the batch and retry; meanwhile new events fill the queue and overflow is dropped.
                    self.write_errors += 1
                    log.warning("audit write failed (%s); retrying in %.2fs", type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.written += len(batch)
            self._batch = []
            for _ in batch:
                self._queue.task_done()

    async def _write(self, batch: list[dict[str, str]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for entry in batch:
            pipe.xadd(self._keys.audit(), entry,  # type: ignore[arg-type]
                      maxlen=self._config.stream_max_len, approximate=True)
        await pipe.execute()
