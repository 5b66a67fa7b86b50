"""The web UI's HTTP side on the WebSocket port (no browser): pages and files with their content types and
caching headers, no path traversal, the dev login (only in dev mode, only for loopback clients), the
dashboard's /ws/cluster-stats (admins only), and the packaging of the files."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hub import webui
from hub.cluster_stats import ARCHIVER_GROUP
from hub.config import load_config
from tests.conftest import ROOT, NodeFactory, free_port, hub_env
from tests.helpers import connect, mint

HTTP_TIMEOUT_S = 10.0


async def raw_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET ``target`` exactly as written (no client-side normalisation of '..' or '%2e'): status, headers
    (lower-case names), body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(HTTP_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            parsed = dict(line.split(": ", 1) for line in header_lines if ": " in line)
            found = {k.lower(): v for k, v in parsed.items()}
            body = await reader.readexactly(int(found.get("content-length", "0")))
    finally:
        writer.close()
    return int(status_line.split()[1]), found, body


@pytest.mark.parametrize(("path", "content_type", "file"), [
    ("/ui/", "text/html; charset=utf-8", "hub/web/chat.html"),
    ("/ui/dashboard", "text/html; charset=utf-8", "hub/web/dashboard.html"),
    ("/ui/static/chat.js", "text/javascript; charset=utf-8", "hub/web/static/chat.js"),
    ("/ui/static/style.css", "text/css; charset=utf-8", "hub/web/static/style.css"),
    ("/ui/static/favicon.svg", "image/svg+xml", "hub/web/static/favicon.svg"),
    # The page imports the real client, not a copy.
    ("/ui/client/streamhub.js", "text/javascript; charset=utf-8", "clients/js/streamhub.js"),
])
async def test_pages_and_files_are_served_with_type_and_revalidation(nodes: NodeFactory, path: str,
                                                                     content_type: str, file: str) -> None:
    """Each file comes with its content type, nosniff, no-cache and an ETag; asking again with that ETag
    gets 304 and no body. Pages carry a same-origin Content-Security-Policy."""
    node = await nodes.start()
    assert node.port is not None
    status, headers, body = await raw_get(node.port, path)
    assert status == 200
    assert body == (ROOT / file).read_bytes()
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"
    if content_type.startswith("text/html"):
        assert "default-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    status, again, body = await raw_get(node.port, path, {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")
    assert again["etag"] == headers["etag"]
    status, _, body = await raw_get(node.port, path, {"If-None-Match": '"something-else"'})
    assert status == 200 and body


async def test_root_and_ui_redirect_to_the_chat_page(nodes: NodeFactory) -> None:
    """/ and /ui send the browser to /ui/ (relative links in the pages resolve from there)."""
    node = await nodes.start()
    assert node.port is not None
    for path in ("/", "/ui"):
        status, headers, _ = await raw_get(node.port, path)
        assert (status, headers["location"]) == (302, "/ui/")


TRAVERSALS = [
    "/ui/static/../../config.py",
    "/ui/static/../../../pyproject.toml",
    "/ui/client/../../../hub/config.py",
    "/ui/static/%2e%2e/%2e%2e/config.py",
    "/ui/static/..%2f..%2fconfig.py",
    "/ui/static/%2E%2E%2F%2E%2E%2Fconfig.py",
    "/ui/static/..\\..\\config.py",
    "/ui/static//etc/passwd",
    "/ui//etc/passwd",
    "/ui/static/%2fetc%2fpasswd",
    "/ui/client/streamhub.js/../../../../hub/config.py",
    "/ui/static/chat.js%00.html",
    "/ui/../hub/config.py",
    "/ui/chat.html/..",
    "/ui/web/chat.html",
    "/ui/static/",
    "/ui/static/.gitignore",
    "/ui/static/./chat.js",
]


async def test_no_path_reaches_a_file_outside_the_table(nodes: NodeFactory) -> None:
    """Raw '..', percent-encoded and backslash spellings, absolute paths, NUL and dot files all get 404
    JSON: a path is looked up in the table of listed files, never joined onto a directory."""
    node = await nodes.start()
    assert node.port is not None
    secret_bits = [b"load_config", b"[project]", b"root:"]
    for target in TRAVERSALS:
        status, headers, body = await raw_get(node.port, target)
        assert status == 404, target
        assert headers["content-type"] == "application/json", target
        assert not any(bit in body for bit in secret_bits), target


def test_table_lists_known_types_and_plain_names_only(tmp_path: Path) -> None:
    """Only files of a known type with plain names are listed; a file linked in (the JS client) is, a linked
    folder is not walked, and nothing outside the folders appears."""
    root = tmp_path / "web"
    (root / "static" / "img").mkdir(parents=True)
    (root / "client").mkdir()
    (root / "chat.html").write_text("<p>chat</p>")
    (root / "static" / "app.js").write_text("1")
    (root / "static" / "img" / "logo.svg").write_text("<svg/>")
    (root / "static" / "notes.py").write_text("secret")
    (root / "static" / ".hidden.js").write_text("x")
    (root / "static" / "we ird.js").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "client.js").write_text("the client")
    (outside / "other.js").write_text("x")
    (root / "client" / "client.js").symlink_to(outside / "client.js")
    (root / "static" / "linked").symlink_to(outside, target_is_directory=True)
    table = webui.build_table(root)
    assert sorted(table) == ["/ui/", "/ui/client/client.js", "/ui/static/app.js", "/ui/static/img/logo.svg"]
    files = webui.StaticFiles(root)
    response = files.response("/ui/client/client.js", None)
    assert response is not None and response.body == b"the client"
    assert files.response("/ui/static/notes.py", None) is None


def test_a_changed_file_is_served_fresh(tmp_path: Path) -> None:
    """An edited file is re-read (new bytes, new ETag) without restarting the hub."""
    root = tmp_path / "web"
    (root / "static").mkdir(parents=True)
    path = root / "static" / "app.js"
    path.write_text("one")
    files = webui.StaticFiles(root)
    first = files.response("/ui/static/app.js", None)
    path.write_text("second version")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = files.response("/ui/static/app.js", None)
    assert first is not None and second is not None
    assert second.body == b"second version" and first.headers["ETag"] != second.headers["ETag"]


# ------------------------------------------------------------------------------------------ dev login


async def test_dev_login_is_refused_unless_dev_mode(nodes: NodeFactory) -> None:
    """Without server.dev_login the endpoint mints nothing (403 dev_login_off)."""
    node = await nodes.start()
    assert node.port is not None
    status, _, body = await raw_get(node.port, "/ui/dev-token?user_id=alice")
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == "dev_login_off"


async def test_dev_login_mints_a_token_the_hub_accepts(nodes: NodeFactory) -> None:
    """In dev mode a loopback client gets a token for the name it gives (roles optional) and it opens a
    WebSocket as that user; bad names and roles are 400."""
    node = await nodes.start(**{"server.dev_login": True, "server.admin_ips": ()})
    assert node.port is not None
    status, _, body = await raw_get(node.port, "/ui/dev-token?user_id=alice&role=admin")
    assert status == 200
    data = orjson.loads(body)["data"]
    assert (data["user_id"], data["roles"]) == ("alice", ["admin"])
    client = await connect(f"ws://127.0.0.1:{node.port}", "alice", token=data["token"])
    assert client.established["user_id"] == "alice"
    await client.close()
    # The admin role works where admin_ips admits nobody.
    status, _, _ = await raw_get(node.port, "/ws/connection-stats", {"Authorization": f"Bearer {data['token']}"})
    assert status == 200
    for query in ("user_id=a%20b", "user_id=", "user_id=x&role=root", ""):
        status, _, body = await raw_get(node.port, f"/ui/dev-token?{query}")
        assert status == 400, query
        assert orjson.loads(body)["error"]["code"] == "invalid_parameter"


async def test_dev_login_answers_loopback_clients_only(nodes: NodeFactory) -> None:
    """A client behind a trusted proxy (X-Forwarded-For names a remote address) is refused; a forged
    X-Forwarded-For from an untrusted peer changes nothing (the peer is loopback)."""
    node = await nodes.start(**{"server.dev_login": True, "server.trusted_proxies": ("127.0.0.1",)})
    assert node.port is not None
    status, _, body = await raw_get(node.port, "/ui/dev-token?user_id=alice", {"X-Forwarded-For": "203.0.113.9"})
    assert status == 403 and b"loopback" in body
    plain = await nodes.start(**{"server.dev_login": True})
    assert plain.port is not None
    status, _, _ = await raw_get(plain.port, "/ui/dev-token?user_id=alice", {"X-Forwarded-For": "203.0.113.9"})
    assert status == 200


def test_dev_login_rules_without_a_server() -> None:
    """Remote addresses and non-HS algorithms are refused even in dev mode."""
    config = load_config(None, hub_env("x:"), {"server.dev_login": True})
    assert webui.dev_token(config, "::1", "user_id=bob")["user_id"] == "bob"
    for ip in ("10.0.0.7", "192.168.1.2", "2001:db8::1", "", "not-an-ip"):
        with pytest.raises(webui.DevLoginRefused):
            webui.dev_token(config, ip, "user_id=bob")


@pytest.mark.timeout(90)
async def test_hubctl_dev_serve_serves_the_ui_and_the_dev_login(prefix: str, tmp_path: Path) -> None:
    """``hubctl --dev serve`` is the one command: the page, the client and the dev login answer on the
    WebSocket's port."""
    port = free_port()
    env = {**os.environ, **hub_env(prefix), "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "--dev", "serve", "--port", str(port), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"ready" in line
        for path in ("/ui/", "/ui/dashboard", "/ui/client/streamhub.js", "/ui/dev-token?user_id=1"):
            status, _, _ = await raw_get(port, path)
            assert status == 200, path
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert f"web UI: http://127.0.0.1:{port}/ui/".encode() in stderr


# ------------------------------------------------------------------------------------------ cluster stats


async def test_cluster_stats_is_for_admins_on_both_ports(nodes: NodeFactory) -> None:
    """/ws/cluster-stats answers 403 without an admin token where no address is allowlisted, and the
    cluster snapshot (this node alive, its consumer group) with one, on the WebSocket and the API port."""
    node = await nodes.start(**{"server.admin_ips": ()})
    admin = {"Authorization": f"Bearer {mint('ops', roles=['admin'])}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as http:
        for port in (node.port, node.api_port):
            url = f"http://127.0.0.1:{port}/ws/cluster-stats"
            async with http.get(url) as r:
                assert r.status == 403
            async with http.get(url, headers={"Authorization": f"Bearer {mint('7', roles=['customer'])}"}) as r:
                assert r.status == 403
            async with http.get(url, headers=admin) as r:
                assert r.status == 200
                data: dict[str, Any] = (await r.json())["data"]
            assert data["node_id"] == node.node_id
            assert [n["node_id"] for n in data["nodes"] if n["alive"]] == [node.node_id]
            assert "dead_letters" in data and "groups" in data and "connections" in data


async def test_cluster_stats_are_shared_between_close_requests(nodes: NodeFactory) -> None:
    """Concurrent and back-to-back requests share one snapshot (one SCAN of the keyspace per interval)."""
    node = await nodes.start()
    first, second = await asyncio.gather(node.cluster_stats.snapshot(), node.cluster_stats.snapshot())
    assert first is second
    assert await node.cluster_stats.snapshot() is first


def test_archiver_group_matches_the_archiver() -> None:
    """hub does not import consumers; the group name it reports the archive lag under is the archiver's."""
    from consumers.archiver import GROUP

    assert ARCHIVER_GROUP == GROUP


def test_package_data_covers_every_ui_file() -> None:
    """``pip install .`` ships what the hub serves: every listed file matches pyproject's package-data."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hub"]
    table = webui.build_table(webui.WEB_ROOT)
    for url, path in table.items():
        parts = path.relative_to(ROOT / "hub").parts
        # setuptools' globs: '*' stays within one folder
        assert any(len(parts) == len(p.split("/")) and all(map(fnmatch.fnmatchcase, parts, p.split("/")))
                   for p in patterns), (url, parts)
    assert {"/ui/", "/ui/dashboard", "/ui/client/streamhub.js", "/ui/static/chat.js"} <= set(table)
