"""Limits wired into the hub: message and typing rates, connection caps per IP and per user."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.exceptions import InvalidStatus

from hub.keys import Keys
from hub.server import client_ip
from tests.conftest import NodeFactory, url_of
from tests.helpers import connect, wait_until

ROOM = "channel_limits"


async def test_messages_over_the_rate_are_refused_and_not_stored(
        nodes: NodeFactory, redis_client: Redis, prefix: str) -> None:
    """With a burst of 5, the 6th to 8th of 8 quick messages get rate_limited with retry_after_ms, and
    only 5 entries reach the stream."""
    node = await nodes.start(**{"server.message_rate_limit_per_min": 60, "server.message_burst": 5})
    client = await connect(url_of(node), "1")
    await client.join(ROOM)
    for i in range(8):
        await client.send({"type": "chat_message", "room": ROOM, "content": f"m{i}", "client_msg_id": f"c{i}"})
    acks = [await client.expect("ack") for _ in range(5)]
    errors = [await client.expect("error") for _ in range(3)]
    assert [a["client_msg_id"] for a in acks] == [f"c{i}" for i in range(5)]
    for err in errors:
        assert err["code"] == "rate_limited" and err["request_type"] == "chat_message"
        assert err["retryable"] is True and 0 < err["retry_after_ms"] <= 60_000
    assert await redis_client.xlen(Keys(prefix).stream(ROOM)) == 5


async def test_the_message_rate_is_per_user_across_nodes(nodes: NodeFactory) -> None:
    """A user's budget is shared by their connections on two nodes; another user is unaffected."""
    overrides = {"server.message_rate_limit_per_min": 60, "server.message_burst": 3}
    a, b = await nodes.start(**overrides), await nodes.start(**overrides)
    on_a, on_b, other = await connect(url_of(a), "1"), await connect(url_of(b), "1"), await connect(url_of(b), "2")
    for client in (on_a, on_b, other):
        await client.join(ROOM)
    await on_a.say(ROOM, "1")
    await on_b.say(ROOM, "2")
    await on_a.say(ROOM, "3")
    await on_b.send({"type": "chat_message", "room": ROOM, "content": "4"})
    assert (await on_b.expect("error"))["code"] == "rate_limited"
    assert (await other.say(ROOM, "fine"))["type"] == "ack"


async def test_typing_over_the_rate_is_refused(nodes: NodeFactory) -> None:
    """typing_start beyond the typing burst gets rate_limited; typing_stop is never limited."""
    node = await nodes.start(**{"server.typing_rate_limit_per_min": 60, "server.typing_burst": 2})
    client = await connect(url_of(node), "1")
    await client.join(ROOM)
    for _ in range(3):
        await client.send({"type": "typing_start", "room": ROOM})
    err = await client.expect("error")
    assert err["code"] == "rate_limited" and err["request_type"] == "typing_start"
    await client.send({"type": "typing_stop", "room": ROOM})
    await client.send({"type": "ping"})
    await client.expect("pong")
    assert not [f for f in client.backlog if f["type"] == "error"]


async def expect_429(url: str, user: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, user)
    assert refused.value.response.status_code == 429
    assert int(refused.value.response.headers["Retry-After"]) >= 1


async def test_one_connection_more_than_the_ip_cap_gets_429(nodes: NodeFactory) -> None:
    """With 3 connections per IP across two nodes, the 4th gets HTTP 429; closing one frees a slot."""
    a, b = await nodes.start(**{"server.max_connections_per_ip": 3}), await nodes.start(
        **{"server.max_connections_per_ip": 3})
    held = [await connect(url_of(a), "1"), await connect(url_of(b), "2"), await connect(url_of(a), "3")]
    await expect_429(url_of(b), "4")
    await held[0].close()
    assert a.node is not None
    registry = a.node.registry
    await wait_until(lambda: "1" not in registry.users, what="the closed connection to leave the node")
    again = await connect(url_of(b), "4")
    assert again.established["type"] == "connection_established"


async def test_the_user_cap_counts_connections_of_one_user(nodes: NodeFactory) -> None:
    """A user may hold max_connections_per_user connections; the next gets 429, other users do not."""
    node = await nodes.start(**{"server.max_connections_per_user": 2})
    await connect(url_of(node), "1")
    await connect(url_of(node), "1")
    await expect_429(url_of(node), "1")
    await connect(url_of(node), "2")


async def test_connect_rate_per_ip(nodes: NodeFactory) -> None:
    """Connection attempts beyond the per-IP connect burst get 429."""
    node = await nodes.start(**{"server.connect_rate_limit_per_min": 60, "server.connect_burst": 3})
    for user in ("1", "2", "3"):
        await connect(url_of(node), user)
    await expect_429(url_of(node), "4")


@pytest.mark.fault
@pytest.mark.timeout(60)
async def test_ip_slots_of_a_killed_node_heal_within_the_ttl(hub_processes: Any) -> None:
    """A node is killed holding all of an IP's slots: the IP is refused at first, then admitted again
    on the other node within the lease TTL, with nobody cleaning up by hand."""
    env = {"WEBSOCKET_MAX_CONNECTIONS_PER_IP": "2", "HUB_RELAY_NODE_HEARTBEAT_S": "0.3",
           "HUB_RELAY_NODE_TTL_S": "1.5"}
    doomed = await hub_processes(**env)
    survivor = await hub_processes(**env)
    await connect(doomed.url, "1")
    await connect(doomed.url, "2")
    await expect_429(survivor.url, "3")
    doomed.process.send_signal(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        while True:
            try:
                client = await connect(survivor.url, "3")
                break
            except InvalidStatus as refused:
                assert refused.response.status_code == 429
                await asyncio.sleep(0.05)
    assert client.established["type"] == "connection_established"
    assert loop.time() - started < 1.5 + 1.0


@pytest.mark.parametrize("peer, header, trusted, expected", [
    ("10.0.0.5", None, (), "10.0.0.5"),
    ("10.0.0.5", "1.2.3.4", (), "10.0.0.5"),  # untrusted peer: its header is ignored
    ("10.0.0.5", "1.2.3.4", ("10.0.0.5",), "1.2.3.4"),
    ("10.0.0.5", "6.6.6.6, 1.2.3.4", ("10.0.0.5",), "1.2.3.4"),  # the client wrote 6.6.6.6 itself
    ("10.0.0.5", "1.2.3.4, 10.0.0.9", ("10.0.0.5", "10.0.0.9"), "1.2.3.4"),
    ("10.0.0.5", " , ", ("10.0.0.5",), "10.0.0.5"),
])
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
        peer: str, header: str | None, trusted: tuple[str, ...], expected: str) -> None:
    """X-Forwarded-For names the client only behind a configured proxy, and only its rightmost hop."""
    assert client_ip(peer, header, trusted) == expected
