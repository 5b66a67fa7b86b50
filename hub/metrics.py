"""The node's own numbers for scrapers: ``GET /metrics`` (Prometheus text) and ``GET /ws/connection-stats``.

Nothing is counted here. A scrape reads the counters the node already keeps (:class:`hub.node.Metrics`,
the relay's and the publisher's counters, the registry's sizes) through a custom collector, so the
hot paths pay nothing for metrics and a node that is never scraped does no metrics work at all.

Each :class:`~hub.app.App` gets its own registry (several nodes may share a process in tests), never
prometheus-client's global one.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from websockets.datastructures import Headers
from websockets.http11 import Response

from hub import __version__
from hub.notifications import is_internal
from hub.ops import room_type

if TYPE_CHECKING:
    from hub.app import App
    from hub.session import Session

# The Prometheus text exposition format generate_latest() writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOP_USERS = 10

_registries: weakref.WeakKeyDictionary[App, CollectorRegistry] = weakref.WeakKeyDictionary()


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the event loop (a test calling collect() directly)
        return 0


class NodeCollector(Collector):
    """Reads one app's counters at scrape time."""

    def __init__(self, app: App) -> None:
        # Weak: the registry cache must not keep a stopped app alive.
        self._app = weakref.ref(app)

    def collect(self) -> Iterator[Metric]:
        app = self._app()
        if app is None:
            return
        info = GaugeMetricFamily("streamhub_node_info", "This node's id and version (always 1).",
                                 labels=["node_id", "version"])
        info.add_metric([app.node_id, __version__], 1)
        yield info
        yield GaugeMetricFamily("streamhub_draining", "1 while the node is shutting down.", value=int(app.draining))
        node = app.node
        if node is None:
            return
        yield GaugeMetricFamily("streamhub_node_start_time_seconds", "When the node started (unix time).",
                                value=node.started_at)
        sessions = list(node.registry.sessions)
        yield GaugeMetricFamily("streamhub_connections", "Open WebSocket connections.", value=len(sessions))
        by_client = GaugeMetricFamily("streamhub_connections_by_client_type",
                                      "Open connections by the client_type the client declared.",
                                      labels=["client_type"])
        for client_type, count in sorted(Counter(_client_type(s) for s in sessions).items()):
            by_client.add_metric([client_type], count)
        yield by_client
        yield GaugeMetricFamily("streamhub_connected_users", "Users with at least one open connection.",
                                value=len(node.registry.users))
        rooms = GaugeMetricFamily("streamhub_rooms", "Rooms with local members, by type.", labels=["type"])
        for kind, count in sorted(Counter(room_type(r) for r in list(node.registry.rooms)).items()):
            rooms.add_metric([kind], count)
        yield rooms
        metrics = node.metrics
        yield CounterMetricFamily("streamhub_connections_opened", "Connections accepted since start.",
                                  value=metrics.connections_opened)
        yield CounterMetricFamily("streamhub_frames_received", "Client frames received.",
                                  value=metrics.frames_received)
        yield CounterMetricFamily("streamhub_messages_published", "Chat messages stored (duplicates not counted).",
                                  value=metrics.messages_published)
        errors = CounterMetricFamily("streamhub_client_errors", "Error frames sent to clients, by code.",
                                     labels=["code"])
        for code, count in sorted(dict(metrics.client_errors).items()):
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily("streamhub_slow_disconnects", "Connections closed for not reading fast enough.",
                                  value=metrics.slow_disconnects)
        relay = node.relay
        yield GaugeMetricFamily("streamhub_relay_active_rooms", "Rooms whose stream this node reads.",
                                value=len(relay.active))
        yield CounterMetricFamily("streamhub_relay_reads", "XREADGROUP calls that returned.", value=relay.reads)
        yield CounterMetricFamily("streamhub_relay_entries_delivered", "Stream entries handed to local members.",
                                  value=relay.entries_delivered)
        yield CounterMetricFamily("streamhub_relay_undeliverable_entries",
                                  "Stream entries skipped as malformed or of an unknown type.",
                                  value=relay.undeliverable_entries)
        yield CounterMetricFamily("streamhub_relay_streams_lost",
                                  "Room streams that vanished under the relay (Redis lost data, or a purge).",
                                  value=relay.streams_lost)
        yield CounterMetricFamily("streamhub_epoch_mismatches",
                                  "Resumes from an older epoch of a room (data lost), answered recovered false.",
                                  value=metrics.epoch_mismatches)
        yield GaugeMetricFamily("streamhub_asyncio_tasks", "asyncio tasks alive in the node's process (leak watch).",
                                value=_task_count())
        yield CounterMetricFamily("streamhub_publish_batches", "Publish pipelines sent to Redis.",
                                  value=node.publisher.batches)
        disconnects = CounterMetricFamily("streamhub_disconnects", "Connections closed, by close code (0: none).",
                                          labels=["code"])
        for close_code, count in sorted(dict(metrics.disconnects).items()):
            disconnects.add_metric([str(close_code)], count)
        yield disconnects
        published = CounterMetricFamily("streamhub_messages_in", "Chat messages stored from this node's clients, "
                                        "by room type.", labels=["room_type"])
        for kind, count in sorted(dict(metrics.published_by_kind).items()):
            published.add_metric([kind], count)
        yield published
        delivered = CounterMetricFamily("streamhub_messages_out", "Frames handed to this node's connections, "
                                        "by room type.", labels=["room_type"])
        for kind, count in sorted(dict(metrics.delivered_by_kind).items()):
            delivered.add_metric([kind], count)
        yield delivered
        cumulative, buckets = 0, []
        for bound, count in zip(metrics.latency_buckets_ms, metrics.latency_counts, strict=False):
            cumulative += count
            buckets.append((str(bound / 1000), cumulative))
        buckets.append(("+Inf", cumulative + metrics.latency_counts[-1]))
        yield HistogramMetricFamily("streamhub_delivery_latency_seconds",
                                    "Time from a stream entry's id (its XADD) to its fan-out on this node.",
                                    buckets=buckets, sum_value=metrics.latency_sum_ms / 1000)
        yield GaugeMetricFamily("streamhub_redis_rtt_seconds", "Round trip of the last heartbeat PING.",
                                value=metrics.redis_rtt_ms / 1000)
        yield GaugeMetricFamily("streamhub_relay_rooms_waiting", "Rooms woken but not read yet (backlog).",
                                value=relay.rooms_waiting)


def registry_of(app: App) -> CollectorRegistry:
    registry = _registries.get(app)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(app))
        _registries[app] = registry
    return registry


def render(app: App) -> bytes:
    """The node's metrics in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(registry_of(app))


def connection_stats(app: App, top_n: int = TOP_USERS) -> dict[str, Any]:
    """This node's connections: total, unique users, rooms (notification streams excluded, as in
    /ws/health), per declared client_type, and the users with the most connections."""
    node = app.node
    sessions = list(node.registry.sessions) if node is not None else []
    users = {user: len(peers) for user, peers in node.registry.users.items()} if node is not None else {}
    top = sorted(users.items(), key=lambda item: (-item[1], item[0]))[:top_n]
    return {
        "status": "success",
        "data": {
            "node_id": app.node_id,
            "total_connections": len(sessions),
            "unique_users": len(users),
            "total_rooms": sum(1 for r in list(node.registry.rooms) if not is_internal(r)) if node else 0,
            "connections_by_client_type": dict(sorted(Counter(_client_type(s) for s in sessions).items())),
            "top_users": [{"user_id": user, "connections": count} for user, count in top],
        },
    }


def metrics_response(app: App) -> Response:
    """``GET /metrics`` on the WebSocket port (websockets' process_request answer)."""
    return _response(CONTENT_TYPE, render(app))


def connection_stats_response(app: App) -> Response:
    """``GET /ws/connection-stats`` on the WebSocket port."""
    return _response("application/json", orjson.dumps(connection_stats(app)))


def _response(content_type: str, body: bytes) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, body)


def _client_type(session: Session) -> str:
    return session.connection.client_type or "unknown"
