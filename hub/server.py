"""The network surface: websockets ``serve``, the handshake checks, and the bodiless HTTP endpoints.

Authentication happens in ``process_request``, before the upgrade: a bad or missing token gets
HTTP 401 without any Redis read (only an audit event is queued). A verified token is then checked
for revocation (one pipelined round trip; 401 "token revoked") and against the connection limits
(429). The token arrives in the ``token`` query parameter (browsers cannot set headers on a
WebSocket) or an ``Authorization: Bearer`` header; it is never logged nor audited.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
from redis.exceptions import RedisError
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from hub import metrics, webui
from hub.errors import AuthError
from hub.logs import protect_logger
from hub.session import HubConnection
from hub.tokens import TokenGuard

if TYPE_CHECKING:
    from hub.app import App

log = logging.getLogger("hub.server")
# websockets logs request lines and headers at DEBUG: they carry the token.
protect_logger("websockets.server")

WS_PATH = "/ws/connect"
CLUSTER_STATS_PATH = "/ws/cluster-stats"
# Answered to server.admin_ips or an admin token only.
ADMIN_PATHS = ("/metrics", "/ws/connection-stats", CLUSTER_STATS_PATH)
DEV_TOKEN_PATH = "/ui/dev-token"


def json_response(status: HTTPStatus, body: dict[str, Any]) -> Response:
    payload = orjson.dumps(body)
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                       ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, payload)


def error_response(status: HTTPStatus, code: str, message: str) -> Response:
    return json_response(status, {"status": "error", "error": {"code": code, "message": message}})


class Handshake:
    """``process_request`` for websockets: routes HTTP endpoints and authenticates upgrades."""

    def __init__(self, app: App, guard: TokenGuard) -> None:
        self._app = app
        self._guard = guard

    async def __call__(self, connection: Any, request: Request) -> Response | None:
        assert isinstance(connection, HubConnection)
        url = urlsplit(request.path)
        if url.path == WS_PATH:
            refused = self._authenticate(connection, request, url.query)
            if refused is not None:
                return refused
            return await self._admit(connection, request)
        if url.path == "/ws/health":
            return await self._app.health_response()
        if url.path in ADMIN_PATHS:
            ip = client_ip(_peer(connection), request.headers.get("X-Forwarded-For"),
                           self._app.config.server.trusted_proxies)
            if not self._is_admin(ip, request.headers.get("Authorization", ""), url.query):
                return error_response(HTTPStatus.FORBIDDEN, "forbidden",
                                      "admins only (server.admin_ips or an admin token)")
            if url.path == "/metrics":
                return metrics.metrics_response(self._app)
            if url.path == CLUSTER_STATS_PATH:
                return await self._cluster_stats()
            return metrics.connection_stats_response(self._app)
        if url.path in ("/", "/ui") or url.path.startswith("/ui/"):
            return self._web(connection, request, url.path, url.query)
        api = self._app.api
        if api is not None and api.handles(url.path):
            if request.headers.get("Content-Length", "0") not in ("", "0") or "Transfer-Encoding" in request.headers:
                return error_response(HTTPStatus.METHOD_NOT_ALLOWED, "use_api_port",
                                      "requests with a body go to the API port (server.api_port)")
            reply = await api.handle("GET", url.path, url.query, request.headers, None)
            return json_response(HTTPStatus(reply.status), reply.body)
        return error_response(HTTPStatus.NOT_FOUND, "not_found", "no such endpoint")

    async def _cluster_stats(self) -> Response:
        try:
            snapshot = await self._app.cluster_stats.snapshot()
        except (RedisError, OSError) as exc:
            log.warning("cluster stats failed: %s", type(exc).__name__)
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", "Redis is unavailable; retry")
        return json_response(HTTPStatus.OK, {"status": "success", "data": snapshot})

    def _web(self, connection: HubConnection, request: Request, path: str, query: str) -> Response:
        """The web UI (hub.webui): pages, static files, the dev login."""
        if path in ("/", "/ui"):
            return webui.redirect("/ui/")
        if path == DEV_TOKEN_PATH:
            ip = client_ip(_peer(connection), request.headers.get("X-Forwarded-For"),
                           self._app.config.server.trusted_proxies)
            try:
                minted = webui.dev_token(self._app.config, ip, query)
            except webui.DevLoginRefused as exc:
                return error_response(HTTPStatus.FORBIDDEN, exc.code, exc.message)
            except ValueError as exc:
                return error_response(HTTPStatus.BAD_REQUEST, "invalid_parameter", str(exc))
            log.info("dev login: token minted for user %s from %s", minted["user_id"], ip)
            return json_response(HTTPStatus.OK, {"status": "success", "data": minted})
        found = self._app.web.response(path, request.headers.get("If-None-Match"))
        return found or error_response(HTTPStatus.NOT_FOUND, "not_found", "no such page")

    def _is_admin(self, ip: str, authorization: str, query: str) -> bool:
        return is_admin_request(self._app.config.server.admin_ips, self._guard.verifier, ip, authorization, query)

    def _authenticate(self, connection: HubConnection, request: Request, query: str) -> Response | None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return error_response(HTTPStatus.UPGRADE_REQUIRED, "upgrade_required",
                                  "this endpoint speaks WebSocket only")
        if self._app.draining:
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "draining", "node is shutting down")
        connection.client_ip = client_ip(_peer(connection), request.headers.get("X-Forwarded-For"),
                                         self._app.config.server.trusted_proxies)
        params = parse_qs(query, keep_blank_values=True, max_num_fields=32)
        token = _first(params, "token")
        if token is None:
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        try:
            connection.verified = self._guard.verifier.verify(token)
        except AuthError as exc:
            log.info("handshake refused from %s: %s", connection.client_ip, exc.message)
            self._guard.audit.record("auth_failure", ip=connection.client_ip, what="handshake", reason=exc.message)
            return error_response(HTTPStatus.UNAUTHORIZED, "unauthorized", exc.message)
        connection.client_type = (_first(params, "client_type") or "")[:32]
        connection.client_version = (_first(params, "client_version") or "")[:32]
        connection.device_id = (_first(params, "device_id") or "")[:128]
        return None


    async def _admit(self, connection: HubConnection, request: Request) -> Response | None:
        """Revocation (HTTP 401), then the per-IP connect rate and per-IP/per-user connection caps
        (HTTP 429), before the upgrade."""
        node = self._app.node
        verified = connection.verified
        assert node is not None and verified is not None
        ip = connection.client_ip
        user_id = verified.principal.user_id
        try:
            revoked = await self._guard.store.is_revoked(verified)
        except (RedisError, OSError):
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable",
                                  "cannot check the token for revocation now; retry later")
        if revoked:
            connection.verified = None
            log.info("handshake refused from %s: token revoked (user %s)", ip, user_id)
            self._guard.audit.record("auth_failure", who=user_id, ip=ip, what="handshake", reason="token revoked")
            return error_response(HTTPStatus.UNAUTHORIZED, "unauthorized", "token revoked")
        decision, lease = await node.limits.admit_connection(ip, user_id)
        if lease is None:
            log.info("connection refused (limit) from %s", ip)
            self._guard.audit.record("rate_limited", who=user_id, ip=ip, what="connect")
            response = error_response(HTTPStatus.TOO_MANY_REQUESTS, "rate_limited",
                                      "too many connections; retry later")
            response.headers["Retry-After"] = str(max(1, -(-decision.retry_after_ms // 1000)))
            return response
        connection.lease = lease
        # The 101 goes out with the hello, in one write (hub.session.HubConnection.hold_response).
        connection.hold_response()
        return None


def is_admin_request(admin_ips: tuple[str, ...], verifier: Any, ip: str, authorization: str, query: str) -> bool:
    """An allowlisted client IP, or a valid token (header or ?token=) carrying the admin role."""
    if ip in admin_ips:
        return True
    token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else _first(
        parse_qs(query, max_num_fields=8), "token")
    try:
        return bool(token) and "admin" in verifier.verify(token).principal.roles
    except AuthError:
        return False


def client_ip(peer: str, forwarded_for: str | None, trusted_proxies: tuple[str, ...]) -> str:
    """The client's address: the socket peer, or, when the peer is a trusted proxy, the rightmost
    X-Forwarded-For entry that is not itself a trusted proxy (entries left of it are client-written)."""
    if not forwarded_for or peer not in trusted_proxies:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted_proxies:
            return hop[:64]
    return peer


def _first(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _peer(connection: HubConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else ""
