"""The moves every scenario is made of: connect many clients with real JWTs, join rooms, publish open-loop
at a fixed rate, drain, and watch the generator's own event loop. Progress goes to a callback (stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.client import LoadClient, close_all, open_client
from bench.procstat import Sampler
from bench.stats import Phase, Samples, Tracker
from bench.target import Target
from hub.auth import mint_token

CONNECT_TIMEOUT_S = 15.0
JOIN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
PROGRESS_INTERVAL_S = 1.0
LAG_TICK_S = 0.01
DRAIN_POLL_S = 0.02

Progress = Callable[[str], None]


@dataclass
class Publisher:
    """One publishing connection, the room it publishes to, and how many members should receive it."""

    client: LoadClient
    room: str
    receivers: int


@dataclass
class Run:
    """One run of a scenario: its target, its connections, its accounting and its clean-up."""

    target: Target
    tag: str  # unique per run: in every room and user name, so its keys can be found and deleted
    progress: Progress
    payload_bytes: int = 64
    tracker: Tracker = field(default_factory=Tracker)
    clients: list[LoadClient] = field(default_factory=list)
    # The generator's event-loop lag (ms past each 10 ms tick) while the monitor runs.
    loop_lag_ms: Samples = field(default_factory=Samples)
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.target.pids())
        self._padding = "x" * self.payload_bytes

    def user_id(self, index: int) -> str:
        return f"{self.tag}-u{index}"

    def room(self, name: str) -> str:
        return f"channel_{self.tag}-{name}"

    def connect_path(self, index: int) -> str:
        token = mint_token(self.target.auth, self.user_id(index), ttl_s=3600)
        return f"/ws/connect?token={token}"

    # ---------------------------------------------------------------- connecting and joining

    async def connect_many(self, count: int, concurrency: int, first_index: int = 0) -> tuple[list[LoadClient],
                                                                                            dict[str, Any]]:
        """Open ``count`` connections, ``concurrency`` handshakes at a time, each with its own real JWT
        (minted before the clock starts: signing is the client's cost, not the hub's)."""
        paths = [self.connect_path(first_index + i) for i in range(count)]
        latency_ms = Samples()
        errors: dict[str, int] = {}
        opened: list[LoadClient] = []
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    client = await open_client(first_index + index, self.target.host, self.target.port,
                                               paths[index], self.tracker, CONNECT_TIMEOUT_S)
                except Exception as exc:  # counted and reported: a refused or failed handshake is a result
                    key = f"{type(exc).__name__}: {exc}"[:100]
                    errors[key] = errors.get(key, 0) + 1
                    continue
                latency_ms.add((time.perf_counter() - started) * 1000)
                opened.append(client)
                self.clients.append(client)

        started = time.perf_counter()
        async with self.reporting(lambda: f"connecting: {len(opened)}/{count} open, {sum(errors.values())} failed"):
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
        elapsed_s = time.perf_counter() - started
        opened.sort(key=lambda c: c.id)
        summary = latency_ms.summary()
        stats = {"attempted": count, "ok": len(opened), "failed": count - len(opened), "errors": errors,
                 "elapsed_s": round(elapsed_s, 3), "rate_per_s": round(len(opened) / elapsed_s, 1),
                 "latency_ms": {"p50": summary["p50"], "p99": summary["p99"], "max": summary["max"]}}
        return opened, stats

    async def join_all(self, pairs: list[tuple[LoadClient, str]], concurrency: int = 200) -> tuple[
            set[tuple[int, str]], dict[str, Any]]:
        """Join every (client, room), waiting for each room_joined; returns the (client id, room) joined."""
        joined: set[tuple[int, str]] = set()
        failed = 0
        next_index = 0

        async def worker() -> None:
            nonlocal next_index, failed
            while next_index < len(pairs):
                client, room = pairs[next_index]
                next_index += 1
                try:
                    await client.join(room, JOIN_TIMEOUT_S)
                except (TimeoutError, ConnectionError, RuntimeError):
                    failed += 1
                    continue
                joined.add((client.id, room))

        started = time.perf_counter()
        async with self.reporting(lambda: f"joining: {len(joined)}/{len(pairs)} joined, {failed} failed"):
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(pairs))))))
        open_ids = {c.id for c in self.clients if c.open}
        closed = {pair for pair in joined if pair[0] not in open_ids}  # died while joining: not a receiver
        joined -= closed
        return joined, {"attempted": len(pairs), "joined": len(joined), "failed": failed,
                        "closed_before_publish": len(closed), "elapsed_s": round(time.perf_counter() - started, 3)}

    # ---------------------------------------------------------------- publishing and draining

    def publish_one(self, pub: Publisher, phase: Phase, extra: dict[str, Any] | None = None) -> bool:
        """Send one message whose content carries the send time, sequence, publisher and phase."""
        client = pub.client
        payload = {"ts": time.perf_counter(), "seq": client.seq, "pub": client.id, "st": phase.index,
                   "body": self._padding}
        frame = {"type": "chat_message", "room": pub.room, "content": orjson.dumps(payload).decode(),
                 "message_type": "text", **(extra or {})}
        phase.published += 1
        phase.expected += pub.receivers
        if client.send(frame):
            client.seq += 1
            return True
        phase.publish_failed += 1
        return False

    async def publish_open_loop(self, pubs: list[Publisher], rate: float, seconds: float, phase: Phase) -> None:
        """Publish round(rate x seconds) messages round-robin over ``pubs``: message n is due at
        t0 + n / rate whatever the hub does (open loop), so each of P publishers sends every P / rate s."""
        total = max(1, round(rate * seconds))
        started = time.perf_counter()
        phase.started_at = started
        sent = 0

        def status() -> str:
            p = phase
            return (f"t={time.perf_counter() - started:5.1f}s published {p.published}/{total} "
                    f"delivered {p.delivered}/{p.expected} dup {p.duplicates} ooo {p.out_of_order}")

        async with self.reporting(status):
            while sent < total:
                now = time.perf_counter()
                due = min(total, math.floor((now - started) * rate) + 1)
                while sent < due:
                    phase.send_lag_ms.add((time.perf_counter() - (started + sent / rate)) * 1000)
                    self.publish_one(pubs[sent % len(pubs)], phase)
                    sent += 1
                if sent < total:
                    await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        phase.publish_s = time.perf_counter() - started + 1 / rate  # the span the last send covers

    async def drain(self, phase: Phase, idle_s: float, max_s: float) -> None:
        """Wait until everything expected arrived, or nothing new arrived for ``idle_s`` (the rest is
        lost), or ``max_s`` passed (a backlog still arriving: the rest is cut off and flagged)."""
        started = last_progress = time.perf_counter()
        last_count = phase.delivered

        def status() -> str:
            return f"draining: delivered {phase.delivered}/{phase.expected}"

        async with self.reporting(status):
            while phase.delivered < phase.expected:
                now = time.perf_counter()
                if phase.delivered != last_count:
                    last_count, last_progress = phase.delivered, now
                if now - last_progress >= idle_s:
                    break
                if now - started >= max_s:
                    phase.backlog_cutoff = True
                    break
                await asyncio.sleep(DRAIN_POLL_S)
        phase.drain_s = time.perf_counter() - started
        phase.final = True

    # ---------------------------------------------------------------- watching and ending

    @contextlib.asynccontextmanager
    async def reporting(self, status: Callable[[], str]) -> AsyncIterator[None]:
        """Print ``status()`` every second while the block runs (and once at its end)."""

        async def report() -> None:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_S)
                self.progress(status())

        task = asyncio.get_running_loop().create_task(report())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.progress(status())

    @contextlib.asynccontextmanager
    async def watching_loop_lag(self) -> AsyncIterator[None]:
        """Measure how late the generator's own event loop runs (a busy generator distorts latency)."""

        async def tick() -> None:
            while True:
                before = time.perf_counter()
                await asyncio.sleep(LAG_TICK_S)
                self.loop_lag_ms.add(max(0.0, (time.perf_counter() - before - LAG_TICK_S) * 1000))

        task = asyncio.get_running_loop().create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def loop_lag(self) -> dict[str, float | int | None]:
        summary = self.loop_lag_ms.summary()
        return {"p99": summary["p99"], "max": summary["max"]}

    async def close(self) -> None:
        """Close every connection (closes from here on are not counted as disconnects)."""
        self.tracker.counting_closes = False
        await close_all(self.clients, CLOSE_TIMEOUT_S)
        self.clients.clear()
