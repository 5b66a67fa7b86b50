"""The null hub: a calibration server speaking just enough of the hub's protocol (connection_established,
join_room -> room_joined, chat_message -> one frame encoded once and written to every member, ping ->
pong), with no Redis, no auth and no storage: the least work a hub can do. A ramp against it
(``hubctl bench calibrate``) finds the ceiling of the generator on this machine, as the shared harness's
null-hub peer does for its Node generator. Not a hub: never expose it.

    python -m bench.nullhub --port 8765      # prints "null hub ready on ..." when it listens
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.target import ROOT, Target, free_port, spawn_server
from hub.config import AuthConfig

NULL_SECRET = "null-hub-accepts-any-token-0123456789"


async def _handle(ws: ServerConnection, rooms: dict[str, set[ServerConnection]]) -> None:
    joined: list[str] = []
    await ws.send(orjson.dumps({"type": "connection_established"}).decode())
    try:
        async for raw in ws:
            frame: dict[str, Any] = orjson.loads(raw)
            ftype = frame.get("type")
            room = str(frame.get("room"))
            if ftype == "chat_message":
                out = {"type": "chat_message", "room": room, "sender_id": "null", "content": frame.get("content"),
                       "message_type": "text"}
                broadcast(rooms.get(room, ()), orjson.dumps(out).decode())
            elif ftype == "join_room":
                rooms.setdefault(room, set()).add(ws)
                joined.append(room)
                await ws.send(orjson.dumps({"type": "room_joined", "room": room}).decode())
            elif ftype == "ping":
                await ws.send('{"type":"pong"}')
    finally:
        for room in joined:
            rooms.get(room, set()).discard(ws)


async def _serve(port: int) -> None:
    rooms: dict[str, set[ServerConnection]] = {}
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(lambda ws: _handle(ws, rooms), "127.0.0.1", port, compression=None, max_queue=None,
                     ping_interval=None):
        os.write(sys.stdout.fileno(), f"null hub ready on ws://127.0.0.1:{port}\n".encode())
        await stop


async def start_null_hub() -> Target:
    """Start the null hub as a subprocess on a free loopback port (nothing to clean up in Redis)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.nullhub", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    target = Target("127.0.0.1", port, AuthConfig(algorithm="HS256", secret=NULL_SECRET), "", None)
    return await spawn_server(argv, env, 1, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
