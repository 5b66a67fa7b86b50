"""Shared fixtures: real Redis (127.0.0.1:6379 unless TEST_REDIS_URL), a fresh key prefix per test,
hub nodes in-process or as ``hubctl serve`` subprocesses, and real WebSocket clients."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from hub.app import App
from hub.config import Config, load_config
from tests.helpers import Client, connect, mint
from tests.redis_server import PrivateRedis

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "test-secret-0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    value = f"t{secrets.token_hex(4)}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{value}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


def hub_env(prefix: str, **extra: str) -> dict[str, str]:
    env = {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": PG_URL,
        "JWT_SECRET": SECRET,
        "HUB_REDIS_KEY_PREFIX": prefix,
        "HUB_REDIS_EMBEDDED": "never",
        "HUB_SERVER_API_PORT": "0",
        # Tests open many connections from 127.0.0.1 and send fast; the limits have their own tests.
        "WEBSOCKET_MAX_CONNECTIONS_PER_IP": "100000",
        "WEBSOCKET_MESSAGE_RATE_LIMIT": "10000000",
        "HUB_SERVER_MESSAGE_BURST": "100000",
        "HUB_SERVER_MAX_CONNECTIONS_PER_USER": "100000",
        "HUB_SERVER_CONNECT_RATE_LIMIT_PER_MIN": "10000000",
        "HUB_SERVER_CONNECT_BURST": "100000",
        "HUB_SERVER_TYPING_BURST": "100000",
    }
    env.update(extra)
    return env


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema with the hub's tables (migrated), dropped afterwards."""
    import asyncpg

    from consumers.schema import migrate

    name = f"t_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE SCHEMA "{name}"')
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": name})
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield name
    await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
    await admin.close()


@pytest.fixture
async def pg(pg_schema: str) -> AsyncIterator[Any]:
    """A connection whose search_path is the test's schema."""
    import asyncpg

    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_schema})
    yield conn
    await conn.close()


def make_config(prefix: str, **overrides: Any) -> Config:
    values = {"server.port": 0, "server.api_port": 0, **overrides}
    return load_config(None, hub_env(prefix), values)


@pytest.fixture
async def redis_client(prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, decode_responses=False)
    yield client
    await client.aclose()


class NodeFactory:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.apps: list[App] = []

    async def start(self, **overrides: Any) -> App:
        app = App(make_config(self.prefix, **overrides))
        await app.start()
        self.apps.append(app)
        return app

    async def stop_all(self) -> None:
        for app in self.apps:
            await app.stop()


@pytest.fixture
async def nodes(prefix: str) -> AsyncIterator[NodeFactory]:
    factory = NodeFactory(prefix)
    yield factory
    await factory.stop_all()


@pytest.fixture
async def node(nodes: NodeFactory) -> App:
    return await nodes.start()


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A redis-server of the test's own (a free loopback port, a temp dir), for tests that stop or break it.
    (tests/faults/conftest.py overrides this with a factory: its scenarios start several.)"""
    server = PrivateRedis()
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.destroy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubProcess:
    """A ``hubctl serve`` subprocess on its own port."""

    def __init__(self, prefix: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **hub_env(prefix, **env)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=self._log)

    async def ready(self, timeout_s: float = 20.0) -> None:
        assert self.process.stdout is not None
        stdout = self.process.stdout
        line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout_s)
        if b"ready" not in line:
            raise RuntimeError(f"hub did not start: {line!r}; log: {self.log_path.read_text()}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
async def hub_processes(prefix: str, tmp_path: Path) -> AsyncIterator[Any]:
    started: list[HubProcess] = []

    async def start(**env: str) -> HubProcess:
        proc = HubProcess(prefix, tmp_path / f"hub{len(started)}.log", **env)
        started.append(proc)
        await proc.ready()
        return proc

    yield start
    # Stop in a thread: the test's clients live on this loop and must answer the close handshake.
    await asyncio.gather(*(asyncio.to_thread(proc.stop) for proc in started))


def url_of(app: App) -> str:
    return f"ws://127.0.0.1:{app.port}"


__all__ = ["SECRET", "Client", "connect", "mint", "url_of"]
