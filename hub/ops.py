"""Operator views of the whole cluster, read from Redis and PostgreSQL: what ``hubctl stats``, ``check``
and ``dlq`` show. Nothing here runs on a node's hot path.

Every question is bounded: keys are found with SCAN (never KEYS), replies are read in pipelined
chunks, and the costly ones (stream memory, message volume, group lag on Redis 6.2) are answered for
a bounded set of streams. An answer extrapolated from a sample says so (``estimated``); one that
cannot be given within the bound is ``None`` rather than a guess.

Read-only, except :func:`check_lua` (SCRIPT LOAD: idempotent, what every node does at start) and
:func:`drop_dead_letters`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hub import redis_client
from hub.keys import Keys
from hub.notifications import INBOX_PREFIX, ROLE_PREFIX, SYSTEM_ROOM
from hub.rooms import RoomKind

StreamId = tuple[int, int]
T = TypeVar("T")

MINUTE_MS = 60_000
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class StatsLimits:
    """How much work one ``stats`` run may do against Redis."""

    # Keys per SCAN call, and commands per pipelined round trip.
    scan_count: int = 1000
    pipeline_chunk: int = 500
    # MEMORY USAGE calls (the top streams by length, then a random sample for the total).
    memory_samples: int = 200
    # Streams read for message volume (those with an entry in the last hour; a random sample past this).
    volume_streams: int = 1000
    # Newest entries read per stream for message volume; a busier stream's rate is extrapolated.
    volume_entries_per_stream: int = 100
    # Entries counted per group when Redis does not report lag (6.2); past this the lag is None.
    lag_count_cap: int = 1000


# ---------------------------------------------------------------------------------------------- results


@dataclass
class NodeStats:
    node_id: str
    alive: bool  # its registration hash exists (refreshed every relay.node_heartbeat_s, expires after node_ttl_s)
    version: str | None = None
    host: str | None = None
    pid: int | None = None
    started_at: int | None = None  # unix seconds
    uptime_s: int | None = None
    connections: int | None = None  # as of its last heartbeat
    rooms: int | None = None
    seen_s_ago: int | None = None


@dataclass
class UserConnections:
    user_id: str
    connections: int


@dataclass
class ConnectionStats:
    total: int  # sum over alive nodes (each as of its last heartbeat)
    users: int  # users holding at least one live connection lease
    top_users: list[UserConnections] = field(default_factory=list)


@dataclass
class TypeStats:
    type: str
    rooms: int = 0
    entries: int = 0  # stream entries held in Redis (the hot window)
    messages_last_minute: int = 0
    messages_last_hour: int = 0


@dataclass
class StreamStats:
    room: str
    type: str
    length: int
    last_id: str | None  # newest entry still in the stream
    memory_bytes: int | None = None  # measured for the listed streams only


@dataclass
class StreamTotals:
    streams: int = 0
    entries: int = 0
    memory_bytes: int = 0
    memory_estimated: bool = False  # extrapolated from a random sample of streams


@dataclass
class GroupStats:
    """One consumer group summed over the rooms where it exists."""

    group: str
    role: str  # "node" (alive), "dead_node" (registered, expired), "archiver", "other"
    rooms: int = 0
    pending: int = 0  # read but not acknowledged
    lag: int = 0  # not read yet, summed over rooms where it is known
    lag_unknown_rooms: int = 0  # rooms where Redis gave no lag and counting it would pass the cap


@dataclass
class GroupRoomStats:
    room: str
    group: str
    role: str
    pending: int
    lag: int | None
    last_delivered_id: str


@dataclass
class VolumeStats:
    streams_read: int = 0
    streams_active: int = 0  # streams with an entry in the last hour
    estimated: bool = False  # a sample of streams, or a busy stream's rate extrapolated


@dataclass
class DeadLetterStats:
    consumer: str
    entries: int
    oldest_age_s: int | None


@dataclass
class ArchiveLag:
    room: str
    archived_id: str | None  # newest id in PostgreSQL's rooms table; None when nothing was archived
    stream_last_id: str | None
    behind_ms: int | None  # stream's newest entry minus the newest archived one, in stream time
    unarchived: int | None  # the archiver group's lag + pending (None without a group or a known lag)


@dataclass
class PostgresStats:
    error: str | None = None
    rows: int = 0  # archived messages (sum of rooms.message_count)
    rooms: int = 0
    rows_by_type: dict[str, int] = field(default_factory=dict)
    unarchived_entries: int = 0
    rooms_behind: int = 0
    max_behind_ms: int = 0
    archive_lag: list[ArchiveLag] = field(default_factory=list)  # the top rooms, most behind first


@dataclass
class ConsumerStats:
    """One archiver's own figures, published after each batch (gone 5 minutes after it stops)."""

    consumer: str
    group: str
    batches: int
    rows_written: int
    dead_lettered: int
    retries: int
    last_batch_entries: int
    last_batch_ms: float
    seen_ms_ago: int


@dataclass
class ShardStats:
    """One Redis master (the standalone server, or each master of a Redis Cluster)."""

    node: str  # host:port
    keys: int  # DBSIZE: every key on the shard, the hub's and any other
    used_memory_bytes: int
    ops_per_sec: int  # Redis' instantaneous_ops_per_sec
    commands_processed: int  # since the server started
    connected_clients: int
    streams: int  # the hub's room streams held by this shard


@dataclass
class ClusterStats:
    generated_at_ms: int
    redis_version: str
    nodes: list[NodeStats]
    connections: ConnectionStats
    rooms_total: int
    rooms_by_type: list[TypeStats]
    stream_totals: StreamTotals
    streams: list[StreamStats]  # the top N by length
    groups: list[GroupStats]
    group_rooms: list[GroupRoomStats]  # the top N by pending + lag
    volume: VolumeStats
    dead_letters: list[DeadLetterStats]
    postgres: PostgresStats | None
    consumers: list[ConsumerStats] = field(default_factory=list)
    shards: list[ShardStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- helpers


def room_type(room: str) -> str:
    """The room's kind (order, quote, user, support, channel) or its notification stream's kind
    (inbox, system, role)."""
    if room == SYSTEM_ROOM:
        return "system"
    if room.startswith(INBOX_PREFIX):
        return "inbox"
    if room.startswith(ROLE_PREFIX):
        return "role"
    kind, sep, _ = room.partition("_")
    return kind if sep and kind in {k.value for k in RoomKind} else "other"


def parse_id(raw: Any) -> StreamId | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, sep, seq = text.partition("-")
    if not (ms.isdigit() and (not sep or seq.isdigit())):
        return None
    return int(ms), int(seq or 0)


def format_id(sid: StreamId | None) -> str | None:
    return None if sid is None else f"{sid[0]}-{sid[1]}"


def key_parser(build: Callable[[str], str]) -> Callable[[str], str | None]:
    """The inverse of a one-argument key builder of :class:`Keys` (key strings stay in hub.keys)."""
    head, _, tail = build("\0").partition("\0")

    def parse(key: str) -> str | None:
        if len(key) < len(head) + len(tail) or not key.startswith(head) or not key.endswith(tail):
            return None
        return key[len(head):len(key) - len(tail)]

    return parse


def redact_url(url: str) -> str:
    """Drop a password from a URL before showing it."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


async def redis_now_ms(redis: Redis) -> int:
    """Redis's clock, which stamped every stream id (no skew against this machine's clock)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def scan_keys(redis: Redis, match: str, type_: str, count: int = 1000) -> list[str]:
    found = {_text(k) async for k in redis.scan_iter(match=match, count=count, _type=type_)}
    return sorted(found)


async def _pipelined(redis: Redis, items: Sequence[T], queue: Callable[[Any, T], object], chunk: int) -> list[Any]:
    """Queue the commands ``queue(pipeline, item)`` adds for each item, ``chunk`` items per round trip.
    Returns every command's result in order; a failed command's result is its exception (a key
    deleted between SCAN and now, for example)."""
    results: list[Any] = []
    for part in _chunks(items, chunk):
        pipe = redis.pipeline(transaction=False)
        for item in part:
            queue(pipe, item)
        results.extend(await pipe.execute(raise_on_error=False))
    return results


# ---------------------------------------------------------------------------------------------- nodes


async def node_stats(redis: Redis, keys: Keys, now_ms: int) -> list[NodeStats]:
    """Every registered node: alive while its registration hash exists."""
    ids = sorted(_text(m) for m in await redis.smembers(keys.nodes()))
    replies = await _pipelined(redis, ids, lambda p, n: p.hgetall(keys.node(n)), 500)
    result = []
    for node_id, reply in zip(ids, replies, strict=True):
        facts = {_text(k): _text(v) for k, v in reply.items()} if isinstance(reply, dict) else {}
        if not facts:
            result.append(NodeStats(node_id, alive=False))
            continue
        started = _int(facts.get("started_at"))
        seen = _int(facts.get("seen_at"))
        now_s = now_ms // 1000
        result.append(NodeStats(
            node_id, alive=True, version=facts.get("version"), host=facts.get("host"), pid=_int(facts.get("pid")),
            started_at=started, uptime_s=None if started is None else max(0, now_s - started),
            connections=_int(facts.get("connections")), rooms=_int(facts.get("rooms")),
            seen_s_ago=None if seen is None else max(0, now_s - seen)))
    return result


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def cluster_connections(redis: Redis, keys: Keys, nodes: list[NodeStats], now_ms: int, top_n: int,
                              limits: StatsLimits) -> ConnectionStats:
    """Connections from the nodes' heartbeats; per user from the live connection leases (scored by
    expiry on the Redis clock, so a dead node's connections stop counting one lease period later)."""
    total = sum(n.connections or 0 for n in nodes if n.alive)
    parse = key_parser(keys.connection_leases)
    lease_keys = await scan_keys(redis, keys.connection_leases("user:*"), "zset", limits.scan_count)
    counts = await _pipelined(redis, lease_keys, lambda p, k: p.zcount(k, f"({now_ms}", "+inf"),
                              limits.pipeline_chunk)
    users = []
    for key, count in zip(lease_keys, counts, strict=True):
        subject = parse(key) or ""
        if isinstance(count, int) and count > 0 and subject.startswith("user:"):
            users.append(UserConnections(subject[len("user:"):], count))
    users.sort(key=lambda u: (-u.connections, u.user_id))
    return ConnectionStats(total, len(users), users[:top_n])


# ---------------------------------------------------------------------------------------------- streams


@dataclass
class _Stream:
    room: str
    key: str
    length: int
    last_generated: StreamId | None
    last_entry: StreamId | None
    groups: list[dict[str, Any]]


async def _read_streams(redis: Redis, keys: Keys, limits: StatsLimits) -> list[_Stream]:
    stream_keys = await scan_keys(redis, keys.stream_pattern(), "stream", limits.scan_count)
    replies = await _pipelined(redis, stream_keys, lambda p, k: (p.xinfo_stream(k), p.xinfo_groups(k)),
                               limits.pipeline_chunk)
    streams = []
    for index, key in enumerate(stream_keys):
        info, groups = replies[2 * index], replies[2 * index + 1]
        room = keys.room_of_key(key)
        if room is None or isinstance(info, Exception) or isinstance(groups, Exception):
            continue  # deleted since the SCAN
        last_entry = info.get("last-entry")
        streams.append(_Stream(room, key, int(info.get("length", 0)), parse_id(info.get("last-generated-id")),
                               parse_id(last_entry[0]) if last_entry else None, list(groups or [])))
    return streams


async def _memory(redis: Redis, streams: list[_Stream], top: list[_Stream],
                  limits: StatsLimits) -> tuple[dict[str, int], StreamTotals]:
    """MEMORY USAGE of the top streams, and of a random sample for the total when there are too many
    streams to measure each."""
    totals = StreamTotals(streams=len(streams), entries=sum(s.length for s in streams))
    budget = max(limits.memory_samples, len(top))
    measured_all = len(streams) <= budget
    sample = streams if measured_all else random.sample(streams, max(1, budget - len(top)))
    wanted = {s.key: s for s in [*top, *sample]}
    replies = await _pipelined(redis, list(wanted), lambda p, k: p.memory_usage(k), limits.pipeline_chunk)
    sizes = {key: int(r) for key, r in zip(wanted, replies, strict=True) if isinstance(r, int)}
    if measured_all:
        totals.memory_bytes = sum(sizes.values())
    else:
        known = [sizes[s.key] for s in sample if s.key in sizes]
        totals.memory_bytes = int(sum(known) / max(1, len(known)) * len(streams))
        totals.memory_estimated = True
    return sizes, totals


async def _group_lags(redis: Redis, streams: list[_Stream], limits: StatsLimits) -> dict[tuple[str, str], int | None]:
    """Lag per (stream key, group). Redis 7 reports it; Redis 6.2 does not (and 7 says nil after
    deletions): then it is 0 when the group delivered the newest id, else the entries after the
    group's last-delivered id are counted, up to ``lag_count_cap`` (past it: None)."""
    lags: dict[tuple[str, str], int | None] = {}
    to_count: list[tuple[str, str, str]] = []
    for stream in streams:
        for group in stream.groups:
            name = _text(group.get("name"))
            lag = group.get("lag")
            if isinstance(lag, int):
                lags[(stream.key, name)] = lag
                continue
            delivered = parse_id(group.get("last-delivered-id")) or (0, 0)
            if stream.length == 0 or stream.last_generated is None or delivered >= stream.last_generated:
                lags[(stream.key, name)] = 0
            else:
                to_count.append((stream.key, name, f"({delivered[0]}-{delivered[1]}"))
    cap = limits.lag_count_cap
    # XRANGE returns entries, so the cap also bounds the bytes read; ids are all we look at.
    replies = await _pipelined(redis, to_count, lambda p, c: p.xrange(c[0], min=c[2], max="+", count=cap + 1),
                               max(1, limits.pipeline_chunk // 10))
    for (key, name, _), reply in zip(to_count, replies, strict=True):
        lags[(key, name)] = len(reply) if isinstance(reply, list) and len(reply) <= cap else None
    return lags


async def _volume(redis: Redis, streams: list[_Stream], now_ms: int,
                  limits: StatsLimits) -> tuple[dict[str, tuple[float, float]], VolumeStats]:
    """Entries per room type added in the last minute and hour: the newest entries of each stream
    active in the last hour (XREVRANGE by ms id, bounded), a random sample of streams past the limit."""
    hour_ago = now_ms - HOUR_MS
    active = [s for s in streams if s.last_entry is not None and s.last_entry[0] >= hour_ago]
    stats = VolumeStats(streams_active=len(active))
    sample = active if len(active) <= limits.volume_streams else random.sample(active, limits.volume_streams)
    weight = len(active) / len(sample) if sample else 1.0
    stats.streams_read = len(sample)
    stats.estimated = len(sample) < len(active)
    cap = limits.volume_entries_per_stream
    replies = await _pipelined(redis, sample, lambda p, s: p.xrevrange(s.key, max="+", min=f"{hour_ago}-0", count=cap),
                               max(1, limits.pipeline_chunk // 10))
    by_type: dict[str, tuple[float, float]] = {}
    for stream, reply in zip(sample, replies, strict=True):
        if not isinstance(reply, list) or not reply:
            continue
        stamps = [sid[0] for sid in (parse_id(eid) for eid, _ in reply) if sid is not None]
        minute = float(sum(1 for ms in stamps if ms >= now_ms - MINUTE_MS))
        hour = float(len(stamps))
        if len(reply) >= cap and stamps:
            # More entries than we read: extrapolate the rate over the span we saw.
            span_ms = max(1, now_ms - min(stamps))
            hour = cap * HOUR_MS / span_ms
            if min(stamps) >= now_ms - MINUTE_MS:
                minute = cap * MINUTE_MS / span_ms
            stats.estimated = True
        kind = room_type(stream.room)
        seen_minute, seen_hour = by_type.get(kind, (0.0, 0.0))
        by_type[kind] = (seen_minute + minute * weight, seen_hour + hour * weight)
    return by_type, stats


def _role(group: str, archiver_group: str, alive: set[str], registered: set[str]) -> str:
    if group == archiver_group:
        return "archiver"
    if group in alive:
        return "node"
    if group in registered:
        return "dead_node"
    return "other"


# ---------------------------------------------------------------------------------------------- dead letters


async def dead_letter_stats(redis: Redis, keys: Keys, now_ms: int, limits: StatsLimits) -> list[DeadLetterStats]:
    parse = key_parser(keys.dead_letters)
    dlq_keys = await scan_keys(redis, keys.dead_letters("*"), "stream", limits.scan_count)
    replies = await _pipelined(redis, dlq_keys, lambda p, k: (p.xlen(k), p.xrange(k, count=1)), limits.pipeline_chunk)
    result = []
    for index, key in enumerate(dlq_keys):
        length, first = replies[2 * index], replies[2 * index + 1]
        if not isinstance(length, int):
            continue
        oldest = parse_id(first[0][0]) if isinstance(first, list) and first else None
        result.append(DeadLetterStats(parse(key) or key, length,
                                      None if oldest is None else max(0, (now_ms - oldest[0]) // 1000)))
    return result


# ---------------------------------------------------------------------------------------------- PostgreSQL


async def postgres_stats(conn: Any, streams: list[_Stream], archiver_lags: dict[str, tuple[int, int | None]],
                         top_n: int) -> PostgresStats:
    """Archived rows (from the ``rooms`` table the archiver maintains, not a count over messages) and
    how far each room's archive is behind its stream. ``archiver_lags``: room -> (pending, lag)."""
    stats = PostgresStats()
    # rooms.kind is the name up to the first '_': notification streams (inbox:USER, role:ROLE) are
    # folded into one type each, as room_type() does.
    for row in await conn.fetch("""
            SELECT CASE WHEN kind LIKE 'inbox:%' THEN 'inbox' WHEN kind LIKE 'role:%' THEN 'role' ELSE kind END
                   AS kind, count(*) AS rooms, coalesce(sum(message_count), 0) AS rows
            FROM rooms GROUP BY 1 ORDER BY 1"""):
        stats.rows_by_type[row["kind"]] = int(row["rows"])
        stats.rows += int(row["rows"])
        stats.rooms += int(row["rooms"])
    archived: dict[str, StreamId] = {}
    rooms = [s.room for s in streams]
    for part in _chunks(rooms, 10_000):
        for row in await conn.fetch("SELECT room, last_stream_ms, last_stream_seq FROM rooms "
                                    "WHERE room = ANY($1::text[])", list(part)):
            archived[row["room"]] = (int(row["last_stream_ms"]), int(row["last_stream_seq"]))
    lags = []
    for stream in streams:
        done = archived.get(stream.room)
        behind = None
        if done is not None:
            behind = max(0, stream.last_entry[0] - done[0]) if stream.last_entry and stream.last_entry > done else 0
        group = archiver_lags.get(stream.room)
        unarchived = None if group is None or group[1] is None else group[0] + group[1]
        lag = ArchiveLag(stream.room, format_id(done), format_id(stream.last_entry), behind, unarchived)
        stats.unarchived_entries += unarchived or 0
        if (unarchived or 0) > 0 or (behind or 0) > 0:
            stats.rooms_behind += 1
        stats.max_behind_ms = max(stats.max_behind_ms, behind or 0)
        if stream.length or done is not None:  # an empty stream never archived has nothing to say
            lags.append(lag)
    lags.sort(key=lambda a: (-(a.unarchived or 0), -(a.behind_ms or 0), a.room))
    stats.archive_lag = lags[:top_n]
    return stats


# ---------------------------------------------------------------------------------------------- stats


async def collect_stats(redis: Redis, keys: Keys, *, archiver_group: str, pg: Any = None,
                        pg_error: str | None = None, top_n: int = 10,
                        limits: StatsLimits | None = None) -> ClusterStats:
    """One snapshot of the cluster. ``pg`` is an asyncpg connection whose search_path is the hub's
    schema, or None (``pg_error`` says why); a PostgreSQL failure is reported in the result, a Redis
    failure raises."""
    limits = limits or StatsLimits()
    now_ms = await redis_now_ms(redis)
    info = await redis.info("server", target_nodes="random") if redis_client.as_cluster(redis) is not None \
        else await redis.info("server")
    nodes = await node_stats(redis, keys, now_ms)
    alive = {n.node_id for n in nodes if n.alive}
    registered = {n.node_id for n in nodes}
    connections = await cluster_connections(redis, keys, nodes, now_ms, top_n, limits)

    streams = await _read_streams(redis, keys, limits)
    top = sorted(streams, key=lambda s: (-s.length, s.room))[:top_n]
    sizes, totals = await _memory(redis, streams, top, limits)
    lags = await _group_lags(redis, streams, limits)
    volume_by_type, volume = await _volume(redis, streams, now_ms, limits)

    types: dict[str, TypeStats] = {}
    for stream in streams:
        kind = types.setdefault(room_type(stream.room), TypeStats(room_type(stream.room)))
        kind.rooms += 1
        kind.entries += stream.length
    for kind_name, (minute, hour) in volume_by_type.items():
        kind = types.setdefault(kind_name, TypeStats(kind_name))
        kind.messages_last_minute, kind.messages_last_hour = round(minute), round(hour)

    groups: dict[str, GroupStats] = {}
    group_rooms: list[GroupRoomStats] = []
    archiver_lags: dict[str, tuple[int, int | None]] = {}
    for stream in streams:
        for group in stream.groups:
            name = _text(group.get("name"))
            role = _role(name, archiver_group, alive, registered)
            pending = int(group.get("pending") or 0)
            lag = lags.get((stream.key, name))
            summary = groups.setdefault(name, GroupStats(name, role))
            summary.rooms += 1
            summary.pending += pending
            if lag is None:
                summary.lag_unknown_rooms += 1
            else:
                summary.lag += lag
            group_rooms.append(GroupRoomStats(stream.room, name, role, pending, lag,
                                              _text(group.get("last-delivered-id", b"0-0"))))
            if name == archiver_group:
                archiver_lags[stream.room] = (pending, lag)
    group_rooms.sort(key=lambda g: (-(g.pending + (g.lag or 0)), g.room, g.group))

    postgres = None
    if pg is not None:
        try:
            postgres = await postgres_stats(pg, streams, archiver_lags, top_n)
        except Exception as exc:  # asyncpg's errors have no common root with OSError
            postgres = PostgresStats(error=f"{type(exc).__name__}: {exc}")
    elif pg_error is not None:
        postgres = PostgresStats(error=pg_error)

    return ClusterStats(
        generated_at_ms=now_ms,
        redis_version=_text(info.get("redis_version", "?")),
        nodes=nodes,
        connections=connections,
        rooms_total=len(streams),
        rooms_by_type=sorted(types.values(), key=lambda t: t.type),
        stream_totals=totals,
        streams=[StreamStats(s.room, room_type(s.room), s.length, format_id(s.last_entry), sizes.get(s.key))
                 for s in top],
        groups=sorted(groups.values(), key=lambda g: (g.role, g.group)),
        group_rooms=group_rooms[:top_n],
        volume=volume,
        dead_letters=await dead_letter_stats(redis, keys, now_ms, limits),
        postgres=postgres,
        consumers=await consumer_stats(redis, keys, now_ms, limits),
        shards=await shard_stats(redis, [s.key for s in streams]),
    )


async def shard_stats(redis: Redis, stream_keys: list[str]) -> list[ShardStats]:
    """Keys, memory, load and the hub's streams of each master (INFO and DBSIZE on each)."""
    infos = await redis_client.on_each_master(redis, "INFO")
    sizes = await redis_client.on_each_master(redis, "DBSIZE")
    cluster = redis_client.as_cluster(redis)
    streams: dict[str, int] = {}
    for key in stream_keys:
        owner = cluster.get_node_from_key(key) if cluster is not None else None
        name = owner.name if owner is not None else next(iter(infos))
        streams[name] = streams.get(name, 0) + 1
    return [ShardStats(node=name, keys=int(sizes.get(name) or 0), used_memory_bytes=int(info.get("used_memory", 0)),
                       ops_per_sec=int(info.get("instantaneous_ops_per_sec", 0)),
                       commands_processed=int(info.get("total_commands_processed", 0)),
                       connected_clients=int(info.get("connected_clients", 0)), streams=streams.get(name, 0))
            for name, info in sorted(infos.items())]


async def consumer_stats(redis: Redis, keys: Keys, now_ms: int, limits: StatsLimits) -> list[ConsumerStats]:
    """The archivers' published batch figures."""
    parse = key_parser(keys.consumer_stats)
    found = []
    for key in await scan_keys(redis, keys.consumer_stats("*"), "hash", limits.scan_count):
        name = parse(key)
        raw: Any = await redis.hgetall(key)
        if name is None or not raw:
            continue
        values = {_text(k): _text(v) for k, v in raw.items()}
        found.append(ConsumerStats(
            name, values.get("group", ""), int(values.get("batches", 0)), int(values.get("rows_written", 0)),
            int(values.get("dead_lettered", 0)), int(values.get("retries", 0)),
            int(values.get("last_batch_entries", 0)), float(values.get("last_batch_ms", 0)),
            max(0, now_ms - int(values.get("at_ms", now_ms)))))
    return sorted(found, key=lambda c: c.consumer)


# ---------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checked, because a check it depends on failed
    detail: str


async def check_redis(redis: Redis, url: str) -> Check:
    try:
        await redis.ping()
        info = await redis.info("server")
    except (RedisError, OSError) as exc:
        return Check("redis", False, f"{redact_url(url)}: {type(exc).__name__}: {exc}")
    return Check("redis", True, f"redis {_text(info.get('redis_version', '?'))} at {redact_url(url)}")


async def check_keyspace_events(redis: Redis) -> Check:
    """The relay and the archiver are woken by keyspace notifications on streams and grant sets."""
    from hub.app import REQUIRED_KEYSPACE_FLAGS

    try:
        reply: dict[Any, Any] = await redis.config_get("notify-keyspace-events")
    except RedisError as exc:
        return Check("keyspace-events", False, f"CONFIG GET refused ({exc}); cannot tell")
    flags = _text(reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b"")))
    have = set(flags)
    if "A" in have:
        have |= set("g$lshzxetd")
    missing = "".join(f for f in REQUIRED_KEYSPACE_FLAGS if f not in have)
    if missing:
        return Check("keyspace-events", False,
                     f"notify-keyspace-events={flags!r} lacks {missing}: live delivery waits for the sweep; "
                     f"CONFIG SET notify-keyspace-events {flags + missing} (nodes do it at start when "
                     "redis.configure_keyspace_events is true)")
    return Check("keyspace-events", True, f"notify-keyspace-events={flags!r}")


async def check_lua(redis: Redis) -> Check:
    from hub.lua import Scripts

    try:
        scripts = Scripts(redis)
        await scripts.load()
        shas = [s.sha for s in scripts.by_name.values()]
        exists = await redis.script_exists(*shas)
    except (RedisError, OSError) as exc:
        return Check("lua", False, f"{type(exc).__name__}: {exc}")
    missing = [name for name, there in zip(scripts.by_name, exists, strict=True) if not there]
    if missing:
        return Check("lua", False, f"not loaded: {', '.join(missing)}")
    return Check("lua", True, f"{len(shas)} scripts loaded")


async def check_postgres(url: str, schema: str, schema_is_current: Callable[[Any], Awaitable[bool]],
                         timeout_s: float = 5.0) -> list[Check]:
    """PostgreSQL reachable, and the hub's schema migrated (``schema_is_current`` is
    :func:`consumers.schema.is_current`: hub does not import consumers)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=timeout_s, server_settings={"search_path": schema})
    except Exception as exc:  # asyncpg raises OSError, TimeoutError or its own errors
        return [Check("postgres", False, f"{redact_url(url)}: {type(exc).__name__}: {exc}"),
                Check("schema", None, "not checked: PostgreSQL unreachable")]
    try:
        version = await conn.fetchval("SHOW server_version")
        checks = [Check("postgres", True, f"PostgreSQL {version} at {redact_url(url)}")]
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema):
            checks.append(Check("schema", False, f"schema {schema!r} does not exist: run hubctl migrate"))
        elif not await schema_is_current(conn):
            checks.append(Check("schema", False, f"schema {schema!r} is not current: run hubctl migrate"))
        else:
            checks.append(Check("schema", True, f"schema {schema!r} is current"))
        return checks
    except Exception as exc:
        return [Check("postgres", False, f"{type(exc).__name__}: {exc}"),
                Check("schema", None, "not checked: PostgreSQL failed")]
    finally:
        await conn.close()


async def run_checks(redis_url: str, pg_url: str, pg_schema: str,
                     schema_is_current: Callable[[Any], Awaitable[bool]], *, cluster: bool = False) -> list[Check]:
    """Redis reachable, keyspace notifications on, Lua scripts loaded, PostgreSQL reachable, schema
    current. Never raises for an unreachable server: that is a failed check."""
    checks: list[Check] = []
    redis = redis_client.connect(redis_url, cluster=cluster, connect_timeout_s=3, socket_timeout_s=5)
    try:
        checks.append(await check_redis(redis, redis_url))
        if checks[-1].ok:
            checks.append(await check_keyspace_events(redis))
            checks.append(await check_lua(redis))
        else:
            checks += [Check("keyspace-events", None, "not checked: Redis unreachable"),
                       Check("lua", None, "not checked: Redis unreachable")]
    finally:
        await redis.aclose()
    checks += await check_postgres(pg_url, pg_schema, schema_is_current)
    return checks


# ---------------------------------------------------------------------------------------------- dead letters


@dataclass
class DeadLetter:
    """One dead-letter record: the entry a consumer could not process, why, and its original fields."""

    id: str  # the record's id in the dead-letter stream (what show and drop take)
    room: str | None
    entry_id: str | None  # the original entry's id in the room's stream
    reason: str | None
    at_ms: int | None
    fields: dict[str, str]  # original fields; bytes that are not UTF-8 are shown as \\xNN


def _dead_letter(entry_id: Any, raw: dict[Any, Any]) -> DeadLetter:
    meta: dict[str, str] = {}
    fields: dict[str, str] = {}
    for key, value in (raw or {}).items():
        name = _text(key)
        if name.startswith("f:"):
            fields[name[2:]] = _text(value)
        else:
            meta[name] = _text(value)
    return DeadLetter(_text(entry_id), meta.get("_room"), meta.get("_id"), meta.get("_reason"),
                      _int(meta.get("_at")), fields)


async def list_dead_letters(redis: Redis, stream_key: str, limit: int) -> tuple[int, list[DeadLetter]]:
    """The stream's length and its oldest ``limit`` records, oldest first."""
    total = await redis.xlen(stream_key)
    records: Any = await redis.xrange(stream_key, count=limit)
    return int(total), [_dead_letter(eid, fields) for eid, fields in records]


async def get_dead_letter(redis: Redis, stream_key: str, record_id: str) -> DeadLetter | None:
    records: Any = await redis.xrange(stream_key, min=record_id, max=record_id, count=1)
    return _dead_letter(records[0][0], records[0][1]) if records else None


async def iter_dead_letter_ids(redis: Redis, stream_key: str, chunk: int = 1000) -> AsyncIterator[list[str]]:
    """Every record id present now, oldest first, ``chunk`` at a time (records added meanwhile may or
    may not be included)."""
    start = "-"
    while True:
        records: Any = await redis.xrange(stream_key, min=start, max="+", count=chunk)
        if not records:
            return
        ids = [_text(eid) for eid, _ in records]
        yield ids
        if len(records) < chunk:
            return
        start = f"({ids[-1]}"


async def drop_dead_letters(redis: Redis, stream_key: str, record_ids: Sequence[str]) -> int:
    """XDEL the given records (never more: records added after they were listed stay). Returns how
    many existed."""
    removed = 0
    for part in _chunks(record_ids, 1000):
        removed += int(await redis.xdel(stream_key, *part))
    return removed
