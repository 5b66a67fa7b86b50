"""Fixtures of the fault suite: the ledger each scenario verifies at its end, private Redis servers, and
archiver subprocesses (the archiver tests' helper)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.faults.invariants import Ledger
from tests.redis_server import PrivateRedis
from tests.test_archiver_faults import ArchiverProcess, archivers, private_pg  # noqa: F401 - fixtures

__all__ = ["ArchiverProcess"]


@pytest.fixture
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    """The scenario's ledger, named after the test; every client it made is closed afterwards."""
    book = Ledger(request.node.name.removeprefix("test_"))
    yield book
    await book.close_clients()


@pytest.fixture
async def private_redis() -> AsyncIterator[Callable[..., Awaitable[PrivateRedis]]]:
    """Start private redis-servers (``PrivateRedis`` options); all destroyed afterwards."""
    started: list[PrivateRedis] = []

    async def start(**options: Any) -> PrivateRedis:
        server = PrivateRedis(**options)
        started.append(server)
        await asyncio.to_thread(server.start)
        return server

    yield start
    for server in started:
        await asyncio.to_thread(server.destroy)
