"""``GET /ws/cluster-stats``: the snapshot ``hubctl stats --json`` prints (nodes, connections, rooms,
consumer groups and their lag, dead letters, archive lag), for the operator dashboard.

A snapshot SCANs the hub's keys, so it is taken at most once per :data:`MIN_INTERVAL_S` per node: callers
within that time (several dashboards polling) share the last one, and concurrent callers share the
collection in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from hub.ops import collect_stats

if TYPE_CHECKING:
    from hub.app import App

# The archivers' consumer group (consumers.archiver.GROUP; hub does not import consumers, and a test keeps
# the two equal), so that stats can tell the archive's lag from the nodes'.
ARCHIVER_GROUP = "archiver"
MIN_INTERVAL_S = 2.0
TOP_N = 10


class ClusterStatsView:
    def __init__(self, app: App) -> None:
        self._app = app
        # The last snapshot (as a dict) and when it was taken (monotonic); None before the first.
        self._last: dict[str, Any] | None = None
        self._taken_at = 0.0
        # The collection in flight, shared by concurrent callers; None when idle.
        self._pending: asyncio.Future[dict[str, Any]] | None = None

    async def snapshot(self) -> dict[str, Any]:
        """The cluster's stats, at most :data:`MIN_INTERVAL_S` old. Raises what Redis raises."""
        if self._last is not None and time.monotonic() - self._taken_at < MIN_INTERVAL_S:
            return self._last
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._collect())
            self._pending.add_done_callback(self._settled)
        # shield: one caller going away (its client disconnected) must not cancel the others' answer.
        return await asyncio.shield(self._pending)

    def _settled(self, future: asyncio.Future[dict[str, Any]]) -> None:
        if self._pending is future:
            self._pending = None
        if not future.cancelled():
            future.exception()  # retrieved: every waiter got it already, or none is left to

    async def close(self) -> None:
        """Stop a collection in flight (the node is stopping)."""
        if self._pending is not None:
            pending = self._pending
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

    async def _collect(self) -> dict[str, Any]:
        app = self._app
        assert app.redis is not None
        stats = await collect_stats(app.redis, app.keys, archiver_group=ARCHIVER_GROUP, pg=app.pool,
                                    pg_error=None if app.pool is not None else "PostgreSQL is not connected",
                                    top_n=TOP_N)
        self._last = stats.to_dict() | {"node_id": app.node_id}
        self._taken_at = time.monotonic()
        return self._last
