"""Node lifecycle: SIGTERM drain, several workers on one port, the health endpoint, the idle timeout and
the Origin allowlist."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from hub.app import App
from hub.keys import Keys
from tests.conftest import ROOT, NodeFactory, free_port, hub_env, url_of
from tests.helpers import Client, connect, mint

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------------- helpers


async def close_code_of(client: Client, timeout_s: float = 15.0) -> int | None:
    """Read (and drop) frames until the server closes the connection; the close code it sent."""
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await client.ws.recv()
    return client.ws.close_code


def node_id_of(client: Client) -> str:
    """connection_id is ``{node_id}-{n}``."""
    connection_id = client.established["connection_id"]
    assert isinstance(connection_id, str)
    return connection_id.rsplit("-", 1)[0]


async def group_names(redis: Redis, stream: str) -> list[str]:
    groups = await redis.xinfo_groups(stream)
    names = []
    for group in groups:
        name = group.get("name", group.get(b"name"))
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


async def node_keys(redis: Redis, prefix: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"{prefix}node:*", count=1000)]


async def wait_for_exit(process: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, float]:
    """Wait (off the loop, so clients keep answering close frames) for the process; (code, seconds)."""
    started = time.monotonic()
    code = await asyncio.to_thread(process.wait, timeout_s)
    return code, time.monotonic() - started


def raw_ws_handshake(port: int, token: str) -> socket.socket:
    """Open a WebSocket by hand and return the socket: the caller never reads it again and never answers
    a close frame (a hung client)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /ws/connect?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sock.sendall(request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)  # one byte at a time: nothing after the response head is consumed
        if not byte:
            sock.close()
            raise AssertionError(f"connection closed during the handshake: {head!r}")
        head += byte
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    if not head.startswith(b"HTTP/1.1 101") or accept.encode() not in head:
        sock.close()
        raise AssertionError(f"handshake refused: {head!r}")
    return sock


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET over a raw loopback connection: (status, headers lower-cased, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            parsed = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    parsed[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(parsed.get("content-length", "0")))
        return int(status_line.split()[1]), parsed, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def health(app: App) -> dict[str, Any]:
    assert app.port is not None
    status, headers, body = await http_get(app.port, "/ws/health")
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    parsed = orjson.loads(body)
    assert isinstance(parsed, dict)
    return parsed


# ---------------------------------------------------------------------- SIGTERM drain


@pytest.mark.timeout(60)
async def test_sigterm_closes_clients_with_4001_and_removes_the_node_from_redis(
        hub_processes: Any, redis_client: Redis, prefix: str) -> None:
    """SIGTERM sends every client close 4001, exits 0 within the drain timeout, and leaves no node key or
    consumer group behind."""
    room = "channel_drain"
    proc = await hub_processes()
    clients = [await connect(proc.url, str(i)) for i in (1, 2, 3)]
    for client in clients:
        await client.join(room)
    await clients[0].say(room, "before the drain")
    node_id = node_id_of(clients[0])
    stream = Keys(prefix).stream(room)
    assert await group_names(redis_client, stream) == [node_id]
    assert await node_keys(redis_client, prefix)
    assert await redis_client.sismember(f"{prefix}nodes", node_id)

    proc.process.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(close_code_of(c) for c in clients))
    assert codes == [4001, 4001, 4001]
    code, elapsed = await wait_for_exit(proc.process, 15)
    assert code == 0
    assert elapsed < 10.0  # the default server.drain_timeout_s

    assert await node_keys(redis_client, prefix) == []
    assert not await redis_client.sismember(f"{prefix}nodes", node_id)
    assert await group_names(redis_client, stream) == []


@pytest.mark.timeout(60)
async def test_sigterm_exit_is_bounded_by_drain_timeout_when_a_client_never_answers(
        hub_processes: Any, redis_client: Redis, prefix: str) -> None:
    """A client that never reads nor answers the close frame delays the exit by at most the drain timeout
    (1 s here, 10 s by default), and the exit is still clean."""
    proc = await hub_processes(HUB_SERVER_DRAIN_TIMEOUT_S="1")
    polite = await connect(proc.url, "1")
    await polite.join("channel_hung")
    hung = await asyncio.to_thread(raw_ws_handshake, proc.port, mint("2"))
    try:
        node_id = node_id_of(polite)
        proc.process.send_signal(signal.SIGTERM)
        assert await close_code_of(polite) == 4001
        code, elapsed = await wait_for_exit(proc.process, 15)
        assert code == 0
        assert elapsed < 1.0 + 3.0, f"exit took {elapsed:.2f}s with a 1 s drain timeout"
    finally:
        hung.close()
    assert await node_keys(redis_client, prefix) == []
    assert not await redis_client.sismember(f"{prefix}nodes", node_id)
    assert await group_names(redis_client, Keys(prefix).stream("channel_hung")) == []


# ---------------------------------------------------------------------- --workers


def start_process(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a process with stdout piped and stderr in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log)


def _gone(pid: int) -> bool:
    """The process no longer runs (absent or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _kill_worker(pid: int) -> None:
    """SIGKILL a worker this test started, if it still runs (checked by command line, against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"cli.main" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(90)
async def test_two_workers_share_the_port_relay_to_each_other_and_stop_on_sigterm(
        prefix: str, redis_client: Redis, tmp_path: Path) -> None:
    """``serve --workers 2`` runs two registered nodes on one port that both accept connections and
    deliver each other's messages; SIGTERM to the parent drains both and exits 0."""
    port = free_port()
    log_path = tmp_path / "workers.log"
    room = "channel_workers"
    children: list[int] = []
    parent = start_process(
        [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        cwd=ROOT, env={**os.environ, **hub_env(prefix)}, log_path=log_path)
    clients: list[Client] = []
    try:
        assert parent.stdout is not None
        # Both workers print a ready line on the shared stdout; with PYTHONUNBUFFERED the two lines may
        # interleave (see the report), so count the ready markers rather than whole lines.
        output = b""
        while output.count(b" ready on ws://") < 2:
            line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), 20)
            if not line:
                log = await asyncio.to_thread(log_path.read_text)
                raise AssertionError(f"workers did not start: {output!r}; log: {log}")
            output += line
        deadline = time.monotonic() + 20
        while await redis_client.scard(f"{prefix}nodes") < 2:
            assert time.monotonic() < deadline, "both workers did not register within 20 s"
            await asyncio.sleep(0.05)
        node_ids = {m.decode() for m in await redis_client.smembers(f"{prefix}nodes")}
        assert len(node_ids) == 2
        children = _children_of(parent.pid)
        pids = {int(await redis_client.hget(f"{prefix}node:{n}", "pid") or 0) for n in node_ids}
        assert pids == set(children)

        url = f"ws://127.0.0.1:{port}"
        clients = [await connect(url, str(100 + i)) for i in range(24)]
        by_node: dict[str, list[Client]] = {}
        for client in clients:
            by_node.setdefault(node_id_of(client), []).append(client)
        assert set(by_node) == node_ids, "SO_REUSEPORT did not spread 24 connections over both workers"

        first, second = sorted(node_ids)
        sender, receiver = by_node[first][0], by_node[second][0]
        await receiver.join(room)
        await sender.join(room)
        await sender.say(room, "across workers")
        frame = await receiver.expect("chat_message")
        assert frame["content"] == "across workers" and frame["sender_id"] == sender.user_id

        parent.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(close_code_of(c, 20) for c in clients))
        assert set(codes) == {4001}
        code, _ = await wait_for_exit(parent, 20)
        assert code == 0
        assert all(_gone(pid) for pid in children)
        assert await redis_client.smembers(f"{prefix}nodes") == set()
        assert await node_keys(redis_client, prefix) == []
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.ws.close()
        if parent.poll() is None:
            children = children or _children_of(parent.pid)
            parent.kill()
        for pid in children:
            _kill_worker(pid)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


# ---------------------------------------------------------------------- health and HTTP answers


async def test_health_reports_redis_and_connection_counts(node: App) -> None:
    """GET /ws/health answers 200 with the documented JSON shape and counts connections, users and rooms."""
    empty = await health(node)
    assert empty["data"]["connection_stats"] == {"total_connections": 0, "unique_users": 0, "total_rooms": 0}

    url = url_of(node)
    a1 = await connect(url, "1")
    a2 = await connect(url, "1")
    b = await connect(url, "2")
    await a1.join("channel_h1")
    await a2.join("channel_h1")
    await b.join("channel_h1")
    await b.join("channel_h2")
    body = await health(node)
    assert set(body) == {"status", "data"}
    assert body["status"] == "success"
    data = body["data"]
    assert data["health_status"] == "healthy"
    assert data["health_score"] == 100
    assert data["redis_connected"] is True
    assert data["connection_stats"] == {"total_connections": 3, "unique_users": 2, "total_rooms": 2}
    assert data["node_id"] == node.node_id


async def test_unknown_path_is_404_json_and_plain_get_on_connect_is_426(node: App) -> None:
    """An unknown path gets a 404 JSON error; /ws/connect without an Upgrade gets 426."""
    assert node.port is not None
    status, headers, body = await http_get(node.port, "/nope")
    assert status == 404 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == "not_found"
    status, headers, body = await http_get(node.port, f"/ws/connect?token={mint('1')}")
    assert status == 426 and headers["content-type"] == "application/json"
    assert orjson.loads(body) == {"status": "error", "error": {
        "code": "upgrade_required", "message": "this endpoint speaks WebSocket only"}}


# ---------------------------------------------------------------------- idle timeout


async def test_idle_client_is_closed_with_4002_while_a_pinging_client_stays(nodes: NodeFactory) -> None:
    """With connection_timeout_s=0.3 a silent client is closed with 4002; one sending pings stays open
    for several timeouts."""
    timeout_s = 0.3
    app = await nodes.start(**{"server.connection_timeout_s": timeout_s})
    silent = await connect(url_of(app), "1")
    talker = await connect(url_of(app), "2")
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent_closed = asyncio.ensure_future(close_code_of(silent, 5))
    pongs = 0
    while loop.time() - started < 3 * timeout_s or not silent_closed.done():
        assert loop.time() - started < 5, "the silent client was not closed"
        await talker.send({"type": "ping", "request_id": pongs})
        await talker.expect("pong", request_id=pongs)
        pongs += 1
        await asyncio.sleep(0.05)
    assert await silent_closed == 4002
    await talker.send({"type": "ping", "request_id": "last"})
    assert (await talker.expect("pong", request_id="last"))["type"] == "pong"
    assert talker.ws.close_code is None


# ---------------------------------------------------------------------- Origin allowlist


async def test_origin_allowlist_refuses_other_origins_with_403(nodes: NodeFactory) -> None:
    """With server.allowed_origins set, an unlisted Origin gets HTTP 403, the listed one connects, and a
    request without Origin (a backend, a native app) is admitted as README documents."""
    app = await nodes.start(**{"server.allowed_origins": ("https://app.example",)})
    url = url_of(app)
    with pytest.raises(InvalidStatus) as info:
        await connect(url, "1", origin=Origin("https://evil.example"))
    assert info.value.response.status_code == 403
    client = await connect(url, "1", origin=Origin("https://app.example"))
    assert client.established["user_id"] == "1"
    await client.join("channel_origin")
    backend = await connect(url, "2")
    assert backend.established["user_id"] == "2"
