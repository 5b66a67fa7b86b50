"""Publish-path benchmark: client messages/s a single node accepts (Lua rate check + idempotent XADD +
ack), with ack latency percentiles. Not a test (pytest does not collect tests/bench/).

    python tests/bench/publish_bench.py --clients 20 --messages 1000 --runs 3

Starts one ``hubctl serve`` process (its own key prefix on the local Redis), connects N clients that
each send M messages as fast as the hub acks them (at most --window unacknowledged per client), and
reports messages/s and ack latency p50/p99 per run, then the medians. Cleans its Redis keys up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jwt
import orjson
import redis
import uvloop
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_hub(prefix: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "JWT_SECRET": SECRET, "REDIS_URL": REDIS_URL, "HUB_REDIS_KEY_PREFIX": prefix,
           "HUB_REDIS_EMBEDDED": "never", "HUB_SERVER_API_PORT": "-1", "HUB_LOGGING_LEVEL": "WARNING",
           "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "WEBSOCKET_MAX_CONNECTIONS_PER_IP": "100000",
           "WEBSOCKET_MESSAGE_RATE_LIMIT": "100000000", "HUB_SERVER_MESSAGE_BURST": "10000000",
           "HUB_SERVER_MAX_CONNECTIONS_PER_USER": "100000", "HUB_SERVER_CONNECT_BURST": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        proc.kill()
        raise RuntimeError(f"hub did not start: {line!r}")
    return proc, port


async def client(port: int, user: int, messages: int, window: int, latencies: list[float]) -> None:
    now = int(time.time())
    token = jwt.encode({"sub": str(user), "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")
    async with connect(f"ws://127.0.0.1:{port}/ws/connect?token={token}", max_queue=None,
                       compression=None) as ws:
        await ws.recv()  # connection_established
        room = f"channel_bench{user % 10}"
        await ws.send(orjson.dumps({"type": "join_room", "room": room}).decode())
        while orjson.loads(await ws.recv()).get("type") != "room_joined":
            pass
        sent_at: dict[str, float] = {}
        slots = asyncio.Semaphore(window)
        done = asyncio.Event()
        acked = 0

        async def reader() -> None:
            nonlocal acked
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "ack":
                    latencies.append(time.perf_counter() - sent_at.pop(frame["client_msg_id"]))
                    slots.release()
                    acked += 1
                    if acked == messages:
                        done.set()
                        return

        task = asyncio.ensure_future(reader())
        for i in range(messages):
            await slots.acquire()
            cmid = f"{user}-{i}"
            sent_at[cmid] = time.perf_counter()
            await ws.send(orjson.dumps({"type": "chat_message", "room": room, "content": f"m{i}",
                                        "client_msg_id": cmid}).decode())
        await asyncio.wait_for(done.wait(), 120)
        await task


async def run_once(port: int, clients: int, messages: int, window: int) -> tuple[float, float, float]:
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(client(port, 1000 + c, messages, window, latencies) for c in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return clients * messages / elapsed, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000, help="per client")
    parser.add_argument("--window", type=int, default=32, help="unacknowledged messages per client")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    prefix = f"bench{secrets.token_hex(4)}:"
    proc, port = start_hub(prefix)
    results = []
    try:
        for run in range(1, args.runs + 1):
            rate, p50, p99 = uvloop.run(run_once(port, args.clients, args.messages, args.window))
            results.append((rate, p50, p99))
            print(f"run {run}: {rate:,.0f} messages/s, ack p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        client_ = redis.Redis.from_url(REDIS_URL)
        keys = list(client_.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client_.delete(*keys[start:start + 500])
        client_.close()
    median = [statistics.median(r[i] for r in results) for i in range(3)]
    print(f"median: {median[0]:,.0f} messages/s, ack p50 {median[1]:.1f} ms, p99 {median[2]:.1f} ms")
    print(orjson.dumps({"clients": args.clients, "messages_per_client": args.messages, "window": args.window,
                        "messages_per_s": [round(r[0]) for r in results],
                        "ack_p50_ms": [round(r[1], 2) for r in results],
                        "ack_p99_ms": [round(r[2], 2) for r in results], "median_messages_per_s": round(median[0]),
                        "median_ack_p99_ms": round(median[2], 2)}).decode())


if __name__ == "__main__":
    main()
