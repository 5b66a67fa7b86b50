"""A node stops promptly after real load whose streams vanished under it: ``hubctl bench rooms`` against it (1,000
connections in 500 rooms), told another key prefix so that its cleanup does not wait for the node to release the
rooms and deletes the run's streams while the node still reads them (as a purge or a Redis data loss would)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from hub.app import App
from tests.conftest import REDIS_URL, ROOT, SECRET, make_config


@pytest.mark.timeout(120)
async def test_node_stops_promptly_after_a_bench_run_deleted_its_streams(prefix: str) -> None:
    """The relay's read loop met vanished streams (NOGROUP, groups restored) right before shutdown; a
    cancellation swallowed there (redis-py's wait_for on Python 3.11) used to leave it running under a TaskGroup
    that cancels only once, and stop() waited forever. Now each relay task is cancelled until it is done."""
    app = App(make_config(prefix, **{"server.drain_timeout_s": 2}))
    await app.start()
    try:
        env = {**os.environ, "REDIS_URL": REDIS_URL, "HUB_REDIS_KEY_PREFIX": f"other{prefix}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        bench = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "bench", "rooms", "--rooms", "500", "--members", "2", "--member-rate",
            "1", "--duration", "3", "--url", f"ws://127.0.0.1:{app.port}", "--secret", SECRET, "--quiet",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(bench.communicate(), 90)
        assert bench.returncode == 0, stderr.decode()[-2000:]
    finally:
        started = time.monotonic()
        await asyncio.wait_for(app.stop(), 20)
    assert time.monotonic() - started < 10
