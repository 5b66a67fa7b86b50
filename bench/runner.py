"""Runs a scenario N times, each run against a fresh target (a new ``hubctl serve`` when the bench starts
its own hub), with a hard time limit, and always closes its connections and deletes its Redis keys."""

from __future__ import annotations

import asyncio
import resource
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.load import Progress, Run
from bench.report import aggregate, summary
from bench.target import Target, existing_hub, start_hub
from hub.config import AuthConfig

Scenario = Callable[[Run, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class TargetSpec:
    """Which hub to load: ``url`` None starts one per run (``workers`` processes) on ``redis_url``."""

    redis_url: str
    # The existing hub's Redis key prefix (its config's redis.key_prefix).
    key_prefix: str = "hub:"
    url: str | None = None
    server_pid: int | None = None
    workers: int = 1
    # Signs tokens for an existing hub (its HS* secret, audience, issuer); unused when starting one.
    auth: AuthConfig | None = None
    database_url: str | None = None
    # Starts this instead of a hub (bench.nullhub's calibration server): a callable returning a Target.
    custom: Callable[[], Awaitable[Target]] | None = None


async def open_target(spec: TargetSpec, tag: str) -> Target:
    if spec.custom is not None:
        return await spec.custom()
    if spec.url is None:
        return await start_hub(spec.redis_url, workers=spec.workers, database_url=spec.database_url)
    if spec.auth is None:
        raise ValueError("an existing hub needs its JWT secret (--secret, JWT_SECRET or the config's auth.secret)")
    return await existing_hub(spec.url, spec.auth, spec.redis_url, spec.key_prefix, tag, spec.server_pid)


def raise_open_files_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


async def run_scenario(name: str, scenario: Scenario, spec: TargetSpec, *, runs: int, max_seconds: float,
                       payload_bytes: int, progress: Progress) -> dict[str, Any]:
    results = []
    for index in range(1, runs + 1):
        tag = f"bench-{secrets.token_hex(4)}"
        progress(f"== {name} run {index}/{runs} ({tag})")
        started = time.perf_counter()
        target = await open_target(spec, tag)
        run = Run(target, tag, progress, payload_bytes)
        result: dict[str, Any] = {"scenario": name, "run": index, "tag": tag,
                                  "target": {"url": f"ws://{target.host}:{target.port}",
                                             "started_here": target.process is not None,
                                             "workers": spec.workers if spec.url is None else None,
                                             "pids": target.pids(), "cleanup_pattern": target.cleanup_pattern}}
        try:
            async with asyncio.timeout(max_seconds):
                await scenario(run, result)
        except TimeoutError:
            result["aborted"] = f"hard stop after {max_seconds:.0f} s"
        except (RuntimeError, OSError, ValueError) as exc:
            result["aborted"] = f"error: {exc}"
        finally:
            await run.close()
            await target.stop()
        result.update(run.tracker.counters())
        result["elapsed_s"] = round(time.perf_counter() - started, 2)
        progress(summary(result))
        results.append(result)
    return aggregate(name, results)
