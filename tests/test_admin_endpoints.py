"""/metrics and /ws/connection-stats are for admins: allowlisted IPs or an admin token."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import NodeFactory
from tests.helpers import mint


@pytest.mark.parametrize("path", ["/metrics", "/ws/connection-stats"])
async def test_admin_endpoints_need_an_allowlisted_ip_or_an_admin_token(nodes: NodeFactory, path: str) -> None:
    """With no IP allowlisted, both ports answer 403 without a token or with a customer token, and
    200 with an admin token (header or query)."""
    node = await nodes.start(**{"server.admin_ips": ()})
    async with aiohttp.ClientSession() as http:
        for port in (node.port, node.api_port):
            base = f"http://127.0.0.1:{port}{path}"
            async with http.get(base) as r:
                assert r.status == 403
            async with http.get(base, headers={"Authorization": f"Bearer {mint('7', roles=['customer'])}"}) as r:
                assert r.status == 403
            async with http.get(base, headers={"Authorization": f"Bearer {mint('8', roles=['admin'])}"}) as r:
                assert r.status == 200
            async with http.get(f"{base}?token={mint('8', roles=['admin'])}") as r:
                assert r.status == 200


async def test_loopback_is_allowlisted_by_default(nodes: NodeFactory) -> None:
    """The default allowlist (loopback) lets a local scraper in without a token."""
    node = await nodes.start()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{node.port}/metrics") as r:
        assert r.status == 200 and "streamhub_connections" in await r.text()
