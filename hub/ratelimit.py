"""Rate limits and concurrent-connection caps, decided in Redis so every node shares them.

Each decision is one Lua script on the Redis clock (``TIME``), so nodes with skewed clocks still
share one timeline and concurrent requests on any number of nodes never over-admit:

- :class:`RateLimiter` runs ``rate_gcra.lua`` (GCRA): at most ``burst`` cells at once from an idle
  key, then ``rate_per_min`` per minute; in any window of ``W`` seconds at most
  ``burst + rate_per_min * W / 60`` cells are admitted, and a sender that stays at the rate is
  never refused.
- :class:`ConnectionCaps` runs ``conn_acquire.lua`` / ``conn_refresh.lua`` / ``conn_release.lua``:
  a sorted set of leases per key (member = connection id, score = lease expiry). The owning node
  refreshes its leases well within ``lease_ms``; a node killed with its connections stops counting
  ``lease_ms`` later, so no count stays stuck high.

When Redis cannot be asked (:class:`redis.exceptions.RedisError` or :class:`OSError`), each
instance answers by its ``fail_open`` choice: allowed (fail open), or refused with
``retry_after_ms = 1000`` (fail closed). It logs a warning when the outage starts, at most every
30 s while it lasts, and once when Redis answers again; the log names the limiter and the error
type, never a key (keys carry user ids and addresses).

Callers pass full key strings. Suggested shapes, one hash tag per subject so each key is its own
Cluster slot (to be built by :mod:`hub.keys` with the configured prefix):

- ``hub:rl:{user:ID}:msg``       chat messages per user
- ``hub:rl:{user:ID}:typing``    typing indicators per user
- ``hub:rl:{ip:ADDR}:connect``   connection attempts per IP
- ``hub:cc:{ip:ADDR}``           concurrent connections per IP
- ``hub:cc:{user:ID}``           concurrent connections per user
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from hub.batching import CommandBatcher
from hub.lua import Scripts

log = logging.getLogger("hub.ratelimit")

# A fail-closed refusal asks the client to come back after this long.
FAIL_CLOSED_RETRY_MS = 1000
# While Redis stays unreachable, the outage warning is repeated at most this often.
_OUTAGE_LOG_INTERVAL_S = 30.0
_US_PER_MIN = 60_000_000


@dataclass(frozen=True, slots=True)
class Decision:
    """One limiter answer.

    ``retry_after_ms`` is 0 when allowed; when refused it is the wait after which the same request
    would fit (rate limits: exact, rounded up; connection caps: when the oldest lease would lapse
    if its owner stopped refreshing, a hint). ``remaining`` is what could still be spent right now
    (cells, or free connection slots); it is 0 when Redis could not be asked.
    """

    allowed: bool
    retry_after_ms: int
    remaining: int


class _Outage:
    """Tracks whether Redis answers one limiter, so an outage logs a few lines, not one per request."""

    def __init__(self, name: str, fail_open: bool) -> None:
        self._name = name
        self._mode = "open" if fail_open else "closed"
        # Failures since the last warning; 0 while Redis answers.
        self._failures = 0
        # time.monotonic() of the last warning; None while Redis answers.
        self._warned_at: float | None = None

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= _OUTAGE_LOG_INTERVAL_S:
            log.warning("%s: Redis unreachable (%s), failing %s (%d decision(s) since last warning)",
                        self._name, type(exc).__name__, self._mode, self._failures)
            self._warned_at = now
            self._failures = 0

    def recovered(self) -> None:
        if self._warned_at is not None:
            log.warning("%s: Redis answers again", self._name)
            self._warned_at = None
            self._failures = 0


def _ints(reply: Any, count: int) -> list[int]:
    if not isinstance(reply, list) or len(reply) != count:
        raise RedisError(f"unexpected script reply {reply!r}")
    return [int(value) for value in reply]


class ScriptBatcher:
    """The calls of one Lua script, sent in pipelines shared with other callers (see
    :class:`hub.batching.CommandBatcher`): one round trip per batch instead of one per call, and each
    call still its own atomic script run, so decisions are exactly those of unbatched calls. Without a
    shared ``batcher`` the script's calls are batched among themselves."""

    def __init__(self, scripts: Scripts, name: str, batcher: CommandBatcher | None = None) -> None:
        self._name = name
        self._batcher = batcher if batcher is not None else CommandBatcher(scripts.redis, scripts)

    @property
    def batches(self) -> int:
        """Pipelines sent by the batcher this script's calls go through."""
        return self._batcher.batches

    def call(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        return self._batcher.script(self._name, keys, args)


class RateLimiter:
    """GCRA rate limits (``rate_gcra.lua``); one instance per fail-open/fail-closed policy, any keys.
    Concurrent decisions (all connections of a node) share pipelined round trips."""

    def __init__(self, scripts: Scripts, *, fail_open: bool, name: str = "rate_limiter",
                 batcher: CommandBatcher | None = None) -> None:
        self._scripts = scripts
        self._fail_open = fail_open
        self._outage = _Outage(name, fail_open)
        self._batcher = ScriptBatcher(scripts, "rate_gcra", batcher)

    async def hit(self, key: str, rate_per_min: int, burst: int, cost: int = 1) -> Decision:
        """Spend ``cost`` cells of ``key`` if they fit, atomically across nodes.

        Allowed requests are charged; refused ones are not (a refused client that retries after
        ``retry_after_ms`` fits). ``cost=0`` only asks. Raises :class:`ValueError` for a rate or
        burst below 1, a negative cost, or a cost above the burst (it could never fit).
        """
        if rate_per_min < 1 or burst < 1:
            raise ValueError(f"rate_per_min and burst must be >= 1, got {rate_per_min} and {burst}")
        if not 0 <= cost <= burst:
            raise ValueError(f"cost must be between 0 and burst ({burst}), got {cost}")
        # Rounded up: the limiter may be a hair stricter than the rate, never looser.
        interval_us = -(-_US_PER_MIN // rate_per_min)
        try:
            reply = await self._batcher.call([key], [interval_us, burst, cost])
            allowed, retry_after_ms, remaining = _ints(reply, 3)
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return _fallback(self._fail_open)
        self._outage.recovered()
        return Decision(allowed == 1, retry_after_ms, remaining)


class ConnectionCaps:
    """Concurrent-connection caps as expiring leases (``conn_*.lua``); one instance per policy, any keys.

    The caller owns the refresh loop: every lease it holds must be refreshed (one :meth:`refresh`
    per key, all of that key's members) well within ``lease_ms``, e.g. every ``lease_ms / 3``.
    """

    def __init__(self, scripts: Scripts, *, fail_open: bool, name: str = "connection_caps",
                 batcher: CommandBatcher | None = None) -> None:
        self._scripts = scripts
        self._fail_open = fail_open
        self._outage = _Outage(name, fail_open)
        # Concurrent calls (a burst of handshakes, the heartbeat's refresh of every key) share round trips;
        # with ``batcher``, also with everything else sent through it.
        self._acquire = ScriptBatcher(scripts, "conn_acquire", batcher)
        self._refresh = ScriptBatcher(scripts, "conn_refresh", batcher)
        self._release = ScriptBatcher(scripts, "conn_release", batcher)

    async def acquire(self, key: str, member: str, limit: int, lease_ms: int) -> Decision:
        """Take a lease for ``member`` (a connection id unique across nodes) if fewer than ``limit``
        are held; atomic across nodes, so concurrent acquires never exceed ``limit``.

        Expired leases are dropped first. Acquiring a member that already holds a lease renews it
        and is allowed without counting twice. ``remaining`` is the number of free slots after.
        """
        if limit < 0 or lease_ms < 1 or not member:
            raise ValueError(f"need limit >= 0, lease_ms >= 1 and a member, got {limit}, {lease_ms}, {member!r}")
        try:
            reply = await self._acquire.call([key], [member, limit, lease_ms])
            admitted, count, retry_after_ms = _ints(reply, 3)
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return _fallback(self._fail_open)
        self._outage.recovered()
        return Decision(admitted == 1, retry_after_ms, max(0, limit - count))

    async def acquire_many(self, requests: Sequence[tuple[str, str, int]], lease_ms: int) -> list[Decision]:
        """:meth:`acquire` for several (key, member, limit) at once, in one round trip and without a task
        each; the decisions come back in order, each independent of the others."""
        for _key, member, limit in requests:
            if limit < 0 or lease_ms < 1 or not member:
                raise ValueError(f"need limit >= 0, lease_ms >= 1 and a member, got {limit}, {lease_ms}, {member!r}")
        futures = [self._acquire.call([key], [member, limit, lease_ms]) for key, member, limit in requests]
        decisions = []
        for future, (_key, _member, limit) in zip(futures, requests, strict=True):
            try:
                admitted, count, retry_after_ms = _ints(await future, 3)
            except (RedisError, OSError) as exc:
                self._outage.failed(exc)
                decisions.append(_fallback(self._fail_open))
                continue
            self._outage.recovered()
            decisions.append(Decision(admitted == 1, retry_after_ms, max(0, limit - count)))
        return decisions

    async def refresh(self, key: str, members: Sequence[str], lease_ms: int) -> list[str]:
        """Renew the leases of ``members`` of ``key`` for ``lease_ms`` from now, in one call.

        Returns the members that had lost their lease (it lapsed, or was released); they are not
        re-added, since the slot may have gone to someone else: acquire them again or close those
        connections. Returns ``[]`` when Redis cannot be asked (logged): the next refresh reports
        whatever lapsed meanwhile.
        """
        if lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {lease_ms}")
        if not members:
            return []
        try:
            reply = await self._refresh.call([key], [lease_ms, *members])
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return []
        self._outage.recovered()
        return [m.decode() if isinstance(m, bytes) else str(m) for m in reply]

    async def refresh_many(self, leases: Sequence[tuple[str, Sequence[str]]], lease_ms: int) -> list[str]:
        """:meth:`refresh` for many keys in one pipelined round trip, without a task per key. Returns
        the members that had lost their lease, over all keys."""
        if lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {lease_ms}")
        futures = [self._refresh.call([key], [lease_ms, *members]) for key, members in leases if members]
        lost: list[str] = []
        for future in futures:
            try:
                reply = await future
            except (RedisError, OSError) as exc:
                self._outage.failed(exc)
                continue
            self._outage.recovered()
            lost.extend(m.decode() if isinstance(m, bytes) else str(m) for m in reply)
        return lost

    async def release(self, key: str, member: str) -> bool:
        """Give back ``member``'s lease. True when it was held; releasing twice is harmless.

        Returns False when Redis cannot be asked (logged): the lease then lapses by itself after
        ``lease_ms``.
        """
        try:
            reply = await self._release.call([key], [member])
            released, _count = _ints(reply, 2)
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return False
        self._outage.recovered()
        return released == 1

    async def release_many(self, leases: Sequence[tuple[str, str]]) -> list[bool]:
        """:meth:`release` for several (key, member) at once, in one round trip and without a task each."""
        futures = [self._release.call([key], [member]) for key, member in leases]
        released = []
        for future in futures:
            try:
                done, _count = _ints(await future, 2)
            except (RedisError, OSError) as exc:
                self._outage.failed(exc)
                released.append(False)
                continue
            self._outage.recovered()
            released.append(done == 1)
        return released


def gcra_args(rate_per_min: int, burst: int, cost: int = 1) -> list[int]:
    """ARGV for rate_gcra.lua (for callers that queue the script on a pipeline)."""
    return [-(-_US_PER_MIN // rate_per_min), burst, cost]


def gcra_decision(reply: Any) -> Decision:
    """A rate_gcra.lua reply as a :class:`Decision` (raises RedisError on a malformed reply)."""
    allowed, retry_after_ms, remaining = _ints(reply, 3)
    return Decision(allowed == 1, retry_after_ms, remaining)


def fallback(fail_open: bool) -> Decision:
    """The decision when Redis cannot be asked."""
    return _fallback(fail_open)


def _fallback(fail_open: bool) -> Decision:
    if fail_open:
        return Decision(True, 0, 0)
    return Decision(False, FAIL_CLOSED_RETRY_MS, 0)
