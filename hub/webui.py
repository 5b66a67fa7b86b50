"""The web UI on the WebSocket port: the chat page, the operator dashboard, their static files and the
JavaScript client, plus the development-only login (``GET /ui/dev-token``).

Files are served from a table built by listing ``hub/web/`` (symlinks followed: ``web/client/streamhub.js``
is the real ``clients/js/streamhub.js``). A request path is looked up in that table as an exact string,
never joined onto a directory, so no spelling of ``..`` (raw, percent-encoded, backslashes) can reach
a file outside it; anything not listed is a 404. Only known file types are listed.

Caching: every answer carries an ETag (a hash of the bytes) and ``Cache-Control: no-cache``, so browsers
revalidate (304, no body) instead of running a stale client after an upgrade; URLs are not fingerprinted,
so a long max-age would be wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from websockets.datastructures import Headers
from websockets.http11 import Response

from hub.auth import KNOWN_ROLES, is_valid_user_id, mint_token
from hub.config import Config
from hub.errors import HubError

WEB_ROOT = Path(__file__).resolve().parent / "web"
UI_PREFIX = "/ui/"

# URL -> file under WEB_ROOT, for the pages; the rest is listed from these folders under /ui/<folder>/.
PAGES = {"/ui/": "chat.html", "/ui/dashboard": "dashboard.html"}
FOLDERS = ("static", "client")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# A listed name: plain ASCII segments, no dot files.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}", re.ASCII)

# Pages may load scripts, styles and images from this origin only, and talk to it only (fetch and the
# WebSocket); no inline script, no framing.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

# Lifetime of a token minted by the dev login.
DEV_TOKEN_TTL_S = 12 * 3600


@dataclass
class _Cached:
    stamp: tuple[int, int]  # (mtime_ns, size) of the file the bytes were read from
    body: bytes
    etag: str


class StaticFiles:
    """The UI's files, read on first request and re-read when a file changes on disk (edits show up on
    reload without a restart)."""

    def __init__(self, root: Path = WEB_ROOT) -> None:
        self.root = root
        self.table = build_table(root)
        self._cache: dict[str, _Cached] = {}

    def response(self, url_path: str, if_none_match: str | None) -> Response | None:
        """The answer for ``url_path`` (``/ui/...``), or None when it names no file."""
        path = self.table.get(url_path)
        if path is None:
            return None
        try:
            entry = self._load(url_path, path)
        except OSError:
            return None
        headers = Headers([("Content-Type", CONTENT_TYPES[path.suffix]), ("ETag", entry.etag),
                           ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
                           ("Referrer-Policy", "no-referrer")])
        if path.suffix == ".html":
            headers["Content-Security-Policy"] = PAGE_POLICY
            headers["X-Frame-Options"] = "DENY"
        if if_none_match is not None and entry.etag in (tag.strip() for tag in if_none_match.split(",")):
            headers["Content-Length"] = "0"
            return Response(HTTPStatus.NOT_MODIFIED.value, HTTPStatus.NOT_MODIFIED.phrase, headers, b"")
        headers["Content-Length"] = str(len(entry.body))
        return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, entry.body)

    def _load(self, url_path: str, path: Path) -> _Cached:
        info = path.stat()
        stamp = (info.st_mtime_ns, info.st_size)
        entry = self._cache.get(url_path)
        if entry is None or entry.stamp != stamp:
            body = path.read_bytes()
            entry = _Cached(stamp, body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
            self._cache[url_path] = entry
        return entry


def build_table(root: Path) -> dict[str, Path]:
    """Every servable URL and its file: the pages, and each file of a known type under the folders."""
    table: dict[str, Path] = {}
    for url, name in PAGES.items():
        if (root / name).is_file():
            table[url] = root / name
    for folder in FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for directory, _dirs, files in os.walk(base, followlinks=False):
            for name in files:
                path = Path(directory) / name
                relative = path.relative_to(base).parts
                if path.suffix not in CONTENT_TYPES or not all(_SEGMENT.fullmatch(p) for p in relative):
                    continue
                if path.is_file():  # follows a symlink to the real file (the JS client)
                    table[f"{UI_PREFIX}{folder}/{'/'.join(relative)}"] = path
    return table


def redirect(location: str) -> Response:
    headers = Headers([("Location", location), ("Content-Length", "0"), ("Cache-Control", "no-cache")])
    return Response(HTTPStatus.FOUND.value, HTTPStatus.FOUND.phrase, headers, b"")


# ------------------------------------------------------------------------------------------ dev login


class DevLoginRefused(HubError):
    code = "dev_login_off"


def dev_token(config: Config, client_ip: str, query: str) -> dict[str, Any]:
    """``GET /ui/dev-token?user_id=NAME[&role=ROLE...]``: a token for any user, so the chat page can log
    in without a backend. Only with ``server.dev_login`` (``hubctl --dev serve`` turns it on), only for
    loopback clients (a hub bound to 0.0.0.0 in dev mode still mints nothing for the network), and
    only with an HS* secret. Raises :class:`DevLoginRefused` (HTTP 403) or ``ValueError`` (400)."""
    if not config.server.dev_login:
        raise DevLoginRefused("dev login is off; start the hub with hubctl --dev serve, or paste a token")
    if not _is_loopback(client_ip):
        raise DevLoginRefused("dev login answers loopback clients only")
    if not config.auth.algorithm.startswith("HS") or not config.auth.secret:
        raise DevLoginRefused("dev login needs an HS* secret (auth.secret)")
    params = parse_qs(query, max_num_fields=8)
    user_id = (params.get("user_id") or [""])[0]
    if not is_valid_user_id(user_id):
        raise ValueError("user_id must be 1-128 of A-Z a-z 0-9 _ . @ : -")
    roles = sorted(set(params.get("role", [])))
    unknown = [r for r in roles if r not in KNOWN_ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (known: {', '.join(sorted(KNOWN_ROLES))})")
    token = mint_token(config.auth, user_id, roles, (), DEV_TOKEN_TTL_S)
    return {"token": token, "user_id": user_id, "roles": roles, "expires_in_s": DEV_TOKEN_TTL_S}


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
