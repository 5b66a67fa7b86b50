"""hubctl's operations commands: ``stats``, ``check`` and ``dlq``. A thin shell over :mod:`hub.ops`:
this module connects, calls, and prints (a table for people, ``--json`` for scripts).

Registered on the main group by :func:`register_ops`. cli.main imports this module at its end, so
this module imports cli.main only inside functions (no import cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson

from hub.config import Config
from hub.ops import Check, ClusterStats, DeadLetter

T = TypeVar("T")
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def register_ops(group: click.Group) -> None:
    group.add_command(stats)
    group.add_command(check)
    group.add_command(dlq)


# ---------------------------------------------------------------------------------------------- plumbing


def _load(ctx: click.Context) -> Config:
    from cli.main import _config

    return _config(ctx, require_auth=False)


async def _with_redis(config: Config, action: Callable[[Any, Any], Awaitable[T]]) -> T:
    from hub import redis_client
    from hub.keys import Keys

    redis = redis_client.connect(config.redis.url, cluster=config.redis.is_cluster, socket_timeout_s=30)
    try:
        db = redis_client.database(redis)
        return await action(redis, Keys(config.redis.key_prefix, db))
    finally:
        await redis.aclose()


def _run(coro: Awaitable[T]) -> T:
    from cli.main import _run as run_redis

    result: T = run_redis(coro)
    return result


def _echo_json(value: Any, *, indent: bool = True) -> None:
    option = orjson.OPT_INDENT_2 if indent else 0
    click.echo(orjson.dumps(value, option=option | orjson.OPT_NON_STR_KEYS).decode())


def _console() -> Any:
    from rich.console import Console

    # Not a terminal (a pipe, a file, a test): wide enough that tables are not folded.
    return Console(file=sys.stdout, markup=False, highlight=False, emoji=False,
                   width=None if sys.stdout.isatty() else 160)


def _table(*columns: str) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        numeric = column.endswith(("#", "connections", "rooms", "entries", "pending", "lag", "length",
                                   "memory", "/min", "/hour", "rows", "behind", "unarchived", "uptime", "age"))
        table.add_column(column.rstrip("#"), justify="right" if numeric else "left", overflow="fold")
    return table


def _section(console: Any, heading: str, table: Any) -> None:
    """A heading line, then the table (or "none"), then a blank line."""
    console.print(heading, style="bold")
    console.print(table if table.row_count else "  none")
    console.print()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _duration(seconds: int | float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172_800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _num(value: int | None, *, estimated: bool = False) -> str:
    if value is None:
        return "?"
    return f"~{value}" if estimated else str(value)


def _printable(text: str) -> str:
    """Control characters (a NUL in a poison entry, say) shown as escapes, other text as is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------------------------------------- stats


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one document; one line per refresh with --watch).")
@click.option("--watch", "watch_s", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Refresh every SECONDS until interrupted.")
@click.option("--top", "top_n", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rows in the top-N lists (streams, users, group rooms, archive lag).")
@click.option("--count", "refreshes", type=click.IntRange(min=1), default=None, hidden=True,
              help="With --watch: stop after this many refreshes.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool, watch_s: float | None, top_n: int, refreshes: int | None) -> None:
    """Show the cluster: nodes, connections, rooms, streams, consumer groups, dead letters, archive lag."""
    config = _load(ctx)

    async def run() -> None:
        from consumers.archiver import GROUP
        from hub.ops import collect_stats

        async def loop(redis: Any, keys: Any) -> None:
            pg: Any = None
            done = 0
            try:
                while True:
                    pg, pg_error = await _pg_open(config, pg)
                    snapshot = await collect_stats(redis, keys, archiver_group=GROUP, pg=pg, pg_error=pg_error,
                                                   top_n=top_n)
                    _emit_stats(snapshot, as_json=as_json, watching=watch_s is not None)
                    done += 1
                    if watch_s is None or (refreshes is not None and done >= refreshes):
                        return
                    await asyncio.sleep(watch_s)
            finally:
                if pg is not None:
                    await pg.close()

        await _with_redis(config, loop)

    with contextlib.suppress(KeyboardInterrupt):  # --watch ends with Ctrl-C
        _run(run())


async def _pg_open(config: Config, current: Any) -> tuple[Any, str | None]:
    """The stats connection (read-only use, the hub's schema on the search_path), reopened after a
    failure. Returns (connection or None, why not)."""
    import asyncpg

    from hub.ops import redact_url

    if current is not None and not current.is_closed():
        return current, None
    try:
        conn = await asyncpg.connect(config.postgres.url, timeout=5, server_settings={
            "search_path": config.postgres.schema, "statement_timeout": "10000",
            "application_name": "hubctl-stats"})
    except Exception as exc:  # OSError, TimeoutError or asyncpg's own: all mean "not now"
        return None, f"{redact_url(config.postgres.url)}: {type(exc).__name__}: {exc}"
    return conn, None


def _emit_stats(snapshot: ClusterStats, *, as_json: bool, watching: bool) -> None:
    if as_json:
        _echo_json(snapshot.to_dict(), indent=not watching)
        return
    console = _console()
    if watching and console.is_terminal:
        console.clear()
    _print_stats(console, snapshot)


def _print_stats(console: Any, s: ClusterStats) -> None:
    alive = [n for n in s.nodes if n.alive]
    console.print(f"streamhub stats at {_iso(s.generated_at_ms)} (redis {s.redis_version})", style="bold")
    console.print()

    nodes = _table("node", "state", "version", "host", "uptime", "connections", "rooms", "seen")
    for n in s.nodes:
        nodes.add_row(n.node_id, "alive" if n.alive else "gone", n.version or "-", n.host or "-",
                      _duration(n.uptime_s), _num(n.connections), _num(n.rooms),
                      "-" if n.seen_s_ago is None else f"{n.seen_s_ago}s ago")
    _section(console, f"Nodes: {len(alive)} alive, {len(s.nodes) - len(alive)} registered but gone", nodes)

    shards = _table("redis master", "keys", "memory", "ops/s", "commands", "clients", "hub streams")
    for sh in s.shards:
        shards.add_row(sh.node, _num(sh.keys), _size(sh.used_memory_bytes), _num(sh.ops_per_sec),
                       _num(sh.commands_processed), _num(sh.connected_clients), _num(sh.streams))
    _section(console, f"Redis: {len(s.shards)} shard(s)", shards)

    users = _table("user", "connections")
    for u in s.connections.top_users:
        users.add_row(u.user_id, str(u.connections))
    _section(console, f"Connections: {s.connections.total} on alive nodes, {s.connections.users} users; "
                      f"top {len(s.connections.top_users)} users", users)

    rooms = _table("type", "rooms", "entries", "msgs/min", "msgs/hour")
    for t in s.rooms_by_type:
        rooms.add_row(t.type, str(t.rooms), str(t.entries), str(t.messages_last_minute), str(t.messages_last_hour))
    estimated = ", estimated" if s.volume.estimated else ""
    _section(console, f"Rooms: {s.rooms_total} (messages from {s.volume.streams_read} of {s.volume.streams_active} "
                      f"streams active in the last hour{estimated})", rooms)

    totals = s.stream_totals
    memory = ("~" if totals.memory_estimated else "") + _size(totals.memory_bytes)
    streams = _table("room", "type", "length", "memory", "last id")
    for st in s.streams:
        streams.add_row(st.room, st.type, str(st.length), _size(st.memory_bytes), st.last_id or "-")
    _section(console, f"Streams: {totals.streams} holding {totals.entries} entries in {memory}; "
                      f"top {len(s.streams)} by length", streams)

    groups = _table("group", "role", "rooms", "pending", "lag", "lag unknown#")
    for g in s.groups:
        groups.add_row(g.group, g.role, str(g.rooms), str(g.pending), str(g.lag), str(g.lag_unknown_rooms))
    _section(console, "Consumer groups", groups)
    busiest = _table("room", "group", "role", "pending", "lag", "last delivered")
    for r in s.group_rooms:
        if r.pending or r.lag or r.lag is None:
            busiest.add_row(r.room, r.group, r.role, str(r.pending), _num(r.lag), r.last_delivered_id)
    if busiest.row_count:
        _section(console, "Group rooms with work waiting", busiest)

    dead = _table("consumer", "entries", "oldest age")
    for d in s.dead_letters:
        dead.add_row(d.consumer, str(d.entries), _duration(d.oldest_age_s))
    _section(console, "Dead letters", dead)

    archivers = _table("archiver", "group", "batches#", "rows", "last batch#", "last batch ms#", "retries#", "age")
    for c in s.consumers:
        archivers.add_row(c.consumer, c.group, str(c.batches), str(c.rows_written), str(c.last_batch_entries),
                          f"{c.last_batch_ms:.1f}", str(c.retries), _duration(c.seen_ms_ago / 1000))
    _section(console, "Archivers", archivers)

    pg = s.postgres
    if pg is None:
        console.print("PostgreSQL: not queried", style="bold")
    elif pg.error is not None:
        console.print(f"PostgreSQL: unavailable ({pg.error})", style="bold")
    else:
        kinds = ", ".join(f"{k} {v}" for k, v in pg.rows_by_type.items()) or "none"
        lag = _table("room", "archived id", "stream last id", "behind", "unarchived")
        for a in pg.archive_lag:
            lag.add_row(a.room, a.archived_id or "-", a.stream_last_id or "-",
                        "-" if a.behind_ms is None else f"{a.behind_ms} ms", _num(a.unarchived))
        _section(console, f"PostgreSQL: {pg.rows} rows in {pg.rooms} rooms ({kinds}); {pg.unarchived_entries} "
                          f"entries not archived yet in {pg.rooms_behind} rooms, newest archived at most "
                          f"{pg.max_behind_ms} ms behind", lag)


# ---------------------------------------------------------------------------------------------- check


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per check.")
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Check config, Redis, keyspace notifications, Lua scripts, PostgreSQL and the schema; exit 1 on
    any problem."""
    from cli.main import _config
    from consumers.schema import is_current
    from hub.ops import run_checks

    checks: list[Check] = []
    config: Config | None
    source = ctx.obj["config_path"] or "no file: defaults and environment"
    try:
        config = _config(ctx)
        checks.append(Check("config", True, str(source)))
    except click.ClickException as exc:
        checks.append(Check("config", False, exc.message))
        try:
            config = _config(ctx, require_auth=False)  # enough to check the servers
        except click.ClickException:
            config = None
    if config is None:
        checks += [Check(name, None, "not checked: no valid config")
                   for name in ("redis", "keyspace-events", "lua", "postgres", "schema")]
    else:
        checks += asyncio.run(run_checks(config.redis.url, config.postgres.url, config.postgres.schema,
                                         is_current, cluster=config.redis.is_cluster))
    failed = [c for c in checks if c.ok is not True]
    if as_json:
        _echo_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            label = "ok" if c.ok else ("FAIL" if c.ok is False else "skip")
            click.echo(f"{label:<4}  {c.name:<16} {c.detail}")
    if failed:
        ctx.exit(1)


# ---------------------------------------------------------------------------------------------- dlq


@click.group()
def dlq() -> None:
    """Inspect and remove dead letters: entries a consumer (the archiver) could not store."""


def _consumer_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--consumer", default=None, metavar="NAME",
                        help="Whose dead letters (default: the archiver's).")(f)


def _dlq_key(keys: Any, consumer: str | None) -> str:
    from consumers.archiver import GROUP

    key: str = keys.dead_letters(consumer or GROUP)
    return key


def _record_id(value: str) -> str:
    if not _STREAM_ID.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a dead-letter id (like 1712345678901-0)", param_hint="ID")
    return value


@dlq.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Records to show.")
@click.option("--json", "as_json", is_flag=True)
@_consumer_option
@click.pass_context
def dlq_list(ctx: click.Context, limit: int, as_json: bool, consumer: str | None) -> None:
    """List dead letters, oldest first: id, room, original entry id, when, why."""
    from hub.ops import list_dead_letters

    async def action(redis: Any, keys: Any) -> tuple[str, int, list[DeadLetter]]:
        key = _dlq_key(keys, consumer)
        total, records = await list_dead_letters(redis, key, limit)
        return key, total, records

    key, total, records = _run(_with_redis(_load(ctx), action))
    if as_json:
        _echo_json({"stream": key, "total": total, "dead_letters": [asdict(r) for r in records]})
        return
    if not records:
        click.echo(f"no dead letters in {key}")
        return
    table = _table("id", "room", "entry id", "at", "reason")
    for r in records:
        table.add_row(r.id, r.room or "-", r.entry_id or "-", _iso(r.at_ms), _printable((r.reason or "-")[:100]))
    _section(_console(), f"{key}: {total} dead letter(s), oldest {len(records)} shown", table)


@dlq.command("show")
@click.argument("record_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@_consumer_option
@click.pass_context
def dlq_show(ctx: click.Context, record_id: str, as_json: bool, consumer: str | None) -> None:
    """Show one dead letter: why it failed and the original entry's fields."""
    from hub.ops import get_dead_letter

    record_id = _record_id(record_id)

    async def action(redis: Any, keys: Any) -> tuple[str, DeadLetter | None]:
        key = _dlq_key(keys, consumer)
        return key, await get_dead_letter(redis, key, record_id)

    key, record = _run(_with_redis(_load(ctx), action))
    if record is None:
        raise click.ClickException(f"no dead letter {record_id} in {key}")
    if as_json:
        _echo_json(asdict(record))
        return
    click.echo(f"id        {record.id}")
    click.echo(f"room      {record.room or '-'}")
    click.echo(f"entry id  {record.entry_id or '-'}")
    click.echo(f"at        {_iso(record.at_ms)}")
    click.echo(f"reason    {_printable(record.reason or '-')}")
    click.echo("fields")
    width = max((len(name) for name in record.fields), default=0)
    for name, value in record.fields.items():
        click.echo(f"  {_printable(name):<{width}}  {_printable(value)}")


@dlq.command("drop")
@click.argument("record_ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "drop_all", is_flag=True, help="Every dead letter present now.")
@click.option("--yes", is_flag=True, help="Really remove them (without it, only print what would go).")
@_consumer_option
@click.pass_context
def dlq_drop(ctx: click.Context, record_ids: tuple[str, ...], drop_all: bool, yes: bool, consumer: str | None) -> None:
    """Remove dead letters by ID, or --all of them. Without --yes nothing is removed."""
    from hub.ops import drop_dead_letters, get_dead_letter, iter_dead_letter_ids

    if drop_all == bool(record_ids):
        raise click.UsageError("give dead-letter IDs or --all (not both)")
    wanted = [_record_id(r) for r in dict.fromkeys(record_ids)]

    async def action(redis: Any, keys: Any) -> tuple[str, list[DeadLetter | str], int]:
        key = _dlq_key(keys, consumer)
        chosen: list[DeadLetter | str] = []
        if drop_all:
            async for ids in iter_dead_letter_ids(redis, key):
                chosen.extend(ids)
        else:
            missing = []
            for record_id in wanted:
                record = await get_dead_letter(redis, key, record_id)
                if record is None:
                    missing.append(record_id)
                else:
                    chosen.append(record)
            if missing:
                raise click.ClickException(f"no dead letter {', '.join(missing)} in {key}; nothing removed")
        removed = 0
        if yes:
            removed = await drop_dead_letters(redis, key, [c if isinstance(c, str) else c.id for c in chosen])
        return key, chosen, removed

    key, chosen, removed = _run(_with_redis(_load(ctx), action))
    if yes:
        click.echo(f"removed {removed} dead letter(s) from {key}")
        return
    click.echo(f"would remove {len(chosen)} dead letter(s) from {key}:")
    for item in chosen[:50]:
        if isinstance(item, str):
            click.echo(f"  {item}")
        else:
            reason = _printable((item.reason or "")[:80])
            click.echo(f"  {item.id}  {item.room or '-'} {item.entry_id or '-'}  {reason}")
    if len(chosen) > 50:
        click.echo(f"  ... and {len(chosen) - 50} more")
    click.echo("nothing removed: run again with --yes to remove them")
