"""The hub under test: a ``hubctl serve`` subprocess started for the run on a free loopback port (its own
key prefix on the configured Redis, limits lifted, a random JWT secret), or an existing hub given by URL.
Either way the run's Redis keys are deleted afterwards, and the PIDs to sample are known: the server's
(``--server-pid`` for an existing hub) and Redis's own (from ``INFO server``, when it runs on this host; every
master's for a Redis Cluster ``REDIS_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from redis.asyncio import Redis

from hub import redis_client
from hub.config import AuthConfig
from hub.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
HUB_START_TIMEOUT_S = 30.0
HUB_STOP_TIMEOUT_S = 20.0
ROOMS_RELEASE_TIMEOUT_S = 10.0
ROOMS_RELEASE_POLL_S = 0.05

# Environment of a hub started for a benchmark: its limits are meant for real users, not for thousands
# of connections from 127.0.0.1 publishing as fast as they can (the limits have their own tests).
LIFTED_LIMITS = {
    "WEBSOCKET_MAX_CONNECTIONS_PER_IP": "1000000",
    "WEBSOCKET_MESSAGE_RATE_LIMIT": "100000000",
    "HUB_SERVER_MESSAGE_BURST": "10000000",
    "HUB_SERVER_MAX_CONNECTIONS_PER_USER": "1000000",
    "HUB_SERVER_CONNECT_RATE_LIMIT_PER_MIN": "100000000",
    "HUB_SERVER_CONNECT_BURST": "1000000",
    "HUB_SERVER_TYPING_BURST": "1000000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_loopback(host: str) -> None:
    """Benchmarks send load only to this machine."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing non-loopback target {host!r}: benchmarks run against this machine only")


@dataclass
class Target:
    """Where the load goes, how to sign tokens for it, what to sample and what to clean up."""

    host: str
    port: int
    auth: AuthConfig
    redis_url: str
    # Keys matching this are deleted after the run (the started hub's prefix, or the run's tag); None:
    # the target keeps nothing in Redis.
    cleanup_pattern: str | None
    server_pid: int | None = None
    # "redis" for a standalone server; "redis@host:port" per master of a cluster.
    redis_pids: dict[str, int] = field(default_factory=dict)
    # The started hub (None for an existing one given by URL), its stderr log, and the task keeping
    # its stdout pipe drained so that nothing it prints can block it.
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    _stdout_drain: asyncio.Task[None] | None = field(default=None, repr=False)
    # An existing hub handles our disconnects after we closed: its nodes' room sets (this pattern) must
    # no longer name the run's rooms (tagged ``run_tag``) before their keys are deleted, or the hub's own
    # leave handling runs into keys deleted under it. None for a hub started here (stopped first).
    node_rooms_pattern: str | None = None
    run_tag: str = ""

    def pids(self) -> dict[str, int]:
        found = {}
        if self.server_pid is not None:
            found["server"] = self.server_pid
        found.update(self.redis_pids)
        return found

    async def stop(self) -> None:
        """Stop the started hub (SIGTERM, then SIGKILL after a grace) and delete the run's keys."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), HUB_STOP_TIMEOUT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._stdout_drain is not None:
            self._stdout_drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stdout_drain
        if self.node_rooms_pattern is not None:
            await wait_rooms_released(self.redis_url, self.node_rooms_pattern, self.run_tag, ROOMS_RELEASE_TIMEOUT_S)
        if self.cleanup_pattern is not None:
            await delete_keys(self.redis_url, self.cleanup_pattern)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").exists()


async def redis_pids_of(redis_url: str) -> dict[str, int]:
    """The PIDs of the Redis servers behind ``redis_url`` that run on this host: {"redis": pid} for a standalone
    server, {"redis@host:port": pid} for each master of a cluster; empty when they run elsewhere."""
    hosts = [part.rsplit(":", 1)[0].rsplit("@", 1)[-1] for part in urlsplit(redis_url).netloc.split(",")]
    if redis_url.startswith("redis") and any(host not in ("127.0.0.1", "localhost", "[::1]") for host in hosts):
        return {}
    client = redis_client.connect(redis_url)
    try:
        await redis_client.initialize(client)
        infos = await redis_client.on_each_master(client, "INFO", "server")
    finally:
        await client.aclose()
    pids = {}
    for node, info in infos.items():
        pid = info.get("process_id")
        if isinstance(pid, int) and process_exists(pid):
            pids["redis" if redis_client.as_cluster(client) is None else f"redis@{node}"] = pid
    return pids


async def wait_rooms_released(redis_url: str, pattern: str, run_tag: str, timeout_s: float) -> bool:
    """Wait until no set matching ``pattern`` (the hub nodes' room sets) names a room containing ``run_tag``;
    False when ``timeout_s`` passed first."""
    client = await _client(redis_url)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                held = False
                async for key in client.scan_iter(match=pattern, count=1000):
                    async for _member in client.sscan_iter(key, match=f"*{run_tag}*"):
                        held = True
                        break
                    if held:
                        break
                if not held:
                    return True
                await asyncio.sleep(ROOMS_RELEASE_POLL_S)
    except TimeoutError:
        return False
    finally:
        await client.aclose()


async def delete_keys(redis_url: str, pattern: str) -> int:
    client = await _client(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(*batch)
                batch = []
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


async def _client(redis_url: str) -> Redis:
    """A client of the run's Redis (redis-py's cluster client SCANs every master and splits a DEL by slot)."""
    client = redis_client.connect(redis_url)
    await redis_client.initialize(client)
    return client


async def start_hub(redis_url: str, *, workers: int = 1, database_url: str | None = None,
                    extra_env: dict[str, str] | None = None) -> Target:
    """Start ``hubctl serve`` on a free loopback port with its own key prefix; return once every worker
    printed its ready line. The hub's stderr goes to a temporary log, quoted when it fails to start."""
    port = free_port()
    prefix = f"bench{secrets.token_hex(4)}:"
    secret = secrets.token_urlsafe(32)
    env = {**os.environ, **LIFTED_LIMITS,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "REDIS_URL": redis_url, "JWT_SECRET": secret, "JWT_ALGORITHM": "HS256",
           "HUB_REDIS_KEY_PREFIX": prefix, "HUB_REDIS_EMBEDDED": "never", "HUB_SERVER_API_PORT": "-1",
           "HUB_LOGGING_LEVEL": "WARNING", **(extra_env or {})}
    for name in ("JWT_AUDIENCE", "JWT_ISSUER", "JWT_PUBLIC_KEY_FILE", "HUB_AUTH_TOKEN_TYPE", "HUB_AUTH_KEYS"):
        env.pop(name, None)
    if database_url:
        env["DATABASE_URL"] = database_url
    argv = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    auth = AuthConfig(algorithm="HS256", secret=secret)
    target = await spawn_server(argv, env, workers, Target("127.0.0.1", port, auth, redis_url, f"{prefix}*"))
    target.redis_pids = await redis_pids_of(redis_url)
    return target


async def spawn_server(argv: list[str], env: dict[str, str], ready_lines: int, target: Target) -> Target:
    """Start ``argv`` and wait until it printed ``ready_lines`` lines containing "ready" on stdout (one
    per worker); its stderr goes to a temporary log, quoted when it fails to start. Fills in ``target``'s
    process fields."""
    fd, log_name = tempfile.mkstemp(prefix="hubctl-bench-", suffix=".log")
    target.log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=log, stdin=asyncio.subprocess.DEVNULL)
    target.process = process
    target.server_pid = process.pid
    assert process.stdout is not None
    stdout = process.stdout
    try:
        ready = 0
        async with asyncio.timeout(HUB_START_TIMEOUT_S):
            while ready < ready_lines:
                line = await stdout.readline()
                if not line:
                    raise RuntimeError("it exited before it was ready")
                ready += b"ready" in line
    except (TimeoutError, RuntimeError) as exc:
        log_path = target.log_path
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        await target.stop()
        raise RuntimeError(f"{' '.join(argv[1:4])} did not start ({exc or 'timeout'}); its log:\n{tail}") from None

    async def drain_stdout() -> None:
        while await stdout.readline():
            pass

    target._stdout_drain = asyncio.create_task(drain_stdout())
    return target


async def existing_hub(url: str, auth: AuthConfig, redis_url: str, key_prefix: str, run_tag: str,
                       server_pid: int | None) -> Target:
    """A hub already running at ``url`` (ws://host:port, loopback only) with keys under ``key_prefix``.
    Its limits must admit the load."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http") or not parts.hostname:
        raise ValueError(f"--url must look like ws://127.0.0.1:8000, got {url!r}")
    require_loopback(parts.hostname)
    if server_pid is not None and not process_exists(server_pid):
        raise ValueError(f"--server-pid {server_pid}: no such process")
    return Target(parts.hostname, parts.port or 80, auth, redis_url, f"*{run_tag}*", server_pid=server_pid,
                  redis_pids=await redis_pids_of(redis_url), node_rooms_pattern=Keys(key_prefix).node_rooms("*"),
                  run_tag=run_tag)
