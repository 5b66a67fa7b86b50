"""A token's life after the handshake: revocation, and what a session needs to enforce expiry and
accept a ``refresh``.

Revocation is by token id (``jti``, kept for a TTL) or by user (every token of the user issued before
a time). It is stored in Redis (keys in :mod:`hub.keys`) and announced on the control channel that
every node's relay already listens to, so each node closes the matching live connections (close code
4503) as soon as the announcement arrives. A handshake or a refresh asks Redis whether its token is
revoked in one pipelined round trip.

A node may be between its Redis check and registering the new session when an announcement arrives;
the announcement would then miss the session. So each node remembers announcements for
``RECENT_S`` seconds and checks every new session against them before it is served.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hub.audit import Audit
from hub.auth import TokenVerifier, VerifiedToken
from hub.batching import CommandBatcher, discard
from hub.config import AuthConfig
from hub.errors import CloseCode
from hub.keys import Keys
from hub.redis_client import publish

if TYPE_CHECKING:
    from hub.registry import Registry

log = logging.getLogger("hub.tokens")

# How long a node remembers an announced revocation for sessions still being set up.
RECENT_S = 30.0
# Default lifetime of a jti revocation: longer than any access token should live.
DEFAULT_JTI_TTL_S = 7 * 86_400
_OP = "revoke"


@dataclass(frozen=True)
class Revocation:
    """One revocation: a token id, or a user's tokens issued before ``before_ms``."""

    jti: str | None = None
    user_id: str | None = None
    before_ms: int = 0

    def matches(self, token: VerifiedToken) -> bool:
        if self.jti is not None:
            return token.token_id == self.jti
        if self.user_id is not None and token.principal.user_id == self.user_id:
            # A token without iat cannot prove it is newer than the revocation.
            return token.issued_at is None or token.issued_at * 1000 < self.before_ms
        return False

    def encode(self) -> bytes:
        body: dict[str, object] = {"op": _OP}
        if self.jti is not None:
            body["jti"] = self.jti
        if self.user_id is not None:
            body["user"] = self.user_id
            body["before_ms"] = self.before_ms
        return orjson.dumps(body)

    @staticmethod
    def decode(data: bytes) -> Revocation | None:
        """The revocation a control message announces, or None (another command, or garbage)."""
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or body.get("op") != _OP:
            return None
        jti, user, before = body.get("jti"), body.get("user"), body.get("before_ms", 0)
        if isinstance(jti, str) and jti:
            return Revocation(jti=jti)
        if isinstance(user, str) and user and isinstance(before, int) and not isinstance(before, bool):
            return Revocation(user_id=user, before_ms=before)
        return None


class RevocationStore:
    """Revocations in Redis: written by hubctl, read at every handshake and refresh."""

    def __init__(self, redis: Redis, keys: Keys, *, fail_open: bool = True,
                 batcher: CommandBatcher | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._fail_open = fail_open
        # Handshakes in flight at once share pipelines (with each other, and with the node's other
        # connect-path commands when the node's batcher is given).
        self._batcher = batcher if batcher is not None else CommandBatcher(redis)

    async def is_revoked(self, token: VerifiedToken) -> bool:
        """One pipelined round trip (shared with concurrent callers). When Redis cannot be asked: False
        with ``fail_open`` (the token is admitted unchecked), else raises the RedisError (the caller
        refuses with 503)."""
        by_id = self._batcher.command("EXISTS", self._keys.revoked_token(token.token_id)) \
            if token.token_id is not None else None
        by_user = self._batcher.command("GET", self._keys.revoked_user(token.principal.user_id))
        try:
            id_revoked = await by_id if by_id is not None else 0
            raw = await by_user
        except (RedisError, OSError) as exc:
            discard(by_user)
            if not self._fail_open:
                raise
            log.warning("revocation check skipped, Redis unavailable (%s)", type(exc).__name__)
            return False
        if id_revoked:
            return True
        if raw is None:
            return False
        try:
            before_ms = int(raw)
        except ValueError:
            return False
        return Revocation(user_id=token.principal.user_id, before_ms=before_ms).matches(token)

    async def revoke_token(self, jti: str, ttl_s: int = DEFAULT_JTI_TTL_S) -> int:
        """Revoke one token for ``ttl_s`` and announce it. Returns how many nodes heard it."""
        revocation = Revocation(jti=jti)
        await self._redis.set(self._keys.revoked_token(jti), b"1", ex=ttl_s)
        return await self._announce(revocation)

    async def revoke_user(self, user_id: str, at_ms: int | None = None, ttl_s: int | None = None) -> int:
        """Revoke every token of ``user_id`` issued before ``at_ms`` (default: now) and announce it.
        Tokens issued in the same second are refused too (iat has second precision). Returns how many
        nodes heard it."""
        before_ms = int(time.time() * 1000) if at_ms is None else at_ms
        revocation = Revocation(user_id=user_id, before_ms=before_ms)
        await self._redis.set(self._keys.revoked_user(user_id), str(before_ms), ex=ttl_s)
        return await self._announce(revocation)

    async def _announce(self, revocation: Revocation) -> int:
        """Tell every node, after the revocation is stored (a node that hears it, or a handshake that checks,
        finds it). Not one MULTI with the write: a Redis Cluster refuses PUBLISH in a transaction."""
        return await publish(self._redis, self._keys.control_channel(), revocation.encode())


class RevocationWatch:
    """Applies announced revocations to this node's live sessions (and to those being set up)."""

    def __init__(self, registry: Registry, audit: Audit, grace_s: float) -> None:
        self._registry = registry
        self._audit = audit
        self._grace_s = grace_s
        # (monotonic time heard, revocation), oldest first; pruned past RECENT_S.
        self._recent: collections.deque[tuple[float, Revocation]] = collections.deque()
        self.applied = 0

    def on_control(self, data: bytes) -> None:
        """Handle one control-channel message (called from the relay's listener; never raises)."""
        try:
            revocation = Revocation.decode(data)
            if revocation is None:
                return
            self._recent.append((time.monotonic(), revocation))
            self._prune()
            if revocation.user_id is not None:
                candidates = list(self._registry.users.get(revocation.user_id, ()))
            else:
                candidates = list(self._registry.sessions)
            for session in candidates:
                if not session.closing and revocation.matches(session.token):
                    self.applied += 1
                    self._audit.record("revoked", who=session.user_id, ip=session.connection.client_ip,
                                       what="connection", connection=session.id,
                                       by="jti" if revocation.jti is not None else "user")
                    session.close(CloseCode.TOKEN_REVOKED, "token revoked", self._grace_s)
        except Exception:
            log.exception("control message not applied")

    def recently_revoked(self, token: VerifiedToken) -> bool:
        """Whether a revocation announced in the last RECENT_S seconds covers ``token``."""
        self._prune()
        return any(revocation.matches(token) for _, revocation in self._recent)

    def _prune(self) -> None:
        horizon = time.monotonic() - RECENT_S
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()


@dataclass(frozen=True)
class TokenGuard:
    """What the handshake and each session use to keep a connection's token honest."""

    config: AuthConfig
    verifier: TokenVerifier
    store: RevocationStore
    watch: RevocationWatch
    audit: Audit
