"""The API port: an aiohttp server for the REST endpoints, including POSTs with a JSON body (which
the WebSocket port cannot read). Thin: routing and bodies only; the endpoints live in hub.api."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from hub import metrics
from hub.api import MAX_BODY_BYTES, Api, fail
from hub.server import ADMIN_PATHS, CLUSTER_STATS_PATH, client_ip, is_admin_request

if TYPE_CHECKING:
    from hub.app import App


def build_api_app(app: App, api: Api) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws/health":
            response = await app.health_response()
            return web.Response(status=response.status_code, body=response.body,
                                content_type="application/json")
        if request.path in ADMIN_PATHS:
            server = app.config.server
            ip = client_ip(request.remote or "", request.headers.get("X-Forwarded-For"), server.trusted_proxies)
            assert app.guard is not None
            if not is_admin_request(server.admin_ips, app.guard.verifier, ip, request.headers.get("Authorization", ""),
                                    request.query_string):
                denied = fail(403, "forbidden", "admins only (server.admin_ips or an admin token)")
                return _json(denied.status, denied.body)
            if request.path == "/metrics":
                return web.Response(body=metrics.render(app), headers={"Content-Type": metrics.CONTENT_TYPE})
            if request.path == CLUSTER_STATS_PATH:
                try:
                    return _json(200, {"status": "success", "data": await app.cluster_stats.snapshot()})
                except (RedisError, OSError):
                    unavailable = fail(503, "unavailable", "Redis is unavailable; retry")
                    return _json(unavailable.status, unavailable.body)
            return _json(200, metrics.connection_stats(app))
        if not api.handles(request.path):
            reply = fail(404, "not_found", "no such endpoint")
        else:
            body = None
            if request.method == "POST":
                if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                    reply = fail(413, "too_large", "the body is too large")
                    return _json(reply.status, reply.body)
                body = await request.read()
            reply = await api.handle(request.method, request.path, request.query_string, request.headers, body)
        return _json(reply.status, reply.body)

    web_app = web.Application(client_max_size=MAX_BODY_BYTES)
    web_app.router.add_route("*", "/{tail:.*}", handle)
    return web_app


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
