"""Every Redis client of the hub, the archivers, maintenance and the CLI is built here, for a standalone
server (``redis://``, ``rediss://``, ``unix://``), a master watched by Sentinel
(``redis+sentinel://sentinel:26379[,sentinel:26379...]/SERVICE[/db]``, ``rediss+sentinel://`` for TLS to the master)
or a Redis Cluster (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://`` for TLS, or any ``redis://``
URL with ``redis.cluster: true``).

A Sentinel client is a standalone :class:`~redis.asyncio.Redis` whose pool asks the sentinels where the master is
whenever it connects: after a failover the old master drops its clients (Sentinel kills them) and every
connection, subscriptions included, comes back on the promoted one.

A cluster client is a redis-py :class:`~redis.asyncio.cluster.RedisCluster`. It speaks the same commands as the
standalone :class:`~redis.asyncio.Redis` the rest of the code is typed with (keyed commands are routed to the
slot's master, MOVED and failovers are followed), so it is handed around as a ``Redis``; the few places where
the two differ go through the helpers below: commands every master (or every node) must run (CONFIG SET of
keyspace events, SCRIPT LOAD, INFO per shard), PUBLISH routing, and the database number.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

# XREAD/XREADGROUP options before STREAMS, and how many arguments each takes.
_STREAM_READ_OPTIONS = {"COUNT": 1, "BLOCK": 1, "NOACK": 0}


# Whether the current task already holds one of a cluster client's in-flight permits (a pipeline retrying its
# redirected commands one by one must not wait for a second permit).
_HOLDING_PERMIT: ContextVar[bool] = ContextVar("hub_redis_cluster_permit", default=False)


class HubRedisCluster(RedisCluster):
    """A RedisCluster that remembers how its nodes are reached (credentials, TLS, timeouts), so per-node
    pub/sub connections (see :mod:`hub.subscriptions`) are made the same way; that finds the keys of
    XREADGROUP and XREAD itself; and whose callers wait for a free connection instead of failing.

    redis-py's cluster client opens up to ``max_connections`` per node and then raises MaxConnectionsError at
    once (a burst of joins did, and the errors cascaded into broken connections). Commands and pipelines here
    take a permit first, at most ``max_connections`` at a time, so no node ever runs short; a caller waits up
    to ``pool_wait_s`` for one, as the standalone client's blocking pool does."""

    node_options: dict[str, Any]
    in_flight: asyncio.Semaphore
    pool_wait_s: float | None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permit():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # (redis-py's typing protocol declares an _event_dispatcher that ClusterPipeline itself does not define.)
        return HubClusterPipeline(self, transaction)  # type: ignore[abstract]

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if _HOLDING_PERMIT.get():
            yield
            return
        try:
            async with asyncio.timeout(self.pool_wait_s):
                await self.in_flight.acquire()
        except TimeoutError:
            raise RedisConnectionError(f"no free Redis Cluster connection within {self.pool_wait_s}s") from None
        holding = _HOLDING_PERMIT.set(True)
        try:
            yield
        finally:
            _HOLDING_PERMIT.reset(holding)
            self.in_flight.release()

    async def _determine_slot(self, command: str, *args: Any) -> int:
        """The slot a command goes to. redis-py asks a node (``COMMAND GETKEYS``, a round trip and a command
        on the server) for the keys of every command whose key positions vary; it does so twice per call
        outside a pipeline and again after each MOVED. XREADGROUP and XREAD name their keys after STREAMS,
        which is parsed here instead (the relay and the archivers read streams all the time). Everything
        else, and anything this parser does not recognise, is left to redis-py. Routing, MOVED, ASK and
        retries are unchanged: only where the keys are is answered here."""
        keys = stream_read_keys(command, args)
        if keys is None:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{command} - all keys must map to the same key slot")
        return slots.pop()


class HubClusterPipeline(ClusterPipeline):
    """A cluster pipeline that runs under one of its client's permits (see :class:`HubRedisCluster`)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        if not isinstance(client, HubRedisCluster):
            return await super().execute(raise_on_error, allow_redirections)
        async with client.permit():
            return await super().execute(raise_on_error, allow_redirections)


def stream_read_keys(command: Any, args: tuple[Any, ...]) -> list[Any] | None:
    """The stream keys of ``XREADGROUP GROUP group consumer [COUNT n] [BLOCK ms] [NOACK] STREAMS key... id...``
    or ``XREAD [COUNT n] [BLOCK ms] STREAMS key... id...``; None for any other command or a shape not
    recognised."""
    name = command.decode() if isinstance(command, bytes) else str(command)
    name = name.upper()
    if name == "XREADGROUP":
        index = 3  # past GROUP group consumer
        if len(args) < 3 or _token(args[0]) != "GROUP":
            return None
    elif name == "XREAD":
        index = 0
    else:
        return None
    while index < len(args):
        token = _token(args[index])
        if token == "STREAMS":
            rest = args[index + 1:]
            if not rest or len(rest) % 2:
                return None
            return list(rest[:len(rest) // 2])
        if token not in _STREAM_READ_OPTIONS:
            return None
        index += 1 + _STREAM_READ_OPTIONS[token]
    return None


def _token(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace").upper()
    return str(value).upper()


@dataclass(frozen=True)
class ClusterAddress:
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelAddress:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]``; the credentials and TLS are
    the master's (the sentinels are asked without them)."""
    address = parse_cluster_url(url.split("/", 3)[0] + "//" + url.split("://", 1)[1].split("/", 1)[0])
    path = [part for part in url.split("://", 1)[1].split("/")[1:] if part]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the master's service: redis+sentinel://host:26379/mymaster")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"expected /SERVICE[/db] after the sentinels, got /{'/'.join(path)}")
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelAddress(address.nodes, unquote(path[0]), db, address.username, address.password, address.tls)


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections go to the master the sentinels name) with the blocking pool's wait for a
    free connection instead of an error past ``max_connections``."""


def parse_cluster_url(url: str) -> ClusterAddress:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]``; a plain ``redis://`` or ``rediss://``
    URL names one seed node."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0]
    credentials, _, hosts = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, _, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) or None)
    nodes = []
    for part in hosts.split(","):
        parsed = urlsplit(f"//{part}")
        if not parsed.hostname:
            raise ValueError(f"no host in cluster seed {part!r}")
        nodes.append((parsed.hostname, parsed.port or 6379))
    database = rest.split("/", 1)[1] if "/" in rest else ""
    if database.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    return ClusterAddress(tuple(nodes), username, password, scheme.lower().startswith("rediss"))


def connect(url: str, *, cluster: bool = False, socket_timeout_s: float | None = None,
            connect_timeout_s: float = 5.0, pool_size: int | None = None, pool_wait_s: float | None = None) -> Redis:
    """A client for ``url``. With ``pool_size`` a standalone client waits up to ``pool_wait_s`` for a free
    connection instead of failing (a cluster client holds ``pool_size`` connections per node)."""
    if is_sentinel_url(url):
        return _connect_sentinel(parse_sentinel_url(url), socket_timeout_s, connect_timeout_s, pool_size, pool_wait_s)
    if cluster or is_cluster_url(url):
        return _connect_cluster(parse_cluster_url(url), socket_timeout_s, connect_timeout_s, pool_size, pool_wait_s)
    options: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": connect_timeout_s,
                               "socket_timeout": socket_timeout_s}
    if not url.startswith("unix://"):
        options["socket_keepalive"] = True  # TCP only: redis-py refuses it on Unix sockets
    if pool_size is None:
        return Redis.from_url(url, **options)
    pool = BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=pool_wait_s, **options)
    return Redis.from_pool(pool)


def _connect_cluster(address: ClusterAddress, socket_timeout_s: float | None, connect_timeout_s: float,
                     pool_size: int | None, pool_wait_s: float | None) -> Redis:
    node_options: dict[str, Any] = {"username": address.username, "password": address.password,
                                    "socket_connect_timeout": connect_timeout_s, "socket_keepalive": True}
    if address.tls:
        node_options["ssl"] = True
    client = HubRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        decode_responses=False, socket_timeout=socket_timeout_s, max_connections=pool_size or 100,
        **node_options)
    client.node_options = node_options
    client.in_flight = asyncio.Semaphore(pool_size or 100)
    client.pool_wait_s = pool_wait_s
    # The rest of the code is typed against the standalone client: see the module's docstring.
    return cast(Redis, client)


def _connect_sentinel(address: SentinelAddress, socket_timeout_s: float | None, connect_timeout_s: float,
                      pool_size: int | None, pool_wait_s: float | None) -> Redis:
    asked = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": connect_timeout_s}
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=asked)  # type: ignore[no-untyped-call]
    options: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": connect_timeout_s,
                               "socket_timeout": socket_timeout_s, "socket_keepalive": True, "db": address.db,
                               "username": address.username, "password": address.password}
    if address.tls:
        options["ssl"] = True
    if pool_size is None:
        return cast(Redis, sentinel.master_for(address.service, redis_class=Redis, **options))
    return cast(Redis, sentinel.master_for(address.service, redis_class=Redis,
                                           connection_pool_class=BlockingSentinelConnectionPool,
                                           max_connections=pool_size, timeout=pool_wait_s, **options))


def _sentinel_pool(redis: Redis) -> SentinelConnectionPool | None:
    pool = redis.connection_pool
    return pool if isinstance(pool, SentinelConnectionPool) else None


def as_cluster(redis: Redis) -> RedisCluster | None:
    """The cluster client behind ``redis``, or None for a standalone server."""
    return cast(RedisCluster, redis) if isinstance(redis, RedisCluster) else None


def database(redis: Redis) -> int:
    """The database number the client uses (keyspace channels name it); a cluster has only 0."""
    if as_cluster(redis) is not None:
        return 0
    return int(redis.connection_pool.connection_kwargs.get("db", 0) or 0)


async def initialize(redis: Redis) -> None:
    """Connect now (a cluster client learns its slot map), so a bad address fails at start."""
    cluster = as_cluster(redis)
    if cluster is not None:
        await cluster.initialize()


def node_name(redis: Redis) -> str:
    """host:port of a standalone client (its socket path for unix://; the master's, once known, with Sentinel)."""
    sentinel_pool = _sentinel_pool(redis)
    if sentinel_pool is not None:
        if sentinel_pool.master_address is None:
            return f"{sentinel_pool.service_name} (sentinel)"
        host, port = sentinel_pool.master_address
        return f"{_text(host)}:{int(port)}"
    kwargs = redis.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


async def on_each_master(redis: Redis, *command: Any, replicas: bool = False) -> dict[str, Any]:
    """Run ``command`` on every master (and every replica with ``replicas``): the standalone server alone, or
    each node of a cluster. Returns the replies by node ("host:port"); a node's error is raised."""
    cluster = as_cluster(redis)
    if cluster is None:
        reply = await redis.execute_command(*command)  # type: ignore[no-untyped-call]
        by_node = {node_name(redis): reply}  # (named after the call: with Sentinel, the master is known then)
        sentinel_pool = _sentinel_pool(redis)
        if replicas and sentinel_pool is not None:
            # The replicas Sentinel knows: one of them is the next master.
            for host, port in await sentinel_pool.sentinel_manager.discover_slaves(sentinel_pool.service_name):
                name = f"{_text(host)}:{int(port)}"
                by_node[name] = await on_node(redis, name, *command)
        return by_node
    if replicas:
        names = await every_node(cluster)
        answers = await asyncio.gather(*(on_node(redis, name, *command) for name in names))
        return dict(zip(names, answers, strict=True))
    nodes = cluster.get_primaries()
    replies = await asyncio.gather(*(cluster.execute_command(*command, target_nodes=node) for node in nodes))
    return {node.name: reply for node, reply in zip(nodes, replies, strict=True)}


async def every_node(cluster: RedisCluster) -> list[str]:
    """Every reachable node of the cluster, masters and replicas, as "host:port", from CLUSTER NODES. redis-py's
    own node list comes from CLUSTER SLOTS, which leaves out a replica until its first sync is done: such a
    replica would miss settings made on every node (keyspace events) and could be promoted without them."""
    reply: dict[str, dict[str, Any]] = await cluster.execute_command("CLUSTER NODES", target_nodes=cluster.RANDOM)
    names = [address for address, node in reply.items()
             if address and not address.startswith(":") and node.get("connected", True)
             and not {"fail", "fail?", "handshake", "noaddr"} & set(str(node.get("flags", "")).split(","))]
    return sorted(names) or [node.name for node in cluster.get_nodes()]


async def on_node(redis: Redis, name: str, *command: Any) -> Any:
    """Run ``command`` on the cluster node ``name`` ("host:port"), through the cluster client's own connection
    when it knows the node, else on a connection made for this call (same credentials and TLS)."""
    cluster = as_cluster(redis)
    if cluster is None:
        if name == node_name(redis):
            return await redis.execute_command(*command)  # type: ignore[no-untyped-call]
        kwargs = redis.connection_pool.connection_kwargs
        host, _, port = name.rpartition(":")
        other = Redis(host=host, port=int(port), decode_responses=False, username=kwargs.get("username"),
                      password=kwargs.get("password"), socket_connect_timeout=kwargs.get("socket_connect_timeout"),
                      socket_timeout=kwargs.get("socket_timeout"), ssl=bool(kwargs.get("ssl", False)))
        try:
            return await other.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            await other.aclose()
    known = cluster.get_node(node_name=name)
    if known is not None:
        return await cluster.execute_command(*command, target_nodes=known)
    host, _, port = name.rpartition(":")
    options = getattr(cluster, "node_options", {})
    client = Redis(host=host, port=int(port), decode_responses=False, **options)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def publish(redis: Redis, channel: str, message: bytes | str) -> int:
    """PUBLISH ``message``; returns how many subscribers got it. In a cluster a PUBLISH reaches every node
    (over the cluster bus) but counts only the subscribers of the node that ran it, so it is sent to the node
    owning the channel's slot, where the hub subscribes (see :mod:`hub.subscriptions`)."""
    cluster = as_cluster(redis)
    if cluster is None:
        return int(await redis.publish(channel, message))
    owner = cluster.get_node_from_key(channel)
    return int(await cluster.execute_command("PUBLISH", channel, message, target_nodes=owner))


async def publish_many(redis: Redis, channel: str, messages: list[bytes]) -> list[int]:
    """PUBLISH each message on ``channel`` in one pipelined round trip (routed as :func:`publish` does)."""
    cluster = as_cluster(redis)
    pipe = redis.pipeline(transaction=False)
    for message in messages:
        if cluster is None:
            pipe.publish(channel, message)
        else:  # (redis-py's cluster pipeline refuses pipe.publish)
            pipe.execute_command("PUBLISH", channel, message, target_nodes=cluster.get_node_from_key(channel))
    return [int(count) for count in await pipe.execute()]


async def load_scripts(redis: Redis, sources: list[str]) -> None:
    """SCRIPT LOAD every source on the server, or on every master of a cluster (one pipelined round trip per
    node). A replica promoted later has not got them: EVALSHA then answers NOSCRIPT and callers load again."""
    cluster = as_cluster(redis)
    pipe = redis.pipeline(transaction=False)
    targets: list[Any] = cluster.get_primaries() if cluster is not None else [None]
    for node in targets:
        for source in sources:
            if node is None:
                pipe.script_load(source)
            else:
                pipe.execute_command("SCRIPT LOAD", source, target_nodes=node)
    await pipe.execute()


async def xreadgroup_many(redis: Redis, group: str, consumer: str, streams: dict[str, str], *,
                          count: int | None = None, noack: bool = False) -> list[Any]:
    """XREADGROUP over many streams: one call to a standalone server; in a cluster, where one command may only
    name keys of one slot (every room is its own slot), one call per slot, pipelined (redis-py sends each
    node's share at once). Returns [key, entries] pairs (RESP2 shape, or the RESP3 dict's items); the first
    error (NOGROUP: a stream vanished) is raised as one call would raise it."""
    cluster = as_cluster(redis)
    if cluster is None or len(streams) <= 1:
        response = await redis.xreadgroup(group, consumer, streams, count=count, noack=noack)  # type: ignore[arg-type]
        return _pairs(response)
    by_slot: dict[int, dict[str, str]] = {}
    for key, position in streams.items():
        by_slot.setdefault(cluster.keyslot(key), {})[key] = position
    pipe = redis.pipeline(transaction=False)
    for part in by_slot.values():
        pipe.xreadgroup(group, consumer, part, count=count, noack=noack)  # type: ignore[arg-type]
    replies = await pipe.execute(raise_on_error=False)
    pairs: list[Any] = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        pairs.extend(_pairs(reply))
    return pairs


def _pairs(response: Any) -> list[Any]:
    if not response:
        return []
    if isinstance(response, dict):
        return [[key, value[0] if value and isinstance(value[0], list) else value] for key, value in response.items()]
    return list(response)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
