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


def _matches(frame: dict[str, Any], ftype: str, match: dict[str, Any]) -> bool:
    return frame.get("type") == ftype and all(frame.get(k) == v for k, v in match.items())


class Client:
    """One connected user. ``recv`` returns decoded frames; ``expect`` waits for a frame type."""

    def __init__(self, ws: ClientConnection, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id
        self.established: dict[str, Any] = {}
        # Frames received but not yet asked for by expect().
        self.backlog: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout_s)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def expect(self, ftype: str, timeout_s: float = FRAME_TIMEOUT_S, **match: Any) -> dict[str, Any]:
        """The first frame of ``ftype`` matching ``match``, earlier skipped frames first. Frames that do
        not match are kept for later ``expect`` calls (an echo may overtake its ack, for example)."""
        for index, frame in enumerate(self.backlog):
            if _matches(frame, ftype, match):
                return self.backlog.pop(index)
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.recv(timeout_s)
                if _matches(frame, ftype, match):
                    return frame
                self.backlog.append(frame)

    async def next_frame(self, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        """The next frame, backlog first."""
        if self.backlog:
            return self.backlog.pop(0)
        return await self.recv(timeout_s)

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "join_room", "room": room, **extra})
        return await self.expect("room_joined", room=room)

    async def say(self, room: str, content: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "chat_message", "room": room, "content": content, **extra})
        return await self.expect("ack")

    async def close(self) -> None:
        await self.ws.close()


async def connect(base_url: str, user_id: str, *, token: str | None = None, roles: list[str] | None = None,
                  rooms: list[str] | None = None, **kwargs: Any) -> Client:
    tok = token if token is not None else mint(user_id, roles=roles, rooms=rooms)
    # Unbounded receive queue by default: a test that has not read every ack yet must still answer
    # the server's close handshake. The slow-client test passes its own max_queue.
    kwargs.setdefault("max_queue", None)
    ws = await ws_connect(f"{base_url}/ws/connect?token={tok}&client_type=test", open_timeout=10,
                          **kwargs)
    client = Client(ws, user_id)
    client.established = await client.recv()
    assert client.established["type"] == "connection_established", client.established
    return client


async def collect_chat(client: Client, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Read frames until ``count`` chat messages arrived; other frames (acks, ...) are skipped."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < count:
            frame = await client.next_frame(timeout_s)
            if frame["type"] == "chat_message":
                got.append(frame)
    return got


async def wait_until(predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a cheap in-process predicate (server state) until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def say_until_acked(client: Client, room: str, content: str, refused: list[str], attempts: int = 100) -> str:
    """Publish ``content`` (also its client_msg_id: no spaces) until acknowledged; each refusal (an error frame)
    is noted in ``refused`` and the message sent again a tenth of a second later (stored once either way)."""
    for _ in range(attempts):
        await client.send({"type": "chat_message", "room": room, "content": content, "client_msg_id": content})
        while True:
            frame = await client.next_frame(timeout_s=15)
            if frame.get("client_msg_id") == content and frame["type"] in ("ack", "error"):
                break  # (other frames: its own echoes)
        if frame["type"] == "ack":
            return str(frame["id"])
        refused.append(frame["code"])
        # Sent again at once it would meet the same redirection; a tenth of a second apart.
        await asyncio.sleep(0.1)  # by design; noqa: sleep-ok
    raise AssertionError(f"{content!r} refused {attempts} times: {refused[-3:]}")
