"""Room names and access rules (pure: no I/O).

Names are parsed strictly: ASCII digits only, no leading zeros, canonical DM order, a length limit.
The parsed :class:`Room` carries the canonical name that both the ACL check and the Redis keys use,
so a name that passes the check can only ever address its own keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from hub.errors import Forbidden, InvalidRoom

_ID = r"[1-9][0-9]{0,17}"  # fits in a signed 64-bit integer; no leading zeros, ASCII only
_PATTERNS = {
    "order": re.compile(rf"order_({_ID})", re.ASCII),
    "quote": re.compile(rf"quote_({_ID})", re.ASCII),
    "support": re.compile(rf"support_({_ID})", re.ASCII),
    "user": re.compile(rf"user_({_ID})_({_ID})", re.ASCII),
    "channel": re.compile(r"channel_([a-z0-9][a-z0-9_-]{0,63})", re.ASCII),
}


class RoomKind(StrEnum):
    ORDER = "order"
    QUOTE = "quote"
    DIRECT = "user"
    SUPPORT = "support"
    CHANNEL = "channel"


@dataclass(frozen=True)
class Room:
    kind: RoomKind
    name: str  # canonical; equals the input exactly
    ids: tuple[int, ...] = ()


def parse_room(value: object, max_length: int = 128) -> Room:
    """Parse a client-supplied room name or raise :class:`InvalidRoom` saying why."""
    if not isinstance(value, str):
        raise InvalidRoom("room must be a string")
    if len(value) > max_length:
        raise InvalidRoom(f"room name longer than {max_length} characters")
    kind_text, sep, _ = value.partition("_")
    pattern = _PATTERNS.get(kind_text)
    if not sep or pattern is None:
        raise InvalidRoom("room must be order_{id}, quote_{id}, user_{a}_{b}, support_{id} or channel_{name}")
    match = pattern.fullmatch(value)
    if match is None:
        if kind_text == "channel":
            raise InvalidRoom("channel names are 1-64 of a-z, 0-9, '_' and '-', "
                              "starting with a letter or digit")
        second = " and a second id" if kind_text == "user" else ""
        raise InvalidRoom(f"{kind_text} rooms are {kind_text}_ followed by a decimal id{second} "
                          "(ASCII digits, no leading zero)")
    kind = RoomKind(kind_text)
    if kind is RoomKind.CHANNEL:
        return Room(kind, value)
    ids = tuple(int(g) for g in match.groups())
    if kind is RoomKind.DIRECT and not ids[0] < ids[1]:
        raise InvalidRoom("direct rooms are user_{a}_{b} with a < b (lower id first, two different users)")
    return Room(kind, value, ids)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection, from the verified token."""

    user_id: str
    roles: frozenset[str] = frozenset()
    # Rooms listed in the token's signed "rooms" claim (grants carried by the token itself).
    token_rooms: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(frozen=True)
class AccessRules:
    admin_all_rooms: bool = True
    channel_publish_roles: tuple[str, ...] = ()


def needs_grant(room: Room, who: Principal, rules: AccessRules) -> bool:
    """Whether reading ``room`` depends on a grant stored in Redis (the caller must look it up).

    Raises :class:`Forbidden` when no grant could admit ``who``; returns False when the rules alone
    admit them.
    """
    if rules.admin_all_rooms and who.is_admin:
        return False
    if room.name in who.token_rooms:
        return False
    if room.kind is RoomKind.CHANNEL:
        return False
    if room.kind is RoomKind.DIRECT:
        if who.user_id in (str(room.ids[0]), str(room.ids[1])):
            return False
        raise Forbidden("direct rooms are only for the two users they name")
    # Order, quote and support rooms: the backend's grant decides, except for the support role.
    return not (room.kind is RoomKind.SUPPORT and "support" in who.roles)


def check_publish(room: Room, who: Principal, rules: AccessRules) -> None:
    """Raise :class:`Forbidden` if ``who`` (already admitted to read) may not write to ``room``."""
    if room.kind is RoomKind.CHANNEL and rules.channel_publish_roles:
        if rules.admin_all_rooms and who.is_admin:
            return
        if not who.roles.intersection(rules.channel_publish_roles):
            raise Forbidden("your roles may not publish in this channel")
