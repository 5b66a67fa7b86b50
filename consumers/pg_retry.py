"""Retrying a PostgreSQL write while the server is away, shared by the consumers.

A consumer holds its batch and retries with exponential backoff (capped) until PostgreSQL answers;
it reads nothing more meanwhile, so memory stays bounded and the entries wait in Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger("consumers.pg_retry")

# Errors that mean "PostgreSQL is not there right now": retry the same write later.
CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                     asyncpg.CannotConnectNowError, asyncio.TimeoutError)


async def until_written(write: Callable[[], Awaitable[None]], reconnect: Callable[[], Awaitable[None]],
                        max_delay_s: float, on_retry: Callable[[], None]) -> None:
    """Run ``write`` until it succeeds; after each connection failure call ``on_retry`` and
    ``reconnect`` (drop the broken connection), then wait 50 ms doubling up to ``max_delay_s``."""
    delay = 0.05
    while True:
        try:
            await write()
            return
        except CONNECTION_ERRORS as exc:
            on_retry()
            log.warning("PostgreSQL unavailable (%s); retrying in %.2fs", type(exc).__name__, delay)
            await reconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
