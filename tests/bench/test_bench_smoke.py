"""Smoke runs of ``hubctl bench``: every scenario, tiny, through the real CLI against a real hub (started by
the bench itself, or an existing one by URL), real Redis and PostgreSQL. Each asserts the JSON shape and
real outcomes: everything expected was delivered, once and in order, and the hub's CPU was sampled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner

from bench.client import LoadClient
from bench.stats import Tracker
from cli.main import cli
from tests.conftest import PG_URL, REDIS_URL, SECRET

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def redis_sync() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def bench(*args: str, **env: str) -> dict[str, Any]:
    """Run ``hubctl bench ARGS --json --quiet`` in-process; the parsed JSON document."""
    result = CliRunner().invoke(cli, ["bench", *args, "--json", "--quiet"], env={"REDIS_URL": REDIS_URL, **env},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = orjson.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def assert_shape(document: dict[str, Any], scenario: str, runs: int = 1) -> dict[str, Any]:
    """The documented shape; returns the first run. No run was aborted, nobody was disconnected."""
    assert document["scenario"] == scenario
    assert len(document["runs"]) == runs
    assert isinstance(document["median"], dict) and document["median"]
    assert document["worst"]["aborted"] == 0
    run = document["runs"][0]
    assert run["scenario"] == scenario and "params" in run and "elapsed_s" in run
    assert run.get("disconnects", 0) == 0, run.get("close_codes")
    return dict(run)


def assert_all_delivered(run: dict[str, Any]) -> None:
    assert run["expected"] > 0
    assert run["delivered"] == run["expected"], run
    assert run["duplicates"] == 0 and run["out_of_order"] == 0 and run["lost"] == 0
    latency = run["latency_ms"]
    assert latency["n"] == run["delivered"]
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def assert_server_sampled(run: dict[str, Any], phase: str = "proc") -> None:
    server = run[phase]["server"]
    assert server["cpu_s"] > 0, run[phase]
    assert server["rss_kb_after"] > 0
    assert run[phase]["loadgen"]["cpu_s"] > 0


def assert_keys_cleaned(redis_sync: redis.Redis, run: dict[str, Any]) -> None:
    pattern = run["target"]["cleanup_pattern"]
    assert pattern
    assert list(redis_sync.scan_iter(match=pattern, count=1000)) == []


def test_fanout_delivers_everything_once_in_order_and_reports_medians(redis_sync: redis.Redis) -> None:
    """fanout with 2 runs: every member gets every message once and in order, the hub's CPU and RSS are
    sampled, deliveries per server CPU-second computed, medians reported, the runs' keys deleted."""
    document = bench("fanout", "--subs", "10", "--rate", "20", "--duration", "1", "--drain", "2", "--runs", "2")
    run = assert_shape(document, "fanout", runs=2)
    for each in document["runs"]:
        assert each["expected"] == 20 * 10
        assert_all_delivered(each)
        assert_server_sampled(each)
        assert each["deliveries_per_server_cpu_s"] > 0
        assert each["self_echo"] == 20  # the publisher is a member: its own copies are not deliveries
        assert_keys_cleaned(redis_sync, each)
    assert run["target"]["started_here"] is True
    median = document["median"]
    assert median["delivered"] == 200 and median["delivery_ratio"] == 1.0
    assert median["latency_ms.p99"] > 0 and median["deliveries_per_server_cpu_s"] > 0
    assert document["worst"]["lost"] == 0 and document["worst"]["duplicates"] == 0


def test_rooms_every_member_publishes_and_receives_the_others(redis_sync: redis.Redis) -> None:
    """rooms 5 x 3 at 2 msg/s each for 1 s: 30 publishes, each delivered to the 2 other members."""
    run = assert_shape(bench("rooms", "--rooms", "5", "--members", "3", "--member-rate", "2", "--duration", "1",
                             "--drain", "2"), "rooms")
    assert run["published"] == 30 and run["expected"] == 60
    assert_all_delivered(run)
    assert_server_sampled(run)
    assert_keys_cleaned(redis_sync, run)


def test_connect_opens_every_connection_with_a_real_token(redis_sync: redis.Redis) -> None:
    """connect 60: every handshake (a JWT each) succeeds; rate and server CPU per connect are reported."""
    run = assert_shape(bench("connect", "--conns", "60", "--concurrency", "20"), "connect")
    assert run["connect"]["ok"] == 60 and run["connect"]["failed"] == 0
    assert run["connects_per_s"] > 0 and run["connects_per_server_cpu_s"] > 0
    assert run["connect"]["latency_ms"]["p99"] > 0
    assert_server_sampled(run)
    assert_keys_cleaned(redis_sync, run)


def test_idle_holds_connections_in_two_rooms_and_measures_memory(redis_sync: redis.Redis) -> None:
    """idle 60: all stay open through the hold, each joined two rooms; RSS per connection is reported."""
    run = assert_shape(bench("idle", "--conns", "60", "--hold", "0.5"), "idle")
    idle = run["idle"]
    assert idle["still_open"] == 60 and idle["disconnects_during_hold"] == 0
    assert idle["rooms_joined"] == 120
    assert isinstance(idle["server_rss_bytes_per_conn"], int)
    assert_server_sampled(run, "proc_connect")
    assert_keys_cleaned(redis_sync, run)


def test_ramp_reports_each_step_and_draws_the_plot(redis_sync: redis.Redis, tmp_path: Path) -> None:
    """ramp with 2 short steps: both pass with everything delivered, rates rise by the factor, and the
    latency-vs-load PNG is written."""
    plot = tmp_path / "ramp.png"
    run = assert_shape(bench("ramp", "--subs", "10", "--start", "20", "--factor", "2", "--step", "1",
                             "--step-drain", "2", "--max-steps", "2", "--plot", str(plot)), "ramp")
    steps = run["steps"]
    assert [step["rate"] for step in steps] == [20, 40]
    for step in steps:
        assert step["pass"] and step["delivery_ratio"] == 1.0
        assert step["duplicates"] == 0 and step["out_of_order"] == 0
        assert step["server_cpu_pct"] > 0 and step["p99_ms"] > 0
    assert run["best_rate"] == 40 and run["stop_reason"] == "max steps (2) reached"
    assert run["delivered"] == run["expected"] == (20 + 40) * 10
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert_keys_cleaned(redis_sync, run)


def test_publish_acks_every_message_and_delivers_it_to_the_room(redis_sync: redis.Redis) -> None:
    """publish 4 clients x 250 in 2 rooms: all 1,000 acked (ack latency measured), each delivered once to the
    other member of its room. (Enough messages for the hub's CPU time to register: /proc counts 10 ms ticks.)"""
    run = assert_shape(bench("publish", "--clients", "4", "--messages", "250", "--window", "8", "--rooms", "2"),
                       "publish")
    assert run["acked"] == 1000 and run["ack_latency_ms"]["n"] == 1000
    assert run["ack_latency_ms"]["p99"] > 0 and run["messages_per_s"] > 0
    assert run["messages_per_server_cpu_s"] > 0
    assert run["expected"] == 1000
    assert_all_delivered(run)
    assert_server_sampled(run)
    assert_keys_cleaned(redis_sync, run)


def test_archive_stores_every_entry_once() -> None:
    """archive 600 rows: raw COPY and the archiver both measured; every entry committed and acked once."""
    run = assert_shape(bench("archive", "--rows", "600", "--rooms", "3", "--database-url", PG_URL), "archive")
    assert run["delivered"] == 600 and run["lost"] == 0 and run["duplicates"] == 0 and run["pending_after"] == 0
    assert run["raw_copy_rows_per_s"] > 0 and run["archiver_rows_per_s"] > 0 and run["ratio"] > 0
    assert run["archiver_cpu_s"] > 0


def test_calibrate_measures_the_generator_against_the_null_hub() -> None:
    """calibrate: the ramp runs against the null hub (no Redis) and everything is delivered."""
    run = assert_shape(bench("calibrate", "--subs", "10", "--start", "50", "--step", "1", "--step-drain", "2",
                             "--max-steps", "1"), "calibrate")
    assert run["steps"][0]["pass"] and run["delivered"] == run["expected"] == 500
    assert run["steps"][0]["deliveries_per_loadgen_cpu_s"] > 0


async def test_existing_hub_by_url_is_sampled_and_cleaned_by_tag(hub_processes: Any, prefix: str,
                                                                  redis_client: Any) -> None:
    """--url with --server-pid and --secret: the bench loads a hub it did not start, samples that PID,
    and deletes the keys its run made (found by the run's tag) while leaving the hub running."""
    hub = await hub_processes()
    document = await asyncio.to_thread(bench, "fanout", "--url", hub.url, "--server-pid", str(hub.process.pid),
                                       "--secret", SECRET, "--subs", "5", "--rate", "10", "--duration", "1",
                                       "--drain", "2", HUB_REDIS_KEY_PREFIX=prefix)
    run = assert_shape(document, "fanout")
    assert run["target"]["started_here"] is False and run["target"]["pids"]["server"] == hub.process.pid
    assert_all_delivered(run)
    assert_server_sampled(run)
    assert run["target"]["cleanup_pattern"] == f"*{run['tag']}*"
    assert [key async for key in redis_client.scan_iter(match=f"*{run['tag']}*")] == []
    node_rooms = [key async for key in redis_client.scan_iter(match=f"{prefix}node:*:rooms")]
    for key in node_rooms:  # the hub finished its own leave handling before the keys went
        assert not [room for room in await redis_client.smembers(key) if run["tag"].encode() in room]
    assert hub.process.poll() is None


def test_non_loopback_url_is_refused() -> None:
    """Load goes to this machine only: a URL naming another host is refused before anything connects."""
    result = CliRunner().invoke(cli, ["bench", "connect", "--url", "ws://192.0.2.1:8000", "--secret", SECRET,
                                      "--conns", "1", "--quiet"], env={"REDIS_URL": REDIS_URL})
    assert result.exit_code != 0
    assert "non-loopback" in result.output


async def test_tracker_counts_duplicates_reordering_and_echoes() -> None:
    """The accounting itself: a repeated (publisher, seq) is a duplicate, a lower seq after a higher one is
    out of order, a publisher's own message is an echo, and nothing after the drain counts as delivered."""
    tracker = Tracker()
    phase = tracker.new_phase()
    receiver = LoadClient(1, "ws://127.0.0.1:1/", tracker)
    publisher_id = 7

    def deliver(seq: int, pub: int = publisher_id) -> None:
        content = orjson.dumps({"ts": 0.0, "seq": seq, "pub": pub, "st": 0, "body": ""}).decode()
        tracker.chat(receiver, {"type": "chat_message", "content": content}, 0.001)

    for seq in (0, 2, 1, 2):
        deliver(seq)
    deliver(0, pub=receiver.id)
    assert (phase.delivered, phase.duplicates, phase.out_of_order, tracker.self_echo) == (3, 1, 1, 1)
    phase.final = True
    deliver(3)
    assert phase.delivered == 3 and phase.late_after_drain == 1
    tracker.chat(receiver, {"type": "chat_message", "content": "not json"}, 0.0)
    assert tracker.bad_payload == 1
