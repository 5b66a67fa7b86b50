"""Rate limits (GCRA) and connection caps (expiring leases) against the real Redis, and what each
does when Redis cannot be asked."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from hub.lua import Scripts
from hub.ratelimit import FAIL_CLOSED_RETRY_MS, ConnectionCaps, Decision, RateLimiter
from tests.conftest import REDIS_URL

# Nothing listens on port 1: every command fails at once with a connection error.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


async def limiter_on(redis: Redis, *, fail_open: bool = False) -> RateLimiter:
    scripts = Scripts(redis)
    await scripts.load()
    return RateLimiter(scripts, fail_open=fail_open)


async def caps_on(redis: Redis, *, fail_open: bool = False) -> ConnectionCaps:
    scripts = Scripts(redis)
    await scripts.load()
    return ConnectionCaps(scripts, fail_open=fail_open)


async def redis_now_us(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


# --- rate limits -------------------------------------------------------------------------------

async def test_two_nodes_200_concurrent_hits_allow_exactly_50(prefix: str, redis_client: Redis) -> None:
    """200 concurrent hits through two limiters on two Redis connections admit exactly the burst of 50."""
    other = Redis.from_url(REDIS_URL)
    try:
        nodes = [await limiter_on(redis_client), await limiter_on(other)]
        key = f"{prefix}rl:{{user:u1}}:msg"
        decisions = await asyncio.gather(*(nodes[i % 2].hit(key, 50, 50) for i in range(200)))
    finally:
        await other.aclose()
    assert sum(d.allowed for d in decisions) == 50
    refused = [d for d in decisions if not d.allowed]
    assert all(d.retry_after_ms > 0 and d.remaining == 0 for d in refused)
    # The key lives no longer than the time to refill the whole burst (50 x 1.2 s).
    assert 0 < await redis_client.pttl(key) <= 60_000


async def test_steady_sender_at_the_rate_is_never_refused(prefix: str, redis_client: Redis) -> None:
    """A sender pacing itself just slower than 600/min with burst 1 is admitted every time for ~1 s."""
    limiter = await limiter_on(redis_client)
    key = f"{prefix}rl:{{user:u1}}:typing"
    decisions = []
    for _ in range(10):
        decisions.append(await limiter.hit(key, 600, 1))
        # Each hit reaches Redis at least 110 ms after the previous one was decided (100 ms needed).
        # Deliberate sleep: the pacing is the behaviour under test.
        await asyncio.sleep(0.11)  # by design; noqa: sleep-ok
    assert all(d.allowed for d in decisions), decisions
    burst = [await limiter.hit(key, 600, 1), await limiter.hit(key, 600, 1)]
    assert burst[0].allowed and not burst[1].allowed


async def test_retry_after_is_exact_and_bounded(prefix: str, redis_client: Redis) -> None:
    """A refused hit's retry_after_ms is positive, at most interval x burst, and waiting it is enough."""
    limiter = await limiter_on(redis_client)
    key = f"{prefix}rl:{{ip:127.0.0.1}}:connect"
    interval_ms, burst = 100, 3  # 600 per minute
    first = [await limiter.hit(key, 600, burst) for _ in range(burst)]
    assert [d.allowed for d in first] == [True] * burst
    assert [d.remaining for d in first] == [2, 1, 0]
    refused = await limiter.hit(key, 600, burst)
    assert not refused.allowed
    assert 0 < refused.retry_after_ms <= interval_ms * burst
    # Deliberate sleep: waiting retry_after_ms is under test.
    await asyncio.sleep(refused.retry_after_ms / 1000)  # by design; noqa: sleep-ok
    assert (await limiter.hit(key, 600, burst)).allowed


async def test_cost_zero_asks_and_cost_above_burst_is_rejected(prefix: str, redis_client: Redis) -> None:
    """cost=0 reports remaining without spending, and a cost that can never fit raises ValueError."""
    limiter = await limiter_on(redis_client)
    key = f"{prefix}rl:{{user:u2}}:msg"
    assert await limiter.hit(key, 60, 5, cost=0) == Decision(True, 0, 5)
    assert await redis_client.exists(key) == 0
    assert await limiter.hit(key, 60, 5, cost=3) == Decision(True, 0, 2)
    refused = await limiter.hit(key, 60, 5, cost=3)
    assert not refused.allowed and refused.remaining == 2
    assert 0 < refused.retry_after_ms <= 1000
    with pytest.raises(ValueError):
        await limiter.hit(key, 60, 5, cost=6)
    with pytest.raises(ValueError):
        await limiter.hit(key, 0, 5)


_example_ids = itertools.count()


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    rate_per_min = draw(st.integers(min_value=1, max_value=600_000))
    burst = draw(st.integers(min_value=1, max_value=20))
    costs = draw(st.lists(st.integers(min_value=0, max_value=burst), min_size=1, max_size=60))
    return rate_per_min, burst, costs


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_tight_loop_never_exceeds_burst_plus_rate_times_elapsed(
        prefix: str, scenario: tuple[int, int, list[int]]) -> None:
    """For any rate, burst and cost sequence sent in a tight loop, admitted cells stay within burst + rate x elapsed."""
    rate_per_min, burst, costs = scenario
    key = f"{prefix}rl:{{prop:{next(_example_ids)}}}:msg"

    async def run() -> tuple[list[Decision], int]:
        redis = Redis.from_url(REDIS_URL)
        try:
            limiter = await limiter_on(redis)
            start_us = await redis_now_us(redis)
            decisions = [await limiter.hit(key, rate_per_min, burst, cost) for cost in costs]
            return decisions, await redis_now_us(redis) - start_us
        finally:
            await redis.aclose()

    decisions, elapsed_us = asyncio.run(run())
    admitted = sum(cost for cost, d in zip(costs, decisions, strict=True) if d.allowed)
    interval_us = -(-60_000_000 // rate_per_min)
    assert admitted <= burst + elapsed_us // interval_us + 1
    # No under-admission either: a refusal means less than `cost` of the burst was left.
    for index, (cost, decision) in enumerate(zip(costs, decisions, strict=True)):
        if not decision.allowed:
            spent = sum(c for c, d in zip(costs[:index], decisions[:index], strict=True) if d.allowed)
            assert spent > burst - cost
            assert decision.retry_after_ms > 0


# --- connection caps ---------------------------------------------------------------------------

async def test_cap_of_three_refuses_the_fourth_until_one_is_released(prefix: str, redis_client: Redis) -> None:
    """With limit 3 the fourth acquire is refused, a released slot admits the next, and re-acquiring counts once."""
    caps = await caps_on(redis_client)
    key = f"{prefix}cc:{{ip:10.0.0.1}}"
    first = [await caps.acquire(key, f"n1:{i}", 3, 30_000) for i in range(3)]
    assert [d.allowed for d in first] == [True] * 3
    assert [d.remaining for d in first] == [2, 1, 0]
    assert (await caps.acquire(key, "n1:0", 3, 30_000)).allowed  # renewal, not a second slot
    fourth = await caps.acquire(key, "n2:0", 3, 30_000)
    assert not fourth.allowed and fourth.remaining == 0
    assert 0 < fourth.retry_after_ms <= 30_000
    assert await caps.release(key, "n1:1") is True
    assert await caps.release(key, "n1:1") is False
    assert (await caps.acquire(key, "n2:0", 3, 30_000)).allowed
    assert await redis_client.zcard(key) == 3
    assert 0 < await redis_client.pttl(key) <= 30_000


async def test_killed_node_leases_lapse_and_the_key_admits_again(prefix: str, redis_client: Redis) -> None:
    """Leases of a node that dies without refreshing lapse after lease_ms, and the cap admits again."""
    key = f"{prefix}cc:{{user:u1}}"
    dead = Redis.from_url(REDIS_URL)
    try:
        dead_caps = await caps_on(dead)
        for i in range(3):
            assert (await dead_caps.acquire(key, f"dead:{i}", 3, 300)).allowed
    finally:
        await dead.aclose()  # the node is gone: nobody refreshes its leases
    caps = await caps_on(redis_client)
    started = time.monotonic()
    decision = await caps.acquire(key, "live:0", 3, 30_000)
    assert not decision.allowed
    deadline = started + 3.0
    while not decision.allowed and time.monotonic() < deadline:
        # Bounded polling, paced by the cap's own hint (when the oldest lease lapses).
        # Deliberate sleep: lease expiry under test.
        await asyncio.sleep(max(decision.retry_after_ms, 10) / 1000)  # by design; noqa: sleep-ok
        decision = await caps.acquire(key, "live:0", 3, 30_000)
    assert decision.allowed
    assert time.monotonic() - started >= 0.25
    # The dead leases were taken moments apart, so they lapse moments apart (the first one freed the slot
    # above); each acquire prunes the lapsed ones.
    deadline = time.monotonic() + 3.0
    while await redis_client.zrange(key, 0, -1) != [b"live:0"] and time.monotonic() < deadline:
        # Deliberate sleep: lease expiry under test.
        await asyncio.sleep(0.05)  # by design; noqa: sleep-ok
        assert (await caps.acquire(key, "live:0", 3, 30_000)).allowed
    assert await redis_client.zrange(key, 0, -1) == [b"live:0"]
    # A node that comes back too late learns which leases it lost; they are not revived.
    assert sorted(await caps.refresh(key, ["dead:0", "dead:1", "live:0"], 30_000)) == ["dead:0", "dead:1"]
    assert await redis_client.zcard(key) == 1


async def test_refresh_many_renews_every_key_in_few_round_trips(prefix: str, redis_client: Redis) -> None:
    """refresh_many renews 600 keys (the heartbeat's per-user lease keys) in pipelined batches, reports
    only the members that had lost their lease, and keeps the event loop responsive meanwhile."""
    caps = await caps_on(redis_client)
    keys = [f"{prefix}cc:{{user:u{i}}}" for i in range(600)]
    for key in keys:
        assert (await caps.acquire(key, "n1:0", 5, 30_000)).allowed
    leases: list[tuple[str, list[str]]] = [(key, ["n1:0"]) for key in keys]
    leases[7] = (keys[7], ["n1:0", "gone:1"])  # a member that never held a lease here
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def probe() -> None:
        nonlocal worst
        while True:
            started = loop.time()
            await asyncio.sleep(0)
            worst = max(worst, loop.time() - started)

    watcher = asyncio.ensure_future(probe())
    try:
        assert await caps.refresh_many(leases, 60_000) == ["gone:1"]
    finally:
        watcher.cancel()
    for key in keys[:5] + keys[-5:]:
        assert 55_000 < await redis_client.pttl(key) <= 60_000
    assert caps._refresh.batches <= 3  # 600 calls, MAX_BATCH 512: two or three pipelines
    assert worst < 0.5  # no long stall (a task per key used to stall the loop for tens of ms at 5,000 keys)
    assert await caps.refresh_many([], 60_000) == []


async def test_refresh_keeps_leases_alive_past_the_lease(prefix: str, redis_client: Redis) -> None:
    """Members refreshed every 100 ms hold a 300 ms lease for three lease periods; the cap stays full."""
    caps = await caps_on(redis_client)
    key = f"{prefix}cc:{{ip:10.0.0.2}}"
    members = [f"n1:{i}" for i in range(3)]
    for member in members:
        assert (await caps.acquire(key, member, 3, 300)).allowed
    started = time.monotonic()
    while time.monotonic() - started < 0.9:
        # Deliberate sleep: the refresh period is the behaviour under test.
        await asyncio.sleep(0.1)  # by design; noqa: sleep-ok
        assert await caps.refresh(key, members, 300) == []
        assert not (await caps.acquire(key, "n2:0", 3, 300)).allowed
    assert sorted(m.decode() for m in await redis_client.zrange(key, 0, -1)) == members
    assert 0 < await redis_client.pttl(key) <= 300
    assert await caps.refresh(key, [], 300) == []


# --- Redis unreachable -------------------------------------------------------------------------

@pytest.mark.parametrize("fail_open", [True, False])
async def test_unreachable_redis_fails_open_or_closed(fail_open: bool, caplog: pytest.LogCaptureFixture) -> None:
    """With nothing listening, limiter and caps answer by their fail_open choice, never raise, and log no key."""
    dead = Redis.from_url(DEAD_REDIS_URL, socket_connect_timeout=1)
    try:
        scripts = Scripts(dead)
        limiter = RateLimiter(scripts, fail_open=fail_open, name="msg_limit")
        caps = ConnectionCaps(scripts, fail_open=fail_open, name="ip_caps")
        with caplog.at_level(logging.WARNING, logger="hub.ratelimit"):
            hits = [await limiter.hit("hub:rl:{user:secret-user}:msg", 60, 5) for _ in range(3)]
            acquired = await caps.acquire("hub:cc:{ip:203.0.113.9}", "n1:0", 3, 30_000)
            lost = await caps.refresh("hub:cc:{ip:203.0.113.9}", ["n1:0"], 30_000)
            released = await caps.release("hub:cc:{ip:203.0.113.9}", "n1:0")
    finally:
        await dead.aclose()
    expected = Decision(True, 0, 0) if fail_open else Decision(False, FAIL_CLOSED_RETRY_MS, 0)
    assert hits == [expected] * 3
    assert acquired == expected
    assert lost == [] and released is False
    # One warning per limiter for the outage, not one per decision; no key, user or address in it.
    warnings = [r.getMessage() for r in caplog.records if r.name == "hub.ratelimit"]
    assert len(warnings) == 2, warnings
    assert "msg_limit" in warnings[0] and "ip_caps" in warnings[1]
    assert "ConnectionError" in warnings[0]
    assert not any("secret-user" in w or "203.0.113.9" in w for w in warnings)
