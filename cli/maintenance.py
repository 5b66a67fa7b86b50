"""hubctl's repair commands: ``purge`` and ``replay``. A thin shell over :mod:`consumers.maintenance`.

purge is destructive, so it only shows its plan unless ``--yes`` is given. replay only adds what is
missing (running it twice changes nothing), so it applies unless ``--dry-run`` is given.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import click
import orjson

from consumers.maintenance import (
    Plan,
    purge_dead_nodes,
    purge_older_than,
    purge_room,
    replay_archive,
    replay_dead_letters,
    replay_deliver,
    replay_restore,
)
from hub.protocol import StreamId, parse_stream_id

ROOM_KINDS = ("order", "quote", "user", "support", "channel", "inbox", "role", "system")


def register_maintenance(group: click.Group) -> None:
    group.add_command(purge)
    group.add_command(replay)


def _ids(value: str | None, name: str) -> StreamId | None:
    if value is None:
        return None
    try:
        return parse_stream_id(value)
    except ValueError:
        raise click.BadParameter(f"{name} must be a stream id like 1700000000000-0") from None


async def _with_stores(ctx: click.Context, action: Any, *, postgres: bool = True) -> Plan:
    from redis.exceptions import RedisError

    from cli.main import _config, _host, _operator, _pg_connect
    from hub import redis_client
    from hub.audit import write_event
    from hub.keys import Keys

    config = _config(ctx, require_auth=False)
    redis = redis_client.connect(config.redis.url, cluster=config.redis.is_cluster)
    pg = await _pg_connect(config) if postgres else None
    try:
        db = redis_client.database(redis)
        keys = Keys(config.redis.key_prefix, db)
        plan: Plan = await action(redis, keys, pg)
        if plan.applied:
            try:
                await write_event(redis, keys, config.audit, f"hubctl@{_host()}", "admin_action", who=_operator(),
                                  what=plan.room or plan.details.get("kind", ""), command=plan.action,
                                  redis_entries=plan.redis_entries, postgres_rows=plan.postgres_rows)
            except (RedisError, OSError) as exc:
                click.echo(f"warning: done, but the audit event was not written: {exc}", err=True)
        return plan
    finally:
        if pg is not None:
            await pg.close()
        await redis.aclose()


def _run(ctx: click.Context, action: Any, *, postgres: bool = True) -> Plan:
    import asyncpg
    from redis.exceptions import RedisError

    try:
        return asyncio.run(_with_stores(ctx, action, postgres=postgres))
    except (RedisError, OSError) as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"PostgreSQL: {exc}") from None


def _report(plan: Plan, as_json: bool, hint: str) -> None:
    if as_json:
        click.echo(orjson.dumps(asdict(plan)).decode())
    else:
        where = f" {plan.room}" if plan.room else ""
        verb = "done" if plan.applied else "plan"
        extra = f", unarchived {plan.unarchived}" if plan.unarchived else ""
        extra += "".join(f", {k} {v}" for k, v in plan.details.items())
        click.echo(f"{plan.action}{where} ({verb}): redis entries {plan.redis_entries}, "
                   f"postgres rows {plan.postgres_rows}{extra}")
        if plan.refused:
            click.echo(f"refused: {plan.refused}")
        elif not plan.applied:
            click.echo(hint)
    if plan.refused:
        raise SystemExit(1)


def _room(name: str) -> str:
    from cli.main import _room as parse

    return parse(name, internal_ok=True)


# ---------------------------------------------------------------------------------------------- purge


@click.group()
def purge() -> None:
    """Remove history (shows the plan; --yes to do it). Never removes entries not yet archived."""


@purge.command("room")
@click.argument("room")
@click.option("--yes", is_flag=True, help="Really remove (otherwise: show what would go).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge_room_cmd(ctx: click.Context, room: str, yes: bool, as_json: bool) -> None:
    """Remove ROOM's whole history from Redis and PostgreSQL."""
    name = _room(room)
    plan = _run(ctx, lambda r, k, pg: purge_room(r, k, pg, name, apply=yes))
    _report(plan, as_json, "dry run: nothing removed (add --yes)")


@purge.command("dead-nodes")
@click.option("--yes", is_flag=True, help="Really remove (otherwise: show what would go).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge_dead_nodes_cmd(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Remove the consumer groups and stale presence of nodes whose registration expired."""
    plan = _run(ctx, lambda r, k, pg: purge_dead_nodes(r, k, apply=yes), postgres=False)
    _report(plan, as_json, "dry run: nothing removed (add --yes)")


@purge.command("older-than")
@click.option("--type", "kind", type=click.Choice(ROOM_KINDS), required=True, help="Room type.")
@click.option("--days", type=click.IntRange(min=1), required=True, help="Retention in days.")
@click.option("--yes", is_flag=True, help="Really remove (otherwise: show what would go).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge_older_cmd(ctx: click.Context, kind: str, days: int, yes: bool, as_json: bool) -> None:
    """Remove messages older than DAYS in rooms of TYPE (archived rows; archived stream entries)."""
    plan = _run(ctx, lambda r, k, pg: purge_older_than(r, k, pg, kind, timedelta(days=days), apply=yes))
    _report(plan, as_json, "dry run: nothing removed (add --yes)")


# ---------------------------------------------------------------------------------------------- replay


@click.group()
def replay() -> None:
    """Repair history: re-archive, restore into Redis, re-inject dead letters (idempotent)."""


@replay.command("archive")
@click.argument("room")
@click.option("--from", "first", default=None, help="First stream id (default: the stream's start).")
@click.option("--to", "last", default=None, help="Last stream id (default: the stream's end).")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay_archive_cmd(ctx: click.Context, room: str, first: str | None, last: str | None, dry_run: bool,
                       as_json: bool) -> None:
    """Store ROOM's stream range in PostgreSQL again (rows already there are kept)."""
    name, low, high = _room(room), _ids(first, "--from"), _ids(last, "--to")
    plan = _run(ctx, lambda r, k, pg: replay_archive(r, k, pg, name, low, high, apply=not dry_run))
    _report(plan, as_json, "dry run: nothing written")


@replay.command("restore")
@click.argument("room")
@click.option("--from", "first", default=None, help="First stream id (default: the archive's start).")
@click.option("--to", "last", default=None, help="Last stream id (default: the archive's end).")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay_restore_cmd(ctx: click.Context, room: str, first: str | None, last: str | None, dry_run: bool,
                       as_json: bool) -> None:
    """Put ROOM's archived range back into its stream after Redis lost it (original ids and epoch)."""
    name, low, high = _room(room), _ids(first, "--from"), _ids(last, "--to")
    plan = _run(ctx, lambda r, k, pg: replay_restore(r, k, pg, name, low, high, apply=not dry_run))
    _report(plan, as_json, "dry run: nothing written")


@replay.command("deliver")
@click.argument("room")
@click.option("--from", "first", default=None, help="First stream id (default: the stream's start).")
@click.option("--to", "last", default=None, help="Last stream id (default: the stream's end).")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay_deliver_cmd(ctx: click.Context, room: str, first: str | None, last: str | None, dry_run: bool,
                       as_json: bool) -> None:
    """Send a range of ROOM's stream to its live members again (frames marked replayed: true)."""
    name, low, high = _room(room), _ids(first, "--from"), _ids(last, "--to")
    plan = _run(ctx, lambda r, k, pg: replay_deliver(r, k, name, low, high, apply=not dry_run), postgres=False)
    _report(plan, as_json, "dry run: nothing sent")


@replay.command("dlq")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead-lettered entry.")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def replay_dlq_cmd(ctx: click.Context, ids: tuple[str, ...], everything: bool, dry_run: bool, as_json: bool) -> None:
    """Re-inject dead-lettered entries (record IDS, or --all) into their rooms, once the cause is fixed."""
    if not ids and not everything:
        raise click.BadParameter("give record ids or --all")
    chosen = None if everything else list(ids)
    plan = _run(ctx, lambda r, k, pg: replay_dead_letters(r, k, chosen, apply=not dry_run), postgres=False)
    _report(plan, as_json, "dry run: nothing written")
