"""The pub/sub connections of a process (a hub node's relay, an archiver): one to a standalone Redis, or one
per Redis Cluster master, kept right through failovers and resharding.

Why per master: Redis Cluster emits a keyspace notification only on the node that owns the key, so
``SUBSCRIBE __keyspace@0__:hub:{room}:s`` must go to the master of the room's slot and a keyspace
``PSUBSCRIBE`` to every master. Ordinary channels (the control channel, a room's ``:ev``) are PUBLISHed to
every node over the cluster bus; they are subscribed on the master of their own slot, which is also where a
sharded SPUBLISH of the channel would land, and where :func:`hub.redis_client.publish` counts receivers.
Ordinary patterns are subscribed on one master only (each node receives every PUBLISH: two would deliver
twice).

Failures: each connection has a silence probe (quiet this long, it is PINGed; no pong within as long again,
it is re-made: a black-holed connection never errors by itself, it just stops delivering). A connection
error, a probe failure or a change of the slot map (checked every few seconds, and at once after an error)
re-plans the subscriptions against the current masters: channels move to their slot's new owner, patterns go
to a promoted master, connections to nodes that are no longer masters close. Every such gap is reported with
``on_gap`` (notifications sent meanwhile are lost: the caller re-reads what it follows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from hub.redis_client import HubRedisCluster, as_cluster, node_name
from hub.tasks import cancel_and_wait

log = logging.getLogger("hub.subscriptions")
# Buffered messages dispatched in one go before the next timed read (which also runs the silence probe).
DRAIN_MAX = 1000

Handler = Callable[[dict[str, Any]], None]

# How often the slot map is compared with where the subscriptions are (no error tells a connection that its
# node lost its slots or became a replica after a coordinated failover).
TOPOLOGY_CHECK_S = 5.0


def _is_keyspace(name: str) -> bool:
    return name.startswith(("__keyspace@", "__keyevent@"))


class _Link:
    """One pub/sub connection to one node and what it is asked to deliver."""

    def __init__(self, name: str, pubsub: PubSub, client: Redis | None) -> None:
        self.name = name
        self.pubsub = pubsub
        self.client = client  # owned here (cluster nodes), None when the pubsub borrows the caller's client
        self.channels: set[str] = set()
        self.shard_channels: set[str] = set()
        self.patterns: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    @property
    def empty(self) -> bool:
        return not (self.channels or self.shard_channels or self.patterns)

    async def close(self) -> None:
        if self.task is not None:
            await cancel_and_wait([self.task])
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        if self.client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.client.aclose()


class Subscriptions:
    def __init__(self, redis: Redis, handler: Handler, *, on_gap: Callable[[], None] | None = None,
                 silence_s: float = 5.0, topology_check_s: float = TOPOLOGY_CHECK_S, name: str = "pubsub") -> None:
        self._redis = redis
        self._cluster = as_cluster(redis)
        self._handler = handler
        self._on_gap = on_gap
        self._silence_s = silence_s
        self._topology_check_s = topology_check_s
        self._name = name
        # What the caller asked for; the links hold where each one is subscribed now.
        self.channels: set[str] = set()
        self.shard_channels: set[str] = set()
        self.patterns: set[str] = set()
        self._links: dict[str, _Link] = {}
        self._replan = asyncio.Event()
        self._lock = asyncio.Lock()
        self._running = False
        self._watcher: asyncio.Task[None] | None = None
        self.gaps = 0  # reconnects and moves (each may have lost notifications)

    # ------------------------------------------------------------------ the caller's side

    async def subscribe(self, *channels: str) -> None:
        self.channels.update(channels)
        await self._add("channels", channels)

    async def ssubscribe(self, *channels: str) -> None:
        """Sharded channels (SSUBSCRIBE; Redis 7): their messages stay within their slot's shard."""
        self.shard_channels.update(channels)
        await self._add("shard_channels", channels)

    async def psubscribe(self, *patterns: str) -> None:
        self.patterns.update(patterns)
        await self._add("patterns", patterns)

    async def unsubscribe(self, *channels: str) -> None:
        await self._remove("channels", channels)

    async def sunsubscribe(self, *channels: str) -> None:
        await self._remove("shard_channels", channels)

    async def punsubscribe(self, *patterns: str) -> None:
        await self._remove("patterns", patterns)

    async def run(self) -> None:
        """Read every connection and follow the cluster's topology until cancelled."""
        self._running = True
        for link in self._links.values():
            self._start_reader(link)
        try:
            await self._watch_topology()
        finally:
            self._running = False

    async def aclose(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()

    @property
    def connections(self) -> dict[str, int]:
        """Subscriptions per node (channels, sharded channels and patterns), for stats and tests."""
        return {name: len(link.channels) + len(link.shard_channels) + len(link.patterns)
                for name, link in self._links.items()}

    # ------------------------------------------------------------------ routing

    def _owner(self, kind: str, name: str) -> str:
        """The node a channel or pattern is subscribed on (see the module's docstring)."""
        if self._cluster is None:
            return "server"
        if kind == "patterns":
            raise AssertionError("patterns are routed by _pattern_owners")
        key = name.split(":", 1)[1] if _is_keyspace(name) else name
        return self._slot_owner(key)

    def _slot_owner(self, key: str) -> str:
        assert self._cluster is not None
        node = self._cluster.get_node_from_key(key)
        if node is None:
            raise RedisError(f"no master serves the slot of {key!r} now")
        return str(node.name)

    def _pattern_owners(self, pattern: str) -> list[str]:
        if self._cluster is None:
            return ["server"]
        if _is_keyspace(pattern):
            return [node.name for node in self._cluster.get_primaries()]
        return [self._slot_owner(pattern)]

    def _plan(self) -> dict[str, dict[str, set[str]]]:
        """node -> kind -> names, for everything asked for, against the current slot map."""
        plan: dict[str, dict[str, set[str]]] = {}
        for kind in ("channels", "shard_channels"):
            for name in getattr(self, kind):
                plan.setdefault(self._owner(kind, name), {}).setdefault(kind, set()).add(name)
        for pattern in self.patterns:
            for owner in self._pattern_owners(pattern):
                plan.setdefault(owner, {}).setdefault("patterns", set()).add(pattern)
        return plan

    async def _add(self, kind: str, names: tuple[str, ...]) -> None:
        if not names:
            return
        by_owner: dict[str, list[str]] = {}
        for name in names:
            owners = self._pattern_owners(name) if kind == "patterns" else [self._owner(kind, name)]
            for owner in owners:
                by_owner.setdefault(owner, []).append(name)
        for owner, group in by_owner.items():
            link = self._link(owner)
            getattr(link, kind).update(group)
            try:
                await _command(link.pubsub, kind, group)
            except (RedisError, OSError) as exc:
                if self._cluster is None:
                    raise
                # The node is failing over: the re-plan subscribes again where the slot went, and the caller's
                # wait for the confirmation ends then.
                log.warning("%s: subscribing on %s failed (%s); re-planning", self._name, owner, type(exc).__name__)
                self._replan.set()

    async def _remove(self, kind: str, names: tuple[str, ...]) -> None:
        wanted: set[str] = getattr(self, kind)
        wanted.difference_update(names)
        for link in list(self._links.values()):
            held: set[str] = getattr(link, kind)
            dropped = [name for name in names if name in held]
            if not dropped:
                continue
            held.difference_update(dropped)
            # On failure the names are forgotten anyway: a reconnect does not subscribe them again.
            with contextlib.suppress(RedisError, OSError):
                await _command(link.pubsub, kind, dropped, subscribe=False)

    def _link(self, owner: str) -> _Link:
        link = self._links.get(owner)
        if link is not None:
            return link
        if self._cluster is None:
            link = _Link(node_name(self._redis), self._redis.pubsub(), None)
        else:
            node = self._cluster.get_node(node_name=owner)
            assert node is not None, owner
            options = getattr(self._cluster, "node_options", {}) if isinstance(self._cluster, HubRedisCluster) \
                else {}
            # socket_timeout None: a subscription is quiet by design; the silence probe watches it instead.
            client = Redis(host=node.host, port=int(node.port), decode_responses=False, socket_timeout=None, **options)
            link = _Link(owner, client.pubsub(), client)
        self._links[owner] = link
        if self._running:
            self._start_reader(link)
        return link

    def _start_reader(self, link: _Link) -> None:
        if link.task is None or link.task.done():
            link.task = asyncio.get_running_loop().create_task(self._read(link), name=f"{self._name}:{link.name}")

    # ------------------------------------------------------------------ reading, probing

    def _gap(self) -> None:
        self.gaps += 1
        if self._on_gap is not None:
            self._on_gap()

    async def _read(self, link: _Link) -> None:
        pubsub = link.pubsub
        loop = asyncio.get_running_loop()
        backoff = 0.05
        heard_at = loop.time()
        pinged_at: float | None = None  # when the unanswered PING went out; None when none is
        # Set by a failure; the first read that succeeds after it (redis-py connected and subscribed everything
        # again) reports a gap once more: what was published between the failure's gap read and the new
        # subscriptions was neither read nor announced here.
        broken = False
        while True:
            parser: _AsyncHiredisParser | None = None
            message: dict[str, Any] | None = None  # one redis-py read (without hiredis), dispatched below
            try:
                if not pubsub.subscribed:
                    # Nothing to read yet (or everything was unsubscribed): nothing can be lost either.
                    await asyncio.sleep(self._silence_s / 2)  # by design: an idle link has no socket to wait on
                    heard_at, pinged_at = loop.time(), None
                    continue
                parser = _hiredis_parser(pubsub)
                if parser is not None:
                    # Wait for the socket, then dispatch what came: redis-py's get_message costs a timeout, a
                    # retry wrapper and a parse call per wake-up before _drain_parsed's loop runs anyway.
                    try:
                        async with asyncio.timeout(self._silence_s / 2):
                            await parser.read_from_socket()  # type: ignore[no-untyped-call]
                    except TimeoutError:
                        heard = False
                    else:
                        heard = True
                        await self._drain_parsed(pubsub, parser)
                else:
                    message = await pubsub.get_message(timeout=self._silence_s / 2)
                    heard = message is not None
                    if broken:
                        broken = False
                        self._gap()
                now = loop.time()
                if heard:
                    heard_at, pinged_at = now, None
                elif pinged_at is not None and now - pinged_at > self._silence_s:
                    log.warning("%s: subscription connection to %s silent for %.1fs (no pong); reconnecting",
                                self._name, link.name, now - heard_at)
                    # The next get_message() connects again, and redis-py subscribes everything again.
                    if pubsub.connection is not None:
                        await pubsub.connection.disconnect()
                    heard_at, pinged_at = now, None
                    self._after_error()
                    broken = True
                    continue
                elif pinged_at is None and now - heard_at > self._silence_s:
                    await pubsub.ping()
                    pinged_at = now
            except (RedisError, OSError) as exc:
                log.warning("%s: subscription connection to %s lost (%s); reconnecting", self._name, link.name,
                            type(exc).__name__)
                self._after_error()
                broken = True
                if parser is not None and pubsub.connection is not None:
                    # Read past redis-py: disconnect, so that its next get_message connects and subscribes again.
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.connection.disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                heard_at, pinged_at = loop.time(), None
                continue
            backoff = 0.05
            if message is not None:
                self._handler(message)
                try:
                    await self._drain(pubsub)
                except (RedisError, OSError) as exc:
                    log.warning("%s: subscription connection to %s lost (%s); reconnecting", self._name, link.name,
                                type(exc).__name__)
                    self._after_error()
                    broken = True
                    heard_at, pinged_at = loop.time(), None

    async def _drain(self, pubsub: Any) -> None:
        """Dispatch the messages already received, without a timer each: a timed read (get_message with a
        timeout) wraps every message in an asyncio.timeout, a timer scheduled and cancelled per message (two
        messages per published entry: its keyspace notification and its announcement)."""
        parser = _hiredis_parser(pubsub)
        if parser is not None:
            await self._drain_parsed(pubsub, parser)
            return
        for _ in range(DRAIN_MAX):
            conn = pubsub.connection
            if conn is None or not await conn.can_read():
                return
            message = await pubsub.get_message(timeout=None)  # data is there: returns at once, untimed
            if message is not None:
                self._handler(message)

    async def _drain_parsed(self, pubsub: Any, parser: _AsyncHiredisParser) -> None:
        """_drain's way with hiredis: messages straight from the connection's hiredis reader. redis-py's
        get_message costs ~20 µs of CPU per message (a retry wrapper, a push-message hook that formats every
        message for a debug log, metrics hooks, a dict per message); a room's publish brings two messages.
        Anything but a (p)message (subscription confirmations, pongs) still goes through redis-py's
        handle_message, which keeps the subscription state."""
        reader: Any = parser._reader
        stream: Any = parser._stream
        handler = self._handler
        for _ in range(DRAIN_MAX):
            response = reader.gets()
            if response is NOT_ENOUGH_DATA:
                if not stream._buffer:
                    return  # everything received so far is dispatched
                await parser.read_from_socket()  # type: ignore[no-untyped-call]  # buffered: returns at once
                continue
            if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                handler({"type": "message", "pattern": None, "channel": response[1], "data": response[2]})
            elif isinstance(response, list) and len(response) == 4 and response[0] == b"pmessage":
                handler({"type": "pmessage", "pattern": response[1], "channel": response[2], "data": response[3]})
            else:
                if isinstance(response, Exception):
                    raise response
                message = await pubsub.handle_message(response)
                if message is not None:
                    handler(message)

    def _after_error(self) -> None:
        self._gap()  # notifications sent meanwhile are lost
        if self._cluster is not None:
            self._replan.set()  # the node may have failed over: ask the cluster where the slots are now

    # ------------------------------------------------------------------ topology

    async def _watch_topology(self) -> None:
        """Re-plan when the client's slot map changed (the hub's own commands refresh it when they meet MOVED),
        after a connection error (at once), and after asking the cluster every ``topology_check_s`` (a
        coordinated failover or a resharding raises no error on a subscription connection)."""
        if self._cluster is None:
            await asyncio.Event().wait()  # a standalone server has no topology; readers run until cancelled
            return
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        seen_map = self._slot_map()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self._topology_check_s)):
                    await self._replan.wait()
            urgent = self._replan.is_set()
            self._replan.clear()
            try:
                if urgent or loop.time() - asked_at >= self._topology_check_s:
                    asked_at = loop.time()
                    if urgent or await self._slots_changed():
                        await self._cluster.nodes_manager.initialize()
                current_map = self._slot_map()
                if current_map != seen_map or urgent:
                    seen_map = current_map
                    await self._apply_plan()
            except (RedisError, OSError) as exc:
                log.warning("%s: cannot read the cluster's slot map (%s); retrying", self._name, type(exc).__name__)
                await asyncio.sleep(0.5)  # by design: a failing-over cluster answers again within seconds
                self._replan.set()

    def _slot_map(self) -> tuple[str, ...]:
        """Which master serves each slot, as the client knows it now (redis-py updates it in place when a
        command meets MOVED, so it is compared by value)."""
        assert self._cluster is not None
        return tuple(nodes[0].name if nodes else "" for nodes in self._cluster.nodes_manager.slots_cache.values())

    async def _slots_changed(self) -> bool:
        """Whether the cluster says another master serves some slot than our slot map does (one CLUSTER SLOTS)."""
        assert self._cluster is not None
        # redis-py answers {(first slot, last slot): {"primary": (host, port), "replicas": [...]}}.
        reply: dict[tuple[int, int], dict[str, Any]] = await self._cluster.execute_command(
            "CLUSTER SLOTS", target_nodes=self._cluster.RANDOM)
        manager = self._cluster.nodes_manager
        for (first, _last), serving in reply.items():
            host, port = serving["primary"]
            try:
                known = manager.get_node_from_slot(int(first)).name
            except RedisError:
                return True
            if known != f"{_text(host)}:{int(port)}":
                return True
        return False

    async def _apply_plan(self) -> bool:
        """Subscribe everything where the current slot map says, drop what is elsewhere. True when anything
        moved (a gap: the caller re-reads)."""
        async with self._lock:
            plan = self._plan()
            moved = False
            for owner, link in list(self._links.items()):
                wanted = plan.get(owner, {})
                if owner not in plan:
                    del self._links[owner]
                    await link.close()
                    moved = True
                    continue
                for kind in ("channels", "shard_channels", "patterns"):
                    held: set[str] = getattr(link, kind)
                    extra = held - wanted.get(kind, set())
                    if extra:
                        held.difference_update(extra)
                        moved = True
                        with contextlib.suppress(RedisError, OSError):
                            await _command(link.pubsub, kind, sorted(extra), subscribe=False)
            for owner, kinds in plan.items():
                link = self._link(owner)
                for kind, names in kinds.items():
                    held = getattr(link, kind)
                    missing = names - held
                    if missing:
                        held.update(missing)
                        moved = True
                        try:
                            await _command(link.pubsub, kind, sorted(missing))
                        except (RedisError, OSError) as exc:
                            log.warning("%s: subscribing on %s failed (%s)", self._name, owner, type(exc).__name__)
                            self._replan.set()
            if moved:
                log.warning("%s: the cluster's slot map changed; subscriptions follow it (%s)", self._name,
                            ", ".join(f"{name}: {count}" for name, count in sorted(self.connections.items())))
                self._gap()
            return moved


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _command(pubsub: PubSub, kind: str, names: list[str], *, subscribe: bool = True) -> None:
    if kind == "channels":
        await (pubsub.subscribe(*names) if subscribe else pubsub.unsubscribe(*names))
    elif kind == "shard_channels":
        await (pubsub.ssubscribe(*names) if subscribe else pubsub.sunsubscribe(*names))
    else:
        await (pubsub.psubscribe(*names) if subscribe else pubsub.punsubscribe(*names))


def _hiredis_parser(pubsub: Any) -> _AsyncHiredisParser | None:
    """The subscription connection's hiredis parser, when it is connected and parses with hiredis; None otherwise
    (redis-py's get_message then connects, or reconnects and subscribes everything again)."""
    conn = pubsub.connection
    if conn is None or not conn.is_connected:
        return None
    parser = getattr(conn, "_parser", None)
    if isinstance(parser, _AsyncHiredisParser) and parser._reader is not None:
        return parser
    return None
