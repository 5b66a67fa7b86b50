"""hubctl: the operator's command line. A thin click shell over library functions."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import orjson

from hub.config import Config, load_config
from hub.errors import HubError

DEV_SECRET_FILE = Path(".hub-data/dev-secret")


def _config(ctx: click.Context, overrides: dict[str, Any] | None = None, *, require_auth: bool = True) -> Config:
    path = ctx.obj["config_path"]
    overrides = dict(overrides or {})
    if ctx.obj["dev"]:
        overrides.setdefault("auth.secret", _dev_secret())
        overrides.setdefault("auth.algorithm", "HS256")
    try:
        return load_config(path, os.environ, overrides, require_auth=require_auth)
    except HubError as exc:
        raise click.ClickException(exc.message) from None


def _dev_secret() -> str:
    """A random HS256 secret kept under .hub-data/, made on first use (development only)."""
    if os.environ.get("JWT_SECRET"):
        return os.environ["JWT_SECRET"]
    if not DEV_SECRET_FILE.exists():
        DEV_SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEV_SECRET_FILE.write_text(secrets.token_urlsafe(48), encoding="utf-8")
        DEV_SECRET_FILE.chmod(0o600)
    return DEV_SECRET_FILE.read_text(encoding="utf-8").strip()


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file (default: $HUB_CONFIG, else ./hub.yaml if present).")
@click.option("--dev", is_flag=True, help="Development mode: a generated JWT secret under .hub-data/.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, dev: bool) -> None:
    """Operate a streamhub node and its Redis."""
    if config_path is None:
        config_path = os.environ.get("HUB_CONFIG") or ("hub.yaml" if Path("hub.yaml").is_file() else None)
    ctx.obj = {"config_path": config_path, "dev": dev}


# ---------------------------------------------------------------------- serve


@cli.command()
@click.option("--host", default=None, help="Interface to bind (default from config: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from config: 8000).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, help="Processes sharing the port.")
@click.option("--embedded", is_flag=True, help="Always run a private embedded Redis.")
@click.option("--reuse-port", is_flag=True, hidden=True)
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int, embedded: bool,
          reuse_port: bool) -> None:
    """Run a hub node (WebSocket on /ws/connect, health on /ws/health)."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["server.host"] = host
    if port is not None:
        overrides["server.port"] = port
    if embedded:
        overrides["redis.embedded"] = "always"
    if ctx.obj["dev"]:
        overrides["server.dev_login"] = True  # the web UI's "log in as" (loopback clients only)
    config = _config(ctx, overrides)
    if workers > 1:
        if config.redis.embedded == "always":
            raise click.ClickException("--workers needs a shared Redis; --embedded runs one per process")
        sys.exit(_run_workers(config, workers))
    from hub.logs import setup_logging

    setup_logging(config.logging.level, config.logging.json)
    if ctx.obj["dev"]:
        click.echo("dev mode: mint a token with  hubctl --dev token 1; the web UI logs in by user name", err=True)
    _run_node(config, reuse_port)


def _run_node(config: Config, reuse_port: bool) -> None:
    import uvloop

    from hub.app import App

    async def main() -> None:
        app = App(config, reuse_port=reuse_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await app.start()
        except BaseException:
            await app.stop()
            raise
        _tune_collector()
        # One write: with --workers, several processes share this stdout and lines must not interleave.
        line = f"streamhub node {app.node_id} ready on ws://{config.server.host}:{app.port}/ws/connect\n"
        os.write(sys.stdout.fileno(), line.encode())
        click.echo(f"web UI: http://{config.server.host}:{app.port}/ui/ (dashboard: /ui/dashboard)", err=True)
        await stop.wait()
        await app.stop()

    try:
        uvloop.run(main())
    except HubError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


def _tune_collector() -> None:
    """For a serving node: what exists once it started (modules, config, the app) lives as long as the
    process, so gc.freeze() takes it out of every full collection (those then scan connections' objects
    only); and a young generation ten times the default (700), so a burst of handshakes does not trigger a
    collection every few connects. Together they cut the collector's time over 8,000 connects and closes
    from about 1.8 s to 0.6 s of CPU (timed with gc.callbacks)."""
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def _run_workers(config: Config, workers: int) -> int:
    """Run ``workers`` node processes on one port (SO_REUSEPORT); forward SIGTERM/SIGINT to them.

    When the embedded Redis is due (nothing configured, nothing answering), the parent starts one and
    every worker shares it."""
    from hub.embedded import EmbeddedRedis, redis_answers

    embedded: EmbeddedRedis | None = None
    env = dict(os.environ)
    if config.redis.embedded == "auto" and not config.redis_url_explicit and not redis_answers(config.redis.url):
        embedded = EmbeddedRedis(config.redis.embedded_dir)
        env["REDIS_URL"] = embedded.start()
        click.echo(f"no Redis answers at {config.redis.url}: workers share an embedded Redis", err=True)
    try:
        return _spawn_workers(workers, env)
    finally:
        if embedded is not None:
            embedded.stop()


def _spawn_workers(workers: int, env: dict[str, str]) -> int:
    argv = [a for a in sys.argv[1:]]
    cleaned: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        cleaned.append(arg)
    children = [subprocess.Popen([sys.executable, "-m", "cli.main", *cleaned, "--reuse-port"], env=env)
                for _ in range(workers)]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes)


# ---------------------------------------------------------------------- tokens and grants


@cli.command()
@click.argument("user_id")
@click.option("--role", "roles", multiple=True, help="Role claim (customer, manufacturer, support, admin).")
@click.option("--room", "rooms", multiple=True, help="Room to grant inside the token (signed claim).")
@click.option("--ttl", "ttl_s", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Lifetime in seconds.")
@click.option("--private-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key for RS*/ES* algorithms.")
@click.pass_context
def token(ctx: click.Context, user_id: str, roles: tuple[str, ...], rooms: tuple[str, ...], ttl_s: int,
          private_key: str | None) -> None:
    """Mint a JWT this hub accepts (development and testing)."""
    from hub.auth import is_valid_user_id, mint_token

    if not is_valid_user_id(user_id):
        raise click.BadParameter("user ids are 1-128 of A-Z a-z 0-9 _ . @ : -", param_hint="USER_ID")
    config = _config(ctx)
    key = Path(private_key).read_text(encoding="utf-8") if private_key else None
    try:
        click.echo(mint_token(config.auth, user_id, roles, rooms, ttl_s, private_key=key))
    except HubError as exc:
        raise click.ClickException(exc.message) from None


def _room(name: str, *, internal_ok: bool = False) -> str:
    """A room name, or (``internal_ok``) a notification target: inbox:USER, system, role:ROLE."""
    from hub.auth import KNOWN_ROLES, is_valid_user_id
    from hub.notifications import INBOX_PREFIX, ROLE_PREFIX, SYSTEM_ROOM
    from hub.rooms import parse_room

    if internal_ok:
        if name == SYSTEM_ROOM:
            return name
        if name.startswith(INBOX_PREFIX) and is_valid_user_id(name[len(INBOX_PREFIX):]):
            return name
        if name.startswith(ROLE_PREFIX) and name[len(ROLE_PREFIX):] in KNOWN_ROLES:
            return name
    try:
        return parse_room(name).name
    except HubError as exc:
        raise click.BadParameter(exc.message) from None


async def _with_streams(config: Config, action: Any) -> Any:
    from hub import redis_client
    from hub.keys import Keys
    from hub.lua import Scripts
    from hub.streams import Streams

    redis = redis_client.connect(config.redis.url, cluster=config.redis.is_cluster)
    try:
        db = redis_client.database(redis)
        scripts = Scripts(redis)
        await scripts.load()
        return await action(Streams(redis, scripts, Keys(config.redis.key_prefix, db)))
    finally:
        await redis.aclose()


def _audited(config: Config, command: str, what: str, action: Any, result_field: str | None = None,
             **detail: str | int | None) -> Any:
    """Wrap ``action(streams)``: once it succeeded, record an ``admin_action`` audit event (who ran
    which command on what; never a message body). ``result_field`` names the action's result in it."""

    async def run(streams: Any) -> Any:
        from redis.exceptions import RedisError

        from hub.audit import write_event

        result = await action(streams)
        if result_field is not None:
            detail[result_field] = str(result)
        try:
            await write_event(streams.redis, streams.keys, config.audit, f"hubctl@{_host()}", "admin_action",
                              who=_operator(), what=what, command=command, **detail)
        except (RedisError, OSError) as exc:
            click.echo(f"warning: done, but the audit event was not written: {exc}", err=True)
        return result

    return run


def _operator() -> str:
    """Who runs hubctl, as far as the OS knows."""
    import getpass

    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _host() -> str:
    import socket

    return socket.gethostname()[:64]


def _run(coro: Any) -> Any:
    from redis.exceptions import RedisError

    try:
        return asyncio.run(coro)
    except (RedisError, OSError) as exc:
        raise click.ClickException(f"Redis: {exc}") from None


@cli.command()
@click.argument("room")
@click.argument("user_ids", nargs=-1, required=True)
@click.pass_context
def grant(ctx: click.Context, room: str, user_ids: tuple[str, ...]) -> None:
    """Let USER_IDS read and write ROOM (order, quote and support rooms)."""
    name = _room(room)
    config = _config(ctx, require_auth=False)
    added = _run(_with_streams(config, _audited(config, "grant", name, lambda s: s.grant(name, list(user_ids)),
                                                users=",".join(user_ids))))
    click.echo(f"granted {name} to {added} new user(s)")


@cli.command()
@click.argument("room")
@click.argument("user_ids", nargs=-1, required=True)
@click.pass_context
def revoke(ctx: click.Context, room: str, user_ids: tuple[str, ...]) -> None:
    """Remove USER_IDS' grant on ROOM; connected members are removed within a second."""
    name = _room(room)
    config = _config(ctx, require_auth=False)
    removed = _run(_with_streams(config, _audited(config, "revoke", name, lambda s: s.revoke(name, list(user_ids)),
                                                  users=",".join(user_ids))))
    click.echo(f"revoked {name} from {removed} user(s)")


@cli.command("revoke-token")
@click.option("--jti", default=None, help="Revoke the one token whose jti claim this is.")
@click.option("--user", "user_id", default=None, help="Revoke every token of this user issued before now.")
@click.option("--ttl", "ttl_s", type=click.IntRange(min=1), default=None,
              help="Keep the revocation this many seconds. Default: 7 days for --jti (longer than a token "
                   "should live), forever for --user.")
@click.pass_context
def revoke_token(ctx: click.Context, jti: str | None, user_id: str | None, ttl_s: int | None) -> None:
    """Revoke a token (--jti) or every current token of a user (--user). A handshake or refresh with it
    is refused, and live connections using it are closed (code 4503) on every node within a second.
    With --user, tokens issued in the same second as the revocation are refused too."""
    from hub.auth import is_valid_user_id
    from hub.tokens import DEFAULT_JTI_TTL_S, RevocationStore

    if (jti is None) == (user_id is None):
        raise click.UsageError("give exactly one of --jti and --user")
    if jti is not None and not (0 < len(jti) <= 256 and jti.isprintable() and " " not in jti):
        raise click.BadParameter("a jti is 1-256 printable characters without spaces", param_hint="--jti")
    if user_id is not None and not is_valid_user_id(user_id):
        raise click.BadParameter("user ids are 1-128 of A-Z a-z 0-9 _ . @ : -", param_hint="--user")
    config = _config(ctx, require_auth=False)

    async def act(streams: Any) -> int:
        store = RevocationStore(streams.redis, streams.keys)
        if jti is not None:
            return await store.revoke_token(jti, ttl_s or DEFAULT_JTI_TTL_S)
        assert user_id is not None
        return await store.revoke_user(user_id, ttl_s=ttl_s)

    target = f"jti:{jti}" if jti is not None else f"user:{user_id}"
    heard = _run(_with_streams(config, _audited(config, "revoke-token", target, act, result_field="nodes_told")))
    click.echo(f"revoked {target}; {heard} node(s) told to close its connections")


# ---------------------------------------------------------------------- publish


@cli.command()
@click.argument("room")
@click.option("--type", "event_type", default="chat_message", show_default=True,
              type=click.Choice(["chat_message", "order_status_update", "quote_update", "payment_update",
                                 "system_notification", "deadline_reminder"]))
@click.option("--content", default=None, help="Text (required for chat_message).")
@click.option("--sender", "sender_id", default="system", show_default=True)
@click.option("--message-type", default="system", show_default=True,
              type=click.Choice(["text", "file", "image", "system"]))
@click.option("--data", default=None, help="JSON object for typed events, e.g. '{\"status\":\"shipped\"}'.")
@click.pass_context
def publish(ctx: click.Context, room: str, event_type: str, content: str | None, sender_id: str,
            message_type: str, data: str | None) -> None:
    """Append a message or backend event to ROOM's stream, as a backend's XADD would. ROOM may also
    be inbox:USER (one user's devices; kept for them while offline), system (everyone) or
    role:ROLE (everyone with that role)."""
    name = _room(room, internal_ok=True)
    fields: list[str | bytes] = ["type", event_type, "sender_id", sender_id,
                                 "created_at", str(int(time.time() * 1000))]
    if event_type == "chat_message":
        if not content:
            raise click.BadParameter("chat_message needs --content")
        fields += ["content", content, "message_type", message_type]
    elif content:
        fields += ["content", content]
    if data is not None:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise click.BadParameter("--data must be JSON") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("--data must be a JSON object")
        fields += ["data", orjson.dumps(parsed)]
    config = _config(ctx, require_auth=False)
    stream_id = _run(_with_streams(config, _audited(config, "publish", name, lambda s: s.append(name, fields),
                                                    result_field="id", type=event_type)))
    click.echo(stream_id)


@cli.command()
@click.argument("room")
@click.option("--text", required=True, help="What the reminder says.")
@click.option("--at", "at", default=None, help="When, ISO 8601 (e.g. 2026-12-01T09:00:00Z).")
@click.option("--in", "in_s", type=click.FloatRange(min=0), default=None, help="When, in seconds from now.")
@click.option("--data", default=None, help="Extra JSON object for the reminder's data.")
@click.pass_context
def remind(ctx: click.Context, room: str, text: str, at: str | None, in_s: float | None, data: str | None) -> None:
    """Schedule a deadline_reminder for ROOM (or inbox:USER); delivered once, at its time, by any node."""
    from datetime import datetime

    from hub.notifications import schedule_reminder

    name = _room(room, internal_ok=True)
    if (at is None) == (in_s is None):
        raise click.BadParameter("give exactly one of --at and --in")
    if at is not None:
        try:
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter("--at must be ISO 8601, e.g. 2026-12-01T09:00:00Z") from None
        if when.tzinfo is None:
            raise click.BadParameter("--at needs a time zone (Z or +hh:mm)")
        due_ms = int(when.timestamp() * 1000)
    else:
        due_ms = int((time.time() + (in_s or 0)) * 1000)
    extra = {}
    if data is not None:
        try:
            extra = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise click.BadParameter("--data must be JSON") from None
        if not isinstance(extra, dict):
            raise click.BadParameter("--data must be a JSON object")
    reminder = _run(_with_streams(_config(ctx, require_auth=False), lambda s: schedule_reminder(
        s.redis, s.keys, name, due_ms, text, extra)))
    click.echo(f"reminder {reminder.id} for {name} due {datetime.fromtimestamp(due_ms / 1000).isoformat()}")


# ---------------------------------------------------------------------- PostgreSQL and the archiver


@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the PostgreSQL schema (idempotent)."""
    config = _config(ctx, require_auth=False)

    async def run() -> list[str]:
        from consumers.schema import migrate as apply

        conn = await _pg_connect(config)
        try:
            return [f"{m.version:04d}_{m.name}" for m in await apply(conn)]
        finally:
            await conn.close()

    applied = _run_pg(run())
    click.echo(f"applied {', '.join(applied)}" if applied else "schema is current")


async def _pg_connect(config: Config) -> Any:
    import asyncpg

    schema = config.postgres.schema
    conn = await asyncpg.connect(config.postgres.url, timeout=10, server_settings={"search_path": schema})
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    return conn


def _run_pg(coro: Any) -> Any:
    import asyncpg

    try:
        return asyncio.run(coro)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"PostgreSQL: {exc}") from None


@cli.command("rotate-keys")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True, help="Rows per transaction.")
@click.pass_context
def rotate_keys(ctx: click.Context, batch: int) -> None:
    """Re-encrypt archived messages sealed with an older key under the current encryption.key.

    Resumable and idempotent: rows already under the current key are left alone. Keep the old keys in
    encryption.keys until this reports nothing left; entries still in Redis age out of the hot window."""
    from hub.crypto import DecryptError, load_keyring, message_aad
    from hub.history import row_created_ms

    config = _config(ctx, require_auth=False)
    ring = load_keyring(config.encryption.key, config.encryption.keys)
    if ring is None:
        raise click.ClickException("encryption.key (WEBSOCKET_ENCRYPTION_KEY) is not set")

    async def run() -> tuple[int, int]:
        conn = await _pg_connect(config)
        moved = failed = 0
        after: tuple[Any, ...] = ("", "", -1, -1)
        current = f"enc:v1:{ring.current_kid}:%"
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT room, epoch, stream_ms, stream_seq, stream_ts, sender_id, created_at, content "
                    "FROM messages WHERE content LIKE 'enc:v1:%' AND content NOT LIKE $1 "
                    "AND (room, epoch, stream_ms, stream_seq) > ($2, $3, $4, $5) "
                    "ORDER BY room, epoch, stream_ms, stream_seq LIMIT $6", current, *after, batch)
                if not rows:
                    return moved, failed
                async with conn.transaction():
                    for row in rows:
                        aad = message_aad(row["room"], row["sender_id"] or "", row_created_ms(row))
                        try:
                            sealed = ring.reencrypt(row["content"], aad)
                        except DecryptError:
                            failed += 1
                            continue
                        await conn.execute(
                            "UPDATE messages SET content = $1 WHERE room = $2 AND epoch = $3 AND stream_ms = $4 "
                            "AND stream_seq = $5 AND stream_ts = $6", sealed, row["room"], row["epoch"],
                            row["stream_ms"], row["stream_seq"], row["stream_ts"])
                        moved += 1
                last = rows[-1]
                after = (last["room"], last["epoch"], last["stream_ms"], last["stream_seq"])
        finally:
            await conn.close()

    moved, failed = _run_pg(run())
    click.echo(f"re-encrypted {moved} message(s) under key {ring.current_kid}"
               + (f"; {failed} could not be opened with the configured keys" if failed else ""))
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--burst", is_flag=True, help="Archive what is pending, print the counts, exit.")
@click.option("--name", default=None, help="Consumer name (stable across restarts; default: host name).")
@click.pass_context
def archiver(ctx: click.Context, burst: bool, name: str | None) -> None:
    """Archive every room stream, and the audit stream, into PostgreSQL (several may run at once)."""
    overrides = {"archiver.name": name} if name else {}
    config = _config(ctx, overrides, require_auth=False)
    from hub.logs import setup_logging

    setup_logging(config.logging.level, config.logging.json)

    async def run() -> Any:
        from consumers.archiver import Archiver
        from consumers.audit_archiver import AuditArchiver
        from consumers.scheduler import Scheduler
        from consumers.schema import is_current
        from hub import redis_client
        from hub.keys import Keys
        from hub.tasks import cancel_and_wait

        conn = await _pg_connect(config)
        try:
            if not await is_current(conn):
                raise click.ClickException("the schema is not current: run hubctl migrate")
        finally:
            await conn.close()
        # With a read timeout, like the hub's: a command sent into a black hole otherwise waits for TCP keepalive.
        redis = redis_client.connect(config.redis.url, cluster=config.redis.is_cluster,
                                     socket_timeout_s=config.redis.socket_timeout_s)
        db = redis_client.database(redis)
        worker = Archiver(redis, Keys(config.redis.key_prefix, db), config.postgres, config.archiver)
        audit_worker = AuditArchiver(redis, Keys(config.redis.key_prefix, db), config.postgres, config.archiver)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await worker.start()
            await audit_worker.start()
            print(f"archiver {worker.consumer} ready", flush=True)
            tasks = [asyncio.ensure_future(worker.run(burst=burst)),
                     asyncio.ensure_future(audit_worker.run(burst=burst))]
            if not burst:
                scheduler = Scheduler(redis, Keys(config.redis.key_prefix, db), lambda: _pg_connect(config),
                                      config.archiver.retention_months, worker.consumer)
                tasks.append(asyncio.ensure_future(scheduler.run(config.archiver.maintenance_interval_s)))
            stopper = asyncio.ensure_future(stop.wait())
            # Until stopped, or (burst) until both are drained, or until one of them fails.
            waiting: set[asyncio.Future[Any]] = {stopper, *tasks}
            while stopper in waiting and len(waiting) > 1:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if any(t is not stopper and t.exception() is not None for t in done):
                    break
            await cancel_and_wait([stopper, *tasks])
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return worker.stats, audit_worker.stats
        finally:
            await audit_worker.close()
            await worker.close()
            await redis.aclose()

    stats, audit_stats = _run_pg(run())
    click.echo(f"rows written: {stats.rows_written}, entries acked: {stats.entries_acked}, "
               f"dead-lettered: {stats.dead_lettered}, audit events archived: {audit_stats.rows_written}")


from cli.ops import register_ops  # noqa: E402

register_ops(cli)

from cli.maintenance import register_maintenance  # noqa: E402

register_maintenance(cli)

from cli.bench import register_bench  # noqa: E402

register_bench(cli)


@cli.command()
@click.option("--days", type=click.IntRange(1, 366), default=7, show_default=True, help="Period, ending now.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def report(ctx: click.Context, days: int, as_json: bool) -> None:
    """Usage report from the archive: messages, senders and rooms by room type, the busiest rooms.
    (The weekly one is also produced by the archivers' maintenance and kept in Redis.)"""
    from datetime import UTC, datetime, timedelta

    from consumers.scheduler import usage

    config = _config(ctx, require_auth=False)

    async def run() -> dict[str, Any]:
        conn = await _pg_connect(config)
        try:
            now = datetime.now(UTC)
            return await usage(conn, now - timedelta(days=days), now)
        finally:
            await conn.close()

    result = _run_pg(run())
    if as_json:
        click.echo(orjson.dumps(result).decode())
        return
    click.echo(f"usage {result['from'][:16]} .. {result['to'][:16]}: {result['messages']} messages, "
               f"{result['active_senders']} active senders")
    for kind, row in result["by_room_type"].items():
        click.echo(f"  {kind:10} {row['messages']:>9} messages {row['senders']:>7} senders {row['rooms']:>7} rooms")
    for row in result["busiest_rooms"]:
        click.echo(f"  busiest: {row['room']} ({row['messages']})")


def main() -> None:
    cli(prog_name="hubctl")


if __name__ == "__main__":
    main()
