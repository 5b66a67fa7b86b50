"""The hub's limits, wired to :mod:`hub.ratelimit`: per-IP connect rate, per-IP and per-user
concurrent connections (leases that heal after a node dies), per-user message and typing rates.
All decided in Redis, atomically across nodes; each fails open or closed as configured."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from hub.batching import CommandBatcher
from hub.config import ServerConfig
from hub.keys import Keys
from hub.lua import Scripts
from hub.ratelimit import ConnectionCaps, Decision, RateLimiter, gcra_args


@dataclass(frozen=True)
class RateCheck:
    """One rate_gcra.lua call to make before a publish (key, ARGV, what to do if Redis cannot answer)."""

    key: str
    args: list[int]
    fail_open: bool


@dataclass(frozen=True, slots=True)
class Lease:
    """A connection's two slots: one under its IP, one under its user."""

    member: str
    ip_key: str
    user_key: str


class Limits:
    # Lease keys renewed per pipelined round trip by refresh().
    REFRESH_SLICE = 128

    def __init__(self, scripts: Scripts, keys: Keys, config: ServerConfig, node_id: str, lease_ms: int,
                 batcher: CommandBatcher | None = None) -> None:
        self._keys = keys
        self._config = config
        self._node_id = node_id
        self._lease_ms = lease_ms
        # With ``batcher`` (the node's), limit decisions share pipelines with the rest of the connect path.
        self._rates = RateLimiter(scripts, fail_open=config.rate_limits_fail_open, name="rate limits",
                                  batcher=batcher)
        self._caps = ConnectionCaps(scripts, fail_open=config.connection_caps_fail_open, name="connection caps",
                                    batcher=batcher)
        self._seq = itertools.count(1)

    async def admit_connection(self, ip: str, user_id: str) -> tuple[Decision, Lease | None]:
        """Connect rate per IP, then a slot under the IP and one under the user. On refusal nothing
        is held; on success the caller owns the lease (release it when the connection ends)."""
        cfg = self._config
        rate = await self._rates.hit(self._keys.rate(f"ip:{ip}", "connect"), cfg.connect_rate_limit_per_min,
                                     cfg.connect_burst)
        if not rate.allowed:
            return rate, None
        lease = Lease(f"{self._node_id}:{next(self._seq)}", self._keys.connection_leases(f"ip:{ip}"),
                      self._keys.connection_leases(f"user:{user_id}"))
        # Both slots at once (one round trip, shared with concurrent handshakes); a refusal gives back
        # the slot that was taken.
        by_ip, by_user = await self._caps.acquire_many(
            [(lease.ip_key, lease.member, cfg.max_connections_per_ip),
             (lease.user_key, lease.member, cfg.max_connections_per_user)], self._lease_ms)
        if not by_ip.allowed:
            if by_user.allowed:
                await self._caps.release(lease.user_key, lease.member)
            return by_ip, None
        if not by_user.allowed:
            await self._caps.release(lease.ip_key, lease.member)
            return by_user, None
        return by_user, lease

    async def release(self, lease: Lease) -> None:
        await self._caps.release_many([(lease.ip_key, lease.member), (lease.user_key, lease.member)])

    async def refresh(self, leases: Iterable[Lease]) -> None:
        """Renew every live connection's slots (called from the node heartbeat)."""
        by_key: dict[str, list[str]] = {}
        for lease in leases:
            by_key.setdefault(lease.ip_key, []).append(lease.member)
            by_key.setdefault(lease.user_key, []).append(lease.member)
        # Pipelined, REFRESH_SLICE keys per round trip (was: one EVALSHA round trip per key, i.e. per
        # connected user, every heartbeat). No task per key, and slices: a gather over every key
        # stalled the event loop ~31 ms per heartbeat at 5,000 users (delivery latency spikes).
        items = list(by_key.items())
        for start in range(0, len(items), self.REFRESH_SLICE):
            await self._caps.refresh_many(items[start:start + self.REFRESH_SLICE], self._lease_ms)

    def message_rate(self, user_id: str) -> RateCheck:
        """The message-rate check for ``user_id``, for the publisher to run in its pipeline."""
        cfg = self._config
        return RateCheck(self._keys.rate(f"user:{user_id}", "msg"),
                         gcra_args(cfg.message_rate_limit_per_min, cfg.message_burst), cfg.rate_limits_fail_open)

    async def message(self, user_id: str) -> Decision:
        cfg = self._config
        return await self._rates.hit(self._keys.rate(f"user:{user_id}", "msg"), cfg.message_rate_limit_per_min,
                                     cfg.message_burst)

    async def typing(self, user_id: str) -> Decision:
        cfg = self._config
        return await self._rates.hit(self._keys.rate(f"user:{user_id}", "typing"), cfg.typing_rate_limit_per_min,
                                     cfg.typing_burst)
