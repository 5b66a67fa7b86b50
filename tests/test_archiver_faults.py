"""Archiver fault tests with real processes: PostgreSQL stopped with ``-m immediate`` under load, and
two archivers of which one is stopped mid-way. Every entry must end up in PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from consumers.archiver import GROUP, Archiver
from hub.config import ArchiverConfig, PostgresConfig
from hub.keys import Keys
from tests.conftest import PG_URL, ROOT, free_port, hub_env
from tests.pg_cluster import PgCluster, find_bin_dir, private_cluster

BATCH_MAX_ROWS = ArchiverConfig().batch_max_rows

needs_pg_binaries = pytest.mark.skipif(find_bin_dir() is None, reason="PostgreSQL binaries (initdb, pg_ctl) not found")


# ---------------------------------------------------------------------- helpers


class ArchiverProcess:
    """``hubctl archiver --name NAME`` as a subprocess; stderr (its log) goes to a file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()/stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "archiver", "--name", name],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=self._log,
            stdin=subprocess.DEVNULL)
        self.stdout = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self, timeout_s: float = 30.0) -> None:
        assert self.process.stdout is not None
        stdout = self.process.stdout
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout_s)
        except TimeoutError:
            raise AssertionError(f"archiver {self.name} not ready in {timeout_s}s; log: {self.log_tail()}") from None
        assert b"ready" in line, f"archiver {self.name} did not start: {line!r}; log: {self.log_tail()}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_kb(self) -> int:
        """Resident set size from /proc/PID/status (VmRSS, kB)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def count_in_log(self, needle: str) -> int:
        return self.log_text().count(needle)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait (bounded), keep stdout. Returns the exit code (SIGKILLed when it hangs: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        self.stdout += out or b""
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._log.close()

    def stat(self, name: str) -> int:
        """A counter from the final line ("rows written: N, entries acked: N, ...")."""
        match = re.search(rf"{name}: (\d+)".encode(), self.stdout)
        return int(match.group(1)) if match else -1


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli.main", *args], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"hubctl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


async def publish(redis: Redis, keys: Keys, rooms: list[str], start: int, count: int, *,
                  chunk: int = 500, transaction: bool = False) -> None:
    """Raw XADDs (as a backend would), round-robin over ``rooms``, ``chunk`` per round trip."""
    for first in range(start, start + count, chunk):
        pipe = redis.pipeline(transaction=transaction)
        for i in range(first, min(first + chunk, start + count)):
            pipe.xadd(keys.stream(rooms[i % len(rooms)]),
                      {"sender_id": f"u{i % 7}", "content": f"message {i}", "created_at": str(int(time.time() * 1000))})
        await pipe.execute()


async def pending_total(redis: Redis, keys: Keys, rooms: list[str]) -> int:
    """Entries delivered to the archiver group and not acknowledged, over ``rooms``."""
    total = 0
    for room in rooms:
        if await redis.exists(keys.stream(room)) and await group_exists(redis, keys, room):
            total += int((await redis.xpending(keys.stream(room), GROUP))["pending"])
    return total


async def group_exists(redis: Redis, keys: Keys, room: str) -> bool:
    groups = await redis.xinfo_groups(keys.stream(room))
    return any(g["name"] in (GROUP, GROUP.encode()) for g in groups)


async def stream_entries(redis: Redis, keys: Keys, rooms: list[str]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for room in rooms:
        for entry_id, _ in await redis.xrange(keys.stream(room)):
            found.add((room, entry_id.decode()))
    return found


async def stored_rows(url: str, schema: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url, timeout=5, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT room, stream_ms, stream_seq FROM messages")
    finally:
        await conn.close()
    return [(r["room"], f"{r['stream_ms']}-{r['stream_seq']}") for r in rows]


async def try_count(url: str, schema: str) -> int | None:
    """``count(*)`` of messages, or None while PostgreSQL does not answer."""
    try:
        conn = await asyncpg.connect(url, timeout=2, server_settings={"search_path": schema})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    finally:
        conn.terminate()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: Callable[[], str]) -> None:
    """Poll ``condition`` every 50 ms until true; fail with ``what()`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what()}")
        await asyncio.sleep(0.05)


async def drained(url: str, schema: str, redis: Redis, keys: Keys, rooms: list[str], expected: int,
                  state: dict[str, Any]) -> bool:
    """True once PostgreSQL holds ``expected`` rows and nothing is pending in the group."""
    state["count"] = await try_count(url, schema)
    if state["count"] is None or state["count"] < expected:
        return False
    state["pending"] = await pending_total(redis, keys, rooms)
    return state["pending"] == 0


async def assert_exactly_once(url: str, schema: str, redis: Redis, keys: Keys, rooms: list[str],
                              expected: int) -> None:
    rows = await stored_rows(url, schema)
    assert len(rows) == expected, f"{len(rows)} rows in PostgreSQL, expected {expected}"
    assert len(set(rows)) == len(rows), f"{len(rows) - len(set(rows))} duplicate (room, stream id) rows"
    in_redis = await stream_entries(redis, keys, rooms)
    assert len(in_redis) == expected
    assert set(rows) == in_redis, (f"missing from PostgreSQL: {sorted(in_redis - set(rows))[:5]}, "
                                   f"not in Redis: {sorted(set(rows) - in_redis)[:5]}")
    for room in rooms:
        pending = await redis.xpending(keys.stream(room), GROUP)
        assert pending["pending"] == 0, f"{room}: {pending}"


async def cancel_and_wait(task: asyncio.Future[Any], timeout_s: float = 10.0) -> None:
    """Cancel until done: on Python 3.11, asyncio.wait_for (inside redis-py) can drop one cancellation."""
    deadline = time.monotonic() + timeout_s
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and time.monotonic() > deadline:
            raise AssertionError(f"task still running {timeout_s}s after cancel: {task}")
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def private_pg() -> AsyncIterator[PgCluster]:
    """A private PostgreSQL cluster this test may stop and start; destroyed afterwards."""
    async with private_cluster() as cluster:
        yield cluster


@pytest.fixture
async def archivers(tmp_path: Path) -> AsyncIterator[Callable[[str, dict[str, str]], ArchiverProcess]]:
    """Start archiver subprocesses; every one still running is killed afterwards."""
    started: list[ArchiverProcess] = []

    def start(name: str, env: dict[str, str]) -> ArchiverProcess:
        proc = ArchiverProcess(name, env, tmp_path / f"archiver-{name}.log")
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            await asyncio.to_thread(proc.kill)


# ---------------------------------------------------------------------- PostgreSQL stopped under load


@pytest.mark.fault
@pytest.mark.timeout(120)
@needs_pg_binaries
async def test_postgres_stopped_immediately_while_5000_are_published_all_land_once(
        redis_client: Redis, prefix: str, private_pg: PgCluster,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    """PostgreSQL is stopped with -m immediate after 1,000 of 5,000 raw XADDs; the archiver waits with
    bounded memory, and after the restart all 5,000 are stored exactly once and acknowledged."""
    keys = Keys(prefix)
    rooms = [f"channel_pgdown{i}" for i in range(8)]
    url = private_pg.url()
    env = hub_env(prefix, DATABASE_URL=url, HUB_POSTGRES_SCHEMA="public", HUB_ARCHIVER_MAX_RETRY_DELAY_S="0.5")
    await run_cli(env, "migrate")
    archiver = archivers("x", env)
    await archiver.ready()

    await publish(redis_client, keys, rooms, 0, 1000)
    state: dict[str, Any] = {}
    await wait_until(lambda: drained(url, "public", redis_client, keys, rooms, 1000, state), 30,
                     lambda: f"the first 1,000 archived ({state}); log: {archiver.log_tail()}")

    await private_pg.astop("immediate")
    assert not private_pg.running()
    samples = [archiver.rss_kb()]
    retries_before = archiver.count_in_log("PostgreSQL unavailable")
    # One MULTI: the 4,000 entries exist together when the archiver is woken.
    await publish(redis_client, keys, rooms, 1000, 4000, chunk=4000, transaction=True)

    # While PostgreSQL is down: sample RSS until the archiver holds entries and has retried several times.
    max_in_flight = 0

    async def waited_long_enough() -> bool:
        nonlocal max_in_flight
        assert archiver.alive(), f"archiver exited while PostgreSQL was down; log: {archiver.log_tail()}"
        samples.append(archiver.rss_kb())
        in_flight = await pending_total(redis_client, keys, rooms)
        max_in_flight = max(max_in_flight, in_flight)
        retries = archiver.count_in_log("PostgreSQL unavailable") - retries_before
        return in_flight > 0 and retries >= 8 and len(samples) >= 10

    await wait_until(waited_long_enough, 30,
                     lambda: f"the archiver retrying with a held batch; log: {archiver.log_tail()}")
    assert not private_pg.running()

    await private_pg.astart()
    await wait_until(lambda: drained(url, "public", redis_client, keys, rooms, 5000, state), 60,
                     lambda: f"all 5,000 archived and acked ({state}); log: {archiver.log_tail()}")
    await assert_exactly_once(url, "public", redis_client, keys, rooms, 5000)

    code = await asyncio.to_thread(archiver.stop)
    assert code == 0, f"archiver exit {code}; log: {archiver.log_tail()}"
    assert archiver.stat("dead-lettered") == 0

    growth_kb = max(samples) - samples[0]
    assert growth_kb < 30 * 1024, f"RSS grew by {growth_kb} kB while PostgreSQL was down: {samples}"
    # The documented bound (two batches: one being written, one read meanwhile) while PG is down.
    assert max_in_flight <= 2 * BATCH_MAX_ROWS, (
        f"the archiver held {max_in_flight} entries while PostgreSQL was down, over "
        f"2 x batch_max_rows={BATCH_MAX_ROWS}")


@pytest.mark.fault
@pytest.mark.timeout(60)
async def test_entries_held_while_postgres_is_unreachable_stay_within_two_batches(
        redis_client: Redis, prefix: str) -> None:
    """With PostgreSQL unreachable and a backlog in 8 rooms, the archiver holds at most two batches
    (one being written, one read meanwhile)."""
    keys = Keys(prefix)
    rooms = [f"channel_bound{i}" for i in range(8)]
    await publish(redis_client, keys, rooms, 0, 8 * 300)
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    archiver = Archiver(redis_client, keys, PostgresConfig(url=unreachable),
                        ArchiverConfig(name="bound", batch_max_rows=500, read_count=500, max_retry_delay_s=0.1))
    await archiver.start()
    task = asyncio.ensure_future(archiver.run())
    try:
        async def retried() -> bool:
            assert not task.done(), task
            return archiver.stats.retries >= 3

        await wait_until(retried, 20, lambda: f"retries ({archiver.stats})")
        in_flight = await pending_total(redis_client, keys, rooms)
        assert in_flight <= 2 * 500, f"{in_flight} entries read and held while PostgreSQL is down (batch_max_rows=500)"
    finally:
        await cancel_and_wait(task)
        await archiver.close()


# ---------------------------------------------------------------------- two archivers, one stopped


@pytest.mark.fault
@pytest.mark.timeout(120)
async def test_two_archivers_one_stopped_midway_every_entry_stored_once(
        redis_client: Redis, prefix: str, pg_schema: str,
        archivers: Callable[[str, dict[str, str]], ArchiverProcess]) -> None:
    """Two archivers share the group while 2,000 entries arrive in 10 rooms; one gets SIGTERM mid-way and
    the other claims what it left, so every entry is stored exactly once and acknowledged."""
    keys = Keys(prefix)
    rooms = [f"channel_two{i}" for i in range(10)]
    env = hub_env(prefix, DATABASE_URL=PG_URL, HUB_POSTGRES_SCHEMA=pg_schema,
                  HUB_ARCHIVER_CLAIM_IDLE_MS="500", HUB_ARCHIVER_SWEEP_INTERVAL_S="0.5")
    first, second = archivers("arch-a", env), archivers("arch-b", env)
    await asyncio.gather(first.ready(), second.ready())

    # The first half in small round trips, so both archivers take part.
    await publish(redis_client, keys, rooms, 0, 1000, chunk=10)
    state: dict[str, Any] = {}

    async def some_archived() -> bool:
        state["count"] = await try_count(PG_URL, pg_schema)
        return (state["count"] or 0) >= 300

    await wait_until(some_archived, 30, lambda: f"300 rows archived ({state})")
    # Mid-way: stop the first while entries keep arriving.
    stopping = asyncio.ensure_future(asyncio.to_thread(first.stop))
    await publish(redis_client, keys, rooms, 1000, 1000, chunk=10)
    code = await stopping
    assert code == 0, f"arch-a exit {code}; log: {first.log_tail()}"
    left = 0
    for room in rooms:
        for consumer in await redis_client.xinfo_consumers(keys.stream(room), GROUP):
            if consumer["name"] in (b"arch-a", "arch-a"):
                left += int(consumer["pending"])
    took_part = first.stat("entries acked")
    assert took_part >= 0, f"no final counts from arch-a: {first.stdout!r}"
    assert took_part + left > 0, "arch-a never read anything: the test proves nothing"

    await wait_until(lambda: drained(PG_URL, pg_schema, redis_client, keys, rooms, 2000, state), 60,
                     lambda: f"all 2,000 archived and acked ({state}); arch-a left {left}; "
                             f"arch-b log: {second.log_tail()}")
    await assert_exactly_once(PG_URL, pg_schema, redis_client, keys, rooms, 2000)
    code = await asyncio.to_thread(second.stop)
    assert code == 0, f"arch-b exit {code}; log: {second.log_tail()}"
