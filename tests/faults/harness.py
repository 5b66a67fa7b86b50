"""Shared pieces of the fault scenarios: a steady load of senders, health probes, bounded waits, process
measurements."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from tests.conftest import hub_env
from tests.faults.invariants import Ledger, RecordingClient


class Load:
    """Senders that each send one message, wait for its ack (retrying like an app), pause, and go on, until
    :meth:`stop`. The pause keeps the load modest and steady on a small machine."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.acks: dict[str, int] = {}  # sender user -> messages acked

    def start(self, client: RecordingClient, rooms: Sequence[str], interval_s: float = 0.05) -> None:
        self.acks.setdefault(client.log.user, 0)
        self._tasks.append(asyncio.ensure_future(self._run(client, rooms, interval_s)))

    async def _run(self, client: RecordingClient, rooms: Sequence[str], interval_s: float) -> None:
        for room in itertools.cycle(rooms):
            if self._stop.is_set():
                return
            if await self.ledger.send(client, room) is not None:
                self.acks[client.log.user] += 1
            # The load's pace (messages per second per sender), not a wait for a condition.
            await asyncio.sleep(interval_s)  # by design; noqa: sleep-ok

    def acked_by(self, users: Sequence[str]) -> int:
        return sum(self.acks.get(user, 0) for user in users)

    async def wait_acked(self, users: Sequence[str], more: int, timeout_s: float = 30.0, what: str = "") -> None:
        """Wait until ``users`` got ``more`` acks than now."""
        target = self.acked_by(users) + more
        await wait_for(lambda: self.acked_by(users) >= target, timeout_s,
                       what or f"{more} more acks for {list(users)} (have {self.acked_by(users)})")

    async def stop(self, timeout_s: float = 45.0) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        assert not pending, f"{len(pending)} senders still busy {timeout_s}s after stop"


async def join_members(ledger: Ledger, urls: dict[str, Any], rooms: Sequence[str]) -> dict[str, RecordingClient]:
    """One recording client per user (user -> the hub URL, or a callable giving it per attempt), connected and
    joined to every room in ``rooms``."""
    clients = {}
    for user, url in urls.items():
        client = ledger.client(url, user, set(rooms))
        await client.connect()
        for room in rooms:
            await client.join_room(room)
        clients[user] = client
    return clients


def start_load(ledger: Ledger, clients: dict[str, RecordingClient], rooms: Sequence[str],
               interval_s: float = 0.05) -> Load:
    """Every client sending into ``rooms`` every ``interval_s`` until the load is stopped."""
    load = Load(ledger)
    for client in clients.values():
        load.start(client, rooms, interval_s=interval_s)
    return load


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str | Callable[[], str],
                   poll_s: float = 0.05) -> None:
    """Poll ``condition`` (sync or async) until true; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(poll_s)


async def health_status(port: int, timeout_s: float = 5.0) -> int:
    """The node's /ws/health status code (0 when it does not answer)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/ws/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


def archiver_env(prefix: str, redis_url: str, pg_url: str, schema: str, **extra: str) -> dict[str, str]:
    """Environment of an archiver subprocess: small batches, quick retries, a quick claim of dead
    consumers' entries."""
    settings = {"REDIS_URL": redis_url, "DATABASE_URL": pg_url, "HUB_POSTGRES_SCHEMA": schema,
                "HUB_ARCHIVER_BATCH_MAX_AGE_MS": "50", "HUB_ARCHIVER_MAX_RETRY_DELAY_S": "0.5",
                "HUB_ARCHIVER_CLAIM_IDLE_MS": "2000", "HUB_ARCHIVER_SWEEP_INTERVAL_S": "1"}
    return hub_env(prefix, **{**settings, **extra})


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
