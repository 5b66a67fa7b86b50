"""Wiring: builds a node from a :class:`~hub.config.Config`, starts it, drains it.

Start order: Redis (or the embedded one) -> keyspace notifications -> Lua scripts -> node
registration -> publisher, relay, heartbeat -> listening socket. Stop order is the reverse, and
clients get close code 4001 ("reconnect") before the node's consumer groups are removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from http import HTTPStatus
from typing import Any

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Origin

from hub import __version__, redis_client
from hub.api import Api
from hub.audit import Audit
from hub.auth import TokenVerifier
from hub.cluster_stats import ClusterStatsView
from hub.config import Config
from hub.embedded import EmbeddedRedis
from hub.errors import CloseCode, HubError
from hub.http_api import build_api_app
from hub.keepalive import Keepalive
from hub.keys import Keys
from hub.lua import Scripts
from hub.node import Node
from hub.notifications import ReminderScheduler, is_internal, is_reminders_wake
from hub.server import Handshake, json_response
from hub.session import HubConnection, Outbox, Session
from hub.streams import Publisher, Streams
from hub.tasks import cancel_and_wait
from hub.tokens import RevocationStore, RevocationWatch, TokenGuard
from hub.webui import StaticFiles

log = logging.getLogger("hub.app")
# One line per connection open and close (never per message; never a token or a body).
conn_log = logging.getLogger("hub.connections")

# Keyspace notification classes the relay needs: K (keyspace channel), t (stream), s (set: grants),
# g (generic: DEL of a grant set or a stream).
REQUIRED_KEYSPACE_FLAGS = "Kgst"


# Stands in for every connection's handshake request once the session runs (see App._handle).
_HANDSHAKE_DONE = Request("/ws/connect", Headers())


def make_node_id() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:32] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# Redis connections a node may hold; callers beyond it wait for one (up to REDIS_POOL_WAIT_S) instead of
# failing: redis-py's default pool (100 since 8.x) raises MaxConnectionsError on the 101st concurrent
# command, which a burst of joins or publishes reaches at once.
REDIS_POOL_SIZE = 64
REDIS_POOL_WAIT_S = 5.0


async def connect_redis(url: str, socket_timeout_s: float | None = None, *, cluster: bool = False) -> Redis:
    # socket_timeout: without it a command sent into a black hole waits for TCP keepalive (hours), holding its
    # pooled connection and everything queued behind it (the publisher's pipeline, the heartbeat).
    redis = redis_client.connect(url, cluster=cluster, socket_timeout_s=socket_timeout_s,
                                 pool_size=REDIS_POOL_SIZE, pool_wait_s=REDIS_POOL_WAIT_S)
    await redis_client.initialize(redis)
    return redis


async def ensure_keyspace_events(redis: Redis, allowed_to_configure: bool, *, report: bool = True) -> bool:
    """Make sure stream and set keyspace notifications are on: on the server, or on every node of a cluster
    (CONFIG SET is not replicated, and each master notifies only about its own keys: the replicas get it too,
    so a promoted one notifies at once). Returns False if they are not and could not be turned on (the relay
    then depends on its sweep)."""
    replies = await redis_client.on_each_master(redis, "CONFIG", "GET", "notify-keyspace-events", replicas=True)
    ok = True
    for node, reply in replies.items():
        ok = await _ensure_keyspace_events_on(redis, node if len(replies) > 1 else None, reply,
                                              allowed_to_configure, report) and ok
    return ok


async def _ensure_keyspace_events_on(redis: Redis, node: str | None, reply: dict[Any, Any],
                                     allowed_to_configure: bool, report: bool) -> bool:
    current = reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b""))
    flags = current.decode() if isinstance(current, bytes) else str(current)
    have = set(flags)
    if "A" in have:
        have |= set("g$lshzxetd")
    missing = [f for f in REQUIRED_KEYSPACE_FLAGS if f not in have]
    if not missing:
        return True
    where = f" on {node}" if node else ""
    if not allowed_to_configure:
        if report:
            log.error("Redis notify-keyspace-events=%r%s lacks %s; live delivery falls back to the sweep",
                      flags, where, "".join(missing))
        return False
    try:
        if node is None:
            await redis.config_set("notify-keyspace-events", flags + "".join(missing))
        else:
            await redis_client.on_node(redis, node, "CONFIG", "SET", "notify-keyspace-events", flags + "".join(missing))
    except RedisError as exc:
        if report:
            log.error("cannot enable keyspace notifications%s (%s); live delivery falls back to the sweep",
                      where, exc)
        return False
    if not report:
        log.warning("keyspace notifications were off%s (Redis restarted or failed over?): turned back on", where)
    return True


class App:
    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.node_id = make_node_id()
        self.keys = Keys(config.redis.key_prefix)
        self.draining = False
        # Built in start(); None before.
        self.redis: Redis | None = None
        self.node: Node | None = None
        self.server: Server | None = None
        # REST endpoints; the API port's aiohttp runner (None when server.api_port is -1).
        self.api: Api | None = None
        self._api_runner: web.AppRunner | None = None
        self.api_port: int | None = None
        # PostgreSQL pool for history and search; None when PostgreSQL is unreachable.
        self.pool: asyncpg.Pool | None = None
        self.embedded: EmbeddedRedis | None = None
        # Background tasks (publisher, relay, heartbeat, idle reaper); cancelled in stop().
        self._tasks: list[asyncio.Task[Any]] = []
        self._verifier = TokenVerifier(config.auth)
        # Audit writer and the token guard (revocations, refresh, expiry); built in start().
        self.audit: Audit | None = None
        self.guard: TokenGuard | None = None
        # Delivers due deadline reminders; built in start().
        self.reminders: ReminderScheduler | None = None
        self.port: int | None = None
        # The web UI's files (hub/web, listed once) and the dashboard's cluster snapshot (taken on request).
        self.web = StaticFiles()
        self.cluster_stats = ClusterStatsView(self)

    async def start(self) -> None:
        url = await self._redis_url()
        self.redis = await connect_redis(url, self.config.redis.socket_timeout_s, cluster=self.config.redis.is_cluster)
        self.keys = Keys(self.config.redis.key_prefix, redis_client.database(self.redis))
        await ensure_keyspace_events(self.redis, self.config.redis.configure_keyspace_events)
        scripts = Scripts(self.redis)
        await scripts.load()
        streams = Streams(self.redis, scripts, self.keys)
        publisher = Publisher(streams, self.config.rooms.idempotency_ttl_s,
                              rate_in_script=redis_client.as_cluster(self.redis) is None,
                              linger_s=self.config.server.publish_linger_ms / 1000)
        self.pool = await self._connect_postgres()
        self.node = Node(self.config, self.node_id, streams, publisher, self.keys, self.pool)
        self.reminders = ReminderScheduler(scripts, self.keys, self._publish_reminder)
        self.guard = self._token_guard(self.redis, self.node)
        self.api = Api(self.node, self.guard)
        self.outbox = Outbox(asyncio.get_running_loop(), self.config.server.write_delay_ms / 1000,
                             self.config.server.outbox_limit_bytes)
        node = self.node
        server_cfg = self.config.server
        self.keepalive = Keepalive(lambda: node.registry.sessions, server_cfg.ping_interval_s,
                                   server_cfg.ping_timeout_s, server_cfg.slow_close_grace_s)
        await self._heartbeat_once()
        await self.node.relay.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(publisher.run(), name="publisher"),
            loop.create_task(self.node.relay.run(), name="relay"),
            loop.create_task(self._heartbeat(), name="heartbeat"),
            loop.create_task(self._reap_idle(), name="idle-reaper"),
            loop.create_task(self.keepalive.run(), name="keepalive"),
            loop.create_task(self.reminders.run(), name="reminders"),
        ]
        self.server = await serve(
            self._handle,
            server_cfg.host,
            server_cfg.port,
            process_request=Handshake(self, self.guard),
            create_connection=HubConnection,
            compression="deflate" if server_cfg.compression else None,
            max_size=server_cfg.max_frame_bytes,
            # No keepalive task per connection: hub/keepalive.py pings quiet connections node-wide.
            ping_interval=None,
            origins=_origins(server_cfg.allowed_origins),
            server_header=f"streamhub/{__version__}",
            reuse_port=self.reuse_port,
        )
        sockets = list(self.server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else server_cfg.port
        if server_cfg.api_port >= 0:
            self._api_runner = web.AppRunner(build_api_app(self, self.api), access_log=None)
            await self._api_runner.setup()
            site = web.TCPSite(self._api_runner, server_cfg.host, server_cfg.api_port, reuse_port=self.reuse_port)
            await site.start()
            server = getattr(site, "_server", None)
            api_sockets = list(server.sockets) if server is not None else []
            self.api_port = api_sockets[0].getsockname()[1] if api_sockets else server_cfg.api_port
        log.info("node %s listening on %s:%s (redis %s)", self.node_id, server_cfg.host, self.port,
                 _redact_url(url))

    def _token_guard(self, redis: Redis, node: Node) -> TokenGuard:
        """The audit writer, the revocation store, and the watch that applies revocations announced
        on the control channel to this node's sessions."""
        self.audit = Audit(redis, self.keys, self.config.audit, self.node_id)
        self.audit.start()
        watch = RevocationWatch(node.registry, self.audit, self.config.server.slow_close_grace_s)

        def on_control(data: bytes) -> None:
            watch.on_control(data)
            if self.reminders is not None and is_reminders_wake(data):
                self.reminders.wake()

        node.relay.on_control = on_control
        store = RevocationStore(redis, self.keys, fail_open=self.config.auth.revocation_fail_open,
                                batcher=node.streams.batcher)
        return TokenGuard(self.config.auth, self._verifier, store, watch, self.audit)

    async def _connect_postgres(self) -> asyncpg.Pool | None:
        """A small pool for history and search. Without PostgreSQL the hub still runs: history then
        comes from the Redis window alone (said once, loudly)."""
        pg = self.config.postgres
        try:
            pool = await asyncpg.create_pool(
                pg.url, min_size=1, max_size=4, timeout=3, server_settings={
                    "search_path": pg.schema, "statement_timeout": str(pg.statement_timeout_ms),
                    "application_name": f"streamhub:{self.node_id}"})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("PostgreSQL unreachable (%s): history is served from the Redis window only, "
                        "search is off", type(exc).__name__)
            return None
        if not await pool.fetchval("SELECT to_regclass('messages') IS NOT NULL"):
            log.warning("PostgreSQL schema %r has no hub tables (run hubctl migrate): history is served "
                        "from the Redis window only, search is off", pg.schema)
            await pool.close()
            return None
        return pool

    async def _redis_url(self) -> str:
        cfg = self.config.redis
        if cfg.embedded == "always":
            return await self._start_embedded()
        if cfg.embedded == "auto" and not self.config.redis_url_explicit and not cfg.is_cluster:
            probe = Redis.from_url(cfg.url, socket_connect_timeout=1)
            try:
                await probe.ping()
            except (RedisError, OSError):
                log.warning("no Redis answers at %s and none is configured: starting the embedded one",
                            _redact_url(cfg.url))
                return await self._start_embedded()
            finally:
                await probe.aclose()
        return cfg.url

    async def _start_embedded(self) -> str:
        self.embedded = EmbeddedRedis(self.config.redis.embedded_dir)
        return await asyncio.to_thread(self.embedded.start)

    async def _handle(self, connection: Any) -> None:
        assert self.node is not None and self.guard is not None and isinstance(connection, HubConnection)
        session = Session(connection, self.node, self.outbox, self.guard)
        # websockets keeps the handshake's request and response (headers, and the token in the path)
        # for the connection's lifetime: ~1.7 KB per connection that nothing reads after the upgrade.
        # It expects a Request object there once the handshake is done, hence a shared placeholder.
        handshake = connection.request
        if handshake is not None and handshake is not _HANDSHAKE_DONE:
            # websockets' parser generator still holds this request as a local for the connection's
            # lifetime: empty it in place as well.
            handshake.path = _HANDSHAKE_DONE.path
            handshake.headers = _HANDSHAKE_DONE.headers
        connection.request = _HANDSHAKE_DONE
        connection.response = None
        self.node.session_opened(session)
        if self.draining:
            session.close(CloseCode.SERVER_SHUTDOWN, "server shutting down, reconnect",
                          self.config.server.drain_timeout_s)
        opened = time.monotonic()
        conn_log.info("connection open", extra={"fields": {
            "event": "open", "connection_id": session.id, "user_id": session.user_id, "ip": connection.client_ip,
            "client_type": connection.client_type, "client_version": connection.client_version}})
        try:
            await session.run()
        finally:
            code = connection.close_code or 0
            self.node.metrics.disconnects[code] = self.node.metrics.disconnects.get(code, 0) + 1
            conn_log.info("connection closed", extra={"fields": {
                "event": "close", "connection_id": session.id, "user_id": session.user_id,
                "ip": connection.client_ip, "client_type": connection.client_type,
                "duration_s": round(time.monotonic() - opened, 3), "close_code": connection.close_code}})

    # ------------------------------------------------------------------ background work

    async def _publish_reminder(self, room: str, fields: list[bytes | str], idempotency_id: str) -> None:
        assert self.node is not None
        await self.node.streams.append(room, fields, sender_id="reminders", idempotency_id=idempotency_id)

    async def _heartbeat_once(self) -> None:
        assert self.redis is not None and self.node is not None
        key = self.keys.node(self.node_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={
            "version": __version__, "started_at": int(self.node.started_at), "pid": os.getpid(),
            "host": socket.gethostname(), "connections": len(self.node.registry.sessions),
            "rooms": len(self.node.registry.rooms), "seen_at": int(time.time()),
        })
        pipe.expire(key, int(self.config.relay.node_ttl_s))
        pipe.sadd(self.keys.nodes(), self.node_id)
        await pipe.execute()

    async def _heartbeat(self) -> None:
        """Keep this node's registration alive, and clean up after nodes whose registration expired
        (their connections' presence, their consumer groups)."""
        assert self.node is not None and self.redis is not None
        redis = self.redis
        while True:
            await asyncio.sleep(self.config.relay.node_heartbeat_s)
            try:
                started = time.perf_counter()
                await redis.ping()
                self.node.metrics.redis_rtt_ms = (time.perf_counter() - started) * 1000
                await self._heartbeat_once()
                # A Redis that restarted forgot CONFIG SET: turn the wake-ups back on (one CONFIG GET;
                # a refusal was already reported at start).
                await ensure_keyspace_events(redis, self.config.redis.configure_keyspace_events, report=False)
                await self.node.limits.refresh(
                    s.connection.lease for s in self.node.registry.sessions if s.connection.lease is not None)
                await self.node.presence.reap_dead_nodes()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)

    async def _reap_idle(self) -> None:
        """Close connections idle past server.connection_timeout_s; show those idle past
        rooms.away_after_idle_s as away."""
        node = self.node
        assert node is not None
        timeout = self.config.server.connection_timeout_s
        away_after = self.config.rooms.away_after_idle_s
        while True:
            await asyncio.sleep(min(max(min(timeout, away_after) / 4, 0.05), 30.0))
            now = time.monotonic()
            for session in list(node.registry.sessions):
                if session.last_frame_at < now - timeout:
                    session.close(CloseCode.IDLE_TIMEOUT, "idle timeout, reconnect when needed",
                                  self.config.server.slow_close_grace_s)
                elif session.last_frame_at < now - away_after and session.status == "online" and not session.closing:
                    await node.set_status(session, "away", auto=True)

    # ------------------------------------------------------------------ health

    async def health_response(self) -> Response:
        redis_ok = False
        if self.redis is not None:
            try:
                async with asyncio.timeout(1.0):
                    redis_ok = bool(await self.redis.ping())
            except (RedisError, OSError, TimeoutError):
                redis_ok = False
        registry = self.node.registry if self.node else None
        score = 100 if redis_ok and not self.draining else (50 if redis_ok else 0)
        body = {
            "status": "success" if redis_ok else "error",
            "data": {
                "health_status": "healthy" if score == 100 else ("degraded" if score else "unhealthy"),
                "health_score": score,
                "redis_connected": redis_ok,
                "node_id": self.node_id,
                "connection_stats": {
                    "total_connections": len(registry.sessions) if registry else 0,
                    "unique_users": len(registry.users) if registry else 0,
                    "total_rooms": sum(1 for r in registry.rooms if not is_internal(r)) if registry else 0,
                },
            },
        }
        return json_response(HTTPStatus.OK if redis_ok else HTTPStatus.SERVICE_UNAVAILABLE, body)

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Drain: stop accepting, tell every client to reconnect (4001), wait for them to go (bounded),
        remove this node's groups and registration, stop background work."""
        self.draining = True
        grace = self.config.server.drain_timeout_s
        if self.server is not None:
            self.server.close(close_connections=False)
        if self._api_runner is not None:
            await self._api_runner.cleanup()
        if self.node is not None:
            sessions = list(self.node.registry.sessions)
            for session in sessions:
                session.close(CloseCode.SERVER_SHUTDOWN, "server shutting down, reconnect", grace)
            if sessions:
                await asyncio.wait([asyncio.ensure_future(s.connection.wait_closed()) for s in sessions],
                                   timeout=grace + 1)
        if self.server is not None:
            try:
                async with asyncio.timeout(grace + 1):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning("some connection handlers did not finish in time")
        await cancel_and_wait(self._tasks)
        await self.cluster_stats.close()
        if self.audit is not None:
            await self.audit.close()
        if self.node is not None:
            await self.node.relay.destroy_all_groups()
            await self.node.relay.close()
            await self.node.typing.close()
            await self.node.receipts.close()
        if self.pool is not None:
            await self.pool.close()
        if self.redis is not None:
            try:
                await self.redis.delete(self.keys.node(self.node_id))
                await self.redis.srem(self.keys.nodes(), self.node_id)
            except RedisError:
                pass
            await self.redis.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def _origins(allowed: tuple[str, ...]) -> list[Origin | None] | None:
    """websockets' origin check: exact values; an empty allowlist admits any origin.

    A request without an Origin header is always admitted: browsers always send one, so the
    allowlist still stops cross-site pages, while backends and native apps (which send none) pass.
    """
    if not allowed:
        return None
    return [*(Origin(value) for value in allowed), None]


def _redact_url(url: str) -> str:
    """Drop a password from a URL before logging it."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


__all__ = ["App", "HubError"]
