"""Room naming and access rules: the pure parser and checks, then the same rules over real WebSockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from cli.main import cli
from hub.app import App
from hub.errors import Forbidden, InvalidRoom
from hub.keys import Keys
from hub.notifications import is_internal
from hub.rooms import AccessRules, Principal, Room, RoomKind, check_publish, needs_grant, parse_room
from tests.conftest import hub_env, url_of
from tests.helpers import Client, connect

# ---------------------------------------------------------------------- names

VALID_NAMES: list[tuple[str, RoomKind, tuple[int, ...]]] = [
    ("order_1", RoomKind.ORDER, (1,)),
    ("quote_456", RoomKind.QUOTE, (456,)),
    ("user_3_9", RoomKind.DIRECT, (3, 9)),
    ("support_12", RoomKind.SUPPORT, (12,)),
    ("channel_general", RoomKind.CHANNEL, ()),
    ("channel_a-b_c", RoomKind.CHANNEL, ()),
]

# Every name here must be refused with InvalidRoom, by the parser and over the wire.
HOSTILE_NAMES: list[Any] = [
    "order_\u0661\u0662",  # Arabic-Indic digits (str.isdigit() says yes, re.ASCII says no)
    "order_1_2",
    "order_12\n",
    "user_9_3",  # DM ids out of canonical order
    "user_3_3",  # a DM with oneself
    "Order_7",
    "order_012",  # leading zero: would alias order_12
    "order_",
    "order_-1",
    "order_1 ",
    "channel_",
    "channel_UPPER",
    "order_" + "1" * 10_240,  # 10 KB
    "channel_" + "a" * 10_240,
    12,
    None,
    ["order_1"],
    {"room": "order_1"},
    "order_1\x00",
    "channel_a\x00b",
    "order_\uff11\uff12",  # fullwidth digits
]


def _name_id(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


@pytest.mark.parametrize(("name", "kind", "ids"), VALID_NAMES, ids=[v[0] for v in VALID_NAMES])
def test_parse_room_accepts_canonical_names(name: str, kind: RoomKind, ids: tuple[int, ...]) -> None:
    """Each canonical room name parses to its kind and ids, and the canonical name is the input itself."""
    room = parse_room(name)
    assert room == Room(kind, name, ids)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_name_id)
def test_parse_room_refuses_hostile_names(name: Any) -> None:
    """Every non-canonical, look-alike, oversized or non-string room name is refused with InvalidRoom."""
    with pytest.raises(InvalidRoom) as info:
        parse_room(name)
    assert info.value.code == "invalid_room"


def test_parse_room_length_limit_is_configurable() -> None:
    """A name exactly at max_length parses and one character more is refused."""
    name = "channel_" + "a" * 24
    assert parse_room(name, max_length=len(name)).name == name
    with pytest.raises(InvalidRoom):
        parse_room(name + "a", max_length=len(name))


# ---------------------------------------------------------------------- access rules (pure)

RULES = AccessRules()


def test_needs_grant_for_direct_rooms() -> None:
    """A DM admits exactly its two users without a grant and refuses everyone else outright."""
    room = parse_room("user_3_9")
    assert needs_grant(room, Principal("3"), RULES) is False
    assert needs_grant(room, Principal("9"), RULES) is False
    with pytest.raises(Forbidden):
        needs_grant(room, Principal("5"), RULES)
    with pytest.raises(Forbidden):
        needs_grant(room, Principal("39"), RULES)


def test_needs_grant_for_order_quote_and_support_rooms() -> None:
    """Order/quote/support rooms need a grant unless the token lists them; support staff need none."""
    for name in ("order_7", "quote_7", "support_7"):
        room = parse_room(name)
        assert needs_grant(room, Principal("1", frozenset({"customer"})), RULES) is True
        assert needs_grant(room, Principal("1", token_rooms=frozenset({name})), RULES) is False
        assert needs_grant(room, Principal("1", token_rooms=frozenset({name + "0"})), RULES) is True
    support = parse_room("support_7")
    assert needs_grant(support, Principal("2", frozenset({"support"})), RULES) is False
    assert needs_grant(parse_room("order_7"), Principal("2", frozenset({"support"})), RULES) is True


def test_needs_grant_for_channels_and_admins() -> None:
    """Channels admit any user; admins read every room unless admin_all_rooms is off."""
    assert needs_grant(parse_room("channel_general"), Principal("1"), RULES) is False
    admin = Principal("1", frozenset({"admin"}))
    for name in ("order_7", "quote_7", "support_7", "user_3_9"):
        assert needs_grant(parse_room(name), admin, RULES) is False
    strict = AccessRules(admin_all_rooms=False)
    assert needs_grant(parse_room("order_7"), admin, strict) is True
    with pytest.raises(Forbidden):
        needs_grant(parse_room("user_3_9"), admin, strict)


def test_check_publish_channel_roles() -> None:
    """Channel publishing is open by default and limited to the configured roles (plus admin) when set."""
    channel = parse_room("channel_news")
    check_publish(channel, Principal("1"), RULES)
    limited = AccessRules(channel_publish_roles=("support",))
    with pytest.raises(Forbidden):
        check_publish(channel, Principal("1", frozenset({"customer"})), limited)
    check_publish(channel, Principal("1", frozenset({"support"})), limited)
    check_publish(channel, Principal("1", frozenset({"admin"})), limited)
    with pytest.raises(Forbidden):
        check_publish(channel, Principal("1", frozenset({"admin"})),
                      AccessRules(admin_all_rooms=False, channel_publish_roles=("support",)))
    # The publish rule is about channels only; other rooms were decided by the read check.
    check_publish(parse_room("order_7"), Principal("1", frozenset({"customer"})), limited)


# ---------------------------------------------------------------------- over the wire


async def expect_error(client: Client, code: str, request_type: str, **match: Any) -> dict[str, Any]:
    """The next frame is an error with ``code`` answering ``request_type``."""
    frame = await client.recv()
    assert frame.get("type") == "error", frame
    assert frame.get("code") == code, frame
    assert frame.get("request_type") == request_type, frame
    for key, value in match.items():
        assert frame.get(key) == value, frame
    return frame


async def assert_open(client: Client) -> None:
    """The connection still answers: a ping gets the next frame, a pong."""
    await client.send({"type": "ping", "request_id": "alive"})
    await client.expect("pong", request_id="alive")


async def say_and_echo(client: Client, room: str, content: str) -> dict[str, Any]:
    """Send a chat message and wait for both its ack and its own delivery back (in either order)."""
    await client.send({"type": "chat_message", "room": room, "content": content})
    ack: dict[str, Any] | None = None
    echo: dict[str, Any] | None = None
    while ack is None or echo is None:
        frame = await client.recv()
        if frame.get("type") == "ack" and ack is None:
            ack = frame
        elif frame.get("type") == "chat_message" and frame.get("content") == content and echo is None:
            echo = frame
        elif frame.get("type") == "presence_update":
            continue  # others coming and going is not what this helper checks
        else:
            raise AssertionError(f"expected the ack and echo of {content!r}, got {frame}")
    assert ack["id"] == echo["id"] and echo["room"] == room
    return echo


async def room_keys(redis: Redis, prefix: str) -> list[bytes]:
    """Every per-room key (hash-tagged ``{prefix}{room}:...``) under the test's prefix, except the
    notification streams every connection is attached to (inbox, system, role) and user indexes."""
    internal = tuple(f"{prefix}{{{p}".encode() for p in ("inbox:", "system}", "role:", "user:"))
    return [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)
            if key.startswith(f"{prefix}{{".encode()) and not key.startswith(internal)]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_name_id)
async def test_join_hostile_name_gets_invalid_room(node: App, redis_client: Redis, prefix: str,
                                                   name: Any) -> None:
    """A hostile name in join_room gets invalid_room, the connection stays open, and Redis is untouched."""
    client = await connect(url_of(node), "1", roles=["admin"])
    await client.send({"type": "join_room", "room": name, "request_id": "j1"})
    await expect_error(client, "invalid_room", "join_room", request_id="j1")
    await assert_open(client)
    assert await room_keys(redis_client, prefix) == []
    read_by_node = await redis_client.smembers(node.keys.node_rooms(node.node_id))
    assert all(is_internal(room.decode()) for room in read_by_node), read_by_node
    await client.close()


async def test_direct_room_only_for_its_two_users(node: App) -> None:
    """user_3_9 refuses user 5 with forbidden and lets users 3 and 9 join and chat."""
    url = url_of(node)
    outsider = await connect(url, "5")
    await outsider.send({"type": "join_room", "room": "user_3_9"})
    await expect_error(outsider, "forbidden", "join_room", room="user_3_9")
    await assert_open(outsider)

    three = await connect(url, "3")
    nine = await connect(url, "9")
    await three.join("user_3_9")
    await nine.join("user_3_9")
    ack = await three.say("user_3_9", "hi nine")
    got = await nine.expect("chat_message", room="user_3_9")
    assert got["content"] == "hi nine" and got["sender_id"] == "3" and got["id"] == ack["id"]
    for client in (outsider, three, nine):
        await client.close()


async def test_order_room_needs_a_grant(node: App, redis_client: Redis, prefix: str) -> None:
    """order_N refuses a user without a grant and admits them once the backend's grant is in Redis."""
    client = await connect(url_of(node), "4", roles=["customer"])
    await client.send({"type": "join_room", "room": "order_41"})
    await expect_error(client, "forbidden", "join_room", room="order_41")
    await redis_client.sadd(Keys(prefix).acl("order_41"), "4")
    joined = await client.join("order_41")
    assert joined["room"] == "order_41"
    await client.close()


async def test_order_grant_is_per_room_and_per_user(node: App, redis_client: Redis, prefix: str) -> None:
    """A grant on order_41 admits neither another order room nor another user."""
    await redis_client.sadd(Keys(prefix).acl("order_41"), "4")
    four = await connect(url_of(node), "4")
    other = await connect(url_of(node), "44")
    await four.send({"type": "join_room", "room": "order_410"})
    await expect_error(four, "forbidden", "join_room")
    await other.send({"type": "join_room", "room": "order_41"})
    await expect_error(other, "forbidden", "join_room")
    await four.close()
    await other.close()


async def test_token_rooms_claim_admits_without_grant(node: App) -> None:
    """A token whose signed rooms claim lists order_42 joins it with no grant in Redis, and only that room."""
    client = await connect(url_of(node), "4", rooms=["order_42"])
    joined = await client.join("order_42")
    assert joined["room"] == "order_42"
    await client.send({"type": "join_room", "room": "order_43"})
    await expect_error(client, "forbidden", "join_room")
    await client.close()


async def test_support_room_access(node: App, redis_client: Redis, prefix: str) -> None:
    """support_N admits the support role, the owner only when granted, and refuses other customers."""
    url = url_of(node)
    agent = await connect(url, "100", roles=["support"])
    await agent.join("support_8")

    owner = await connect(url, "6", roles=["customer"])
    await owner.send({"type": "join_room", "room": "support_8"})
    await expect_error(owner, "forbidden", "join_room")
    await redis_client.sadd(Keys(prefix).acl("support_8"), "6")
    await owner.join("support_8")

    stranger = await connect(url, "7", roles=["customer"])
    await stranger.send({"type": "join_room", "room": "support_8"})
    await expect_error(stranger, "forbidden", "join_room")

    await owner.say("support_8", "my order is late")
    got = await agent.expect("chat_message", room="support_8")
    assert got["sender_id"] == "6"
    for client in (agent, owner, stranger):
        await client.close()


async def test_channel_admits_any_authenticated_user(node: App) -> None:
    """channel_x is joinable by a user with no roles and no grants."""
    client = await connect(url_of(node), "31")
    joined = await client.join("channel_x")
    assert joined["room"] == "channel_x"
    await client.close()


async def test_admin_joins_every_room(node: App) -> None:
    """The admin role joins order, quote, support and someone else's DM rooms without grants."""
    admin = await connect(url_of(node), "900", roles=["admin"])
    for name in ("order_5", "quote_6", "support_7", "user_3_9", "channel_ops"):
        joined = await admin.join(name)
        assert joined["room"] == name
    await admin.close()


async def test_chat_in_room_not_joined_is_refused(node: App) -> None:
    """A chat_message to a room the connection has not joined gets not_joined and stores nothing."""
    client = await connect(url_of(node), "1")
    await client.send({"type": "chat_message", "room": "channel_general", "content": "hi", "request_id": 7})
    await expect_error(client, "not_joined", "chat_message", request_id=7)
    await assert_open(client)
    await client.close()


async def _revoke_scenario(node: App, redis_client: Redis, prefix: str, revoke: Any) -> None:
    """Member 4 (granted) and member 5 (granted) share order_50; ``revoke`` removes 4's grant."""
    room = "order_50"
    await redis_client.sadd(Keys(prefix).acl(room), "4", "5")
    member = await connect(url_of(node), "4", roles=["customer"])
    stayer = await connect(url_of(node), "5", roles=["manufacturer"])
    await member.join(room)
    await stayer.join(room)

    await revoke(room, "4")
    left = await member.expect("room_left", timeout_s=1.0)
    assert left == {"type": "room_left", "room": room, "reason": "access_revoked"}

    # The room goes on for the one still granted; the removed member gets nothing more from it.
    await say_and_echo(stayer, room, "after revoke")
    await member.send({"type": "ping", "request_id": "marker"})
    await member.expect("pong", request_id="marker")

    await member.send({"type": "chat_message", "room": room, "content": "still here?"})
    await expect_error(member, "not_joined", "chat_message", room=room)
    await member.send({"type": "join_room", "room": room})
    await expect_error(member, "forbidden", "join_room", room=room)
    await member.close()
    await stayer.close()


async def test_revoke_by_srem_removes_connected_member(node: App, redis_client: Redis, prefix: str) -> None:
    """An SREM on the room's acl removes a connected member within a second with reason access_revoked."""

    async def revoke(room: str, user_id: str) -> None:
        assert await redis_client.srem(Keys(prefix).acl(room), user_id) == 1

    await _revoke_scenario(node, redis_client, prefix, revoke)


async def test_hubctl_revoke_removes_connected_member(node: App, redis_client: Redis, prefix: str,
                                                      tmp_path: Any) -> None:
    """`hubctl revoke` removes a connected member within a second, who then stops receiving the room."""
    config_file = tmp_path / "hub.yaml"
    config_file.write_text("", encoding="utf-8")

    async def revoke(room: str, user_id: str) -> None:
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["--config", str(config_file), "revoke", room, user_id],
            env=hub_env(prefix))
        assert result.exit_code == 0, result.output
        assert f"revoked {room} from 1 user(s)" in result.output

    await _revoke_scenario(node, redis_client, prefix, revoke)


async def test_revoking_last_grant_keeps_other_members(node: App, redis_client: Redis, prefix: str) -> None:
    """Revoking the only grant of a room removes the granted member but not a support agent in it."""
    room = "support_60"
    await redis_client.sadd(Keys(prefix).acl(room), "6")
    owner = await connect(url_of(node), "6", roles=["customer"])
    agent = await connect(url_of(node), "101", roles=["support"])
    await owner.join(room)
    await agent.join(room)
    await redis_client.srem(Keys(prefix).acl(room), "6")  # the set becomes empty and is deleted
    left = await owner.expect("room_left", timeout_s=1.0)
    assert left["reason"] == "access_revoked"
    await say_and_echo(agent, room, "still open")
    await owner.send({"type": "ping", "request_id": "marker"})
    await owner.expect("pong", request_id="marker")
    await owner.close()
    await agent.close()
