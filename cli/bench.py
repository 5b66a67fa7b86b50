"""``hubctl bench <scenario>``: the load generator's command line, a thin shell over :mod:`bench`.

Registered on the main group by :func:`register_bench` (cli.main imports this module at its end, so
this module imports cli.main only inside functions). Progress and per-run summaries go to stderr; stdout
gets the median line, or with ``--json`` one JSON document (shape: :mod:`bench.report`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import orjson

from hub.config import AuthConfig, Config

F = Callable[..., Any]
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def register_bench(group: click.Group) -> None:
    group.add_command(bench)


@click.group()
def bench() -> None:
    """Load-test a hub: fan-out, rooms, connects, idle memory, a rate ramp, the publish path, the archiver.

    By default each run starts its own hub (``hubctl serve`` on a free loopback port, its own key prefix
    on the configured Redis, limits lifted) and stops it afterwards; ``--url`` loads an existing hub
    instead (give ``--server-pid`` to sample its CPU and memory). Every run deletes the Redis keys it made."""


def _target_options(func: F) -> F:
    @click.option("--url", default=None, help="Load this existing hub (ws://127.0.0.1:PORT) instead of starting one.")
    @click.option("--server-pid", type=int, default=None,
                  help="With --url: the hub's PID, sampled (with its children) for CPU and RSS.")
    @click.option("--secret", default=None, envvar="BENCH_JWT_SECRET",
                  help="With --url: the hub's HS* JWT secret (default: the config's auth.secret).")
    @click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
                  help="Processes of the hub started here (hubctl serve --workers).")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def _output_options(func: F) -> F:
    @click.option("--runs", type=click.IntRange(1, 99), default=1, show_default=True,
                  help="Repeat the run; the medians are reported (each run gets a fresh hub).")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
    @click.option("--quiet", is_flag=True, help="No progress on stderr.")
    @click.option("--max-seconds", type=click.FloatRange(min=1), default=None,
                  help="Hard stop for each run (default: computed from the scenario's durations).")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def _progress(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda _line: None
    return lambda line: click.echo(line, err=True)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    from bench.report import median_line

    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(median_line(result))
    if result["worst"].get("aborted"):
        raise SystemExit(2)


def _run_load(ctx: click.Context, name: str, scenario: Callable[..., Awaitable[None]], params: dict[str, Any],
              opts: dict[str, Any], default_max_s: float, open_files: int) -> dict[str, Any]:
    """Build the target spec from the config and options, run the scenario ``--runs`` times, emit."""
    import uvloop

    from bench.runner import TargetSpec, raise_open_files_limit, run_scenario
    from cli.main import _config

    config: Config = _config(ctx, require_auth=False)
    raise_open_files_limit(open_files)
    url = opts["url"]
    auth = None
    if url is not None:
        secret = opts["secret"] or config.auth.secret
        if not config.auth.algorithm.startswith("HS") or not secret:
            raise click.UsageError("--url needs the hub's HS* JWT secret: --secret, BENCH_JWT_SECRET, "
                                   "JWT_SECRET or the config's auth.secret")
        auth = AuthConfig(algorithm=config.auth.algorithm, secret=secret, audience=config.auth.audience,
                          issuer=config.auth.issuer, token_type=config.auth.token_type)
    elif opts["server_pid"] is not None:
        raise click.UsageError("--server-pid goes with --url (a hub started here is sampled anyway)")
    spec = TargetSpec(redis_url=config.redis.url, key_prefix=config.redis.key_prefix, url=url,
                      server_pid=opts["server_pid"], workers=opts["workers"], auth=auth,
                      database_url=config.postgres.url)

    async def scenario_with_params(run: Any, result: dict[str, Any]) -> None:
        await scenario(run, result, **params)

    try:
        result = uvloop.run(run_scenario(name, scenario_with_params, spec, runs=opts["runs"],
                                         max_seconds=opts["max_seconds"] or default_max_s,
                                         payload_bytes=opts.get("payload", 64), progress=_progress(opts["quiet"])))
    except (RuntimeError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    _emit(result, opts["as_json"])
    return result


_payload = click.option("--payload", type=click.IntRange(0, 60_000), default=64, show_default=True,
                        help="Bytes of padding in each message body.")
_concurrency = click.option("--concurrency", type=click.IntRange(1, 10_000), default=100, show_default=True,
                            help="Connection handshakes in flight at once.")
_drain = click.option("--drain", "drain_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
                      help="After the last publish, stop waiting when nothing arrived for this many seconds.")
_drain_max = click.option("--drain-max", "drain_max_s", type=click.FloatRange(min=0.1), default=30.0,
                          show_default=True, help="Never wait longer than this after the last publish.")



def _load_options(func: F) -> F:
    """The options every publishing scenario takes: drain, payload, handshake concurrency, target, output."""
    for option in reversed((_drain, _drain_max, _payload, _concurrency, _target_options, _output_options)):
        func = option(func)
    return func


@bench.command()
@click.option("--subs", type=click.IntRange(1, 100_000), default=200, show_default=True, help="Members S.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=50.0, show_default=True,
              help="Publisher's messages per second R.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Publishing time in seconds.")
@_load_options
@click.pass_context
def fanout(ctx: click.Context, /, subs: int, rate: float, duration_s: float, drain_s: float, drain_max_s: float,
           concurrency: int, **opts: Any) -> None:
    """S members in one room, one more member publishing R msg/s (S x R deliveries/s)."""
    from bench.scenarios import fanout as scenario

    _run_load(ctx, "fanout", scenario, {"subs": subs, "rate": rate, "duration_s": duration_s, "drain_s": drain_s,
                                        "drain_max_s": drain_max_s, "concurrency": concurrency},
              opts, default_max_s=duration_s + drain_max_s + 120, open_files=subs + 1000)


@bench.command()
@click.option("--rooms", "room_count", type=click.IntRange(1, 100_000), default=500, show_default=True,
              help="Rooms K.")
@click.option("--members", type=click.IntRange(2, 10_000), default=2, show_default=True,
              help="Members per room M (each one publishes).")
@click.option("--member-rate", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Messages per second per member r.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Publishing time in seconds.")
@_load_options
@click.pass_context
def rooms(ctx: click.Context, /, room_count: int, members: int, member_rate: float, duration_s: float, drain_s: float,
          drain_max_s: float, concurrency: int, **opts: Any) -> None:
    """K rooms x M members, every member publishing r msg/s (K x M x r publishes/s)."""
    from bench.scenarios import rooms as scenario

    _run_load(ctx, "rooms", scenario, {"rooms": room_count, "members": members, "member_rate": member_rate,
                                       "duration_s": duration_s, "drain_s": drain_s, "drain_max_s": drain_max_s,
                                       "concurrency": concurrency},
              opts, default_max_s=duration_s + drain_max_s + 180, open_files=room_count * members + 1000)


@bench.command()
@click.option("--conns", type=click.IntRange(1, 100_000), default=2000, show_default=True, help="Connections N.")
@_concurrency
@_target_options
@_output_options
@click.pass_context
def connect(ctx: click.Context, /, conns: int, concurrency: int, **opts: Any) -> None:
    """Open N connections, each with its own real JWT: connects per second and per server CPU-second."""
    from bench.scenarios import connect as scenario

    _run_load(ctx, "connect", scenario, {"conns": conns, "concurrency": concurrency}, opts,
              default_max_s=120 + conns / 100, open_files=conns + 1000)


@bench.command()
@click.option("--conns", type=click.IntRange(1, 100_000), default=5000, show_default=True, help="Connections N.")
@click.option("--hold", "hold_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds to hold them idle after connecting and joining.")
@click.option("--room-size", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Members per room (each connection is in two rooms).")
@_concurrency
@_target_options
@_output_options
@click.pass_context
def idle(ctx: click.Context, /, conns: int, hold_s: float, room_size: int, concurrency: int, **opts: Any) -> None:
    """N idle authenticated connections, each in two rooms: server memory (RSS) per connection."""
    from bench.scenarios import idle as scenario

    _run_load(ctx, "idle", scenario, {"conns": conns, "hold_s": hold_s, "room_size": room_size,
                                      "concurrency": concurrency},
              opts, default_max_s=hold_s + 180 + conns / 50, open_files=conns + 1000)


def _ramp_options(func: F) -> F:
    @click.option("--subs", type=click.IntRange(1, 100_000), default=500, show_default=True, help="Members S.")
    @click.option("--start", "start_rate", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                  help="First step's publish rate (msg/s).")
    @click.option("--factor", type=click.FloatRange(min=1.01), default=1.5, show_default=True,
                  help="Rate multiplier per step.")
    @click.option("--step", "step_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                  help="Seconds per step.")
    @click.option("--step-drain", "step_drain_s", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
                  help="Longest drain after each step (a backlog past it fails the step).")
    @click.option("--max-steps", type=click.IntRange(1, 100), default=12, show_default=True)
    @click.option("--p99-limit", "p99_limit_ms", type=click.FloatRange(min=0.1), default=500.0, show_default=True,
                  help="A step fails when its p99 latency (ms) exceeds this.")
    @click.option("--min-delivery", type=click.FloatRange(0, 1), default=0.999, show_default=True,
                  help="A step fails when delivered/expected falls below this.")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write a PNG of p50/p99 latency vs offered load (needs the 'bench' extra: matplotlib).")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def _ramp(ctx: click.Context, name: str, subs: int, plot_path: Path | None, concurrency: int,
          ramp_args: dict[str, Any], opts: dict[str, Any], open_target: Any = None) -> None:
    from bench.scenarios import RampLimits
    from bench.scenarios import ramp as scenario

    if plot_path is not None:
        from bench.plot import require_matplotlib

        require_matplotlib()
    limits = RampLimits(**ramp_args)
    default_max_s = limits.max_steps * (limits.step_s + limits.step_drain_s + 2) + 180
    if open_target is None:
        result = _run_load(ctx, name, scenario, {"subs": subs, "limits": limits, "concurrency": concurrency}, opts,
                           default_max_s=default_max_s, open_files=subs + 1000)
    else:
        result = open_target(scenario, {"subs": subs, "limits": limits, "concurrency": concurrency},
                             default_max_s)
    if plot_path is not None:
        from bench.plot import plot_ramp

        plot_ramp(result, plot_path)
        click.echo(f"plot written to {plot_path}", err=True)


@bench.command()
@_ramp_options
@_payload
@_concurrency
@_target_options
@_output_options
@click.pass_context
def ramp(ctx: click.Context, /, subs: int, plot_path: Path | None, concurrency: int, start_rate: float, factor: float,
         step_s: float, step_drain_s: float, max_steps: int, p99_limit_ms: float, min_delivery: float,
         **opts: Any) -> None:
    """One room of S members; raise the publish rate each step until p99 > limit or delivery < minimum."""
    _ramp(ctx, "ramp", subs, plot_path, concurrency,
          {"start_rate": start_rate, "factor": factor, "step_s": step_s, "step_drain_s": step_drain_s,
           "max_steps": max_steps, "p99_limit_ms": p99_limit_ms, "min_delivery": min_delivery}, opts)


@bench.command()
@click.option("--clients", type=click.IntRange(1, 100_000), default=20, show_default=True,
              help="Publishing connections N.")
@click.option("--messages", type=click.IntRange(1, 10_000_000), default=1000, show_default=True,
              help="Messages per client M.")
@click.option("--window", type=click.IntRange(1, 100_000), default=32, show_default=True,
              help="Unacknowledged messages per client at most.")
@click.option("--rooms", "room_count", type=click.IntRange(1, 100_000), default=10, show_default=True,
              help="Client c publishes in room c mod ROOMS (its members receive each other's messages).")
@_payload
@_concurrency
@_target_options
@_output_options
@click.pass_context
def publish(ctx: click.Context, /, clients: int, messages: int, window: int, room_count: int, concurrency: int,
            **opts: Any) -> None:
    """Publish path: client messages/s a node accepts (rate check, Lua XADD, ack) and ack latency."""
    from bench.scenarios import publish as scenario

    _run_load(ctx, "publish", scenario, {"clients": clients, "messages": messages, "window": window,
                                         "rooms": room_count, "concurrency": concurrency},
              opts, default_max_s=300, open_files=clients + 1000)


@bench.command()
@click.option("--rows", type=click.IntRange(1, 10_000_000), default=50_000, show_default=True,
              help="Messages per run.")
@click.option("--rooms", "room_count", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Room streams the archiver reads.")
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=500, show_default=True,
              help="Rows per raw COPY.")
@click.option("--archiver-batch", type=click.IntRange(1, 1_000_000), default=None,
              help="The archiver's batch_max_rows and read_count (default: its config default).")
@click.option("--database-url", default=None, envvar="BENCH_DATABASE_URL",
              help=f"PostgreSQL to write to (fresh schemas, dropped afterwards) [default: {DEFAULT_PG_URL}].")
@click.option("--runs", type=click.IntRange(1, 99), default=1, show_default=True, help="Runs; medians reported.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.pass_context
def archive(ctx: click.Context, rows: int, room_count: int, batch: int, archiver_batch: int | None,
            database_url: str | None, runs: int, as_json: bool, quiet: bool) -> None:
    """Archiver throughput: stream -> PostgreSQL rows/s (committed and acked) against raw COPY."""
    import uvloop

    from bench.archive import run_archive
    from cli.main import _config

    config: Config = _config(ctx, require_auth=False)
    pg_url = database_url or os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG_URL
    try:
        result = uvloop.run(run_archive(config.redis.url, pg_url, rows=rows, rooms=room_count, copy_batch=batch,
                                        archiver_batch=archiver_batch, runs=runs, progress=_progress(quiet)))
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    _emit(result, as_json)


@bench.command()
@_ramp_options
@_payload
@_concurrency
@_output_options
@click.pass_context
def calibrate(ctx: click.Context, /, subs: int, plot_path: Path | None, concurrency: int, start_rate: float,
              factor: float, step_s: float, step_drain_s: float, max_steps: int, p99_limit_ms: float,
              min_delivery: float, **opts: Any) -> None:
    """The generator's own ceiling: a ramp against the null hub (bench.nullhub: no Redis, no auth, one
    pre-encoded frame per publish). Where it stops with the generator near 100 % CPU is the most
    deliveries/s this generator can absorb on this machine."""
    import uvloop

    from bench.nullhub import start_null_hub
    from bench.runner import TargetSpec, raise_open_files_limit, run_scenario
    from cli.main import _config

    config: Config = _config(ctx, require_auth=False)
    raise_open_files_limit(subs + 1000)

    def against_null_hub(scenario: Callable[..., Awaitable[None]], params: dict[str, Any],
                         default_max_s: float) -> dict[str, Any]:
        spec = TargetSpec(redis_url=config.redis.url, custom=start_null_hub)

        async def scenario_with_params(run: Any, result: dict[str, Any]) -> None:
            await scenario(run, result, **params)

        result = uvloop.run(run_scenario("calibrate", scenario_with_params, spec, runs=opts["runs"],
                                         max_seconds=opts["max_seconds"] or default_max_s,
                                         payload_bytes=opts.get("payload", 64), progress=_progress(opts["quiet"])))
        _emit(result, opts["as_json"])
        return result

    _ramp(ctx, "calibrate", subs, plot_path, concurrency,
          {"start_rate": start_rate, "factor": factor, "step_s": step_s, "step_drain_s": step_drain_s,
           "max_steps": max_steps, "p99_limit_ms": p99_limit_ms, "min_delivery": min_delivery}, opts,
          open_target=against_null_hub)


@bench.command()
@click.option("--peers", "peer_list", default="hub socketio-node", show_default=True,
              help="The harness's peers to run, in order: hub (this checkout), null-hub-py (its bench/nullhub.py), "
                   "and the harness's own (socketio-node, null-hub, socketio-py, channels, ...).")
@click.option("--scenarios", default=None,
              help="The harness's scenarios (default: its own list, fanout200 fanout1000 ramp500 rooms500x2 idle5000; "
                   "'smoke' checks the plumbing in seconds).")
@click.option("--against", "against_rev", default=None, metavar="REV",
              help="Also run the hub at git revision REV (a worktree), as peer hub-<REV>, right after hub.")
@click.option("--hub-env", "hub_env", multiple=True, metavar="NAME=VALUE",
              help="Environment for the hub peers (e.g. HUB_SERVER_WRITE_DELAY_MS=25); repeatable.")
@click.option("--harness", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The harness to copy [default: $STREAMHUB_BENCH_HARNESS, or shared/bench beside this checkout "
                   "or the one it was cloned from].")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the copy lives; its npm and pip installs are kept for the next run "
                   "[default: $TMPDIR/streamhub-harness].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results file (JSON lines) [default: results/<UTC time>.jsonl in the work directory].")
@click.option("--extra-args", default=None, help="Passed to every loadgen.mjs run (the harness's EXTRA_ARGS).")
def peers(peer_list: str, scenarios: str | None, against_rev: str | None, hub_env: tuple[str, ...],
          harness: Path | None, workdir: Path | None, out: Path | None, extra_args: str | None) -> None:
    """Side by side with Socket.IO and the other peers of the shared harness: copies it, adds this hub as a peer
    (and with --against an older commit as another), runs its run_peers.sh and prints its report. One invocation
    runs every peer on every scenario, so their figures compare (this machine drifts between invocations)."""
    import tempfile

    from bench import harness as side_by_side
    from bench.target import ROOT

    env: dict[str, str] = {}
    for item in hub_env:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--hub-env")
        env[name] = value
    source = harness or side_by_side.default_harness()
    work = workdir or Path(tempfile.gettempdir()) / "streamhub-harness"
    names = peer_list.split()
    if not names:
        raise click.BadParameter("name at least one peer", param_hint="--peers")
    hubs = [side_by_side.HubPeer("hub", ROOT, env)]

    def set_up_and_run() -> int:
        side_by_side.prepare(source, work, hubs)
        unknown = [name for name in names if name not in side_by_side.available_peers(work)]
        if unknown:
            raise click.BadParameter(f"no peer {', '.join(unknown)} (there are: "
                                     f"{', '.join(side_by_side.available_peers(work))})", param_hint="--peers")
        side_by_side.skip_python_install(work, names)
        click.echo(f"# harness {source} set up in {work} (its results/ keeps every run)", err=True)
        return side_by_side.run(work, names, scenarios.split() if scenarios else None, out, extra_args)

    try:
        if against_rev is None:
            status = set_up_and_run()
        else:
            old = f"hub-{side_by_side.short_rev(against_rev)}"
            names.insert(names.index("hub") + 1 if "hub" in names else 0, old)
            with side_by_side.worktree(against_rev, work.with_name(work.name + "-" + old)) as checkout:
                hubs.append(side_by_side.HubPeer(old, checkout, env))
                status = set_up_and_run()
    except side_by_side.HarnessError as exc:
        raise click.ClickException(str(exc)) from None
    if status != 0:
        raise click.ClickException(f"the harness's run_peers.sh exited with {status}")
