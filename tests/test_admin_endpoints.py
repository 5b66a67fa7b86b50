"""/metrics and /ws/connection-stats are for admins: allowlisted IPs or an admin token."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import NodeFactory
from tests.helpers import mint, wait_until


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


async def test_metrics_count_traffic_by_room_type_latency_and_disconnects(nodes: NodeFactory) -> None:
    """After a chat round trip and a disconnect, /metrics has messages in/out by room type, a delivery
    latency histogram with the entries, a Redis round trip and disconnects by close code."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import url_of
    from tests.helpers import connect

    node = await nodes.start(**{"relay.node_heartbeat_s": 0.2, "relay.node_ttl_s": 2})
    sender, reader = await connect(url_of(node), "1"), await connect(url_of(node), "2")
    for client in (sender, reader):
        await client.join("channel_m")
    for i in range(3):
        await sender.say("channel_m", f"m{i}")
        await reader.expect("chat_message")
    await sender.close()
    assert node.node is not None
    metrics = node.node.metrics
    await wait_until(lambda: metrics.disconnects.get(1000) == 1 and metrics.redis_rtt_ms > 0, what="counters")
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{node.port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("streamhub_messages_in_total", (("room_type", "channel"),))] == 3
    assert samples[("streamhub_messages_out_total", (("room_type", "channel"),))] == 6  # both members
    assert samples[("streamhub_delivery_latency_seconds_count", ())] >= 3
    assert samples[("streamhub_disconnects_total", (("code", "1000"),))] == 1
    assert samples[("streamhub_redis_rtt_seconds", ())] > 0
