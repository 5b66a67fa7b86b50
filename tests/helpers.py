"""A small test client over a real WebSocket connection (websockets' asyncio client)."""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
FRAME_TIMEOUT_S = 10.0


def mint(user_id: str, *, roles: list[str] | None = None, rooms: list[str] | None = None, ttl_s: int = 3600,
         secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    import time

    now = int(time.time())
    payload: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s, **claims}
    if roles:
        payload["roles"] = roles
    if rooms:
        payload["rooms"] = rooms
    return jwt.encode(payload, secret, algorithm=algorithm)


class Client:
    """One connected user. ``recv`` returns decoded frames; ``expect`` waits for a frame type."""

    def __init__(self, ws: ClientConnection, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id
        self.established: dict[str, Any] = {}

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout_s)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def expect(self, ftype: str, timeout_s: float = FRAME_TIMEOUT_S, **match: Any) -> dict[str, Any]:
        """Next frame of ``ftype`` (matching ``match``); other frames in between are an error, except
        frames listed in ``skip``."""
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.recv(timeout_s)
                if frame.get("type") == ftype and all(frame.get(k) == v for k, v in match.items()):
                    return frame
                if frame.get("type") in ("typing_indicator", "presence_update"):
                    continue
                raise AssertionError(f"expected {ftype} {match}, got {frame}")

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "join_room", "room": room, **extra})
        frame = await self.recv()
        assert frame["type"] == "room_joined", frame
        return frame

    async def say(self, room: str, content: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "chat_message", "room": room, "content": content, **extra})
        return await self.expect("ack")

    async def close(self) -> None:
        await self.ws.close()


async def connect(base_url: str, user_id: str, *, token: str | None = None, roles: list[str] | None = None,
                  rooms: list[str] | None = None, **kwargs: Any) -> Client:
    tok = token if token is not None else mint(user_id, roles=roles, rooms=rooms)
    ws = await ws_connect(f"{base_url}/ws/connect?token={tok}&client_type=test", open_timeout=10,
                          **kwargs)
    client = Client(ws, user_id)
    client.established = await client.recv()
    assert client.established["type"] == "connection_established", client.established
    return client
